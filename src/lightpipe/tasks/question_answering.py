"""question-answering: a question and a context -> the span of the context that answers it.

Extractive QA as transformers 5.2 does it (the last release with this pipeline):

- the question and the context are encoded as one pair (question first when the tokenizer pads on
  the right); a context too long for `max_seq_len` tokens is cut into overlapping windows, each
  window one model item of the same input, `doc_stride` tokens shared between neighbours;
- the model gives a start and an end logit per token; tokens that cannot be in an answer (the
  question, special tokens, padding) are masked, the CLS token excepted;
- per window, start and end logits go through a softmax over the allowed tokens, a span scores
  p(start) * p(end), spans longer than `max_answer_len` tokens or ending before they start are
  dropped, and the best spans become character spans of the context through the tokenizer's
  offsets (widened to whole words with `align_to_words`);
- answers with the same text (case-insensitive) found in several places or windows add their
  scores; with `handle_impossible_answer` the empty answer competes with the smallest CLS score
  of any window.
"""

from __future__ import annotations

import collections.abc
from typing import Any

import numpy as np
import torch

from ..checks import flag
from ..errors import InvalidInput
from ..runtime import ModelItem
from .base import TextPipeline
from .extractive import (DEFAULT_MAX_ANSWER_LEN, NO_NULL_SCORE, check_span_params, encode_windows,
                         pad_windows, pads, ranked, window_spans)

DEFAULT_MAX_SEQ_LEN = 384  # tokens per window, question and special tokens included
MAX_DOC_STRIDE = 128  # the default overlap is half a window, at most this many tokens
_MISSING = object()


def _char_span(encoding, s: int, e: int, sequence_index: int, align_to_words: bool) -> tuple[int, int]:
    """Token span [s, e] of a window -> [start, end) characters of the context.

    With `align_to_words` the span widens to the whole words of its first and last tokens; tokens
    outside any word (special tokens) fall back to plain token offsets.
    """
    if align_to_words:
        try:
            first, last = encoding.token_to_word(s), encoding.token_to_word(e)
            if first is not None and last is not None:
                first_chars = encoding.word_to_chars(first, sequence_index=sequence_index)
                last_chars = encoding.word_to_chars(last, sequence_index=sequence_index)
                if first_chars is not None and last_chars is not None:
                    return first_chars[0], last_chars[1]
        except (OverflowError, TypeError, ValueError, IndexError):
            pass
    offsets = encoding.offsets
    return offsets[s][0], offsets[e][1]


def _as_numpy(logits: torch.Tensor) -> np.ndarray:
    """(T,) logits -> numpy, which has no bfloat16 (other dtypes are kept as they are)."""
    return (logits.float() if logits.dtype == torch.bfloat16 else logits).numpy()


# ---------------------------------------------------------------------------------------- the pipeline
class QuestionAnsweringPipeline(TextPipeline):
    """pipe(question=..., context=...) -> {"score", "start", "end", "answer"}; see the module docstring."""

    task = "question-answering"
    preprocess_params = ("padding", "doc_stride", "max_question_len", "max_seq_len")
    postprocess_params = ("top_k", "handle_impossible_answer", "max_answer_len", "align_to_words")
    sequence_outputs = ("start_logits", "end_logits")

    # ------------------------------------------------------------------ parameters
    def check_params(self, params: dict[str, Any]) -> None:
        super().check_params(params)
        check_span_params(params)
        flag("align_to_words", params.get("align_to_words"))
        stride, window = params.get("doc_stride"), params.get("max_seq_len")
        if stride is not None and window is not None:
            self._check_stride(stride, window)

    @staticmethod
    def _check_stride(doc_stride: int, max_seq_len: int) -> None:
        if doc_stride >= max_seq_len:
            raise InvalidInput(
                f"doc_stride ({doc_stride}) must be smaller than max_seq_len ({max_seq_len}): it is the overlap "
                "between windows of max_seq_len tokens."
            )

    # ------------------------------------------------------------------ inputs
    def __call__(self, *args, question=_MISSING, context=_MISSING, **params):
        """pipe(question=..., context=...), pipe({"question": ..., "context": ...}), lists of either.

        Following transformers: a list of questions with one context asks each of them; lists of
        questions and contexts go pairwise; a list of exactly one input gives one result, not a list.
        A generator or dataset of dicts gives a stream of results.
        """
        # Each input is checked before any work, unless on_error keeps a bad one to its own place (preprocess
        # checks it again, as it checks a stream's).
        on_error = params.get("on_error") or self._defaults.get("on_error")
        inputs = self._gather(args, question, context, check_each=on_error in (None, "raise"))
        if self._is_stream(inputs):
            return super().__call__(inputs, **params)
        results = super().__call__(inputs, **params)
        return results[0] if len(inputs) == 1 and len(results) == 1 else results  # on_error='skip' may leave none

    def _gather(self, args: tuple, question: Any, context: Any, check_each: bool = True):
        """The call's inputs (as transformers' QuestionAnsweringArgumentHandler reads them) -> a list of
        checked {"question", "context"} dicts, or a stream left for preprocess to check."""
        given = question is not _MISSING or context is not _MISSING
        if args and given:
            raise InvalidInput("give the inputs either positionally or as question=/context=, not both.")
        if args:
            if len(args) == 1:
                inputs = args[0]
            elif len(args) == 2 and all(isinstance(a, str) for a in args):
                inputs = [{"question": args[0], "context": args[1]}]
            else:
                inputs = list(args)
        elif given:
            if question is _MISSING or context is _MISSING:
                missing = "context" if context is _MISSING else "question"
                raise InvalidInput(f"{missing}= is missing: call pipe(question=..., context=...).")
            if isinstance(question, list) and isinstance(context, str):
                inputs = [{"question": q, "context": context} for q in question]
            elif isinstance(question, list) and isinstance(context, list):
                if len(question) != len(context):
                    raise InvalidInput(f"got {len(question)} questions but {len(context)} contexts: give one context "
                                       "for all questions, or one context per question.")
                inputs = [{"question": q, "context": c} for q, c in zip(question, context)]
            elif isinstance(question, str) and isinstance(context, str):
                inputs = [{"question": question, "context": context}]
            else:
                raise InvalidInput(
                    "question and context must be strings, or a list of questions with one context string, or "
                    f"lists of questions and contexts of the same length; got {type(question).__name__} and "
                    f"{type(context).__name__}."
                )
        else:
            raise InvalidInput("no input: call pipe(question=..., context=...).")
        if self._is_stream(inputs):
            return inputs
        if isinstance(inputs, dict):
            inputs = [inputs]
        elif isinstance(inputs, (list, tuple)):
            inputs = list(inputs)
        else:
            raise InvalidInput('inputs must be given as question=..., context=..., or as dicts '
                               f'{{"question": ..., "context": ...}}; got {type(inputs).__name__}.')
        for item in inputs if check_each else ():
            self._example(item)
        return inputs

    def _example(self, item: Any) -> tuple[str, str]:
        if not isinstance(item, collections.abc.Mapping):
            raise InvalidInput('each input must be a dict {"question": ..., "context": ...}, '
                               f"not {type(item).__name__}.")
        missing = [k for k in ("question", "context") if k not in item]
        extra = sorted(map(str, set(item) - {"question", "context"}))
        if missing or extra:
            problem = f"missing {missing}" if missing else f"unexpected keys {extra}"
            raise InvalidInput(f'an input must be a dict {{"question": ..., "context": ...}}: {problem}.')
        for key in ("question", "context"):
            if item[key] is None:
                raise InvalidInput(f"{key} is None: give some text.")
        return self.check_text(item["question"], "question"), self.check_text(item["context"], "context")

    # ------------------------------------------------------------------ preprocess
    def preprocess(self, inputs, padding=None, doc_stride=None, max_question_len=None, max_seq_len=None):
        """One {"question", "context"} -> one model item per window of the context.

        `max_question_len` is accepted and ignored, as transformers' pipeline does with fast tokenizers.
        """
        question, context = self._example(inputs)
        if max_seq_len is None:
            max_seq_len = min(self.max_positions, DEFAULT_MAX_SEQ_LEN)
        if doc_stride is None:
            doc_stride = min(max_seq_len // 2, MAX_DOC_STRIDE)
        self._check_stride(doc_stride, max_seq_len)

        tokenizer = self.tokenizer
        # Question first, as transformers does when the tokenizer pads on the right; the context is cut.
        question_first = tokenizer.padding_side == "right"
        first, second = (question, context) if question_first else (context, question)
        context_index = 1 if question_first else 0
        windows = encode_windows(tokenizer, first, second, context_index, max_seq_len, doc_stride)
        if pads(padding):
            length = max_seq_len if padding == "max_length" else max(len(w.ids) for w in windows)
            pad_windows(tokenizer, windows, length, tokenizer.padding_side)

        cls_id = tokenizer.special_id("cls_token")
        items = []
        for window in windows:
            if len(window.ids) > self.max_positions:
                raise InvalidInput(f"a window of {len(window.ids)} tokens is longer than this model's "
                                   f"{self.max_positions} positions; pass a smaller max_seq_len.")
            ids = np.asarray(window.ids)
            # (T,) True where a token can be in an answer: the context's tokens, and CLS (which some
            # models use to say "no answer"). With the context first, transformers allows every token.
            if question_first:
                allowed = np.asarray([sid == 1 for sid in window.sequence_ids])
            else:
                allowed = np.ones(len(ids), dtype=bool)
            if cls_id is not None:
                allowed |= ids == cls_id
            pad_offset = int((ids == tokenizer.pad_token_id).sum()) if tokenizer.padding_side == "left" else 0
            items.append(ModelItem(self.features(window), meta={
                "encoding": window, "allowed": allowed, "context": context, "context_index": context_index,
                "pad_offset": pad_offset,
            }))
        return items

    # ------------------------------------------------------------------ forward
    def forward(self, batch):
        out = self.model(**batch)
        return {"start_logits": out["start_logits"], "end_logits": out["end_logits"]}  # (B, T) each

    # ------------------------------------------------------------------ postprocess
    def postprocess(self, outputs, metas, top_k=None, handle_impossible_answer=None, max_answer_len=None,
                    align_to_words=None):
        # None means "not given", as in transformers.
        top_k = 1 if top_k is None else top_k
        max_answer_len = DEFAULT_MAX_ANSWER_LEN if max_answer_len is None else max_answer_len
        align_to_words = True if align_to_words is None else align_to_words
        null_score = NO_NULL_SCORE
        # Some of the best spans may map to the same words: rank more than asked for when aligning.
        wanted = top_k * 2 + 10 if align_to_words else top_k
        answers: list[dict[str, Any]] = []
        for out, meta in zip(outputs, metas):
            encoding = meta["encoding"]
            allowed = meta["allowed"] & (np.asarray(encoding.attention_mask) == 1)
            spans = window_spans(_as_numpy(out["start_logits"]), _as_numpy(out["end_logits"]), allowed, wanted,
                                 max_answer_len)
            null_score = min(null_score, spans.null_score)
            context, shift = meta["context"], meta["pad_offset"]
            for s, e, score in spans:
                begin, stop = _char_span(encoding, s - shift, e - shift, meta["context_index"], align_to_words)
                text = context[begin:stop]
                same = next((a for a in answers if a["answer"].lower() == text.lower()), None)
                if same is not None:
                    same["score"] += score
                else:
                    answers.append({"score": score, "start": begin, "end": stop, "answer": text})
        null_answer = {"score": null_score, "start": 0, "end": 0, "answer": ""} if handle_impossible_answer else None
        answers = ranked(answers, top_k, null_answer)
        return answers[0] if len(answers) == 1 else answers

"""Extractive question answering: the machinery text QA and document QA share.

Both tasks encode (question, context) pairs, cut a long context into overlapping windows of at most
`max_seq_len` tokens, and score answer spans inside each window from the model's start and end logits,
as transformers 5.2's QuestionAnsweringPipeline does (its DocumentQuestionAnsweringPipeline reuses the same
span search). What differs stays in each task: what the context is (a string, or words with boxes) and how a
token span becomes an answer (characters of the string, or a run of words).

- `check_span_params`: the parameters both accept (top_k, lengths, doc_stride, padding,
  handle_impossible_answer), checked before any work;
- `encode_windows`, `pad_windows`: the pair -> Encodings, one per window;
- `window_spans`: one window's logits -> its best token spans with scores (and its "no answer" score);
- `ranked`: all windows' answers -> the best `top_k`, the empty answer competing when asked for.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ..checks import flag, positive_int
from ..errors import InvalidInput

DEFAULT_MAX_ANSWER_LEN = 15  # tokens
MASKED_LOGIT = -10000.0  # the logit a token that cannot be in an answer gets before the softmax
NO_NULL_SCORE = 1000000.0  # "no impossible-answer score seen yet": larger than any probability
PADDING_STRATEGIES = ("longest", "max_length", "do_not_pad")
_INTEGER_MINIMUMS = {"top_k": 1, "max_answer_len": 1, "max_seq_len": 1, "max_question_len": 1, "doc_stride": 0}


# ---------------------------------------------------------------------------------------- parameters
def check_span_params(params: dict[str, Any]) -> None:
    """The parameters of extractive QA (text and document): top_k, lengths and the window stride (integers),
    padding (a strategy) and handle_impossible_answer (a bool). Absent or None values are not checked."""
    for name, low in _INTEGER_MINIMUMS.items():
        positive_int(name, params.get(name), allow_none=True, minimum=low)
    flag("handle_impossible_answer", params.get("handle_impossible_answer"))
    padding = params.get("padding")
    if not (padding is None or isinstance(padding, bool) or padding in PADDING_STRATEGIES):
        raise InvalidInput(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', "
                           f"not {padding!r}.")


def pads(padding: Any) -> bool:
    """Whether a `padding` parameter asks for the windows to be padded (to the longest, or to max_seq_len)."""
    return padding in (True, "longest", "max_length")


# ---------------------------------------------------------------------------------------- windows
def encode_windows(tokenizer, first, second, context_index: int, max_seq_len: int, doc_stride: int,
                   what: str = "context", is_split_into_words: bool = False) -> list:
    """The pair (first, second) -> Encodings of at most max_seq_len tokens, the context (the sequence at
    `context_index`) cut into windows that overlap by doc_stride tokens; a context that fits gives one window.

    The tokenizer errors out (or panics) when the question leaves no room for the context, or the stride is
    not smaller than that room; those become InvalidInput naming `what` the context is, checked before it runs.
    """
    question = (first, second)[1 - context_index]
    kept = len(tokenizer.encode(question, add_special_tokens=False, is_split_into_words=is_split_into_words).ids)
    room = max_seq_len - tokenizer.num_special_tokens_to_add(pair=True) - kept  # context tokens per window
    if 0 <= doc_stride < room:
        cut = "only_second" if context_index == 1 else "only_first"
        encoding = tokenizer.encode(first, second, truncation=cut, max_length=max_seq_len, stride=doc_stride,
                                    is_split_into_words=is_split_into_words)
        return [encoding, *encoding.overflowing]
    whole = tokenizer.encode(first, second, is_split_into_words=is_split_into_words)
    if len(whole.ids) <= max_seq_len:  # nothing to cut: the tokenizer would not look at the stride
        return [whole]
    if room <= 0:
        raise InvalidInput(
            f"the question is {kept} tokens long, which leaves no room for the {what} in max_seq_len="
            f"{max_seq_len} tokens; pass a larger max_seq_len or a shorter question."
        )
    raise InvalidInput(
        f"doc_stride ({doc_stride}) must be smaller than the {room} {what} tokens each window holds "
        f"(max_seq_len={max_seq_len} minus the question and special tokens); pass a smaller doc_stride "
        "or a larger max_seq_len."
    )


def pad_windows(tokenizer, windows: list, length: int, side: str) -> None:
    """Pad every window to `length` tokens on `side`, as the tokenizer pads when asked to."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pad_token = tokenizer.special_tokens.get("pad_token", "[PAD]")
    for window in windows:
        window.pad(length, direction=side, pad_id=pad_id, pad_type_id=0, pad_token=pad_token)


# ---------------------------------------------------------------------------------------- span search
def softmax_allowed(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """(T,) logits -> (T,) probabilities; disallowed tokens get MASKED_LOGIT first, so almost nothing."""
    masked = np.where(allowed, logits, MASKED_LOGIT)
    exp = np.exp(masked - masked.max())
    return exp / exp.sum()


def best_spans(start: np.ndarray, end: np.ndarray, allowed: np.ndarray, top_k: int,
               max_answer_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The `top_k` best (start, end) token spans of one window, best first, with their scores.

    `start`, `end`: (T,) probabilities. `allowed`: (T,) bool, tokens that may be in an answer.
    A span's score is start[s] * end[e], kept only for s <= e < s + max_answer_len. Spans are ranked
    first, then those starting or ending on a disallowed token are dropped, so fewer than `top_k` may
    come back. Token 0 always counts as allowed when any token is (transformers' rule: its CLS token).
    """
    length = start.shape[0]
    scores = start[:, None] * end[None, :]  # (T, T): row = start token, column = end token
    scores = np.tril(np.triu(scores), max_answer_len - 1)
    flat = scores.reshape(-1)
    if top_k == 1:
        order = np.array([np.argmax(flat)])
    elif flat.shape[0] <= top_k:
        order = np.argsort(-flat)
    else:
        picked = np.argpartition(-flat, top_k)[:top_k]
        order = picked[np.argsort(-flat[picked])]
    starts, ends = order // length, order % length
    usable = np.flatnonzero(allowed)
    if usable.size:
        usable = np.union1d(usable, [0])
    keep = np.isin(starts, usable) & np.isin(ends, usable)
    starts, ends = starts[keep], ends[keep]
    return starts, ends, scores[starts, ends]


@dataclasses.dataclass
class WindowSpans:
    """The best token spans of one window, best first, and the window's "no answer" score."""

    starts: list[int]
    ends: list[int]
    scores: list[float]
    null_score: float  # p(start = CLS) * p(end = CLS)

    def __iter__(self):
        return zip(self.starts, self.ends, self.scores)


def window_spans(start_logits: np.ndarray, end_logits: np.ndarray, allowed: np.ndarray, top_k: int,
                 max_answer_len: int) -> WindowSpans:
    """(T,) start and end logits of one window -> its `top_k` best spans over the allowed tokens.

    Start and end go through a softmax over the allowed tokens; the span CLS..CLS gives the null score, and
    then CLS (token 0) is no span's start or end."""
    start = softmax_allowed(start_logits, allowed)
    end = softmax_allowed(end_logits, allowed)
    null_score = (start[0] * end[0]).item()
    start[0] = end[0] = 0.0
    starts, ends, scores = best_spans(start, end, allowed, top_k, max_answer_len)
    return WindowSpans(starts.tolist(), ends.tolist(), scores.tolist(), null_score)


def ranked(answers: list[dict[str, Any]], top_k: int, null_answer: dict[str, Any] | None = None) -> list[dict]:
    """Answers of every window -> the best `top_k` by score; `null_answer` (the empty answer, with the smallest
    null score of any window) competes when given. Equal scores keep their order (a stable sort)."""
    if null_answer is not None:
        answers = [*answers, null_answer]
    return sorted(answers, key=lambda a: a["score"], reverse=True)[:top_k]

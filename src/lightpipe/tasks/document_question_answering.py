"""document-question-answering: a page image (or its words with boxes) and a question -> the words that answer it.

LayoutLM (v1) as transformers' DocumentQuestionAnsweringPipeline runs it:

- the document is a list of words, each with a box (x0, y0, x1, y1) on a 0-1000 grid of the page:
  given as `word_boxes`, or read from the image by Tesseract (lightpipe.processing.ocr);
- the question, split on whitespace, and the words are tokenized as a pair of pre-split word lists
  (question first); a document too long for `max_seq_len` tokens is cut into overlapping windows, each
  window one model item of the same input, `doc_stride` tokens shared between neighbours;
- every token gets its word's box; the question's tokens and [CLS] get (0, 0, 0, 0), [SEP] gets
  (1000, 1000, 1000, 1000);
- start and end logits are scored as in extractive question answering (tasks/extractive.py, shared with
  text question answering): only the document's tokens (and CLS) may be in an answer, a span scores
  p(start) * p(end), at most `max_answer_len` tokens long;
- an answer is a run of whole words: `start` and `end` are WORD indices into the document's words, and
  `answer` is those words joined by spaces. Unlike text QA, equal answers are not merged.

The result of one input is always a list of answers, best first: [{"score", "answer", "start", "end"}].
"""

from __future__ import annotations

import collections.abc
import numbers
from typing import Any

import numpy as np
import torch

from ..errors import InvalidInput, UnsupportedModel
from ..processing.ocr import GRID, check_ocr_options, ocr_words
from ..processing.sources import check_timeout
from ..runtime import ModelItem, Padding
from .base import TextPipeline
from .extractive import (DEFAULT_MAX_ANSWER_LEN, NO_NULL_SCORE, check_span_params, encode_windows, pad_windows, pads,
                         ranked, window_spans)

MAX_DOC_STRIDE = 256  # the default overlap is half a window, at most this many tokens
QUESTION_BOX = [0, 0, 0, 0]  # the box of the question's tokens, CLS and padding
SEP_BOX = [GRID] * 4  # the box of separator tokens
INPUT_KEYS = ("image", "question", "word_boxes")
_MISSING = object()


class DocumentQuestionAnsweringPipeline(TextPipeline):
    """pipe(image=..., question=...) -> [{"score", "answer", "start", "end"}, ...]; see the module docstring."""

    task = "document-question-answering"
    components = ("tokenizer",)  # LayoutLM v1 reads no pixels: the image only goes through OCR
    input_kinds = ("image",)  # the document image is decoded for OCR: max_image_pixels applies
    file_is_one_input = True  # an open page file is one image, not a stream of inputs
    preprocess_params = ("padding", "doc_stride", "max_question_len", "max_seq_len", "lang", "tesseract_config",
                         "timeout")
    postprocess_params = ("top_k", "max_answer_len", "handle_impossible_answer")
    sequence_outputs = ("start_logits", "end_logits")

    def __init__(self, model, tokenizer=None, **kwargs):
        if tokenizer is not None and tokenizer.padding_side != "right":
            raise UnsupportedModel(
                f"document-question-answering needs a tokenizer that pads on the right, but {tokenizer.name_or_path} "
                f"pads on the {tokenizer.padding_side}; set \"padding_side\": \"right\" in its tokenizer_config.json."
            )
        super().__init__(model, tokenizer, **kwargs)
        self.cls_id, self.sep_id = self._cls_and_sep_ids() if tokenizer is not None else (None, None)
        if tokenizer is not None:
            self._check_token_types()

    def _cls_and_sep_ids(self) -> tuple[int | None, int | None]:
        """The ids of the classifier token (which may answer "no answer") and of the separator (box 1000s).

        They come from the checkpoint's special tokens. A checkpoint that names none (a tokenizer.json alone, or
        a tokenizer_config.json without them) still has them in transformers, as its tokenizer class's defaults
        ([CLS]/[SEP] for BERT-like, <s>/</s> for RoBERTa-like vocabularies); those are the tokens the
        tokenizer's template puts first and last around a pair, so they are read from an encoded pair."""
        cls_id, sep_id = self.tokenizer.special_id("cls_token"), self.tokenizer.special_id("sep_token")
        if cls_id is not None and sep_id is not None:
            return cls_id, sep_id
        pair = self.tokenizer.encode(["a"], ["b"], is_split_into_words=True)
        if cls_id is None and pair.sequence_ids[0] is None:
            cls_id = pair.ids[0]
        if sep_id is None and pair.sequence_ids[-1] is None:
            sep_id = pair.ids[-1]
        return cls_id, sep_id

    def _check_token_types(self) -> None:
        """UnsupportedModel when the tokenizer gives the document a token type the model has no embedding for
        (e.g. a BERT vocabulary, whose second sequence is type 1, with type_vocab_size=1): every call would fail."""
        types = getattr(self.model.config, "type_vocab_size", None)
        if types is None:
            return
        pair = self.tokenizer.encode(["a"], ["b"], is_split_into_words=True)
        if max(pair.type_ids, default=0) >= types:
            raise UnsupportedModel(
                f"the tokenizer of {self.tokenizer.name_or_path} gives token type ids up to {max(pair.type_ids)} to a "
                f"(question, document) pair, but the model has type_vocab_size={types}: the tokenizer does not "
                "belong to this model."
            )

    def collate_padding(self) -> Padding:
        text = super().collate_padding()
        # Padded tokens get the box (0, 0, 0, 0), as transformers pads "bbox" in a batch.
        return Padding(values={**text.values, "bbox": 0}, side=text.side, sequence_outputs=text.sequence_outputs)

    # ------------------------------------------------------------------ parameters
    def check_params(self, params: dict[str, Any]) -> None:
        super().check_params(params)
        check_span_params(params)
        check_ocr_options(params.get("lang"), params.get("tesseract_config"))
        if params.get("timeout") is not None:
            check_timeout(params["timeout"])

    # ------------------------------------------------------------------ inputs
    def __call__(self, image=_MISSING, question=None, word_boxes=None, **params):
        """pipe(image, question), pipe(image=..., question=..., word_boxes=...), pipe({"image", "question",
        "word_boxes"}), a list of such dicts (a list of results), or a generator / dataset of them (a stream).

        `image`: a path, URL, PIL image, bytes, base64 string or array (see processing.image_io.load_image), or
        None (or left out) when `word_boxes` are given. `word_boxes`: [(word, [x0, y0, x1, y1]), ...] with
        integer boxes on the 0-1000 grid of the page (items past the box are ignored, as transformers ignores
        them); when given, no OCR runs and the image is not opened. Input dicts may carry other keys (a data
        set's ids, answers ...): they are ignored, as in transformers.
        """
        # A list's dicts are checked before any work, unless on_error keeps a bad one to its own place (preprocess
        # checks it again, as it checks a stream's).
        on_error = params.get("on_error") or self._defaults.get("on_error")
        return super().__call__(self._gather(image, question, word_boxes, check_each=on_error in (None, "raise")),
                                **params)

    def _gather(self, image: Any, question: Any, word_boxes: Any, check_each: bool = True):
        """The call's arguments -> one checked input dict, a list of them, or a stream left to preprocess."""
        if image is _MISSING:
            if question is None:
                raise InvalidInput("no input: call pipe(image=..., question=...).")
            image = None  # pipe(question=..., word_boxes=...): the words need no image
        if question is not None:
            if not isinstance(question, str):
                raise InvalidInput(f"question must be a string, not {type(question).__name__}; to ask several "
                                   'questions pass a list of dicts [{"image": ..., "question": ...}, ...].')
            inputs = {"image": image, "question": question}
            if word_boxes is not None:
                inputs["word_boxes"] = word_boxes
            self._example(inputs)
            return inputs
        if word_boxes is not None:
            raise InvalidInput("word_boxes= was given without a question: call pipe(image=..., question=..., "
                               "word_boxes=...).")
        if self._is_stream(image):
            return image
        if isinstance(image, collections.abc.Mapping):
            self._example(image)
            return image
        if isinstance(image, (list, tuple)):
            for item in image if check_each else ():
                self._example(item)
            return list(image)
        raise InvalidInput("the question is missing: call pipe(image=..., question='...'), or pass dicts "
                           '{"image": ..., "question": ..., "word_boxes": ...}.')

    def _example(self, item: Any) -> tuple[Any, str, Any]:
        """One input dict -> (image, question, word_boxes or None), its shape checked (the image is not opened)."""
        if not isinstance(item, collections.abc.Mapping):
            raise InvalidInput('each input must be a dict {"image": ..., "question": ...} (word_boxes optional), '
                               f"not {type(item).__name__}.")
        # Other keys are ignored, as transformers ignores them: rows of a data set carry ids, answers ...
        extra = sorted(map(str, set(item) - set(INPUT_KEYS)))
        if "question" not in item:
            also = f" (it has {extra})" if extra else ""
            raise InvalidInput(f'an input must be a dict {{"image": ..., "question": ..., "word_boxes": ...}}: '
                               f"no question{also}.")
        if item["question"] is None:
            raise InvalidInput("question is None: give some text.")
        question = self.check_text(item["question"], "question")
        image, word_boxes = item.get("image"), item.get("word_boxes")
        if image is None and word_boxes is None:
            also = f" (the keys {extra} are not read)" if extra else ""
            raise InvalidInput("give an image (its words are read by OCR) or "
                               f"word_boxes=[(word, [x0, y0, x1, y1]), ...]{also}.")
        return image, question, word_boxes

    def _checked_word_boxes(self, word_boxes: Any) -> tuple[list[str], list[list[int]]]:
        """[(word, [x0, y0, x1, y1]), ...] -> (words, boxes); every box four integers inside the grid, x0 <= x1,
        y0 <= y1."""
        # Any sequence, array or iterator of pairs, as transformers iterates it; not a string or a dict.
        if not _is_list_like(word_boxes) and not isinstance(word_boxes, collections.abc.Iterator):
            raise InvalidInput(f"word_boxes must be a list of (word, [x0, y0, x1, y1]) pairs, not "
                               f"{type(word_boxes).__name__}.")
        limit = getattr(self.model.config, "max_2d_position_embeddings", GRID + 1)
        words, boxes = [], []
        for i, pair in enumerate(word_boxes):
            # transformers reads pair[0] and pair[1]: more items (an OCR confidence ...) are ignored.
            if not _is_list_like(pair) or len(pair) < 2:
                raise InvalidInput(f"word_boxes[{i}] must be a pair (word, [x0, y0, x1, y1]), not {pair!r}.")
            word, box = pair[0], pair[1]
            if not isinstance(word, str):
                raise InvalidInput(f"word_boxes[{i}]: the word must be a string, not {type(word).__name__}.")
            words.append(word)
            boxes.append(_checked_box(box, limit, f"word_boxes[{i}] ({word!r})"))
        return words, boxes

    # ------------------------------------------------------------------ preprocess
    def preprocess(self, inputs, padding=None, doc_stride=None, max_question_len=None, max_seq_len=None, lang=None,
                   tesseract_config=None, timeout=None):
        """One input -> one model item per window of its words.

        `max_question_len` is accepted and ignored: transformers' pipeline accepts it but does not use it.
        """
        image, question, word_boxes = self._example(inputs)
        if word_boxes is not None:
            words, boxes = self._checked_word_boxes(word_boxes)
        else:
            from ..processing.image_io import load_image

            words, boxes = ocr_words(load_image(image, timeout=timeout), lang=lang,
                                     tesseract_config=tesseract_config or "")
        if max_seq_len is None:
            max_seq_len = self.max_positions
        if doc_stride is None:
            doc_stride = min(max_seq_len // 2, MAX_DOC_STRIDE)

        if words:
            windows = encode_windows(self.tokenizer, question.split(), words, 1, max_seq_len, doc_stride,
                                     what="document", is_split_into_words=True)
        else:
            windows = [self._question_alone(question, max_seq_len)]
        if pads(padding):
            length = max_seq_len if padding == "max_length" else max(len(w.ids) for w in windows)
            pad_windows(self.tokenizer, windows, length, "right")

        cls_id, sep_id = self.cls_id, self.sep_id
        items = []
        for window in windows:
            if len(window.ids) > self.max_positions:
                raise InvalidInput(f"a window of {len(window.ids)} tokens is longer than this model's "
                                   f"{self.max_positions} positions; pass max_seq_len={self.max_positions} or less.")
            ids = np.asarray(window.ids)
            in_document = np.asarray([sid == 1 for sid in window.sequence_ids], dtype=bool)
            # (T,) True where a token may be in an answer: the document's tokens, and CLS (which some models
            # use to say "no answer").
            allowed = in_document | (ids == cls_id) if cls_id is not None else in_document
            token_boxes = [boxes[word] if inside else (SEP_BOX if token == sep_id else QUESTION_BOX)
                           for token, inside, word in zip(window.ids, in_document, window.word_ids)]
            features = self.features(window, with_types=True)  # transformers always passes token_type_ids
            features["bbox"] = torch.tensor(token_boxes, dtype=torch.long).reshape(len(ids), 4)  # (T, 4)
            items.append(ModelItem(features, meta={
                "allowed": allowed & (np.asarray(window.attention_mask) == 1),
                "word_ids": window.word_ids,
                "words": words,
            }))
        return items

    def _question_alone(self, question: str, max_seq_len: int):
        """The window of a document without words. transformers' tokenizer reads an empty list of words as no
        second sequence, so the question is encoded alone, with a single text's special tokens ([CLS] q [SEP],
        not [CLS] q [SEP] [SEP]). That changes the logits, and so the score of a question's own literal "[CLS]"
        or "<s>", which may answer (with no words); plain questions give only the "no answer" score, 1."""
        encoding = self.tokenizer.encode(question.split(), is_split_into_words=True)
        if len(encoding.ids) > max_seq_len:  # transformers fails in the tokenizer ("Second sequence not provided")
            raise InvalidInput(f"the question is {len(encoding.ids)} tokens long, more than max_seq_len={max_seq_len} "
                               "(and the document has no words); pass a larger max_seq_len or a shorter question.")
        return encoding

    # ------------------------------------------------------------------ forward
    def forward(self, batch):
        out = self.model(**batch)
        return {"start_logits": out["start_logits"], "end_logits": out["end_logits"]}  # (B, T) each

    # ------------------------------------------------------------------ postprocess
    def postprocess(self, outputs, metas, top_k=None, max_answer_len=None, handle_impossible_answer=None):
        # None means "not given", as in transformers.
        top_k = 1 if top_k is None else top_k
        max_answer_len = DEFAULT_MAX_ANSWER_LEN if max_answer_len is None else max_answer_len
        null_score = NO_NULL_SCORE
        answers: list[dict[str, Any]] = []
        for out, meta in zip(outputs, metas):
            spans = window_spans(out["start_logits"].float().numpy(), out["end_logits"].float().numpy(),
                                 meta["allowed"], top_k, max_answer_len)
            null_score = min(null_score, spans.null_score)
            word_ids, words = meta["word_ids"], meta["words"]
            for s, e, score in spans:
                first, last = word_ids[s], word_ids[e]
                if first is None or last is None:  # a span starting or ending on CLS: no words
                    continue
                answers.append({"score": score, "answer": " ".join(words[first:last + 1]), "start": first,
                                "end": last})
        null_answer = {"score": null_score, "answer": "", "start": 0, "end": 0} if handle_impossible_answer else None
        return ranked(answers, top_k, null_answer)


def _checked_box(box: Any, limit: int, where: str) -> list[int]:
    """A box (x0, y0, x1, y1) -> four ints; InvalidInput unless they are integers in [0, limit), x0 <= x1, y0 <= y1."""
    if isinstance(box, (str, bytes)) or not isinstance(box, collections.abc.Sequence) and not hasattr(box, "tolist"):
        raise InvalidInput(f"{where}: the box must be [x0, y0, x1, y1], not {box!r}.")
    values = box.tolist() if hasattr(box, "tolist") else list(box)
    if len(values) != 4 or not all(_is_whole(v) for v in values):
        raise InvalidInput(f"{where}: the box must be four integers [x0, y0, x1, y1] on the 0-{GRID} grid of the "
                           f"page, not {box!r}.")
    x0, y0, x1, y1 = (int(v) for v in values)
    if min(x0, y0, x1, y1) < 0 or max(x0, y0, x1, y1) >= limit or x1 < x0 or y1 < y0:
        raise InvalidInput(
            f"{where}: the box {[x0, y0, x1, y1]} must lie in 0..{limit - 1} with x0 <= x1 and y0 <= y1; "
            f"boxes are given on a {GRID}x{GRID} grid of the page: int({GRID} * x / width), int({GRID} * y / height)."
        )
    return [x0, y0, x1, y1]


def _is_list_like(value: Any) -> bool:
    """A list, tuple or array (numpy, torch), but not text or a dict."""
    if isinstance(value, (str, bytes, collections.abc.Mapping)):
        return False
    return isinstance(value, collections.abc.Sequence) or (hasattr(value, "__len__") and hasattr(value, "tolist"))


def _is_whole(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):
        return True
    return isinstance(value, numbers.Real) and float(value).is_integer()

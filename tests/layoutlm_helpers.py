"""Tiny random LayoutLM checkpoints built with transformers (the oracle), and documents to ask about."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from helpers import bert_vocab_folder, bpe_vocab_folder, randomize

SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
             max_position_embeddings=128)


def bpe_prefix_space_folder(folder: Path) -> Path:
    """A byte-level BPE vocabulary whose tokenizer adds a prefix space, as impira/layoutlm-document-qa's
    RoBERTa tokenizer does (pre-split words need it)."""
    from transformers import RobertaTokenizerFast

    bpe_vocab_folder(folder)
    tok = RobertaTokenizerFast(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                               add_prefix_space=True)
    tok.model_max_length = 512
    tok.save_pretrained(str(folder))
    return folder


def layoutlm_checkpoint(folder: Path, vocab: str = "bert", head: str = "qa", seed: int = 0, **overrides) -> Path:
    """Save a tiny random LayoutLM (`head` "qa": LayoutLMForQuestionAnswering, "base": LayoutLMModel) and its
    tokenizer ("bert": WordPiece, lower case; "bpe": RoBERTa-style byte-level BPE) into `folder`; `overrides`
    change the config's sizes and settings."""
    import transformers

    if vocab == "bert":
        bert_vocab_folder(folder)
        extra = {}
    else:
        bpe_prefix_space_folder(folder)
        extra = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2)
    vocab_size = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]) + 8
    config = transformers.LayoutLMConfig(vocab_size=vocab_size, **{**SIZES, **extra, **overrides})
    torch.manual_seed(seed)
    cls = transformers.LayoutLMForQuestionAnswering if head == "qa" else transformers.LayoutLMModel
    model = randomize(cls(config), seed)
    model.save_pretrained(str(folder))
    return folder


# A long "document": words laid out in lines on a page, with some words the tiny vocabularies must split.
DOCUMENT = (
    "invoice number us-001 date 2024-03-15 the company apple is in paris france and john smith works at google "
    "in london since 1998 . mary lives in berlin germany , total due : 154.06 eur . the river flows through the "
    "old city at night ; what a great day"
).split()


def page_boxes(words: list[str], per_line: int = 6) -> list[list[int]]:
    """Boxes (0-1000 grid) for words written left to right, `per_line` words a line."""
    boxes = []
    for i, word in enumerate(words):
        line, column = divmod(i, per_line)
        x0, y0 = 40 + 155 * column, 30 + 45 * line
        boxes.append([x0, y0, x0 + min(140, 14 * len(word)), y0 + 25])
    return boxes


def word_boxes(words: list[str] = DOCUMENT) -> list[tuple[str, list[int]]]:
    return list(zip(words, page_boxes(words)))


# An invoice-like page: lines of words in a large, clear font, so that Tesseract reads them exactly.
INVOICE_LINES = (
    ("INVOICE",),
    ("Invoice", "number:", "US-001"),
    ("Date:", "2024-03-15"),
    ("Total", "due:", "154.06", "EUR"),
)


def page_font(size: int = 34):
    """A TrueType font found on the machine (DejaVu Sans, else Pillow's own scalable default)."""
    from PIL import ImageFont

    for name in ("DejaVuSans.ttf", "LiberationSans-Regular.ttf", "Arial.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def render_page(lines=INVOICE_LINES, size=(900, 560)):
    """-> (RGB PIL image, words in reading order, their boxes in pixels) for black words on a white page."""
    from PIL import Image, ImageDraw

    font = page_font()
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    space = draw.textlength(" ", font=font)
    words, boxes = [], []
    for row, line in enumerate(lines):
        x, y = 50.0, 50 + 125 * row
        for word in line:
            draw.text((x, y), word, fill="black", font=font)
            words.append(word)
            boxes.append(draw.textbbox((x, y), word, font=font))
            x += draw.textlength(word, font=font) + space
    return image, words, boxes


SCORE_ATOL = 1e-4


def assert_same(got, expected, atol=SCORE_ATOL):
    """Document-QA answers: answers, word indices and order equal; scores within atol."""
    import pytest

    if isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), (got, expected)
        for g, e in zip(got, expected):
            assert_same(g, e, atol)
        return
    assert list(got) == list(expected), (got, expected)  # same keys, in the reference's order
    assert (got["answer"], got["start"], got["end"]) == (expected["answer"], expected["start"], expected["end"]), \
        (got, expected)
    assert type(got["score"]) is float and got["score"] == pytest.approx(expected["score"], abs=atol), (got, expected)

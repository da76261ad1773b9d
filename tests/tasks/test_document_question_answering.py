"""document-question-answering parity with transformers' pipeline on tiny random LayoutLM checkpoints.

Word boxes given by the caller need no OCR; the OCR path runs Tesseract on a rendered invoice, in both
lightpipe and transformers (through pytesseract).
"""

from __future__ import annotations

import io

import pytest

from layoutlm_helpers import DOCUMENT, assert_same, layoutlm_checkpoint, render_page, word_boxes
from lightpipe import InvalidInput, MissingDependency, UnsupportedModel, pipeline

VOCABS = ("bert", "bpe")  # WordPiece (microsoft/layoutlm-base style), RoBERTa BPE (impira/layoutlm-document-qa style)
QUESTIONS = ["what is the invoice number?", "Where does John work?", "What is the total due?"]
SHORT = word_boxes(DOCUMENT[:20])  # fits one window of the tiny models' 128 positions
LONG = word_boxes()  # ~120-170 tokens: cut into windows
WINDOWS = {"max_seq_len": 48, "doc_stride": 8}  # 4-8 windows of LONG

# name -> (keyword arguments of the call besides image/question/word_boxes, which document)
CASES = {
    "defaults": ({}, SHORT),
    "top3": ({"top_k": 3}, SHORT),
    "impossible": ({"handle_impossible_answer": True, "top_k": 2}, SHORT),
    "max-answer-len": ({"max_answer_len": 2, "top_k": 4}, SHORT),
    "windows": (WINDOWS, LONG),
    "windows-top3": ({"top_k": 3, **WINDOWS}, LONG),
    "windows-impossible": ({"top_k": 5, "handle_impossible_answer": True, **WINDOWS}, LONG),
    "windows-small-stride": ({"top_k": 2, "max_seq_len": 40, "doc_stride": 3, "max_answer_len": 4}, LONG),
    "windows-pad-max-length": ({"top_k": 3, "padding": "max_length", **WINDOWS}, LONG),
    "windows-pad-longest": ({"top_k": 3, "padding": True, **WINDOWS}, LONG),
    "window-128": ({"top_k": 3, "max_seq_len": 128}, LONG),  # one window (WordPiece) or two (BPE)
    "no-words": ({"top_k": 3}, []),
    "no-words-impossible": ({"handle_impossible_answer": True}, []),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {vocab: layoutlm_checkpoint(tmp_path_factory.mktemp(f"docqa-{vocab}"), vocab) for vocab in VOCABS}


@pytest.fixture(scope="module")
def pipes(folders):
    return {vocab: pipeline("document-question-answering", model=str(folder)) for vocab, folder in folders.items()}


@pytest.fixture(scope="module")
def references(folders):
    import transformers

    transformers.logging.set_verbosity_error()
    return {vocab: transformers.pipeline("document-question-answering", model=str(folder))
            for vocab, folder in folders.items()}


# ---------------------------------------------------------------------------------------- parity, word_boxes
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_word_boxes_equal_transformers(pipes, references, vocab, case):
    kwargs, document = CASES[case]
    for question in QUESTIONS:
        expected = references[vocab](image=None, question=question, word_boxes=document, **kwargs)
        got = pipes[vocab](image=None, question=question, word_boxes=document, **kwargs)
        assert_same(got, expected)
    if document:
        assert got, "a document with words gives answers"
    windows = len(pipes[vocab].preprocess({"question": QUESTIONS[0], "word_boxes": document},
                                          **{k: v for k, v in kwargs.items() if k in ("max_seq_len", "doc_stride")}))
    if kwargs.get("max_seq_len", 128) < 128:
        assert windows >= 4, "the long document is cut into several windows"
    elif document is not LONG:
        assert windows == 1


@pytest.mark.parametrize("vocab", VOCABS)
def test_batches_equal_single_calls_and_transformers(pipes, references, vocab):
    inputs = [{"image": None, "question": q, "word_boxes": doc} for q in QUESTIONS for doc in (SHORT, LONG)]
    params = {"top_k": 2, **WINDOWS}
    expected = references[vocab](inputs, **params)
    one = pipes[vocab](inputs, batch_size=1, **params)
    four = pipes[vocab](inputs, batch_size=4, **params)
    assert len(one) == len(inputs) and all(isinstance(r, list) for r in one)
    assert_same(one, expected)
    assert_same(four, one, atol=1e-5)
    streamed = list(pipes[vocab]((x for x in inputs), batch_size=3, **params))
    assert_same(streamed, one, atol=1e-5)


def test_call_forms(pipes):
    pipe = pipes["bert"]
    question = QUESTIONS[0]
    expected = pipe(image=None, question=question, word_boxes=LONG, **WINDOWS)
    assert isinstance(expected, list) and len(expected) == 1
    assert_same(pipe(None, question, LONG, **WINDOWS), expected, atol=0)
    assert_same(pipe({"image": None, "question": question, "word_boxes": LONG}, **WINDOWS), expected, atol=0)
    assert_same(pipe([{"question": question, "word_boxes": LONG}], **WINDOWS), [expected], atol=0)
    # Boxes as tuples, numpy integers or whole floats read the same.
    import numpy as np
    as_numpy = [(w, np.asarray(b, dtype=np.int64)) for w, b in LONG]
    as_floats = [(w, tuple(float(v) for v in b)) for w, b in LONG]
    for boxes in (as_numpy, as_floats):
        assert_same(pipe(image=None, question=question, word_boxes=boxes, **WINDOWS), expected, atol=0)
    # An image given with word_boxes is not needed by LayoutLM v1, so it is not opened.
    assert_same(pipe(image="no-such-page.png", question=question, word_boxes=LONG, **WINDOWS), expected, atol=0)
    # max_question_len is accepted and, as in transformers' code, has no effect.
    assert_same(pipe(image=None, question=question, word_boxes=LONG, max_question_len=3, **WINDOWS), expected, atol=0)


def test_defaults_at_construction_and_default_window(folders, references):
    pipe = pipeline("document-question-answering", model=str(folders["bert"]), top_k=3)
    got = pipe(image=None, question=QUESTIONS[1], word_boxes=LONG)
    # transformers' default window is the tokenizer's 512 tokens, longer than this model's 128 positions (its
    # model fails); lightpipe's default is the model's limit.
    expected = references["bert"](image=None, question=QUESTIONS[1], word_boxes=LONG, max_seq_len=128, top_k=3)
    assert_same(got, expected)
    assert len(got) == 3


# ---------------------------------------------------------------------------------------- OCR
@pytest.fixture(scope="module")
def page_file(tmp_path_factory):
    image, words, _ = render_page()
    path = tmp_path_factory.mktemp("page") / "invoice.png"
    image.save(path)
    return path, words


def test_ocr_path_equals_transformers_and_answers_with_page_words(pipes, references, page_file):
    from lightpipe.processing.image_io import load_image
    from lightpipe.processing.ocr import ocr_words

    path, rendered = page_file
    question = "What is the invoice number?"
    got = pipes["bert"](image=str(path), question=question, top_k=3)
    expected = references["bert"](image=str(path), question=question, top_k=3)
    assert_same(got, expected)
    words, boxes = ocr_words(load_image(str(path)))
    assert got and all(" ".join(words[a["start"]:a["end"] + 1]) == a["answer"] for a in got)
    assert all(set(a["answer"].split()) <= set(rendered) for a in got)
    # The same page read by OCR and given as word_boxes, batched: each answer as alone.
    mixed = [{"image": str(path), "question": question}, {"question": question, "word_boxes": list(zip(words, boxes))}]
    both = pipes["bert"](mixed, top_k=3, batch_size=2)
    assert_same(both, [got, got], atol=1e-5)


def test_missing_tesseract_is_missing_dependency(pipes, page_file, monkeypatch, tmp_path):
    pipe = pipes["bert"]
    monkeypatch.setenv("PATH", str(tmp_path))  # no tesseract program to run
    with pytest.raises(MissingDependency, match="word_boxes"):
        pipe(image=str(page_file[0]), question="What is the invoice number?")
    assert pipe(image=None, question=QUESTIONS[0], word_boxes=SHORT)  # still answers


# ---------------------------------------------------------------------------------------- bad input
def truncated_jpeg() -> bytes:
    image, _, _ = render_page()
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    data = buffer.getvalue()
    return data[: len(data) // 2]


BAD_CALLS = {
    "no question": lambda p: p(image=None, word_boxes=SHORT),
    "image only": lambda p: p("page.png"),
    "question None in dict": lambda p: p({"image": None, "question": None, "word_boxes": SHORT}),
    "empty question": lambda p: p(image=None, question="   ", word_boxes=SHORT),
    "question list": lambda p: p(image=None, question=QUESTIONS, word_boxes=SHORT),
    "no image nor words": lambda p: p(image=None, question="what?"),
    "unknown key": lambda p: p({"question": "what?", "wordboxes": SHORT}),
    "not a dict": lambda p: p(["what?"]),
    "non-image": lambda p: p(image=42, question="what?"),
    "missing file": lambda p: p(image="no/such/page.png", question="what?"),
    "truncated jpeg": lambda p: p(image=truncated_jpeg(), question="what?"),
    "word_boxes not a list": lambda p: p(image=None, question="what?", word_boxes="invoice"),
    "pair without box": lambda p: p(image=None, question="what?", word_boxes=[("invoice",)]),
    "word not text": lambda p: p(image=None, question="what?", word_boxes=[(7, [0, 0, 1, 1])]),
    "three coordinates": lambda p: p(image=None, question="what?", word_boxes=[("a", [0, 0, 1])]),
    "fractional box": lambda p: p(image=None, question="what?", word_boxes=[("a", [0.5, 0, 1, 1])]),
    "box off the grid": lambda p: p(image=None, question="what?", word_boxes=[("a", [0, 0, 1200, 10])]),
    "inverted box": lambda p: p(image=None, question="what?", word_boxes=[("a", [50, 0, 10, 10])]),
    "top_k 0": lambda p: p(image=None, question="what?", word_boxes=SHORT, top_k=0),
    "negative stride": lambda p: p(image=None, question="what?", word_boxes=SHORT, doc_stride=-1),
    "stride too large": lambda p: p(image=None, question="what?", word_boxes=LONG, max_seq_len=24, doc_stride=20),
    "question too long": lambda p: p(image=None, question=" ".join(DOCUMENT), word_boxes=LONG, max_seq_len=24),
    "window too long": lambda p: p(image=None, question="what?", word_boxes=word_boxes(DOCUMENT * 2), max_seq_len=400),
    "impossible not bool": lambda p: p(image=None, question="what?", word_boxes=SHORT, handle_impossible_answer="y"),
    "bad padding": lambda p: p(image=None, question="what?", word_boxes=SHORT, padding="all"),
    "bad lang": lambda p: p(image=None, question="what?", word_boxes=SHORT, lang=3),
    "bad timeout": lambda p: p(image=None, question="what?", word_boxes=SHORT, timeout=0),
    "unknown parameter": lambda p: p(image=None, question="what?", word_boxes=SHORT, topk=2),
}


def test_bad_inputs_are_invalid_input_and_the_pipeline_keeps_answering(pipes, references):
    pipe = pipes["bert"]
    before = pipe(image=None, question=QUESTIONS[0], word_boxes=LONG, top_k=2, **WINDOWS)
    for name, call in BAD_CALLS.items():
        with pytest.raises(InvalidInput):
            call(pipe)
            pytest.fail(f"{name}: no error")
    after = pipe(image=None, question=QUESTIONS[0], word_boxes=LONG, top_k=2, **WINDOWS)
    assert_same(after, before, atol=0)


def test_left_padding_tokenizer_is_refused(folders, tmp_path):
    import json
    import shutil

    folder = tmp_path / "left"
    shutil.copytree(folders["bert"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    with pytest.raises(UnsupportedModel, match="padding_side"):
        pipeline("document-question-answering", model=str(folder))

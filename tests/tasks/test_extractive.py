"""The extractive-QA machinery shared by question-answering and document-question-answering (tasks/extractive.py).

The tasks' parity with transformers is tested in test_question_answering.py and
test_document_question_answering.py; these tests pin the helpers' own contracts."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import bert_vocab_folder
from lightpipe import InvalidInput
from lightpipe.processing.text import Tokenizer
from lightpipe.tasks import extractive
from lightpipe.tasks.extractive import (best_spans, check_span_params, encode_windows, pad_windows,
                                        ranked, softmax_allowed, window_spans)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_folder(bert_vocab_folder(tmp_path_factory.mktemp("vocab")))


@pytest.mark.parametrize("params, message", [
    ({"top_k": 0}, "top_k must be a positive integer"),
    ({"max_answer_len": True}, "max_answer_len must be a positive integer"),
    ({"max_seq_len": 1.5}, "max_seq_len must be a positive integer"),
    ({"doc_stride": -1}, "doc_stride must be a non-negative integer"),
    ({"handle_impossible_answer": "yes"}, "handle_impossible_answer must be True or False"),
    ({"padding": "left"}, "padding must be"),
])
def test_check_span_params_refuses(params, message):
    with pytest.raises(InvalidInput, match=message):
        check_span_params(params)


def test_check_span_params_accepts():
    check_span_params({"top_k": 3, "max_answer_len": 1, "max_seq_len": 64, "max_question_len": 8, "doc_stride": 0,
                       "handle_impossible_answer": False, "padding": "max_length"})
    check_span_params({name: None for name in ("top_k", "doc_stride", "padding", "handle_impossible_answer")})


def test_softmax_allowed_masks_tokens():
    logits = np.array([1.0, 5.0, 2.0, 3.0], dtype=np.float32)
    allowed = np.array([True, False, True, True])
    probs = softmax_allowed(logits, allowed)
    assert probs.sum() == pytest.approx(1.0)
    assert probs[1] <= 1e-30  # MASKED_LOGIT underflows to (almost) nothing
    expected = np.exp(logits[[0, 2, 3]]) / np.exp(logits[[0, 2, 3]]).sum()
    np.testing.assert_allclose(probs[[0, 2, 3]], expected, rtol=1e-6)


def test_best_spans_order_lengths_and_allowed_tokens():
    rng = np.random.default_rng(0)
    start, end = rng.random(12), rng.random(12)
    allowed = np.ones(12, dtype=bool)
    allowed[[3, 7]] = False
    starts, ends, scores = best_spans(start, end, allowed, top_k=20, max_answer_len=3)
    assert len(starts) > 0 and list(scores) == sorted(scores, reverse=True)
    for s, e, score in zip(starts, ends, scores):
        assert s <= e < s + 3 and allowed[s] and allowed[e]
        assert score == pytest.approx(start[s] * end[e])
    # Brute force: the best allowed span overall comes first.
    best = max(((s, e) for s in range(12) for e in range(s, min(12, s + 3)) if allowed[s] and allowed[e]),
               key=lambda se: start[se[0]] * end[se[1]])
    assert (starts[0], ends[0]) == best


def test_best_spans_keeps_cls_when_anything_is_allowed():
    start = np.array([0.9, 0.05, 0.05])
    end = np.array([0.9, 0.05, 0.05])
    allowed = np.array([False, False, True])
    starts, ends, _ = best_spans(start, end, allowed, top_k=1, max_answer_len=5)
    assert (starts.tolist(), ends.tolist()) == ([0], [0])
    starts, _, _ = best_spans(start, end, np.zeros(3, dtype=bool), top_k=1, max_answer_len=5)
    assert starts.size == 0


def test_window_spans_null_score_and_no_cls_span():
    start_logits = np.array([4.0, 1.0, 2.0, 0.5], dtype=np.float32)
    end_logits = np.array([3.0, 0.2, 1.5, 2.5], dtype=np.float32)
    allowed = np.array([True, False, True, True])
    spans = window_spans(start_logits, end_logits, allowed, top_k=3, max_answer_len=4)
    p_start, p_end = softmax_allowed(start_logits, allowed), softmax_allowed(end_logits, allowed)
    assert spans.null_score == pytest.approx(p_start[0] * p_end[0])
    found = list(spans)
    assert len(found) == 3 and all(s != 0 and e != 0 for s, e, _ in found)  # CLS scores 0 as a span
    assert (found[0][0], found[0][1]) == (2, 3)
    assert found[0][2] == pytest.approx(p_start[2] * p_end[3])


def test_ranked_with_and_without_the_null_answer():
    answers = [{"score": 0.2, "answer": "a"}, {"score": 0.5, "answer": "b"}, {"score": 0.2, "answer": "c"}]
    assert [a["answer"] for a in ranked(answers, 2)] == ["b", "a"]
    assert [a["answer"] for a in ranked(answers, 5)] == ["b", "a", "c"]  # ties keep their order
    null = {"score": 0.3, "answer": ""}
    assert [a["answer"] for a in ranked(answers, 2, null)] == ["b", ""]
    assert ranked([], 3, null) == [null]
    assert len(answers) == 3  # the input list is not changed


def test_encode_windows_cut_with_overlap(tokenizer):
    question, context = "where does john work ?", " ".join(["john works at google in london"] * 12)
    windows = encode_windows(tokenizer, question, context, 1, max_seq_len=32, doc_stride=6)
    assert len(windows) > 1 and all(len(w.ids) <= 32 for w in windows)
    question_tokens = len(tokenizer.encode(question, add_special_tokens=False).ids)
    for w in windows:  # every window repeats the whole question
        assert [s for s in w.sequence_ids if s == 0] == [0] * question_tokens
    first = [i for i, s in zip(windows[0].ids, windows[0].sequence_ids) if s == 1]
    second = [i for i, s in zip(windows[1].ids, windows[1].sequence_ids) if s == 1]
    assert first[-6:] == second[:6]  # doc_stride tokens shared by neighbours
    whole = encode_windows(tokenizer, question, "john works", 1, max_seq_len=32, doc_stride=6)
    assert len(whole) == 1


def test_encode_windows_pre_split_words(tokenizer):
    words = ["john", "works", "at", "google"] * 20
    windows = encode_windows(tokenizer, ["where", "?"], words, 1, 24, 4, what="document", is_split_into_words=True)
    assert len(windows) > 1
    assert all(w.word_ids[i] is not None for w in windows for i, s in enumerate(w.sequence_ids) if s == 1)


def test_encode_windows_errors_name_the_context(tokenizer):
    long_question = " ".join(["john"] * 40)
    with pytest.raises(InvalidInput, match="no room for the document"):
        encode_windows(tokenizer, long_question, "john works at google " * 10, 1, 32, 4, what="document")
    with pytest.raises(InvalidInput, match="doc_stride \\(30\\) must be smaller than the .* context tokens"):
        encode_windows(tokenizer, "where ?", "john works at google " * 10, 1, 32, 30)


def test_pad_windows(tokenizer):
    windows = encode_windows(tokenizer, "where ?", "john works", 1, 32, 4)
    pad_windows(tokenizer, windows, 16, "right")
    assert len(windows[0].ids) == 16 and windows[0].ids[-1] == tokenizer.pad_token_id
    assert windows[0].attention_mask[-1] == 0


def test_task_modules_share_the_machinery():
    """Both tasks use these helpers rather than copies of them."""
    from lightpipe.tasks import document_question_answering as docqa
    from lightpipe.tasks import question_answering as qa

    for module in (qa, docqa):
        assert module.window_spans is extractive.window_spans
        assert module.encode_windows is extractive.encode_windows
        assert module.check_span_params is extractive.check_span_params

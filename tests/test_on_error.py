"""on_error: one bad input does not sink a list, a stream or a dataset; "record" keeps its error in its place,
"skip" drops it with one warning, "raise" (the default) raises as before. Errors in preprocess, forward (a failing
batch runs again item by item) and postprocess; chunked inputs; the results already computed are never lost."""

import logging

import pytest
import torch

from lightpipe import InvalidInput, KeyDataset, pipeline
from lightpipe.runtime import ModelItem, Padding, Runner
from helpers import results_close

TEXTS = ["I love it", 42, "The river flows through the old city at night.", "", "ok then", None, "fine"]
BAD = {1, 5}  # not strings: InvalidInput in preprocess
GOOD = [t for i, t in enumerate(TEXTS) if i not in BAD]
LONG = " ".join(["John Smith works at Google in London and Mary lives in Berlin ."] * 12)


close = results_close  # results equal up to float noise (tests/helpers.py)


@pytest.fixture(scope="module")
def classify(checkpoint):
    return pipeline("text-classification", model=str(checkpoint("bert", "sequence-classification")))


@pytest.fixture(scope="module")
def good(classify):
    return {t: classify([t])[0] for t in GOOD}  # each alone: no padding


def expected_records(good):
    out = []
    for i, t in enumerate(TEXTS):
        out.append({"error": f"input must be a string, not {type(t).__name__}.", "type": "InvalidInput"}
                   if i in BAD else good[t])
    return out


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("num_workers", [None, 2])
def test_record_keeps_each_error_in_its_place(classify, good, batch_size, num_workers):
    expected = expected_records(good)
    assert close(classify(TEXTS, on_error="record", batch_size=batch_size, num_workers=num_workers), expected)
    stream = classify(iter(TEXTS), on_error="record", batch_size=batch_size, num_workers=num_workers)
    assert close(list(stream), expected)


def test_skip_drops_failed_inputs_with_one_warning(classify, good, caplog):
    with caplog.at_level(logging.WARNING, logger="lightpipe"):
        results = classify(TEXTS, on_error="skip", batch_size=2)
    assert close(results, [good[t] for t in GOOD])
    warnings = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 1 and "2 of 7 inputs failed" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lightpipe"):
        assert close(list(classify(iter(TEXTS), on_error="skip", batch_size=2)), [good[t] for t in GOOD])
    assert sum("2 of 7 inputs failed" in r.getMessage() for r in caplog.records) == 1


def test_raise_is_the_default_and_the_pipeline_keeps_working(classify, good):
    for call in (lambda: classify(TEXTS), lambda: list(classify(iter(TEXTS))), lambda: classify(TEXTS, on_error=None)):
        with pytest.raises(InvalidInput, match="must be a string"):
            call()
    assert close(classify(GOOD), [good[t] for t in GOOD])


def test_stream_yields_good_results_before_a_raised_error(classify, good):
    stream = classify(iter(["I love it", "fine", 42, "ok then"]), on_error="raise")
    assert close([next(stream), next(stream)], [good["I love it"], good["fine"]])
    with pytest.raises(InvalidInput):
        next(stream)


def test_construction_default_and_call_override(checkpoint, good):
    recording = pipeline("text-classification", model=str(checkpoint("bert", "sequence-classification")),
                         on_error="record")
    assert close(recording(TEXTS), expected_records(good))
    with pytest.raises(InvalidInput):
        recording(TEXTS, on_error="raise")


@pytest.mark.parametrize("bad", ["ignore", "RECORD", 1, True])
def test_other_values_are_invalid(classify, checkpoint, bad):
    with pytest.raises(InvalidInput, match="on_error must be one of 'raise', 'skip', 'record'"):
        classify(GOOD, on_error=bad)
    with pytest.raises(InvalidInput, match="on_error"):
        pipeline("text-classification", model=str(checkpoint("bert", "sequence-classification")), on_error=bad)


def test_a_single_input_raises_whatever_on_error_says(classify):
    for mode in ("record", "skip"):
        with pytest.raises(InvalidInput):
            classify(42, on_error=mode)


def holds(batch, ids) -> bool:
    """Whether a (right-padded) batch has a row of exactly these token ids."""
    return any(int(mask.sum()) == len(ids) and torch.equal(row[: len(ids)], ids)
               for row, mask in zip(batch["input_ids"], batch["attention_mask"]))


def culprit_forward(pipe, monkeypatch, culprit: str, error=RuntimeError):
    """Make forward fail on any batch holding `culprit`'s token ids; returns the sizes of the batches run."""
    ids = pipe.preprocess(culprit)[0].features["input_ids"]
    sizes = []
    real = type(pipe).forward

    def forward(self, batch, **params):
        sizes.append(batch["input_ids"].shape[0])
        if holds(batch, ids):
            raise error("the model cannot take this one")
        return real(self, batch, **params)

    monkeypatch.setattr(type(pipe), "forward", forward)
    return sizes


def test_a_failing_batch_runs_again_item_by_item(classify, good, monkeypatch):
    texts = GOOD
    sizes = culprit_forward(classify, monkeypatch, "ok then")
    results = classify(texts, on_error="record", batch_size=5)
    record = {"error": "the model cannot take this one", "type": "RuntimeError"}
    assert close(results, [record if t == "ok then" else good[t] for t in texts])
    assert sizes == [5, 1, 1, 1, 1, 1]  # the failing batch of 5, then each of its items alone
    sizes.clear()
    assert close(list(classify(iter(texts), on_error="record", batch_size=2)),
                 [record if t == "ok then" else good[t] for t in texts])
    with pytest.raises(RuntimeError):
        classify(texts, batch_size=5)


def test_keyboard_interrupt_is_never_recorded(classify, monkeypatch):
    culprit_forward(classify, monkeypatch, "fine", error=KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        classify(GOOD, on_error="record", batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        list(classify(iter(GOOD), on_error="skip"))


def test_postprocess_errors_are_item_errors(classify, good, monkeypatch, caplog):
    real = type(classify).postprocess
    calls = []

    def postprocess(self, outputs, metas, **params):
        calls.append(1)
        if len(calls) == 2:
            raise ZeroDivisionError("a bug in postprocess")
        return real(self, outputs, metas, **params)

    monkeypatch.setattr(type(classify), "postprocess", postprocess)
    with caplog.at_level(logging.WARNING, logger="lightpipe"):
        results = classify(GOOD, on_error="record")
    assert close(results[:1] + results[2:], [good[t] for t in GOOD[:1] + GOOD[2:]])
    assert results[1] == {"error": "a bug in postprocess", "type": "ZeroDivisionError"}
    # not one of lightpipe's errors: logged once, with its traceback
    logged = [r for r in caplog.records if "ZeroDivisionError" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None


def test_a_chunked_input_fails_whole_and_the_others_answer(checkpoint, monkeypatch):
    folder = checkpoint("bert", "token-classification", labels=["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])
    ner = pipeline("ner", model=str(folder), aggregation_strategy="simple", stride=4, ignore_labels=[])
    texts = ["John lives in Paris", LONG, "Mary", "Berlin is big"]
    windows = ner.preprocess(LONG, stride=4)
    assert len(windows) >= 2
    expected = [ner(t) for t in texts]
    culprit = windows[1].features["input_ids"]
    real = type(ner).forward

    def forward(self, batch, **params):
        if holds(batch, culprit):
            raise RuntimeError("one window fails")
        return real(self, batch, **params)

    monkeypatch.setattr(type(ner), "forward", forward)
    record = {"error": "one window fails", "type": "RuntimeError"}
    for batch_size in (1, 3):
        assert close(ner(texts, on_error="record", batch_size=batch_size), [*expected[:1], record, *expected[2:]])
        assert close(list(ner(iter(texts), on_error="record", batch_size=batch_size)),
                     [*expected[:1], record, *expected[2:]])
        assert close(ner(texts, on_error="skip", batch_size=batch_size), [*expected[:1], *expected[2:]])


class Rows(torch.utils.data.Dataset):
    """A map-style dataset one of whose rows cannot be read."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        if i == 2:
            raise OSError("row 2 is corrupt")
        return {"text": ["I love it", "fine", None, "ok then"][i]}


def test_an_unreadable_dataset_row_is_that_input_s_error(classify, good):
    results = list(classify(KeyDataset(Rows(), "text"), on_error="record", num_workers=2))
    assert close(results, [good["I love it"], good["fine"], {"error": "row 2 is corrupt", "type": "OSError"},
                           good["ok then"]])
    with pytest.raises(OSError):
        list(classify(KeyDataset(Rows(), "text")))


def test_a_generator_that_raises_ends_the_stream(classify, good):
    def texts():
        yield "I love it"
        raise OSError("the source broke")

    stream = classify(texts(), on_error="record")
    assert close(next(stream), good["I love it"])
    with pytest.raises(OSError, match="the source broke"):
        next(stream)


def test_runner_isolates_the_failing_item():
    def forward(batch):
        if (batch["x"] < 0).any():
            raise ValueError("negative")
        return {"y": batch["x"] * 2}

    items = [ModelItem({"x": torch.tensor([float(v)])}) for v in (1, -1, 3, 4)]
    runner = Runner(forward, Padding(values={}), batch_size=4, isolate_errors=True)
    outputs = runner.run_list(items)
    assert [None if o is None else o["y"].item() for o in outputs] == [2.0, None, 6.0, 8.0]
    assert isinstance(items[1].error, ValueError) and all(items[i].error is None for i in (0, 2, 3))
    with pytest.raises(ValueError):
        Runner(forward, Padding(values={}), batch_size=4).run_list([ModelItem({"x": torch.tensor([-1.0])})])


def test_question_answering_records_a_malformed_question(checkpoint):
    qa = pipeline("question-answering", model=str(checkpoint("bert", "question-answering")))
    good = {"question": "Who works here?", "context": "John works at Google in London."}
    expected = qa([good, good])
    results = qa([good, {"question": "Where?"}, good], on_error="record")
    assert close([results[0], results[2]], expected)
    assert results[1]["type"] == "InvalidInput" and "context" in results[1]["error"]
    with pytest.raises(InvalidInput):
        qa([good, {"question": "Where?"}])


def test_document_question_answering_records_a_malformed_dict(tmp_path):
    from layoutlm_helpers import layoutlm_checkpoint, word_boxes

    docqa = pipeline("document-question-answering", model=str(layoutlm_checkpoint(tmp_path / "layoutlm")))
    good = {"image": None, "question": "What is the total?", "word_boxes": word_boxes()}
    expected = docqa([good, good])
    results = docqa([good, {"image": None, "word_boxes": word_boxes()}, good], on_error="record")
    assert close([results[0], results[2]], expected)
    assert results[1]["type"] == "InvalidInput" and "no question" in results[1]["error"]
    with pytest.raises(InvalidInput, match="no question"):
        docqa([good, {"image": None, "word_boxes": word_boxes()}])

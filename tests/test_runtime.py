"""The batching runtime: lists, streams, datasets, order, progress, workers, parameters, collate/split."""

import collections.abc
import itertools
import threading

import pytest
import torch

from lightpipe import InvalidInput, KeyDataset, pipeline
from lightpipe.runtime import ModelItem, Padding, Runner, collate, prefetch, split
from helpers import results_close

# Lengths vary a lot, so that length-sorted batches differ from the input order.
TEXTS = [
    "bad",
    "Paris is the capital of France, and John Smith works at Google in London since 1998, they say.",
    "I love this movie, it is great!",
    "good",
    "what where who when why how does did do can will would should could not no yes very much many",
    "The river flows through the old city at night.",
    "ok then",
]
LONG = " ".join(["John Smith works at Google in London and Mary lives in Berlin ."] * 12)  # > 128 tokens


close = results_close  # results equal up to float noise (tests/helpers.py)


@pytest.fixture(scope="module")
def classify(checkpoint):
    return pipeline("text-classification", model=str(checkpoint("bert", "sequence-classification")), top_k=None)


@pytest.fixture(scope="module")
def expected(classify):
    """Each text on its own: no padding at all."""
    return [classify([text])[0] for text in TEXTS]


# ------------------------------------------------------------------ lists


@pytest.mark.parametrize("batch_size", [1, 2, 3, 16])
def test_list_results_in_input_order(classify, expected, batch_size):
    assert close(classify(TEXTS, batch_size=batch_size), expected)


def test_list_order_with_chunked_inputs(checkpoint):
    """Inputs split into several windows are regrouped per input, whatever the batches."""
    folder = checkpoint("bert", "token-classification", labels=["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])
    ner = pipeline("ner", model=str(folder), aggregation_strategy="simple", stride=4, ignore_labels=[])
    texts = ["John lives in Paris", LONG, "Mary", LONG[:300], "Berlin is big", LONG]
    assert len(ner.preprocess(LONG, stride=4)) > 1  # several windows
    one_by_one = [ner(text) for text in texts]
    assert all(one_by_one)
    for batch_size in (1, 3, 8):
        assert close(ner(texts, batch_size=batch_size), one_by_one)


def test_empty_list(classify):
    assert classify([]) == []


def test_tuple_is_a_list(classify, expected):
    assert close(classify(tuple(TEXTS[:3])), expected[:3])


# ------------------------------------------------------------------ streams and datasets


def generate(values, pulled=None):
    for value in values:
        if pulled is not None:
            pulled.append(value)
        yield value


@pytest.mark.parametrize("batch_size", [1, 3])
def test_generator_gives_a_lazy_iterator(classify, expected, batch_size):
    out = classify(generate(TEXTS), batch_size=batch_size)
    assert isinstance(out, collections.abc.Iterator) and not isinstance(out, list)
    assert close(list(out), expected)


def test_infinite_stream_is_lazy(classify, expected):
    """An endless generator: results come one by one, without waiting for the end."""
    endless = (TEXTS[i % len(TEXTS)] for i in itertools.count())
    out = classify(endless, batch_size=2)
    first = list(itertools.islice(out, 5))
    assert close(first, expected[:5])
    out.close()


def test_nothing_runs_before_the_first_result(classify):
    pulled = []
    out = classify(generate(TEXTS, pulled))
    assert pulled == []
    next(out)
    assert pulled  # started on demand
    out.close()


class TextDataset(torch.utils.data.Dataset):
    """A map-style dataset whose __getitem__ raises KeyError, not IndexError, past its end."""

    def __init__(self, texts):
        self.rows = dict(enumerate(texts))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_torch_dataset(classify, expected, batch_size):
    out = classify(TextDataset(TEXTS), batch_size=batch_size)
    assert isinstance(out, collections.abc.Iterator)
    assert close(list(out), expected)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_key_dataset(classify, expected, batch_size):
    rows = [{"text": text, "id": i} for i, text in enumerate(TEXTS)]
    dataset = KeyDataset(rows, "text")
    assert len(dataset) == len(TEXTS) and dataset[2] == TEXTS[2] and list(dataset) == TEXTS
    out = classify(dataset, batch_size=batch_size)
    assert isinstance(out, collections.abc.Iterator)
    assert close(list(out), expected)


def test_key_dataset_over_torch_dataset(classify, expected):
    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(TEXTS)

        def __getitem__(self, i):
            if i >= len(TEXTS):
                raise IndexError(i)
            return {"text": TEXTS[i]}

    assert close(list(classify(KeyDataset(Rows(), "text"), batch_size=2)), expected)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_bad_item_in_stream_raises_invalid_input(classify, expected, batch_size):
    values = TEXTS[:4] + [None] + TEXTS[4:]
    out = classify(generate(values), batch_size=batch_size)
    got = []
    with pytest.raises(InvalidInput, match="must be a string"):
        for result in out:
            got.append(result)
    # Results before the bad input came through; the pipeline still answers.
    assert len(got) <= 4 and close(got, expected[:len(got)])
    if batch_size == 1:
        assert len(got) == 4
    assert close(classify([TEXTS[0]]), expected[:1])


def test_error_from_the_stream_itself_reaches_the_consumer(classify):
    def broken():
        yield "good"
        raise RuntimeError("the source broke")

    with pytest.raises(RuntimeError, match="the source broke"):
        list(classify(broken()))


def test_abandoned_stream_stops_its_thread(classify):
    before = {t.ident for t in threading.enumerate()}
    out = classify(generate(TEXTS * 20))
    next(out)
    out.close()
    for thread in threading.enumerate():
        if thread.ident not in before and thread.name == "lightpipe-prefetch":
            thread.join(timeout=5)
            assert not thread.is_alive()


def test_prefetch_keeps_order_and_reraises():
    assert list(prefetch(iter(range(100)), depth=3)) == list(range(100))

    def fails():
        yield 1
        raise KeyError("boom")

    stream = prefetch(fails())
    assert next(stream) == 1
    with pytest.raises(KeyError, match="boom"):
        next(stream)


# ------------------------------------------------------------------ progress, workers, parameters


def test_progress_bar_on_lists_and_streams(classify, expected, capsys):
    capsys.readouterr()
    assert close(classify(TEXTS, progress=True, batch_size=2), expected)
    err = capsys.readouterr().err
    assert "text-classification" in err and f"{len(TEXTS)}/{len(TEXTS)}" in err
    assert close(list(classify(generate(TEXTS), progress=True)), expected)
    err = capsys.readouterr().err
    assert "text-classification" in err and f"{len(TEXTS)}item" in err.replace(" ", "")
    assert close(list(classify(KeyDataset([{"t": t} for t in TEXTS], "t"), progress=True)), expected)
    assert f"{len(TEXTS)}/{len(TEXTS)}" in capsys.readouterr().err
    classify(TEXTS)
    assert capsys.readouterr().err == ""  # no bar unless asked


def test_progress_as_construction_default(checkpoint, capsys):
    pipe = pipeline("text-classification", model=str(checkpoint("bert", "sequence-classification")), progress=True)
    capsys.readouterr()
    pipe(TEXTS[:2])
    assert "2/2" in capsys.readouterr().err
    pipe(TEXTS[:2], progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("batch_size", [1, 3])
def test_num_workers(classify, expected, batch_size):
    assert close(classify(TEXTS, num_workers=2, batch_size=batch_size), expected)
    assert close(list(classify(generate(TEXTS), num_workers=2, batch_size=batch_size)), expected)


def test_call_parameters_override_defaults_once(checkpoint):
    folder = str(checkpoint("bert", "sequence-classification"))
    pipe = pipeline("text-classification", model=folder, top_k=2, batch_size=3)
    assert [len(r) for r in pipe(TEXTS[:2])] == [2, 2]
    assert [len(r) for r in pipe(TEXTS[:2], top_k=1)] == [1, 1]
    assert [len(r) for r in pipe(TEXTS[:2])] == [2, 2]  # the call's top_k did not stick
    assert [len(r) for r in pipe(TEXTS[:2], top_k=None)] == [3, 3]
    assert [len(r) for r in pipe(TEXTS[:2])] == [2, 2]
    # batch_size=None at call time keeps the default
    assert close(pipe(TEXTS, batch_size=None), pipe(TEXTS, batch_size=3))


def test_unknown_parameter_names_accepted_ones(classify):
    with pytest.raises(InvalidInput) as info:
        classify("good", topk=3)
    message = str(info.value)
    assert "'topk'" in message
    for name in ("top_k", "function_to_apply", "truncation", "batch_size", "num_workers", "progress"):
        assert name in message


@pytest.mark.parametrize("params", [{"batch_size": 0}, {"batch_size": -2}, {"batch_size": 1.5}, {"batch_size": True},
                                    {"num_workers": -1}, {"num_workers": "2"}])
def test_bad_runtime_parameters(classify, params):
    with pytest.raises(InvalidInput, match=next(iter(params))):
        classify(TEXTS, **params)
    with pytest.raises(InvalidInput):
        classify(generate(TEXTS), **params)  # checked at the call, before any work


# ------------------------------------------------------------------ collate and split


def item(length, start=1):
    ids = torch.arange(start, start + length)
    return ModelItem({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long),
                      "label": torch.tensor(length)}, meta={"n": length})


PADDING = {"input_ids": 0, "attention_mask": 0}


def test_collate_right_padding():
    batch = collate([item(3), item(1), item(2, start=7)], Padding(PADDING, side="right"))
    assert batch["input_ids"].tolist() == [[1, 2, 3], [1, 0, 0], [7, 8, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch["label"].tolist() == [3, 1, 2]  # not a padded field: stacked


def test_collate_left_padding():
    batch = collate([item(3), item(1), item(2, start=7)], Padding({"input_ids": -1, "attention_mask": 0}, side="left"))
    assert batch["input_ids"].tolist() == [[1, 2, 3], [-1, -1, 1], [-1, 7, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]


def test_collate_even_lengths_and_extra_dims():
    items = [ModelItem({"x": torch.ones(2, 4)}), ModelItem({"x": torch.zeros(3, 4)})]
    batch = collate(items, Padding({"x": 5.0}))
    assert batch["x"].shape == (2, 3, 4) and batch["x"][0, 2].tolist() == [5.0] * 4
    same = collate([item(2), item(2)], Padding(PADDING))
    assert same["input_ids"].tolist() == [[1, 2], [1, 2]]


def test_collate_uneven_field_without_rule():
    with pytest.raises(AssertionError, match="no padding rule"):
        collate([item(2), item(3)], Padding({}))


@pytest.mark.parametrize("side", ["left", "right"])
def test_split_trims_sequences_to_each_item(side):
    items = [item(3), item(1), item(2)]
    padding = Padding(PADDING, side=side, sequence_outputs=("hidden",))
    for it in items:
        it.length = it.features["input_ids"].shape[0]
    batch = collate(items, padding)
    outputs = {"hidden": batch["input_ids"].float()[..., None] * 10, "pooled": batch["label"].float()}
    per_item = split(outputs, items, padding)
    assert [o["hidden"][:, 0].tolist() for o in per_item] == [[10.0, 20.0, 30.0], [10.0], [10.0, 20.0]]
    assert [o["pooled"].item() for o in per_item] == [3.0, 1.0, 2.0]  # not a sequence: untouched


def test_split_hands_out_ragged_outputs_per_item():
    """A forward may return a list with one entry per item (generated tokens of different lengths) instead of a
    tensor padded only to be split: each item gets its own entry, tensors in it moved to the CPU."""
    items = [item(3), item(1), item(2)]
    padding = Padding(PADDING)
    outputs = {"tokens": [[7, 8, 9], [], [5]], "times": [torch.zeros(3), torch.zeros(0), torch.ones(1)],
               "pooled": torch.tensor([3.0, 1.0, 2.0])}
    per_item = split(outputs, items, padding)
    assert [o["tokens"] for o in per_item] == [[7, 8, 9], [], [5]]
    assert [o["times"].tolist() for o in per_item] == [[0.0, 0.0, 0.0], [], [1.0]]
    assert [o["pooled"].item() for o in per_item] == [3.0, 1.0, 2.0]
    with pytest.raises(AssertionError, match="2 entries"):
        split({"tokens": [[1], [2]]}, items, padding)


@pytest.mark.parametrize("side", ["left", "right"])
def test_runner_list_order_and_unpadded_results(side):
    """Runner.run_list sorts by length for batching and hands outputs back in item order."""
    seen_batches = []

    def forward(batch):
        seen_batches.append(batch["input_ids"].shape)
        return {"hidden": batch["input_ids"][..., None].float(), "mask_sum": batch["attention_mask"].sum(-1)}

    padding = Padding(PADDING, side=side, sequence_outputs=("hidden",))
    lengths = [2, 5, 1, 4, 3, 5, 1]
    runner = Runner(forward, padding, batch_size=3)
    outs = runner.run_list([item(n) for n in lengths])
    assert [o["mask_sum"].item() for o in outs] == lengths
    assert [o["hidden"][:, 0].tolist() for o in outs] == [list(map(float, range(1, n + 1))) for n in lengths]
    assert seen_batches == [(3, 5), (3, 3), (1, 1)]  # longest first: padding only inside similar lengths


def test_runner_stream_keeps_arrival_order():
    padding = Padding(PADDING, sequence_outputs=("hidden",))
    runner = Runner(lambda b: {"hidden": b["input_ids"][..., None].float()}, padding, batch_size=2)
    lengths = [2, 5, 1, 4, 3]
    got = [(it.meta["n"], out["hidden"].shape[0]) for it, out in runner.run_stream(item(n) for n in lengths)]
    assert got == [(n, n) for n in lengths]

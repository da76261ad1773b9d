"""Every text task with a tokenizer that pads on the left (padding_side "left" in tokenizer_config.json):
batched results (batch_size=4, texts of different lengths) equal unbatched ones and transformers' on each text
alone. (transformers' own batches move BERT's and DistilBERT's positions under left padding and read their
classifiers from a padding slot; question answering has its left-padding cases in test_question_answering.)"""

import numbers

import numpy as np
import pytest
import transformers

from lightpipe import pipeline

ARCHS = ("bert", "roberta", "distilbert", "xlm-roberta")
TEXTS = ["Hello world.", "Paris is the capital of France, and John Smith works at Google in London since 1998.",
         "bad", "Mary lives in Berlin, Germany; she loves the old city at night.", "a b"]
MASKED = ["Paris is the {m} of France.", "{m} works at Google in London, and Mary lives in Berlin at night.",
          "I love {m}!", "The river flows through the old {m}."]
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def assert_same(ours, ref, tol=1e-4, where="result"):
    """Nested results equal: numbers within `tol` (integers exactly), everything else equal."""
    if isinstance(ref, np.ndarray):
        ref = ref.tolist()
    if isinstance(ref, (list, tuple)):
        assert isinstance(ours, (list, tuple)) and len(ours) == len(ref), f"{where}: {ours!r} != {ref!r}"
        for i, (o, r) in enumerate(zip(ours, ref)):
            assert_same(o, r, tol, f"{where}[{i}]")
    elif isinstance(ref, dict):
        assert isinstance(ours, dict) and ours.keys() == ref.keys(), f"{where}: {ours!r} != {ref!r}"
        for key in ref:
            assert_same(ours[key], ref[key], tol, f"{where}[{key!r}]")
    elif isinstance(ref, numbers.Integral) and not isinstance(ref, bool):
        assert ours == ref, f"{where}: {ours!r} != {ref!r}"
    elif isinstance(ref, numbers.Real):
        assert abs(float(ours) - float(ref)) <= tol, f"{where}: {ours!r} != {ref!r}"
    else:
        assert ours == ref, f"{where}: {ours!r} != {ref!r}"


def assert_left_padded_batches(task, folder, texts, **kwargs):
    ours = pipeline(task, model=str(folder))
    assert ours.tokenizer.padding_side == "left"
    ref = transformers.pipeline(task, model=str(folder))
    alone = [ours(text, **kwargs) for text in texts]
    for text, got in zip(texts, alone):
        assert_same(got, ref(text, **kwargs), where=f"{task} {text!r}")
    assert_same(ours(texts, batch_size=4, **kwargs), alone, tol=1e-5, where=f"{task} batched")
    assert_same(list(ours(iter(texts), batch_size=4, **kwargs)), alone, tol=1e-5, where=f"{task} streamed")


@pytest.mark.parametrize("arch", ARCHS)
def test_feature_extraction(left_checkpoint, arch):
    assert_left_padded_batches("feature-extraction", left_checkpoint(arch, "base"), TEXTS)


@pytest.mark.parametrize("arch", ARCHS)
def test_text_classification(left_checkpoint, arch):
    folder = left_checkpoint(arch, "sequence-classification", labels=["neg", "neutral", "pos"])
    assert_left_padded_batches("text-classification", folder, TEXTS, top_k=None)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("aggregation_strategy", ["none", "simple"])
def test_token_classification(left_checkpoint, arch, aggregation_strategy):
    folder = left_checkpoint(arch, "token-classification", labels=NER_LABELS, seed=2)
    assert_left_padded_batches("token-classification", folder, TEXTS, aggregation_strategy=aggregation_strategy,
                               ignore_labels=[])


@pytest.mark.parametrize("arch", ARCHS)
def test_fill_mask(left_checkpoint, arch):
    folder = left_checkpoint(arch, "masked-lm")
    mask = pipeline("fill-mask", model=str(folder)).tokenizer.mask_token
    assert_left_padded_batches("fill-mask", folder, [t.replace("{m}", mask) for t in MASKED], top_k=3)

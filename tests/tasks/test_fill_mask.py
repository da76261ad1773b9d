"""fill-mask parity with transformers on tiny random checkpoints."""

import logging

import pytest
import torch
import transformers
from safetensors import safe_open

from lightpipe import InvalidInput, pipeline
from lightpipe.processing.text import Tokenizer

ARCHS = ("bert", "roberta", "distilbert", "xlm-roberta")
BPE = ("roberta", "xlm-roberta")
# "{m}" stands for the model's mask token.
ONE_MASK = [
    "Paris is the {m} of France.",
    "{m} is the capital of France.",  # at the start
    "John Smith works at {m}",  # at the end
    "I love this movie, {m}!",  # next to punctuation
    "What is the capital,{m}, of England?",  # no spaces around it
    "The river flows through the old {m}. The quick brown fox jumps over the lazy dog at night in Berlin.",
]
TWO_MASKS = [
    "{m} is the capital of {m}.",
    "Mary lives in {m}, {m}!",
    "{m}{m} works at Google",
]
TARGETS = {  # per vocabulary kind: entries of the vocabulary, and strings that are not
    "wordpiece": ["paris", "london", "john", "France", "mary smith", "zzqx"],
    "bpe": ["ĠJohn", "ĠBerlin", " England", "Google", "Paris", "zzqx"],
}


def vocab_kind(arch):
    return "bpe" if arch in BPE else "wordpiece"


def fill(texts, mask):
    return [t.replace("{m}", mask) for t in texts]


def assert_same(ours, ref, tol=1e-4):
    if isinstance(ref, list):
        assert isinstance(ours, list) and len(ours) == len(ref), (ours, ref)
        for o, r in zip(ours, ref):
            assert_same(o, r, tol)
    else:
        assert ours.keys() == ref.keys()
        assert (ours["token"], ours["token_str"], ours["sequence"]) == (ref["token"], ref["token_str"], ref["sequence"])
        assert isinstance(ours["score"], float) and isinstance(ours["token"], int)
        assert abs(ours["score"] - ref["score"]) <= tol, (ours, ref)


@pytest.fixture(scope="module", params=ARCHS)
def arch_pipes(request, checkpoint):
    folder = checkpoint(request.param, "masked-lm")
    ours = pipeline("fill-mask", model=str(folder))
    ref = transformers.pipeline("fill-mask", model=str(folder))
    return request.param, ours, ref, ours.tokenizer.mask_token


@pytest.mark.parametrize("kwargs", [{}, {"top_k": 1}, {"top_k": 12}, {"top_k": None}])
def test_one_mask(arch_pipes, kwargs):
    _, ours, ref, mask = arch_pipes
    for text in fill(ONE_MASK, mask):
        assert_same(ours(text, **kwargs), ref(text, **kwargs))


@pytest.mark.parametrize("kwargs", [{}, {"top_k": 2}])
def test_two_masks(arch_pipes, kwargs):
    _, ours, ref, mask = arch_pipes
    for text in fill(TWO_MASKS, mask):
        result = ours(text, **kwargs)
        assert len(result) == 2 and all(isinstance(row, list) for row in result)
        assert_same(result, ref(text, **kwargs))


def test_list_inputs(arch_pipes):
    _, ours, ref, mask = arch_pipes
    texts = fill(ONE_MASK + TWO_MASKS, mask)
    assert_same(ours(texts), ref(texts))
    # transformers answers a list of one text with that text's result, unwrapped
    assert_same(ours(texts[:1]), ref(texts[:1]))
    assert_same(ours(texts[:1]), ours(texts[0]))


def test_targets(arch_pipes, caplog):
    arch, ours, ref, mask = arch_pipes
    texts = fill(ONE_MASK[:3] + TWO_MASKS[:1], mask)
    targets = TARGETS[vocab_kind(arch)]
    for kwargs in [{"targets": targets[0]}, {"targets": targets}, {"targets": targets[:2], "top_k": 1},
                   {"targets": targets[2:], "top_k": 10}, {"targets": [targets[0], targets[0], targets[1]]}]:
        with caplog.at_level(logging.WARNING):
            assert_same(ours(texts, **kwargs), ref(texts, **kwargs))
    # a target not in the vocabulary is replaced by its first token, with a warning naming it
    assert any("'zzqx'" in r.getMessage() for r in caplog.records if r.name.startswith("lightpipe"))
    # top_k is capped at the number of targets
    assert len(ours(texts[0], targets=targets[:2])) == 2


def test_targets_follow_the_vocabulary(arch_pipes):
    arch, ours, _, mask = arch_pipes
    text = fill(ONE_MASK[:1], mask)[0]
    if arch in BPE:  # " England" is tokenized to the vocabulary entry "ĠEngland"
        assert ours(text, targets=" England")[0]["token_str"] == " England"
    else:  # lower-cased by the tokenizer
        assert ours(text, targets="France")[0]["token_str"] == "france"


def test_empty_targets_are_invalid(arch_pipes):
    _, ours, ref, mask = arch_pipes
    text = fill(ONE_MASK[:1], mask)[0]
    for bad in ["", [""], [], [3], 5]:
        with pytest.raises(InvalidInput):
            ours(text, targets=bad)
    with pytest.raises(ValueError):
        ref(text, targets=[""])
    # an empty target beside a good one is dropped, as in transformers
    good = TARGETS["bpe" if mask == "<mask>" else "wordpiece"][0]
    assert_same(ours(text, targets=["", good]), ref(text, targets=["", good]))


def test_batched_equals_unbatched(arch_pipes):
    arch, ours, ref, mask = arch_pipes
    texts = fill(ONE_MASK + TWO_MASKS, mask) * 2
    one = ours(texts, top_k=3)
    assert_same(ours(texts, top_k=3, batch_size=4), one, tol=1e-5)
    assert_same(list(ours(iter(texts), top_k=3, batch_size=4)), one, tol=1e-5)
    assert_same(list(ours(iter(texts), top_k=3)), one, tol=1e-5)
    targets = TARGETS[vocab_kind(arch)]
    assert_same(ours(texts, targets=targets, batch_size=4), ref(texts, targets=targets, batch_size=4))


def test_tokenizer_kwargs(arch_pipes):
    _, ours, ref, mask = arch_pipes
    long = f"The {mask} city " + "the old city " * 200
    kwargs = {"tokenizer_kwargs": {"truncation": True, "max_length": 20}}
    assert_same(ours(long, **kwargs), ref(long, **kwargs))
    with pytest.raises(InvalidInput, match="truncation"):
        ours(long)
    cut_off = "the old city " * 200 + mask
    with pytest.raises(InvalidInput, match="mask"):
        ours(cut_off, **kwargs)
    text = fill(ONE_MASK[:1], mask)[0]
    for extra in [{"padding": True}, {"add_special_tokens": False}]:
        assert_same(ours(text, tokenizer_kwargs=extra), ref(text, tokenizer_kwargs=extra))
    with pytest.raises(InvalidInput, match="tokenizer_kwargs"):
        ours(text, tokenizer_kwargs={"return_offsets": True})
    with pytest.raises(InvalidInput, match="tokenizer_kwargs"):
        ours(text, tokenizer_kwargs="truncation")


def test_construction_params_are_defaults(checkpoint):
    folder = str(checkpoint("bert", "masked-lm"))
    ours = pipeline("fill-mask", model=folder, top_k=2, targets=["paris", "london", "john"])
    ref = transformers.pipeline("fill-mask", model=folder, top_k=2, targets=["paris", "london", "john"])
    texts = fill(ONE_MASK, "[MASK]")
    assert_same(ours(texts), ref(texts))
    assert_same(ours(texts, top_k=1), ref(texts, top_k=1))
    assert_same(ours(texts, top_k=None), ref(texts, top_k=None))  # None: the construction value holds
    assert len(ours(texts[0])) == 2  # the call-only top_k=1 did not stick


def test_bad_inputs_then_the_pipeline_answers(arch_pipes):
    _, ours, ref, mask = arch_pipes
    good = fill(ONE_MASK[:1], mask)[0]
    bad_inputs = ["no mask in this text", "", "   ", None, 42, b"bytes " + mask.encode(), {"text": good},
                  [good, "no mask here"], [good, None]]
    for bad in bad_inputs:
        with pytest.raises(InvalidInput):
            ours(bad)
    with pytest.raises(InvalidInput, match=r"no mask token"):
        ours("no mask in this text")
    for bad_params in [{"top_k": 0}, {"top_k": -1}, {"top_k": 1.5}, {"top_k": True}, {"topk": 3}]:
        with pytest.raises(InvalidInput):
            ours(good, **bad_params)
    assert_same(ours(good), ref(good))


def test_top_k_beyond_the_vocabulary(arch_pipes):
    _, ours, _, mask = arch_pipes
    # transformers fails inside torch.topk here; lightpipe returns every token, best first
    result = ours(fill(ONE_MASK[:1], mask)[0], top_k=10**6)
    assert len(result) == ours.model.config.vocab_size
    assert abs(sum(r["score"] for r in result) - 1) < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_tied_decoder_weights(checkpoint, arch):
    """The output projection is not in the checkpoint: loading ties it to the input embeddings."""
    folder = checkpoint(arch, "masked-lm")
    model = pipeline("fill-mask", model=str(folder)).model
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert model.tied_weights
    for target, source in model.tied_weights.items():
        assert target not in saved and source in saved
        assert model.get_parameter(target) is model.get_parameter(source)
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            assert torch.equal(model.get_parameter(target), f.get_tensor(source))


def test_tokenizer_without_mask_token(checkpoint):
    folder = checkpoint("bert", "masked-lm")
    tokenizer = Tokenizer.from_folder(folder)
    del tokenizer.special_tokens["mask_token"]
    with pytest.raises(InvalidInput, match="mask token"):
        pipeline("fill-mask", model=str(folder), tokenizer=tokenizer)

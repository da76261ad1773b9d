"""text-classification parity with transformers on tiny random checkpoints."""

import pytest
import transformers

from lightpipe import InvalidInput, pipeline

ARCHS = ("bert", "roberta", "distilbert", "xlm-roberta")
TEXTS = [
    "I love this movie, it is great!",
    "bad",
    "Paris is the capital of France, and John Smith works at Google in London since 1998.",
    "Ünïcödé àccents and CAPITALS?",
    "what where who when why how does did do can will would should could not no yes very much many",
]
PAIRS = [{"text": "What is the capital?", "text_pair": "Paris is the capital of France."},
         {"text": "good movie", "text_pair": "terrible book"}]


def assert_same(ours, ref, tol=1e-4):
    if isinstance(ref, list):
        assert isinstance(ours, list) and len(ours) == len(ref)
        for o, r in zip(ours, ref):
            assert_same(o, r, tol)
    else:
        assert ours.keys() == ref.keys()
        assert ours["label"] == ref["label"]
        assert abs(ours["score"] - ref["score"]) <= tol


@pytest.fixture(scope="module", params=ARCHS)
def pair_of_pipes(request, checkpoint):
    folder = checkpoint(request.param, "sequence-classification", labels=["neg", "neutral", "pos"])
    return pipeline("text-classification", model=str(folder)), transformers.pipeline("text-classification", model=str(folder))


@pytest.mark.parametrize("kwargs", [{}, {"top_k": None}, {"top_k": 2}, {"function_to_apply": "sigmoid"},
                                    {"function_to_apply": "none", "top_k": None}])
def test_parity_list(pair_of_pipes, kwargs):
    ours, ref = pair_of_pipes
    assert_same(ours(TEXTS, **kwargs), ref(TEXTS, **kwargs))


@pytest.mark.parametrize("kwargs", [{}, {"top_k": 1}, {"top_k": None}])
def test_parity_single_string_shapes(pair_of_pipes, kwargs):
    ours, ref = pair_of_pipes
    assert_same(ours(TEXTS[0], **kwargs), ref(TEXTS[0], **kwargs))


def test_parity_pairs(pair_of_pipes):
    ours, ref = pair_of_pipes
    assert_same(ours(PAIRS), ref(PAIRS))
    assert_same(ours(PAIRS[0]), ref(PAIRS[0]))
    assert_same(ours(PAIRS, top_k=None), ref(PAIRS, top_k=None))


def test_batched_equals_unbatched(pair_of_pipes):
    ours, ref = pair_of_pipes
    one = ours(TEXTS * 2, top_k=None)
    many = ours(TEXTS * 2, top_k=None, batch_size=4)
    assert_same(many, one, tol=1e-5)
    assert_same(ours(TEXTS, top_k=None, batch_size=3), ref(TEXTS, top_k=None, batch_size=3))


def test_truncation_parity(pair_of_pipes):
    ours, ref = pair_of_pipes
    long = "the city " * 200
    assert_same(ours(long, truncation=True, max_length=20), ref(long, truncation=True, max_length=20))
    with pytest.raises(InvalidInput, match="truncation"):
        ours(long)
    assert_same(ours(TEXTS[0]), ref(TEXTS[0]))


def test_construction_params_are_defaults(checkpoint):
    folder = checkpoint("bert", "sequence-classification", labels=["neg", "neutral", "pos"])
    ours = pipeline("text-classification", model=str(folder), top_k=None)
    ref = transformers.pipeline("text-classification", model=str(folder), top_k=None)
    assert_same(ours(TEXTS), ref(TEXTS))
    assert_same(ours(TEXTS, top_k=1), ref(TEXTS, top_k=1))
    assert len(ours(TEXTS[0])[0]) == 3  # the call-only top_k=1 did not stick


def test_single_label_regression_and_multilabel(checkpoint):
    for overrides in ({"problem_type": "regression"}, {"problem_type": "multi_label_classification"}):
        folder = checkpoint("bert", "sequence-classification", **overrides)
        ours = pipeline("text-classification", model=str(folder))
        ref = transformers.pipeline("text-classification", model=str(folder))
        assert_same(ours(TEXTS, top_k=None), ref(TEXTS, top_k=None))
    folder = checkpoint("distilbert", "sequence-classification", num_labels=1)
    assert_same(pipeline("sentiment-analysis", model=str(folder))(TEXTS),
                transformers.pipeline("sentiment-analysis", model=str(folder))(TEXTS))


@pytest.mark.parametrize("bad", [None, 3, {"text": "a", "oops": "b"}, {"text_pair": "b"}, ["a", "b", "c"],
                                 [["a", "b", "c"]], {"text": 5}])
def test_bad_input(pair_of_pipes, bad):
    ours, ref = pair_of_pipes
    with pytest.raises(InvalidInput):
        ours(bad if not isinstance(bad, list) or isinstance(bad[0], list) else [bad])
    assert_same(ours(TEXTS[0]), ref(TEXTS[0]))  # still answers


@pytest.mark.parametrize("params", [{"top_k": 0}, {"top_k": "x"}, {"function_to_apply": "relu"}, {"unknown": 1},
                                    {"batch_size": 0}])
def test_bad_params(pair_of_pipes, params):
    ours, _ = pair_of_pipes
    with pytest.raises(InvalidInput):
        ours(TEXTS[0], **params)

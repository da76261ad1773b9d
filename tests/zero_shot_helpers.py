"""What the zero-shot-classification tests share: the texts and labels of the seed's call, both pipelines on one
checkpoint, and the comparison of their results."""

import transformers

import lightpipe

SEED_TEXT = "I have a problem with my iphone that needs to be resolved asap!!"
SEED_LABELS = ["urgent", "not urgent", "phone", "tablet", "computer"]
TEXTS = [SEED_TEXT, "Paris is the capital of France.", "a", "John Smith works at Google in London, England."]


def both(folder):
    """(lightpipe's, transformers') zero-shot-classification pipelines on `folder`."""
    return (lightpipe.pipeline("zero-shot-classification", model=str(folder)),
            transformers.pipeline("zero-shot-classification", model=str(folder)))


def assert_same(got, want):
    """Same structure, texts and label order; float scores within 1e-4, sorted."""
    if isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want):
            assert_same(g, w)
        return
    assert set(got) == {"sequence", "labels", "scores"}
    assert got["sequence"] == want["sequence"]
    assert got["labels"] == want["labels"]
    assert all(isinstance(s, float) for s in got["scores"])
    assert max(abs(a - b) for a, b in zip(got["scores"], want["scores"])) <= 1e-4
    assert got["scores"] == sorted(got["scores"], reverse=True)

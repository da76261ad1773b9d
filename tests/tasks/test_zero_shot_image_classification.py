"""zero-shot-image-classification parity with transformers on a tiny random CLIP checkpoint."""

import base64
import shutil

import numpy as np
import pytest
import torch
import transformers
from transformers.image_utils import load_image as ref_load_image

from clip_helpers import sample_images, tiny_clip_checkpoint
from lightpipe import CheckpointError, InvalidInput, loading, pipeline

LABELS = ["cat", "dog", "a big old house", "Paris at night"]
OTHER_LABELS = ["red", "blue car", "green river", "happy day", "the capital of France", "bird"]


def assert_same(ours, ref, tol=1e-4):
    if ref and isinstance(ref[0], list):
        assert isinstance(ours, list) and len(ours) == len(ref)
        for o, r in zip(ours, ref):
            assert_same(o, r, tol)
        return
    assert [d["label"] for d in ours] == [d["label"] for d in ref]
    for o, r in zip(ours, ref):
        assert list(o) == ["score", "label"]
        assert abs(o["score"] - r["score"]) <= tol


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_clip_checkpoint(tmp_path_factory.mktemp("clip-zs"))


@pytest.fixture(scope="module")
def pipes(folder):
    return (pipeline("zero-shot-image-classification", model=str(folder)),
            transformers.pipeline("zero-shot-image-classification", model=str(folder)))


@pytest.fixture(scope="module")
def images():
    return sample_images(6)


def test_task_inferred_from_the_checkpoint(folder, pipes, images):
    want = pipes[1](images[0], candidate_labels=LABELS)
    for model in (str(folder), loading.load_model(folder, "contrastive")):
        pipe = pipeline(model=model)
        assert pipe.task == "zero-shot-image-classification"
        assert_same(pipe(images[0], candidate_labels=LABELS), want)


@pytest.mark.parametrize("labels", [LABELS, OTHER_LABELS, ["only one"], ["same", "same", "other"]])
def test_parity_label_sets(pipes, images, labels):
    ours, ref = pipes
    assert_same(ours(images, candidate_labels=labels), ref(images, candidate_labels=labels))
    assert_same(ours(images[1], candidate_labels=labels), ref(images[1], candidate_labels=labels))


@pytest.mark.parametrize("template", ["{}", "a photo of a {} in the city", "{}, seen at night!"])
def test_parity_hypothesis_template(pipes, images, template):
    ours, ref = pipes
    assert_same(ours(images, candidate_labels=LABELS, hypothesis_template=template),
                ref(images, candidate_labels=LABELS, hypothesis_template=template))


def test_image_forms(pipes, images, tmp_path):
    """A path, bytes in base64, a numpy array and the images= keyword give the PIL image's result."""
    ours, ref = pipes
    path = tmp_path / "image.png"
    images[0].save(path)
    want = ref(str(path), candidate_labels=LABELS)
    encoded = base64.b64encode(path.read_bytes()).decode()
    assert_same(ours(str(path), candidate_labels=LABELS), want)
    assert_same(ours(encoded, candidate_labels=LABELS), want)
    assert_same(ours(np.asarray(images[0].convert("RGB")), candidate_labels=LABELS), want)
    assert_same(ours(images=[str(path)], candidate_labels=LABELS), [want])


def test_batched_equals_unbatched(pipes, images):
    ours, ref = pipes
    one = ours(images, candidate_labels=LABELS, batch_size=1)
    many = ours(images, candidate_labels=LABELS, batch_size=4)
    assert_same(many, one, tol=1e-5)
    assert_same(many, ref(images, candidate_labels=LABELS, batch_size=4))


def test_label_sentences_are_encoded_once_per_call(pipes, images):
    """Counted with a forward hook on the model's text tower (torch's public API), not by patching a method."""
    ours, _ = pipes
    calls = []
    hook = ours.model.text_model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape))
    try:
        ours(images, candidate_labels=LABELS, batch_size=2)
        assert calls == [(len(LABELS), calls[0][1])]  # one text batch of all labels for three image batches
        list(ours(iter(images), candidate_labels=OTHER_LABELS, batch_size=2))
        assert len(calls) == 2 and calls[1][0] == len(OTHER_LABELS)
    finally:
        hook.remove()


def test_stream_and_construction_defaults(folder, images):
    ours = pipeline("zero-shot-image-classification", model=str(folder), candidate_labels=LABELS,
                    hypothesis_template="a {}")
    ref = transformers.pipeline("zero-shot-image-classification", model=str(folder))
    want = ref(images, candidate_labels=LABELS, hypothesis_template="a {}")
    assert_same(ours(images), want)
    assert_same(list(ours(iter(images), batch_size=3)), want)
    assert_same(ours(images[0], candidate_labels=OTHER_LABELS),
                ref(images[0], candidate_labels=OTHER_LABELS, hypothesis_template="a {}"))


def test_tokenizer_without_clip_word_ends_is_refused(folder, tmp_path):
    """Without tokenizer.json the tokenizer is rebuilt from vocab.json + merges.txt the RoBERTa way, which would
    give other ids than CLIP's: refused rather than scoring silently wrong."""
    copy = tmp_path / "no-tokenizer-json"
    shutil.copytree(folder, copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        pipeline("zero-shot-image-classification", model=str(copy))


def test_comma_separated_labels(pipes, images):
    ours, ref = pipes
    assert_same(ours(images[0], candidate_labels="cat, dog,a big old house"),
                ref(images[0], candidate_labels=["cat", "dog", "a big old house"]))


def test_ties_keep_label_order(pipes, images):
    ours, ref = pipes
    got = ours(images[0], candidate_labels=["x", "y", "z"], hypothesis_template="a photo")  # the same sentence thrice
    assert [d["label"] for d in got] == ["x", "y", "z"]
    assert_same(got, ref(images[0], candidate_labels=["x", "y", "z"], hypothesis_template="a photo"))


@pytest.fixture(scope="module")
def reference_answer(pipes, images):
    return pipes[1](images[:2], candidate_labels=LABELS)


@pytest.mark.parametrize("call", [
    lambda p, im: p(im),  # no labels
    lambda p, im: p(im, candidate_labels=[]),
    lambda p, im: p(im, candidate_labels=" , "),
    lambda p, im: p(im, candidate_labels=["cat", 3]),
    lambda p, im: p(im, candidate_labels=42),
    lambda p, im: p(im, candidate_labels=LABELS, hypothesis_template="{0} {1}"),
    lambda p, im: p(im, candidate_labels=LABELS, hypothesis_template=None),
    lambda p, im: p(im, candidate_labels=LABELS, timeout=-1),
    lambda p, im: p(im, candidate_labels=LABELS, top_k=2),
    lambda p, im: p(im, candidate_labels=["word " * 100]),  # a label sentence longer than the model's 77 tokens
    lambda p, im: p(None, candidate_labels=LABELS),
    lambda p, im: p(42, candidate_labels=LABELS),
    lambda p, im: p("no/such/file.png", candidate_labels=LABELS),
    lambda p, im: list(p(iter([im, 5]), candidate_labels=LABELS)),  # a bad item in a stream
    lambda p, im: p(b"not an image", candidate_labels=LABELS),
    lambda p, im: p([im, "not an image"], candidate_labels=LABELS),
    lambda p, im: p(im, images=im, candidate_labels=LABELS),
])
def test_bad_input(pipes, images, reference_answer, call):
    ours, _ = pipes
    with pytest.raises(InvalidInput):
        call(ours, images[0])
    assert_same(ours(images[:2], candidate_labels=LABELS), reference_answer)  # still answers


# ---------------------------------------------------------------------------------------------- label text
def words(tokenizer, tokens: int) -> str:
    """A label whose default-template sentence is `tokens` tokens long."""
    for n in range(1, 200):
        label = " ".join(["a"] * n)
        if len(tokenizer("This is a photo of " + label + ".").input_ids) == tokens:
            return label
    raise AssertionError(tokens)


@pytest.mark.parametrize("labels", [
    ["café au lait", "naïve Ærø", "日本の猫", "🐱 cat!!", "Ünïcödé—dash"],
    ["a,b", "x;y", "what?!", "(paren)", "'quote'", '"dq"', "tab\tsep", "new\nline", "  spaced  ", "UPPER"],
    ["{}", "{0}", "{label}", "%s", "\\"],
    ["cat", ""],  # an empty label: its sentence is the template alone (lightpipe refused it)
    [" ", "dog"],
])
def test_zero_shot_label_text(pipes, images, labels):
    ours, ref = pipes
    assert_same(ours(images, candidate_labels=labels), ref(images, candidate_labels=labels))


def test_zero_shot_sentence_length_limit(pipes, images):
    """77 tokens is the most CLIP's positions allow: at 77 both answer; at 78 transformers fails inside the
    model and lightpipe says which sentence is too long."""
    ours, ref = pipes
    longest = words(ref.tokenizer, 77)
    assert_same(ours(images[0], candidate_labels=[longest, "cat"]),
                       ref(images[0], candidate_labels=[longest, "cat"]))
    with pytest.raises(InvalidInput, match="78 tokens"):
        ours(images[0], candidate_labels=[words(ref.tokenizer, 78), "cat"])


def test_zero_shot_tokenizer_kwargs(pipes, images):
    """transformers accepts tokenizer_kwargs and drops them. Padding never changes CLIP's scores; truncation
    here works, cutting a too long sentence to 77 tokens (end-of-text kept) as transformers' tokenizer does."""
    ours, ref = pipes
    labels = ["cat", "dog"]
    expected = ref(images, candidate_labels=labels)
    for options in ({"padding": "max_length", "max_length": 77}, {"padding": True}, {"truncation": True}):
        assert_same(ours(images, candidate_labels=labels, tokenizer_kwargs=options), expected)

    long_label = words(ref.tokenizer, 120)
    sentences = [f"This is a photo of {label}." for label in (long_label, "cat")]
    text = ref.tokenizer(sentences, padding=True, truncation=True, max_length=77, return_tensors="pt")
    pixels = ref.image_processor(images=[ref_load_image(images[0])], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        scores = ref.model(**text, pixel_values=pixels).logits_per_image[0].softmax(-1).tolist()
    got = ours(images[0], candidate_labels=[long_label, "cat"], tokenizer_kwargs={"truncation": True})
    assert {d["label"]: d["score"] for d in got} == pytest.approx({long_label: scores[0], "cat": scores[1]}, abs=1e-4)


@pytest.mark.parametrize("options", [{"truncation": "sideways"}, {"max_length": 0}, {"return_tensors": "pt"}, "yes",
                                     {"padding": "everywhere"}])
def test_zero_shot_bad_tokenizer_kwargs(pipes, images, options):
    ours, ref = pipes
    with pytest.raises(InvalidInput):
        ours(images[0], candidate_labels=LABELS, tokenizer_kwargs=options)
    assert_same(ours(images[0], candidate_labels=LABELS), ref(images[0], candidate_labels=LABELS))

"""Parity audit of the vision pipelines against transformers: the corners a user (or a reviewer with
its own checkpoints) reaches first. Each test names the transformers behaviour it matches, or says
where transformers fails and what lightpipe gives instead."""

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers.image_utils import load_image as ref_load_image

from clip_helpers import sample_images, tiny_clip_checkpoint
from lightpipe import InvalidInput, pipeline
from lightpipe.processing.image import ImageProcessor
from lightpipe.processing.image_io import load_image
from vision_helpers import assert_close, assert_same_labels, smooth_image, tiny_vision_checkpoint

LABELS = ["cat", "dog", "bird", "fish"]


@pytest.fixture(scope="module")
def images():
    return [smooth_image(40, 50, seed=1), smooth_image(64, 30, seed=2), smooth_image(33, 33, seed=3)]


# ---------------------------------------------------------------------------------------------- BEiT sizes

@pytest.fixture(scope="module")
def beit_features(tmp_path_factory):
    folder = tiny_vision_checkpoint(tmp_path_factory.mktemp("beit"), "beit", "base")
    return (pipeline("image-feature-extraction", model=str(folder)),
            transformers.pipeline("image-feature-extraction", model=str(folder)))


@pytest.mark.parametrize("options", [{"size": {"height": 40, "width": 24}}, {"size": 48},
                                     {"do_resize": False}, {"size": {"shortest_edge": 40}}])
def test_beit_other_sizes_follow_the_reference(beit_features, images, options):
    """transformers' BEiT takes any image size (its relative position bias table is resized); lightpipe
    refused every size but the trained one."""
    ours, ref = beit_features
    for pool in (False, True):
        for o, r in zip(ours(images, image_processor_kwargs=options, pool=pool),
                        ref(images, image_processor_kwargs=options, pool=pool)):
            assert_close(o, r)


# ---------------------------------------------------------------------------------------------- processor

@pytest.mark.parametrize("cls, settings", [
    ("ConvNextImageProcessor", {"size": {"shortest_edge": 30, "longest_edge": 40}}),  # longest_edge ignored
    ("ViTImageProcessor", {"size": {"max_height": 50, "max_width": 60}}),
    ("ViTImageProcessor", {"size": 40, "default_to_square": False}),
])
def test_processor_size_forms(tmp_path, cls, settings):
    getattr(transformers, cls)(**settings).save_pretrained(str(tmp_path))
    ours = ImageProcessor.from_folder(tmp_path)
    ref = transformers.AutoImageProcessor.from_pretrained(str(tmp_path))
    for h, w in [(40, 50), (64, 30), (100, 7), (5, 5), (300, 301)]:
        image = smooth_image(h, w, seed=h)
        expected = ref(ref_load_image(image), return_tensors="pt")["pixel_values"][0]
        got = ours(load_image(image))["pixel_values"]
        assert got.shape == expected.shape and (got - expected).abs().max() <= 1e-4


@pytest.fixture(scope="module")
def convnext_features(tmp_path_factory):
    folder = tiny_vision_checkpoint(tmp_path_factory.mktemp("convnext"), "convnext", "base")
    return (pipeline("image-feature-extraction", model=str(folder)),
            transformers.pipeline("image-feature-extraction", model=str(folder)))


@pytest.mark.parametrize("options", [{"size": {"shortest_edge": 30, "longest_edge": 40}},
                                     {"size": 40, "default_to_square": False}, {"timeout": 5},
                                     {"timeout": 5, "do_normalize": False}])
def test_image_processor_kwargs_as_transformers_reads_them(convnext_features, images, options):
    """ConvNeXt ignores longest_edge; default_to_square is an option; a timeout among the options is
    the URL timeout (transformers passes them on as the preprocessing parameters)."""
    ours, ref = convnext_features
    for o, r in zip(ours(images, image_processor_kwargs=options), ref(images, image_processor_kwargs=options)):
        assert_close(o, r)


def test_bad_image_processor_kwargs(convnext_features, images):
    ours, ref = convnext_features
    for options in ({"timeout": -1}, {"default_to_square": False, "size": "big"}, {"return_tensors": "np"}):
        with pytest.raises(InvalidInput):
            ours(images[0], image_processor_kwargs=options)
    assert_close(ours(images[0]), ref(images[0]))


def test_image_too_narrow_to_resize_is_invalid_input(tmp_path, images):
    """A 1 x 400 image fitted into 50 x 60 would be 0 pixels high (transformers fails inside PIL)."""
    folder = tiny_vision_checkpoint(tmp_path, "convnext", "image-classification", labels=LABELS)
    raw = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**raw, "image_processor_type": "ViTImageProcessor",
                                                                 "size": {"max_height": 50, "max_width": 60}}))
    ours = pipeline("image-classification", model=str(folder))
    with pytest.raises(InvalidInput, match="too narrow"):
        ours(smooth_image(1, 400))
    ref = transformers.pipeline("image-classification", model=str(folder))
    assert_same_labels(ours(images), ref(images))


# ---------------------------------------------------------------------------------------------- batches

@pytest.fixture(scope="module")
def swin_aspect(tmp_path_factory):
    """A Swin whose processor keeps each image's aspect ratio (shortest_edge, no crop)."""
    folder = tiny_vision_checkpoint(tmp_path_factory.mktemp("swin"), "swin", "image-classification", labels=LABELS,
                                    processor={"size": {"shortest_edge": 32}})
    return (pipeline("image-classification", model=str(folder)),
            transformers.pipeline("image-classification", model=str(folder)), folder)


def test_images_of_different_sizes_in_one_batch(swin_aspect, images):
    """transformers fails to stack such a batch (batch_size > 1); lightpipe runs them one at a time and
    gives what batch_size=1 gives."""
    ours, ref, folder = swin_aspect
    expected = ref(images, batch_size=1)
    assert_same_labels(ours(images, batch_size=3), expected)
    assert_same_labels(list(ours(iter(images), batch_size=2)), expected)
    features = pipeline("image-feature-extraction", model=str(folder))
    ref_features = transformers.pipeline("image-feature-extraction", model=str(folder))
    for o, r in zip(features(images, batch_size=3), ref_features(images, batch_size=1)):
        assert_close(o, r)


# ---------------------------------------------------------------------------------------------- arrays

@pytest.fixture(scope="module")
def vit_pipes(tmp_path_factory):
    folder = tiny_vision_checkpoint(tmp_path_factory.mktemp("vit"), "vit", "image-classification", labels=LABELS)
    return pipeline("image-classification", model=str(folder)), transformers.pipeline("image-classification",
                                                                                      model=str(folder))


def test_array_forms(vit_pipes):
    """transformers hands arrays straight to its image processor: uint8 (H, W, 3) or (3, H, W), integer
    floats, bool (read as 0 and 1) and tensors agree with it."""
    ours, ref = vit_pipes
    rgb = np.array(smooth_image(40, 50, seed=5))
    for array in (rgb, rgb.transpose(2, 0, 1).copy(), rgb.astype(np.float32), rgb.astype(np.int64), rgb > 120,
                  torch.from_numpy(rgb), rgb[:3, :3].copy(), rgb[:, ::2]):
        assert_same_labels(ours(array, top_k=4), ref(array, top_k=4))


def test_arrays_transformers_refuses(vit_pipes):
    """(1, N, 3), (1, 1, 3) and (4, N, 3) arrays are RGB images (transformers takes their first axis for
    1 or 4 channels and fails on the 3-channel normalisation); greyscale and RGBA arrays, which it also
    refuses, read as their PIL images do (RGBA composited onto white)."""
    ours, ref = vit_pipes
    rgb = np.array(smooth_image(40, 50, seed=6))
    for array in (rgb[:1], rgb[:1, :1], rgb[:4]):
        assert_same_labels(ours(array.copy()), ref(Image.fromarray(array.copy())))
    gray = np.array(smooth_image(40, 50, seed=7, mode="L"))
    for array in (gray, gray[:, :, None], gray[None]):
        assert_same_labels(ours(array), ref(Image.fromarray(gray)))
    rgba = np.array(smooth_image(40, 50, seed=8, mode="RGBA"))
    white = Image.alpha_composite(Image.new("RGBA", (50, 40), (255,) * 4), Image.fromarray(rgba)).convert("RGB")
    assert_same_labels(ours(rgba), ref(white), tol=2e-2)  # compositing rounds a little differently


def test_float_arrays_in_0_1_are_intensities(vit_pipes):
    """A deliberate difference: transformers 5 rescales float images in 0..1 twice (once converting them to
    PIL for resizing, once more by rescale_factor), so the model sees a nearly black image. lightpipe
    reads them as intensities: the answer is that of the same image in bytes (within byte truncation)."""
    ours, ref = vit_pipes
    rgb = np.array(smooth_image(40, 50, seed=9))
    floats = rgb.astype(np.float32) / 255
    bytes_back = (floats * 255).astype(np.uint8)  # what truncation to bytes gives
    assert_same_labels(ours(floats), ref(bytes_back))
    assert_same_labels(ours(torch.from_numpy(floats)), ref(bytes_back))


def test_bad_arrays_then_still_answers(vit_pipes):
    ours, ref = vit_pipes
    rgb = np.array(smooth_image(20, 20))
    for bad in (rgb.astype(np.uint16) * 257, rgb[..., :2], np.zeros((0, 4, 3), np.uint8), rgb.astype(np.complex64),
                np.full((4, 4, 3), np.nan, np.float32), np.zeros((2, 4, 4, 3), np.uint8)):
        with pytest.raises(InvalidInput):
            ours(bad)
    assert_same_labels(ours(rgb), ref(rgb))


# ---------------------------------------------------------------------------------------------- zero-shot

@pytest.fixture(scope="module")
def clip_pipes(tmp_path_factory):
    folder = tiny_clip_checkpoint(tmp_path_factory.mktemp("clip"))
    return (pipeline("zero-shot-image-classification", model=str(folder)),
            transformers.pipeline("zero-shot-image-classification", model=str(folder)))


@pytest.fixture(scope="module")
def clip_images():
    return sample_images(3)


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
def test_zero_shot_label_text(clip_pipes, clip_images, labels):
    ours, ref = clip_pipes
    assert_same_labels(ours(clip_images, candidate_labels=labels), ref(clip_images, candidate_labels=labels))


def test_zero_shot_sentence_length_limit(clip_pipes, clip_images):
    """77 tokens is the most CLIP's positions allow: at 77 both answer; at 78 transformers fails inside the
    model and lightpipe says which sentence is too long."""
    ours, ref = clip_pipes
    longest = words(ref.tokenizer, 77)
    assert_same_labels(ours(clip_images[0], candidate_labels=[longest, "cat"]),
                       ref(clip_images[0], candidate_labels=[longest, "cat"]))
    with pytest.raises(InvalidInput, match="78 tokens"):
        ours(clip_images[0], candidate_labels=[words(ref.tokenizer, 78), "cat"])


def test_zero_shot_tokenizer_kwargs(clip_pipes, clip_images):
    """transformers accepts tokenizer_kwargs and drops them. Padding never changes CLIP's scores; truncation
    here works, cutting a too long sentence to 77 tokens (end-of-text kept) as transformers' tokenizer does."""
    ours, ref = clip_pipes
    labels = ["cat", "dog"]
    expected = ref(clip_images, candidate_labels=labels)
    for options in ({"padding": "max_length", "max_length": 77}, {"padding": True}, {"truncation": True}):
        assert_same_labels(ours(clip_images, candidate_labels=labels, tokenizer_kwargs=options), expected)

    long_label = words(ref.tokenizer, 120)
    sentences = [f"This is a photo of {label}." for label in (long_label, "cat")]
    text = ref.tokenizer(sentences, padding=True, truncation=True, max_length=77, return_tensors="pt")
    pixels = ref.image_processor(images=[ref_load_image(clip_images[0])], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        scores = ref.model(**text, pixel_values=pixels).logits_per_image[0].softmax(-1).tolist()
    got = ours(clip_images[0], candidate_labels=[long_label, "cat"], tokenizer_kwargs={"truncation": True})
    assert {d["label"]: d["score"] for d in got} == pytest.approx({long_label: scores[0], "cat": scores[1]}, abs=1e-4)


@pytest.mark.parametrize("options", [{"truncation": "sideways"}, {"max_length": 0}, {"return_tensors": "pt"}, "yes",
                                     {"padding": "everywhere"}])
def test_zero_shot_bad_tokenizer_kwargs(clip_pipes, clip_images, options):
    ours, ref = clip_pipes
    with pytest.raises(InvalidInput):
        ours(clip_images[0], candidate_labels=LABELS, tokenizer_kwargs=options)
    assert_same_labels(ours(clip_images[0], candidate_labels=LABELS), ref(clip_images[0], candidate_labels=LABELS))


# ---------------------------------------------------------------------------------------------- numeric labels

def test_numeric_label_names_come_back_as_config_json_gives_them(tmp_path, images):
    """config.json may name labels by numbers ({"0": 5, ...}); transformers returns them unchanged (an int
    stays an int), and so does lightpipe."""
    folder = tiny_vision_checkpoint(tmp_path, "vit", "image-classification", labels=LABELS)
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {str(i): 10 + i for i in range(len(LABELS))}
    (folder / "config.json").write_text(json.dumps(config))
    ours = pipeline("image-classification", model=str(folder))(images[0], top_k=4)
    ref = transformers.pipeline("image-classification", model=str(folder))(images[0], top_k=4)
    assert all(type(d["label"]) is int for d in ours)
    assert_same_labels(ours, ref)

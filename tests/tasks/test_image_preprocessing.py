"""Image preprocessing against transformers' image processors: size forms, image_processor_kwargs as
transformers reads them, bad processor options, images too narrow to resize, and batches of images that
preprocess to different sizes. Each test names the transformers behaviour it matches, or says where
transformers fails and what lightpipe gives instead."""

import json

import numpy as np
import pytest
import transformers
from transformers.image_utils import load_image as ref_load_image

from lightpipe import InvalidInput, pipeline
from lightpipe.processing.image import ImageProcessor
from lightpipe.processing.image_io import load_image
from vision_helpers import assert_close, assert_same_labels, smooth_image, tiny_vision_checkpoint

LABELS = ["cat", "dog", "bird", "fish"]


@pytest.fixture(scope="module")
def images():
    return [smooth_image(40, 50, seed=1), smooth_image(64, 30, seed=2), smooth_image(33, 33, seed=3)]


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


def test_bad_numeric_processor_options_are_invalid_input(convnext_features, tmp_path):
    # rescale_factor="a" failed with float()'s ValueError, crop_pct=0 with ZeroDivisionError in preprocessing.
    ours, ref = convnext_features
    picture = tmp_path / "picture.png"
    smooth_image(40, 52, seed=4).save(picture)
    for options in ({"rescale_factor": "a"}, {"rescale_factor": [1]}, {"crop_pct": 0}, {"crop_pct": "0.9"},
                    {"crop_pct": -1.0}):
        with pytest.raises(InvalidInput, match="positive number"):
            ours(str(picture), image_processor_kwargs=options)
    options = {"crop_pct": 0.5, "rescale_factor": 1 / 127.5}
    got = ours(str(picture), image_processor_kwargs=options)
    want = ref(str(picture), image_processor_kwargs=options)
    assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-4


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



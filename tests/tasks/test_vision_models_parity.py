"""Vision models in their pipelines against transformers, on the checkpoints beyond the per-model tests: BEiT on
non-square grids and at other sizes, images too small for a model, Swin windows larger than its feature maps,
CLIP vision-tower configs and a distilled DeiT on a non-square grid. Each test says what transformers does;
where it fails (or is clearly wrong), what lightpipe gives instead."""

import numpy as np
import pytest
import torch
import transformers

from clip_helpers import randomize_clip, sample_images
from lightpipe import InvalidInput, pipeline
from vision_helpers import assert_close, assert_same_labels, smooth_image, tiny_vision_checkpoint

LABELS = ["cat", "dog", "bird", "fish"]


@pytest.fixture(scope="module")
def images():
    return [smooth_image(40, 50, seed=1), smooth_image(64, 30, seed=2), smooth_image(33, 33, seed=3)]


# ---------------------------------------------------------------------------------------------- BEiT

@pytest.mark.parametrize("image_size, size", [
    ([32, 48], {"height": 32, "width": 48}),  # the trained, non-square grid
    ([32, 48], {"height": 40, "width": 24}),  # another grid: the table is resized
    ([48, 32], {"height": 32, "width": 32}),
])
def test_beit_trained_on_a_non_square_grid(tmp_path, images, image_size, size):
    """transformers reads a non-square relative position bias table with its row and column offsets
    swapped, and resizes it even for the trained grid; checkpoints trained with it learned that layout,
    and lightpipe reads it the same way (it used the table as laid out: scores off by 1e-3)."""
    for head, task in (("image-classification", "image-classification"), ("base", "image-feature-extraction")):
        folder = tiny_vision_checkpoint(tmp_path / head, "beit", head, labels=LABELS, image_size=image_size,
                                        processor={"size": size})
        ours, ref = pipeline(task, model=str(folder)), transformers.pipeline(task, model=str(folder))
        for image in images:
            if task == "image-classification":
                assert_same_labels(ours(image, top_k=4), ref(image, top_k=4))
            else:
                for pool in (False, True):
                    assert_close(ours(image, pool=pool), ref(image, pool=pool))


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


# ---------------------------------------------------------------------------------------------- tiny images

@pytest.mark.parametrize("arch", ["vit", "deit", "beit", "convnext"])
def test_image_smaller_than_the_model_reads_is_invalid_input(tmp_path, arch):
    """With do_resize off, an image smaller than one patch (or, for ConvNeXt, than its stem and
    downsamplings need) fails inside transformers' convolution with a RuntimeError; lightpipe raised the
    same bare RuntimeError, and now says InvalidInput, then keeps answering."""
    folder = tiny_vision_checkpoint(tmp_path, arch, "image-classification", labels=LABELS,
                                    processor={"do_resize": False, "do_center_crop": False})
    ours = pipeline("image-classification", model=str(folder))
    ref = transformers.pipeline("image-classification", model=str(folder))
    for height, width in ((1, 1), (7, 9), (3, 500)):
        image = smooth_image(height, width, seed=height)
        with pytest.raises(RuntimeError):
            ref(image)
        with pytest.raises(InvalidInput, match="after preprocessing"):
            ours(image)
    fits = smooth_image(32, 32, seed=4)  # the size every one of these models reads
    assert_same_labels(ours(fits, top_k=4), ref(fits, top_k=4))


def test_swin_whose_windows_outgrow_its_own_feature_maps_says_so(tmp_path, images):
    """window_size=5 on 32-pixel images: the second stage's 4x4 map is smaller than a window, and
    transformers fails on its bias table even at the checkpoint's own size. lightpipe raises InvalidInput
    that says the image is too small (it told the user to use the size they had used)."""
    folder = tiny_vision_checkpoint(tmp_path, "swin", "image-classification", labels=LABELS, window_size=5)
    ref = transformers.pipeline("image-classification", model=str(folder))
    with pytest.raises(RuntimeError):
        ref(images[0])
    ours = pipeline("image-classification", model=str(folder))
    with pytest.raises(InvalidInput, match="too small"):
        ours(images[0])
    larger = tiny_vision_checkpoint(tmp_path / "larger", "swin", "image-classification", labels=LABELS,
                                    window_size=5, image_size=40, processor={"size": {"height": 40, "width": 40}})
    assert_same_labels(pipeline("image-classification", model=str(larger))(images[0], top_k=4),
                       transformers.pipeline("image-classification", model=str(larger))(images[0], top_k=4))


# ------------------------------------------------------------------------- CLIP vision towers, distilled DeiT
CLIP_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                   patch_size=8, projection_dim=16)


@pytest.mark.parametrize("cls, overrides", [
    ("CLIPVisionModel", dict(hidden_act="gelu", image_size=30, patch_size=8)),
    ("CLIPVisionModelWithProjection", dict(hidden_act="gelu_new", image_size=24, patch_size=6, num_hidden_layers=3,
                                           projection_dim=8)),
    ("CLIPVisionModel", dict(image_size=32, patch_size=32, hidden_size=48, num_attention_heads=3, layer_norm_eps=1e-3)),
])
def test_clip_vision_config_variants_equal_transformers(tmp_path, cls, overrides):
    config = transformers.CLIPVisionConfig(**{**CLIP_VISION, **overrides})
    torch.manual_seed(0)
    randomize_clip(getattr(transformers, cls)(config), 0).save_pretrained(str(tmp_path))
    size = config.image_size
    transformers.CLIPImageProcessor(size={"shortest_edge": size},
                                    crop_size={"height": size, "width": size}).save_pretrained(str(tmp_path))
    ours, ref = pipeline(model=str(tmp_path)), transformers.pipeline("image-feature-extraction", model=str(tmp_path))
    assert ours.task == "image-feature-extraction"
    images = sample_images(3, seed=6)
    for pool in (False, True):
        for got, want in zip(ours(images, pool=pool, batch_size=2), ref(images, pool=pool)):
            got, want = np.asarray(got), np.asarray(want)
            assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4


def test_distilled_deit_on_a_non_square_grid_equals_transformers(tmp_path):
    folder = tiny_vision_checkpoint(tmp_path, "deit", "image-classification-with-teacher", num_labels=4,
                                    image_size=[32, 48], patch_size=8,
                                    processor=dict(size={"height": 40, "width": 56},
                                                   crop_size={"height": 32, "width": 48}))
    ours, ref = pipeline(model=str(folder)), transformers.pipeline("image-classification", model=str(folder))
    assert ours.task == "image-classification"
    images = sample_images(3, seed=8)
    assert_same_labels(ours(images, top_k=4, batch_size=3), ref(images, top_k=4))
    assert_same_labels(ours(images, function_to_apply="none"), ref(images, function_to_apply="none"))

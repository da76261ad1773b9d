"""ViT parity with transformers on tiny random checkpoints (weights at std 0.2)."""

import pytest
import torch

from lightpipe import InvalidInput
from lightpipe.loading import load_model
from vision_helpers import assert_model_parity, reference_model, tiny_vision_checkpoint

PIXELS = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("head", ["base", "image-classification"])
@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": False, "hidden_act": "gelu_new", "layer_norm_eps": 1e-6},
                                       {"pooler_output_size": 24, "pooler_act": "relu"}])
def test_parity(tmp_path, head, overrides):
    folder = tiny_vision_checkpoint(tmp_path, "vit", head, **overrides)
    got = assert_model_parity(folder, "vit", head, PIXELS)
    if head == "base":
        assert got["last_hidden_state"].shape == (3, 1 + 16, 32)
        assert got["pooler_output"].shape == (3, overrides.get("pooler_output_size", 32))


def test_non_square_images_and_patches(tmp_path):
    folder = tiny_vision_checkpoint(tmp_path, "vit", "image-classification", image_size=[24, 40], patch_size=[8, 4])
    assert_model_parity(folder, "vit", "image-classification", torch.randn(2, 3, 24, 40))


def test_interpolated_positions(tmp_path):
    folder = tiny_vision_checkpoint(tmp_path, "vit", "base")
    for size in ((48, 48), (40, 56), (32, 32)):
        assert_model_parity(folder, "vit", "base", torch.randn(2, 3, *size), interpolate_pos_encoding=True)


def test_wrong_image_size_is_invalid_input(tmp_path):
    folder = tiny_vision_checkpoint(tmp_path, "vit", "base")
    model = load_model(folder, "base")
    with pytest.raises(InvalidInput, match="preprocessor_config"):
        model(torch.randn(1, 3, 40, 40))
    with pytest.raises(InvalidInput, match="channel"):
        model(torch.randn(1, 1, 32, 32))


def test_classifier_checkpoint_as_base_model(tmp_path):
    """A classifier's checkpoint serves feature extraction; it has no pooler, so none is made up."""
    folder = tiny_vision_checkpoint(tmp_path, "vit", "image-classification")
    ours = load_model(folder, "base")
    assert ours.pooler is None
    ref = reference_model(folder, "vit", "image-classification").vit
    with torch.inference_mode():
        expected = ref(pixel_values=PIXELS).last_hidden_state
        assert (ours(PIXELS)["last_hidden_state"] - expected).abs().max() <= 1e-4
        assert "pooler_output" not in ours(PIXELS)


def test_bfloat16(tmp_path):
    folder = tiny_vision_checkpoint(tmp_path, "vit", "image-classification")
    full = load_model(folder, "image-classification")
    half = load_model(folder, "image-classification", dtype="bfloat16")
    with torch.inference_mode():
        low = half(PIXELS)["logits"]
        assert low.dtype == torch.bfloat16
        assert (low.float() - full(PIXELS)["logits"]).abs().max() < 0.3


def test_fused_query_key_value_follow_weight_changes(tmp_path):
    """Inference runs query, key and value as one concatenated layer; it is rebuilt when a weight changes, and
    equals the three layers run one by one (the path taken when gradients are on)."""
    folder = tiny_vision_checkpoint(tmp_path, "vit", "base")
    model = load_model(folder, "base")
    with torch.inference_mode():
        before = model(PIXELS)["last_hidden_state"]
    with torch.no_grad():
        model.encoder.layer[0].attention.attention.key.weight.mul_(0.5)
        model.encoder.layer[1].attention.attention.value.bias.add_(0.1)
    with torch.inference_mode():
        after = model(PIXELS)["last_hidden_state"]
    one_by_one = model(PIXELS)["last_hidden_state"].detach()
    assert (after - before).abs().max() > 1e-3
    assert (after - one_by_one).abs().max() <= 1e-5

"""BEiT parity with transformers on tiny random checkpoints: relative position bias (per layer or
shared), absolute positions, layer scale, mean or [CLS] pooling."""

import pytest
import torch

from vision_helpers import assert_model_parity, tiny_vision_checkpoint

PIXELS = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
VARIANTS = [
    {},
    {"use_relative_position_bias": False, "use_shared_relative_position_bias": True,
     "use_absolute_position_embeddings": True},
    {"use_mean_pooling": False, "layer_scale_init_value": 0.0},
    {"use_relative_position_bias": False, "use_absolute_position_embeddings": True, "use_mean_pooling": False},
]


@pytest.mark.parametrize("head", ["base", "image-classification"])
@pytest.mark.parametrize("overrides", VARIANTS)
def test_parity(tmp_path, head, overrides):
    folder = tiny_vision_checkpoint(tmp_path, "beit", head, **overrides)
    got = assert_model_parity(folder, "beit", head, PIXELS)
    if head == "base":
        assert got["last_hidden_state"].shape == (3, 1 + 16, 32)


@pytest.mark.parametrize("overrides", VARIANTS[:2])
def test_other_image_sizes(tmp_path, overrides):
    """Another patch grid than the trained one: the relative position bias table is resized bilinearly
    (and absolute positions bicubically), as in the reference, which accepts any image size."""
    folder = tiny_vision_checkpoint(tmp_path, "beit", "image-classification", **overrides)
    for height, width in [(40, 40), (24, 48), (8, 8), (33, 47)]:
        pixels = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height))
        assert_model_parity(folder, "beit", "image-classification", pixels)

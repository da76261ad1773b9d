"""BEiT parity with transformers on tiny random checkpoints: relative position bias (per layer or
shared), absolute positions, layer scale, mean or [CLS] pooling."""

import pytest
import torch

from lightpipe import InvalidInput
from lightpipe.loading import load_model
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


def test_wrong_image_size_is_invalid_input(tmp_path):
    model = load_model(tiny_vision_checkpoint(tmp_path, "beit", "base"), "base")
    with pytest.raises(InvalidInput, match="patches"):
        model(torch.randn(1, 3, 40, 40))

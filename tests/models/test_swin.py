"""Swin parity with transformers on tiny random checkpoints: shifted windows, padding to whole
windows, patch merging, absolute positions."""

import pytest
import torch

from vision_helpers import assert_model_parity, tiny_vision_checkpoint

PIXELS = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("head", ["base", "image-classification"])
@pytest.mark.parametrize("overrides", [
    {},  # 8x8 patches in 4x4 windows, shifted by 2; the last stage (4x4) is one unshifted window
    {"window_size": 3, "depths": [2, 2], "num_heads": [2, 2]},  # 8x8 padded to 9x9 windows; 4x4 padded to 6x6
    {"use_absolute_embeddings": True, "qkv_bias": False, "mlp_ratio": 2.0, "hidden_act": "gelu_new"},
])
def test_parity(tmp_path, head, overrides):
    folder = tiny_vision_checkpoint(tmp_path, "swin", head, **overrides)
    got = assert_model_parity(folder, "swin", head, PIXELS)
    if head == "base":
        assert got["last_hidden_state"].shape == (3, 16, 16)


def test_odd_sizes(tmp_path):
    """Images that are not a multiple of the patch size, and odd grids at patch merging."""
    folder = tiny_vision_checkpoint(tmp_path, "swin", "base", window_size=2)
    assert_model_parity(folder, "swin", "base", torch.randn(2, 3, 30, 42))

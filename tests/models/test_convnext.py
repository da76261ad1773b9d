"""ConvNeXt parity with transformers on tiny random checkpoints."""

import pytest
import torch

from vision_helpers import assert_model_parity, tiny_vision_checkpoint

PIXELS = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("head", ["base", "image-classification"])
@pytest.mark.parametrize("overrides", [{}, {"layer_scale_init_value": 0.0, "hidden_act": "gelu_new",
                                            "layer_norm_eps": 1e-6}])
def test_parity(tmp_path, head, overrides):
    folder = tiny_vision_checkpoint(tmp_path, "convnext", head, **overrides)
    got = assert_model_parity(folder, "convnext", head, PIXELS)
    if head == "base":
        assert got["last_hidden_state"].shape == (3, 16, 4, 4)
        assert got["pooler_output"].shape == (3, 16)


def test_any_image_size(tmp_path):
    folder = tiny_vision_checkpoint(tmp_path, "convnext", "image-classification")
    assert_model_parity(folder, "convnext", "image-classification", torch.randn(2, 3, 40, 56))

"""DeiT parity with transformers on tiny random checkpoints: plain, distilled (with teacher), base."""

import pytest
import torch

from lightpipe.loading import load_model
from vision_helpers import assert_model_parity, tiny_vision_checkpoint

PIXELS = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("head", ["base", "image-classification", "image-classification-with-teacher"])
def test_parity(tmp_path, head):
    folder = tiny_vision_checkpoint(tmp_path, "deit", head)
    got = assert_model_parity(folder, "deit", head, PIXELS)
    if head == "base":
        assert got["last_hidden_state"].shape == (3, 2 + 16, 32)  # [CLS], [DIST], patches


def test_distilled_head_averages_two_heads(tmp_path):
    folder = tiny_vision_checkpoint(tmp_path, "deit", "image-classification-with-teacher")
    model = load_model(folder, "image-classification")
    assert model.config.with_teacher and not hasattr(model, "classifier")
    with torch.inference_mode():
        out = model(PIXELS)
    assert torch.allclose(out["logits"], (out["cls_logits"] + out["distillation_logits"]) / 2)


def test_interpolated_positions(tmp_path):
    folder = tiny_vision_checkpoint(tmp_path, "deit", "base")
    assert_model_parity(folder, "deit", "base", torch.randn(2, 3, 40, 48), interpolate_pos_encoding=True)

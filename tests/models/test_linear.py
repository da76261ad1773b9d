"""layers.linear: every row count and weight layout gives F.linear's result, and decode-step sized inputs (one to
three rows, padded to four on AVX-512 CPUs) give each row the same bits as a larger batch does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightpipe.models import layers
from lightpipe.models.layers import by_input_rows, linear


def random_linear(seed: int, inputs: int, outputs: int, bias: bool) -> nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(inputs, outputs, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(outputs, inputs, generator=gen) * 0.2)
        if bias:
            layer.bias.copy_(torch.randn(outputs, generator=gen) * 0.2)
    return layer


@pytest.mark.parametrize("act", [None, "relu", "gelu", "gelu_new"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_f_linear_at_every_row_count(act, bias):
    layer = random_linear(0, 96, 200, bias)
    gen = torch.Generator().manual_seed(1)
    reference = layers.activation(act) if act else (lambda y: y)
    with torch.no_grad():
        for shape in [(1, 96), (2, 96), (3, 96), (4, 96), (9, 96), (1, 1, 96), (3, 1, 96), (2, 5, 96)]:
            x = torch.randn(*shape, generator=gen)
            y = linear(x, layer, act)
            assert y.shape == (*shape[:-1], 200)
            torch.testing.assert_close(y, reference(F.linear(x, layer.weight, layer.bias)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["rows", "by_input_rows"])
def test_few_rows_give_the_bits_of_a_batch(layout):
    """A batch-1 or -3 decode step's rows equal the same rows computed among eight: batched and unbatched
    generation then agree to the bit on this path."""
    layer = random_linear(2, 576, 1000, True)
    if layout == "by_input_rows":
        layer.weight = nn.Parameter(by_input_rows(layer.weight.detach()), requires_grad=False)
    gen = torch.Generator().manual_seed(3)
    batch = torch.randn(8, 576, generator=gen)
    with torch.no_grad():
        together = linear(batch, layer)
        for rows in (1, 2, 3):
            alone = linear(batch[:rows], layer)
            if layers._onednn_streams_one_row():
                assert torch.equal(alone, together[:rows])
            torch.testing.assert_close(alone, together[:rows], rtol=1e-5, atol=1e-5)


def test_few_rows_are_padded_to_four_where_onednn_streams_one_row(monkeypatch):
    """On an AVX-512 CPU the product runs on four rows (the faster kernel) and the padding is dropped; elsewhere
    oneDNN gets the rows as they are."""
    seen = []
    real = torch.ops.mkldnn._linear_pointwise

    def spy(x, *args):
        seen.append(x.shape[0])
        return real(x, *args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    layer = random_linear(4, 64, 32, True)
    with torch.no_grad():
        for rows in (1, 2, 3, 4, 5):
            y = linear(torch.randn(rows, 1, 64), layer)
            assert y.shape == (rows, 1, 32)
    if not layers._fused_linear_works():
        assert seen == []
    elif layers._onednn_streams_one_row():
        assert seen == [4, 4, 4, 4, 5]
    else:
        assert seen == [1, 2, 3, 4, 5]

"""lightpipe.native: the compiled block product against torch's product over the same (dequantised) weights, for
every kind of block it takes (4-bit codes with a zero, 8-bit codes in groups of 32 with or without a zero, 8-bit
codes in groups of 16)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightpipe import native
from lightpipe.native import KINDS, BlockConcat, BlockWeight, sample_weight, side_by_side


def random_weight(out: int, width: int, seed: int = 0, kind=KINDS[0]) -> BlockWeight:
    bits, group, with_zero = kind
    return sample_weight(out, width, bits, group, with_zero, seed)


each_kind = pytest.mark.parametrize("kind", KINDS, ids=lambda k: f"{k[0]}bit-g{k[1]}{'-zero' if k[2] else ''}")


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo", encoding="utf-8") as info:
        return {flag for line in info if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def has_vector_path(flags: set[str]) -> bool:
    return {"avx512f", "avx512bw"} <= flags or {"avx2", "fma"} <= flags


def test_kernel_builds_and_passes_its_self_check():
    # A C compiler is part of the test setup (.ci/run installs one when missing); the kernel has AVX-512 and AVX2
    # paths, and without either lightpipe keeps to torch.
    if has_vector_path(cpu_flags()):
        assert native.available() and native._library.lp_kernel_path() in (256, 512)
    else:
        assert not native.available()


def build_with_flags(monkeypatch, tmp_path, flags):
    monkeypatch.setattr(native, "FLAGS", flags)
    monkeypatch.setenv("LIGHTPIPE_CACHE", str(tmp_path))
    return native._load()


def test_avx2_build_agrees_with_torch_and_portable_build_is_not_used(monkeypatch, tmp_path):
    """The AVX2 path (built here without AVX-512 even on a CPU that has it) passes the self-check and gives each row
    the same bits in any batch; a build with neither vector path is refused (its plain loops are slower than torch)."""
    portable = build_with_flags(monkeypatch, tmp_path / "portable", ("-O2", "-march=x86-64", "-fopenmp", "-shared",
                                                                     "-fPIC"))
    assert portable is None
    if not {"avx2", "fma"} <= cpu_flags():
        return  # an AVX2 build cannot run on this CPU: the portable refusal above is what applies here
    library = build_with_flags(monkeypatch, tmp_path / "avx2", ("-O3", "-march=native", "-mno-avx512f", "-fopenmp",
                                                                "-shared", "-fPIC"))
    assert library is not None and library.lp_kernel_path() == 256
    for bits, group, with_zero in KINDS:
        weight = sample_weight(37, 160, bits, group, with_zero, seed=bits + group)
        x, bias = torch.randn(9, 160), torch.randn(37)
        y = torch.empty(9, 37)
        status = library.lp_block_linear(x.data_ptr(), 9, 160, *weight.pointers, 37, bias.data_ptr(), y.data_ptr(), 2)
        assert status == 0
        torch.testing.assert_close(y, F.linear(x, weight.dequantized(), bias), rtol=1e-5, atol=1e-5)
        alone = torch.empty(1, 37)
        library.lp_block_linear(x[4:5].contiguous().data_ptr(), 1, 160, *weight.pointers, 37, bias.data_ptr(),
                                alone.data_ptr(), 1)
        assert torch.equal(alone[0], y[4])


@each_kind
@pytest.mark.parametrize("out, width", [(1, 32), (3, 64), (4, 96), (13, 256), (64, 576), (130, 1536)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_product_equals_torch_over_the_dequantised_weight(kind, out, width, with_bias):
    weight = random_weight(out, width, kind=kind)
    bias = torch.randn(out) if with_bias else None
    dense = weight.dequantized()
    for rows in (1, 2, 3, 4, 5, 7, 8, 9, 17):
        x = torch.randn(rows, width, generator=torch.Generator().manual_seed(rows))
        got = weight.product(x, bias)
        expected = F.linear(x, dense, bias)
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item()), rows


@each_kind
def test_each_row_has_the_same_bits_in_any_batch(kind):
    """Rows never share sums: a row's result does not depend on which rows run beside it (batched == unbatched)."""
    weight = random_weight(37, 256, seed=1, kind=kind)
    x = torch.randn(8, 256)
    together = weight.product(x, None)
    for count in range(1, 9):
        assert torch.equal(weight.product(x[:count].contiguous(), None), together[:count]), count
    for i in range(8):
        assert torch.equal(weight.product(x[i:i + 1].contiguous(), None), together[i:i + 1]), i


def test_results_do_not_depend_on_the_thread_count():
    weight = random_weight(64, 512, seed=2)
    x = torch.randn(3, 512)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = weight.product(x, None)
        torch.set_num_threads(2)
        two = weight.product(x, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_dequantized_rebuilds_values_with_one_rounding():
    """scale * code (+ zero), rounded once: for float16 scales the product is exact, so this is ggml's d * q + m."""
    weight = random_weight(5, 64, seed=3)
    blocks = weight.codes.view(5, 2, 16)
    codes = torch.cat([blocks & 15, blocks >> 4], dim=-1).view(5, 64).float()
    expected = codes * weight.scale.repeat_interleave(32, 1) + weight.zero.repeat_interleave(32, 1)
    assert torch.equal(weight.dequantized(), expected)
    assert torch.equal(weight.dequantized(slice(2, 4)), expected[2:4])
    sixteen = random_weight(5, 64, seed=3, kind=(8, 16, False))
    expected = sixteen.codes.float() * sixteen.scale.repeat_interleave(16, 1)
    assert torch.equal(sixteen.dequantized(), expected)


def test_rows_stacking_and_mixed_kinds_follow_the_rows():
    a, b = random_weight(6, 64, seed=4), random_weight(3, 64, seed=5)
    both = side_by_side([a, b])
    assert isinstance(both, BlockWeight) and both.shape == (9, 64)
    assert torch.equal(both.dequantized(), torch.cat([a.dequantized(), b.dequantized()]))
    order = torch.tensor([5, 0, 3, 1, 2, 4])
    assert torch.equal(a.rows(order).dequantized(), a.dequantized()[order])
    c = random_weight(4, 64, seed=6, kind=(8, 16, False))
    mixed = side_by_side([a, c])
    assert isinstance(mixed, BlockConcat)
    x, bias = torch.randn(2, 64), torch.randn(10)
    expected = F.linear(x, torch.cat([a.dequantized(), c.dequantized()]), bias)
    assert (mixed.product(x, bias) - expected).abs().max() < 1e-5
    with pytest.raises(ValueError):
        BlockWeight.stacked([a, c])


@pytest.mark.parametrize("codes, groups, dtype, bits, group", [
    ((4, 40), 2, torch.uint8, 4, 32),  # not whole blocks
    ((4, 16), 2, torch.uint8, 4, 32),  # scales of another shape
    ((4, 16), 1, torch.int8, 4, 32),  # 4-bit codes of another type
    ((4, 32), 1, torch.uint8, 8, 32),  # 8-bit codes of another type
    ((4, 32), 1, torch.int8, 8, 64),  # a group the kernel does not take
    ((4, 32), 1, torch.int8, 8, 16),  # groups of 16: two scales per 32 values
])
def test_malformed_weights_are_refused(codes, groups, dtype, bits, group):
    with pytest.raises(ValueError):
        BlockWeight(torch.zeros(codes, dtype=dtype), torch.ones(codes[0], groups), None, bits, group)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("LIGHTPIPE_NATIVE", "0")
    assert native._load() is None


def test_product_refuses_inputs_that_do_not_fit():
    weight = random_weight(4, 64)
    for x in (torch.randn(2, 32), torch.randn(2, 64, dtype=torch.float64), torch.randn(64, 2).t()):
        with pytest.raises(ValueError):
            weight.product(x, None)


@each_kind
def test_linear_and_greedy_head_read_kept_blocks(kind):
    """layers.linear and layers.greedy_tokens use blocks kept beside a float weight for up to 8 rows, with the float
    product's results; a weight changed in place makes them fall back to it."""
    from lightpipe.models import layers

    form = random_weight(2048, 64, seed=7, kind=kind)
    layer = torch.nn.Linear(64, 2048, bias=False)
    with torch.no_grad():
        layer.weight.copy_(form.dequantized())
    layers.keep_blocks(layer, layer.weight, form)
    used, product = [], form.product
    form.product = lambda x, bias: used.append(x.shape[0]) or product(x, bias)
    most = layers.BLOCK_MOST_ROWS
    with torch.inference_mode():
        for rows in (1, 3, most, most + 1):
            hidden = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
            expected = hidden @ layer.weight.t()
            assert (layers.linear(hidden, layer) - expected).abs().max() < 1e-4
            assert torch.equal(layers.greedy_tokens(hidden, layer), expected.argmax(dim=-1))
    assert used == [1, 1, 3, 3, most, most]  # more rows ran on the float weight
    with torch.no_grad():
        layer.weight.mul_(-1.0)
    assert layers.kept_blocks(layer, layer.weight) is None
    hidden = torch.randn(2, 64)
    with torch.inference_mode():
        assert torch.equal(layers.greedy_tokens(hidden, layer), (hidden @ layer.weight.t()).argmax(dim=-1))

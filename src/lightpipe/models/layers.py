"""Generic math shared by every architecture: activations, attention, masks."""

from __future__ import annotations

import contextvars
import ctypes
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidInput, UnsupportedModel
from ..generation.cache import KVCache


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    # The original BERT/GPT-2 tanh formula, written out: F.gelu(approximate="tanh") differs in the last bits.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_python": F.gelu,
    "gelu_new": _gelu_new,
    "gelu_fast": _gelu_new,
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise UnsupportedModel(
            f"activation {name!r} is not supported; supported: {', '.join(sorted(ACTIVATIONS))}"
        ) from None


# oneDNN's linear (+ activation) runs markedly faster than matmul + bias + activation on the CPU for the
# (tokens, hidden) shapes of encoders, with the same results to ~1e-6. It is a private op, so it is used only
# after a self-check, and everything falls back to F.linear without it. ReLU is fused into the product (oneDNN's
# post-op); GELU is applied after it by torch, in place on the product's fresh output: oneDNN's GELU post-op
# costs more than torch's vectorised kernel (a ViT-B MLP layer at 3152 tokens: 244 ms fused, 224 ms this way,
# bit-identical for the erf GELU on an AVX2 CPU).
_FUSED_ACTIVATIONS = {
    None: ("none", [], ""),
    "relu": ("relu", [], ""),
}
_GELU_IN_PLACE = {
    "gelu": "none",
    "gelu_python": "none",
    "gelu_pytorch_tanh": "tanh",
    "gelu_new": "tanh",
    "gelu_fast": "tanh",
}
_ONEDNN_ACTIVATIONS = frozenset(_FUSED_ACTIVATIONS) | frozenset(_GELU_IN_PLACE)
_fused_ok: bool | None = None


def _fused_linear_works() -> bool:
    global _fused_ok
    if _fused_ok is None:
        try:
            x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 128)
            got = torch.ops.mkldnn._linear_pointwise(x, packed, b, "relu", [], "")
            _fused_ok = bool(torch.allclose(got, F.relu(F.linear(x, w, b)), atol=1e-5))
        except Exception:  # op missing in this build
            _fused_ok = False
    return _fused_ok


def write_counter(tensor: torch.Tensor) -> int:
    """The tensor's in-place write counter; -1 for an inference tensor (a model loaded under
    torch.inference_mode()), which has none: such weights can only change inside inference mode."""
    return -1 if tensor.is_inference() else tensor._version


def weight_state(weight: torch.Tensor) -> tuple[int, int]:
    """What changes when a weight moves, is replaced or is written in place: its memory and its write counter."""
    return weight.data_ptr(), write_counter(weight)


def derived_copy(owner, name: str, weight: torch.Tensor, build):
    """`build(weight)`, kept on `owner` as attribute `name` and built again when the weight moves, is replaced or is
    written in place (its memory or write counter changes)."""
    key = weight_state(weight)
    cached = getattr(owner, name, None)
    if cached is None or cached[0] != key:
        cached = (key, build(weight))
        setattr(owner, name, cached)
    return cached[1]


def _packed_weight(layer, weight: torch.Tensor, *, streamed: bool = False) -> torch.Tensor:
    """The layer's weight (`weight`, already read from it) reordered once into oneDNN's blocked layout, kept beside
    the parameter.

    Without it oneDNN reorders the plain (out, in) matrix on every call: ~15% of an encoder's time,
    and far more when other processes compete for memory bandwidth. The cache follows the weight:
    a moved or replaced parameter is packed again. `streamed`: the caller multiplies few rows (a decode step), which
    reads the whole copy for little arithmetic; the copy is then moved to huge pages once (see huge_pages).
    """
    packed = derived_copy(layer, "_lightpipe_packed", weight, _PackedCopy)
    if streamed and not packed.huge:
        huge_pages(packed.tensor)
        packed.huge = True
    return packed.tensor


class _PackedCopy:
    def __init__(self, weight: torch.Tensor):
        self.tensor = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 128)
        self.huge = False  # moved to huge pages (done once, for decode steps)



_MADV_COLLAPSE = 25  # Linux 6.1+
_HUGE_PAGE = 2 << 20
_madvise = None


def huge_pages(packed: torch.Tensor) -> None:
    """Ask Linux to back a packed oneDNN weight with 2 MB pages now (madvise MADV_COLLAPSE), where it can.

    A batch-1 decode step streams every weight once and does little else; with 4 KB pages the processor's address
    translation misses on every page. GPT-2 small's decode step runs ~5% faster with its packed weights collapsed
    (20.5 -> 19.4 ms on a 2-core AMD EPYC), which costs ~1 s per GB once. Torch allocates them with plain pages
    unless THP_MEM_ALLOC_ENABLE was set before it started. Other systems, kernels without it, or
    LIGHTPIPE_HUGE_PAGES=0: nothing happens.
    """
    global _madvise
    if _madvise is None:
        _madvise = False
        if sys.platform.startswith("linux") and os.environ.get("LIGHTPIPE_HUGE_PAGES", "1") != "0":
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                _madvise = libc.madvise
            except (OSError, AttributeError):
                pass
    if not _madvise:
        return
    try:
        start = torch.ops.mkldnn.data_ptr(packed)
        end = start + torch.ops.mkldnn._nbytes(packed)
    except (RuntimeError, AttributeError):
        return
    first, last = -(-start // _HUGE_PAGE) * _HUGE_PAGE, end // _HUGE_PAGE * _HUGE_PAGE  # whole huge pages inside
    if last > first:
        _madvise(first, last - first, _MADV_COLLAPSE)  # refused (no THP, old kernel): the pages stay as they are


def _fusable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.is_cpu and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_grad_enabled() and _fused_linear_works())


def _laid_out_by_input_rows(weight: torch.Tensor) -> bool:
    """An (out, in) matrix whose memory is laid out (in, out): `weight.t()` is contiguous."""
    return weight.dim() == 2 and weight.stride(0) == 1 and weight.stride(1) == weight.shape[0]


_onednn_one_row: bool | None = None


def _onednn_streams_one_row() -> bool:
    """Whether oneDNN's packed product beats BLAS for one row on this CPU. With AVX-512 it streams the packed
    weight faster than BLAS streams an (in, out) matrix (GPT-2 small's 48 layer matrices: 12.3 ms against 20.6 ms;
    its 50257 x 768 head 4.6 against 5.9 ms, 2-core AMD EPYC); on an AVX2 CPU BLAS was the faster by ~17% per
    decode step (see linear)."""
    global _onednn_one_row
    if _onednn_one_row is None:
        _onednn_one_row = torch.backends.cpu.get_cpu_capability().startswith("AVX512") and _fused_linear_works()
    return _onednn_one_row


# With AVX-512, oneDNN multiplies a packed weight by one to three rows with a slower kernel than by four: per decode
# step on a 2-core AMD EPYC (huge pages), SmolLM2-135M's 120 layer matrices took 17.0 ms for one row and 15.2 ms for
# one row padded to four, OPT-350m's 144 took 47.6 against 42.3 ms, GPT-2's 48 11.9 against 9.6 ms (two rows alone
# were the slowest of all). So fewer rows are padded to four with copies of the first and the extra results dropped.
# A row's result then has the same bits as in a batch of four to eight rows (alone it could differ in the last bit).
_FEWEST_ROWS = 4


def _pads_rows(rows: int) -> bool:
    return 0 < rows < _FEWEST_ROWS and _onednn_streams_one_row()


def _onednn_product(x: torch.Tensor, rows: int, packed: torch.Tensor, bias, *post_op) -> torch.Tensor:
    """oneDNN's product of x (`rows` = its leading dims multiplied) with a packed weight; 1-3 rows run as four on
    AVX-512 (see _FEWEST_ROWS)."""
    if not _pads_rows(rows):
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, *post_op)
    lead = x if x.shape[0] == rows else x.reshape(rows, x.shape[-1])  # the rows along the first dim
    if rows == 1:
        padded = lead.expand(_FEWEST_ROWS, *lead.shape[1:])  # oneDNN reads the broadcast row as is
    else:
        padded = torch.cat([lead, lead[:1].expand(_FEWEST_ROWS - rows, *lead.shape[1:])])
    y = torch.ops.mkldnn._linear_pointwise(padded, packed, bias, *post_op)[:rows]
    return y if lead is x else y.view(*x.shape[:-1], y.shape[-1])


def _one_row_by_input_rows(x: torch.Tensor, layer) -> bool:
    """One row of input (a batch-1 decode step) against a weight whose memory is laid out (in, out), seen as (out, in)
    (`weight.t()` contiguous: GPT-2's Conv1D layout, which gpt2.sanitize keeps, or a storage transposed at load)."""
    weight = layer.weight
    return (x.device.type == "cpu" and x.numel() == x.shape[-1] and _laid_out_by_input_rows(weight)
            and x.dtype == weight.dtype)


class QuantizedLayer(nn.Module):
    """Base of the layers that lightpipe.quantize puts in place of a loaded model's nn.Linear (int8/int4 weights,
    bitsandbytes). `linear`, `vocab_logits` and `FusedProjection` call such a layer as a module instead of reading
    a float `weight`, so the model files stay plain math and quantisation stays an after-load rewrite."""

    def fuse(self, layers: tuple) -> "QuantizedLayer | None":  # noqa: ARG002
        """One layer computing `layers` (which include self) side by side, or None when they cannot share one."""
        return None


class QuantizedConcat(QuantizedLayer):
    """Quantised layers reading the same input whose weights cannot be concatenated: outputs joined on the last axis."""

    def __init__(self, layers: tuple) -> None:
        super().__init__()
        self.parts = list(layers)  # a plain list: these layers are owned by the model, not by this view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([linear(x, part) for part in self.parts], dim=-1)


# A weight kept beside its float32 values as the quantised blocks of the GGUF file it came from (native.BlockWeight):
# few-row products read those (0.6 or 1.1 bytes per weight instead of 4) and rebuild the same values. Above this many
# rows a product has arithmetic enough to hide the reading, and oneDNN's packed float kernel is the faster (a
# 1536 x 576 Q4_1 matrix, 2 threads: blocks 99 / 185 / 361 / 706 us at 8 / 16 / 32 / 64 rows, oneDNN 162 / 211 / 351 /
# 610). Rows never share sums in the kernel, so up to this many rows a row's result is the same in any batch: decode
# steps and short prompts give the same tokens batched and alone.
BLOCK_MOST_ROWS = 32


def keep_blocks(layer, weight: torch.Tensor, form) -> None:
    """Keep `form`, quantised blocks equal to `weight`, on `layer` for few-row products, valid while `weight` is."""
    layer._lightpipe_blocks = (weight_state(weight), form)


def kept_blocks(layer, weight: torch.Tensor):
    """The blocks kept for `weight` (see keep_blocks), or None: none kept, or the weight has changed since."""
    kept = layer.__dict__.get("_lightpipe_blocks")
    if kept is None or kept[0] != weight_state(weight):
        return None
    return kept[1]


def linear(x: torch.Tensor, layer, act: str | None = None) -> torch.Tensor:
    """layer(x) followed by the named activation: on the CPU through oneDNN with the weight packed once, ReLU
    fused into the product and GELU applied in place on its output. A quantised layer (QuantizedLayer) runs its own
    kernel.

    One row (a batch-1 decode step) is bound by reading the weight. With AVX-512, oneDNN's packed product streams
    it fastest (see _onednn_streams_one_row); on an AVX2 CPU BLAS over a weight laid out (in, out) was the faster
    (a GPT-2-small decode step ~17%, its 50257 x 768 output matrix ~2x), so such weights go there."""
    if isinstance(layer, QuantizedLayer):
        y = layer(x)
        return y if act is None else activation(act)(y)
    # A decode step calls this ~100 times per token: the checks below are ordered and written for few Python calls.
    weight = layer.weight
    if act in _ONEDNN_ACTIVATIONS and _fusable(x, weight) and x.shape[-1]:
        rows = x.numel() // x.shape[-1]
        if rows <= BLOCK_MOST_ROWS and "_lightpipe_blocks" in layer.__dict__ \
                and (blocks := kept_blocks(layer, weight)) is not None:
            y = blocks.product(x.reshape(rows, x.shape[-1]).contiguous(), layer.bias).view(*x.shape[:-1], -1)
            return y if act is None else activation(act)(y)
        few = _pads_rows(rows)
        if few or rows != 1 or not _laid_out_by_input_rows(weight):
            attr, scalars, algorithm = _FUSED_ACTIVATIONS.get(act, _FUSED_ACTIVATIONS[None])
            packed = _packed_weight(layer, weight, streamed=few or rows == 1)
            y = _onednn_product(x, rows, packed, layer.bias, attr, scalars, algorithm)
            return y if act not in _GELU_IN_PLACE else torch.ops.aten.gelu_(y, approximate=_GELU_IN_PLACE[act])
    if _one_row_by_input_rows(x, layer):
        flat = x.reshape(1, x.shape[-1])
        y = flat @ weight.t() if layer.bias is None else torch.addmm(layer.bias, flat, weight.t())
        y = y.view(*x.shape[:-1], y.shape[-1])
        return y if act is None else activation(act)(y)
    y = _folded_linear(x, weight, layer.bias)
    return y if act is None else activation(act)(y)


def _folded_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear over (..., in) inputs folded to one (rows, in) product. Unfolded, a 3-D input without a bias (or a
    strided one) goes to a batched product over a transposed copy of the weight on the CPU: for OPT-1.3b's
    50272 x 2048 bfloat16 head that copy alone took seconds per call."""
    if x.dim() <= 2:
        return F.linear(x, weight, bias)
    return F.linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


def _source_key(layers: tuple[nn.Linear, ...]) -> list:
    """What identifies the layers' current weights and biases: their memory, write counters, dtype and device.
    Read from the modules' parameter dicts: a decode step refreshes ~60 fused projections, and Module.__getattr__
    made this check cost more than the small products it guards."""
    key = []
    for layer in layers:
        params = layer.__dict__.get("_parameters") or {}
        weight = params["weight"] if "weight" in params else layer.weight
        bias = params["bias"] if "bias" in params else layer.bias
        key += (weight.data_ptr(), write_counter(weight), weight.dtype, weight.device)
        if bias is not None:
            key += (bias.data_ptr(), write_counter(bias))
    return key


class FusedProjection:
    """Several linear layers that read the same input as one wider layer, built from the checkpoint's layers:
    query/key/value (ViT, Llama), gate/up (Llama's MLP).

    One matrix product reads the activations once and runs a wider GEMM, which oneDNN does ~10% faster per FLOP
    than several narrow ones; in a decode step it also saves a call per layer. It quacks like nn.Linear (weight,
    bias) for layers.linear, which keeps its packed copy on this object. It is not a submodule, so checkpoints keep
    their own keys; the cost is one more copy of those weights (~85 MB for ViT-B). The copy follows the source
    layers: a moved, cast or reloaded weight is concatenated again.
    """

    def __init__(self) -> None:
        self.source: list | None = None
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def refresh(self, layers: tuple[nn.Linear, ...]) -> "FusedProjection | QuantizedLayer":
        if any(isinstance(layer, QuantizedLayer) for layer in layers):
            return self._quantized(layers)
        source = _source_key(layers)
        if source != self.source:
            # Built outside inference mode: inference tensors have no version counter to cache on.
            with torch.inference_mode(False), torch.no_grad():
                weights = [layer.weight for layer in layers]
                if all(_laid_out_by_input_rows(w) for w in weights):
                    # Keep the (in, out) memory layout one-row products read fastest (see linear).
                    self.weight = torch.cat([w.t() for w in weights], dim=1).t()
                else:
                    self.weight = torch.cat(weights)
                biases = [layer.bias for layer in layers]
                self.bias = None if all(b is None for b in biases) else torch.cat(
                    [b if b is not None else layer.weight.new_zeros(layer.out_features)
                     for b, layer in zip(biases, layers)])
                self._stack_blocks(layers)
            self.source = source
        return self

    def _stack_blocks(self, layers: tuple[nn.Linear, ...]) -> None:
        """Source layers that all keep quantised blocks (see keep_blocks) give the fused weight theirs, side by side."""
        self.__dict__.pop("_lightpipe_blocks", None)
        forms = [kept_blocks(layer, layer.weight) for layer in layers]
        if forms and all(form is not None for form in forms):
            from ..native import side_by_side

            keep_blocks(self, self.weight, side_by_side(forms))

    def _quantized(self, layers: tuple) -> QuantizedLayer:
        """Quantised source layers: one fused quantised layer when they allow it, else each in turn. Quantised
        layers never change in place (quantize.py replaces them), so their identity keys the cache."""
        if self.source != ("quantized", *map(id, layers)):
            first = layers[0]
            fused = first.fuse(layers) if all(type(layer) is type(first) for layer in layers) else None
            self.fused = fused if fused is not None else QuantizedConcat(layers)
            self.members = layers  # alive while cached, so their ids stay theirs
            self.weight = self.bias = None  # drop a float copy made before the model was quantised
            self.source = ("quantized", *map(id, layers))
        return self.fused


def clamp_half(x: torch.Tensor, *, only_on_overflow: bool = False) -> torch.Tensor:
    """float16 activations of deep encoders can overflow; keep them finite as the reference does: Whisper clamps
    every float16 output, BART only outputs that hold an inf or NaN (`only_on_overflow`)."""
    if x.dtype != torch.float16 or (only_on_overflow and bool(torch.isfinite(x).all())):
        return x
    limit = torch.finfo(torch.float16).max - 1000
    return x.clamp(min=-limit, max=limit)


def padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) 1/0 mask -> (B, 1, 1, T) boolean mask for scaled_dot_product_attention.

    Returns None when nothing is masked, which lets SDPA take its fastest kernel.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()[:, None, None, :]


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T, H*D) -> (B, H, T, D)."""
    b, t, _ = x.shape
    return x.view(b, t, num_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, T, H*D)."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Bidirectional attention over (B, H, T, D) tensors; mask is boolean, True where attended."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ----------------------------------------------------------------------------------------------
# Attention of a decoder over its cache (see lightpipe.generation.cache.KVCache)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: tuple[torch.Tensor | None, bool],
                     scale: float | None = None) -> torch.Tensor:
    """(B, Hq, t, D) queries over (B, Hkv, S, D) cached keys/values -> (B, Hq, t, D).

    `mask` is the cache's `attention_mask(t)`: (boolean mask or None, is_causal). Hq may be a multiple of Hkv
    (grouped-query attention): each key/value head serves Hq // Hkv consecutive query heads, without copying.
    A decode step's single query goes to SDPA too: with torch 2.13 its CPU kernel beats two matrix-vector products
    by 2-3x at short lengths and still by ~20% at 1000 cached positions (GPT-2's 12 heads; 15 against 32 us at 100).
    """
    attn_mask, is_causal = mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                    heads: list[int] | None = None,
                    mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B*G, H, t, D) queries over (B, H, S, D) encoder keys/values, G rows (beams) per input -> (B*G, H, t, D).

    The G rows of one input are folded into its query axis, so the keys/values are never repeated. With
    `heads`, also returns those heads' attention probabilities, (B*G, len(heads), t, S), computed apart
    (SDPA does not expose them). mask: (B, 1, 1, S) boolean, True at the encoder's real tokens (a padded
    encoder batch, see EncoderDecoderCache.cross_mask), or None when nothing is padded.
    """
    rows, num_heads, t, dim = q.shape
    batch = k.shape[0]
    groups = rows // batch
    folded = q if groups == 1 else q.view(batch, groups, num_heads, t, dim).transpose(1, 2).reshape(
        batch, num_heads, groups * t, dim)  # (B, H, G*t, D)
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask, scale=scale)
    if groups > 1:
        out = out.view(batch, num_heads, groups, t, dim).transpose(1, 2).reshape(rows, num_heads, t, dim)
    weights = None
    if heads:
        index = torch.tensor(heads, device=q.device)
        scores = folded.index_select(1, index) @ k.index_select(1, index).transpose(-1, -2)  # (B, h, G*t, S)
        scores = scores * (dim ** -0.5 if scale is None else scale)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = scores.softmax(dim=-1)
        if groups > 1:
            weights = weights.view(batch, len(heads), groups, t, -1).transpose(1, 2).reshape(rows, len(heads), t, -1)
    return out, weights


class Unpadder:
    """Moves a padded batch's real tokens into one (N, C) matrix and back.

    Linear layers and layer norms act on each token alone, so they can run on the N real tokens of
    a batch instead of its B*T padded slots; only attention needs the (B, T) layout. With mixed
    lengths this skips the work padding would cost. With no padding both moves are free.
    """

    def __init__(self, attention_mask: torch.Tensor | None, batch: int, length: int):
        self.batch, self.length = batch, length
        self.mask = padding_mask(attention_mask)  # (B, 1, 1, T) or None
        self.index = None if self.mask is None else attention_mask.reshape(-1).nonzero().squeeze(1)  # (N,)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (N, C): the real tokens only (all B*T when nothing is padded)."""
        flat = x.reshape(self.batch * self.length, x.shape[-1])
        return flat if self.index is None else flat.index_select(0, self.index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (B, T, C), zeros in the padded slots."""
        if self.index is not None:
            x = x.new_zeros(self.batch * self.length, x.shape[-1]).index_copy_(0, self.index, x)
        return x.view(self.batch, self.length, x.shape[-1])


class Embedding(nn.Embedding):
    """nn.Embedding without random initialisation: weights always come from a checkpoint, and
    nn.init.normal_ on the meta device would pull in torch's compiler stack (a second of start-up)."""

    def reset_parameters(self) -> None:
        pass


def vocab_logits(hidden: torch.Tensor, layer) -> torch.Tensor:
    """(..., C) hidden states times the (V, C) output embedding `layer.weight` (no bias) -> (..., V) logits.

    A decode step has few rows and a large vocabulary, so the product is bound by reading the matrix. On the
    CPU, oneDNN's product with the weight packed once (`linear`) streams it fastest at any row count (2-3x
    plain BLAS for 4 to 20 rows). Without oneDNN, BLAS streams a row-major (V, C) matrix fastest as the left
    operand (weight @ hidden^T); one row would take its slower matrix-vector path, so it is paired with a
    copy of itself.
    """
    if isinstance(layer, QuantizedLayer):
        return layer(hidden)
    weight = layer.weight
    if _fusable(hidden, weight) or _one_row_by_input_rows(hidden, layer):
        return linear(hidden, layer)
    shape = hidden.shape
    rows = hidden.reshape(-1, shape[-1])
    if hidden.device.type != "cpu" or hidden.dtype != torch.float32 or rows.shape[0] >= 16:
        return _folded_linear(hidden, weight, None)
    n = rows.shape[0]
    paired = rows.repeat(2, 1) if n == 1 else rows
    logits = (weight @ paired.t()).t()[:n]  # (n, V)
    return logits.contiguous().view(*shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------------------------
# Greedy decoding's head: the best token without all the logits


# Error of an accumulated float32 dot product of length n, per unit of sum |a_i b_i| (n * 2^-24), and of one
# bfloat16 rounding of a value, per unit of its size (2^-8).
_FLOAT32_UNIT = 2.0 ** -24
_BFLOAT16_UNIT = 2.0 ** -8
# More candidates than this and the screen is not worth it: every logit is computed in float32 instead.
_MAX_CANDIDATES = 256
_bf16_screen_ok: bool | None = None


def _bf16_screen_works() -> bool:
    """oneDNN multiplies bfloat16 natively on this CPU (AVX512-BF16 or AMX); otherwise it would emulate it, slower
    than float32, and the screen would cost more than it saves."""
    global _bf16_screen_ok
    if _bf16_screen_ok is None:
        try:
            _bf16_screen_ok = bool(_fused_linear_works() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                                   and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))
        except Exception:  # a build without these probes
            _bf16_screen_ok = False
    return _bf16_screen_ok


class _Screen:
    """A bfloat16 copy of a (V, C) output matrix packed for oneDNN, with what bounds its error per row: the norm of
    the rounding `W - bf16(W)` and the norm of `bf16(W)`."""

    def __init__(self, weight: torch.Tensor):
        with torch.inference_mode(False), torch.no_grad():
            rounded = weight.to(torch.bfloat16)
            self.packed = torch.ops.mkldnn._reorder_linear_weight(rounded, 128)
            huge_pages(self.packed)  # only decode steps read it
            wide = rounded.float()
            self.rounding = torch.linalg.vector_norm(weight - wide, dim=1)  # (V,)
            self.size = torch.linalg.vector_norm(wide, dim=1)  # (V,)


def _screen(layer) -> _Screen:
    return derived_copy(layer, "_lightpipe_screen", layer.weight, lambda weight: _Screen(weight.detach()))


def greedy_tokens(hidden: torch.Tensor, layer) -> torch.Tensor:
    """(B, C) hidden states -> (B,) index of the largest logit of `hidden @ layer.weight.T`: exactly
    `vocab_logits(hidden, layer).argmax(-1)`, at about half the cost on a CPU with bfloat16 instructions.

    A decode step at small batch spends ~20% of its time reading the output matrix (GPT-2: 154 MB per token).
    Here a bfloat16 copy (half the bytes) gives every logit to within a bound proved per row: the rounding of the
    weights (|W_j - bf16(W_j)| |h|), of the hidden state (|bf16(W_j)| |h - bf16(h)|), of the bfloat16 result
    (2^-8 of it) and of float32 accumulation on both sides (n 2^-24 |W_j| |h|), all doubled for safety. Only the
    tokens whose upper bound reaches the best lower bound can be the maximum - a handful - and those are computed
    in float32 from the original weights; ties go to the lowest index, as argmax does. Anything unusual (non-finite
    values, many candidates, no bfloat16 unit) computes every logit in float32 instead.
    """
    if not _screenable(hidden, layer):
        return vocab_logits(hidden, layer).argmax(dim=-1)
    if hidden.shape[0] <= BLOCK_MOST_ROWS and (blocks := kept_blocks(layer, layer.weight)) is not None:
        return blocks.product(hidden.contiguous(), None).argmax(dim=-1)  # every logit, from fewer bytes than the screen
    screen = _screen(layer)
    low = hidden.to(torch.bfloat16)
    approx = _onednn_product(low, hidden.shape[0], screen.packed, None, "none", [], "").float()  # (B, V)
    size = torch.linalg.vector_norm(hidden, dim=1, keepdim=True)  # (B, 1)
    lost = torch.linalg.vector_norm(hidden - low.float(), dim=1, keepdim=True)
    accumulation = 2 * hidden.shape[1] * _FLOAT32_UNIT * size
    bound = 2 * (screen.rounding * size + screen.size * (lost + accumulation) + _BFLOAT16_UNIT * approx.abs())
    best_lower = (approx - bound).amax(dim=1, keepdim=True)  # (B, 1)
    possible = approx + bound >= best_lower  # (B, V): may hold the maximum
    candidates = possible.any(dim=0).nonzero().squeeze(1)  # (K,) ascending
    if candidates.numel() > _MAX_CANDIDATES or not bool(torch.isfinite(best_lower).all()):
        return vocab_logits(hidden, layer).argmax(dim=-1)
    exact = hidden @ layer.weight.index_select(0, candidates).t()  # (B, K) float32
    exact = exact.masked_fill(~possible.index_select(1, candidates), float("-inf"))
    return candidates[exact.argmax(dim=1)]


def greedy_positions(hidden: torch.Tensor, layer, positions: int | None = None) -> torch.Tensor:
    """(B, t, C) final hidden states -> greedy_tokens of the last position (B,), or of each of the last `positions`
    positions (B, positions): what a model's greedy_step returns."""
    if positions is None:
        return greedy_tokens(hidden[:, -1], layer)
    last = hidden[:, -positions:]
    return greedy_tokens(last.reshape(-1, last.shape[-1]), layer).view(last.shape[0], positions)


def spare_rows(model: nn.Module) -> int:
    """How many rows beside one a one-row decode step of `model` computes anyway: _FEWEST_ROWS - 1 where every
    product pads one row to four (float32 weights on a CPU where oneDNN's one-row kernel is the slower, see
    _FEWEST_ROWS), else 0. Greedy decoding fills these rows with guessed tokens (generation.lookup)."""
    if not _pads_rows(1):
        return 0
    for module in model.modules():
        if isinstance(module, QuantizedLayer) or "_lightpipe_blocks" in module.__dict__:
            return 0  # quantised products do not pad rows
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in model.parameters()):
        return 0
    return _FEWEST_ROWS - 1


def _screenable(hidden: torch.Tensor, layer) -> bool:
    return (not isinstance(layer, QuantizedLayer) and hidden.dim() == 2 and hidden.device.type == "cpu"
            and hidden.dtype == torch.float32 and layer.weight.dtype == torch.float32
            and layer.weight.shape[0] > 4 * _MAX_CANDIDATES and not torch.is_grad_enabled() and _bf16_screen_works())


class EncoderDecoderCache(KVCache):
    """A decoder's self-attention cache plus its cross-attention keys/values, computed once from the encoder output.

    `cross[layer]` is (k, v), each (batch, H, S, D) with batch dividing the cache's rows (beams or samples of one
    input share their input's entries, which therefore never move when beams are reordered). `cross_mask` is
    (batch, 1, 1, S) boolean, True at the encoder's real tokens, when the encoder batch was padded (BART's texts of
    different lengths); None when every encoder position is real (Whisper's fixed 30 s windows).
    """

    can_drop_rows = False  # rows share their input's cross-attention entries

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.keys)
        self.cross_mask: torch.Tensor | None = None

    def reorder(self, index: torch.Tensor) -> None:
        if index.numel() != self.batch_size:
            raise InvalidInput("an encoder-decoder cache keeps its rows: beams are reordered, never dropped.")
        super().reorder(index)


# ----------------------------------------------------------------------------------------------
# Decoder-only models: inputs, the cache of one full pass, the weight layout of decode steps


def left_padding(attention_mask: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor | None:
    """(B, T) 1/0 attention mask -> (B,) count of leading zeros per row, or None when no row is left-padded.

    Padding may sit on the left (as generation pads) or on the right (as tokenizers pad by default): in a causal
    model no real token ever attends to later slots, so right padding changes nothing for the real positions.
    Zeros between real tokens cannot be expressed by a cache and are refused.
    """
    if not isinstance(attention_mask, torch.Tensor):
        attention_mask = torch.as_tensor(attention_mask)
    if attention_mask.shape != input_ids.shape:
        raise InvalidInput(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                           f"{tuple(input_ids.shape)}: they must match.")
    real = attention_mask.to(input_ids.device).bool()  # (B, T)
    slots = torch.arange(real.shape[1], device=real.device)[None, :]  # (1, T)
    first = torch.where(real, slots, real.shape[1]).amin(dim=1)  # (B,) first real slot; T for an empty row
    count = real.sum(dim=1)  # (B,)
    contiguous = (slots >= first[:, None]) & (slots < (first + count)[:, None])
    if not torch.equal(contiguous, real):
        raise InvalidInput("attention_mask must mark one run of real tokens per row (1s), with padding (0s) only on "
                           "the left or the right; a causal model cannot take holes between real tokens.")
    return first if bool(first.any()) else None


def check_tokens(input_ids: torch.Tensor, vocab_size: int) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        raise InvalidInput("input_ids must be a non-empty (batch, length) tensor of token ids.")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise InvalidInput(f"input_ids must hold integer token ids, not {input_ids.dtype}.")
    if bool(((input_ids < 0) | (input_ids >= vocab_size)).any()):
        raise InvalidInput(f"input_ids hold token ids outside the vocabulary [0, {vocab_size}).")


def full_sequence_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> KVCache:
    """A fresh cache for one pass over the whole of input_ids (B, T), its left padding read from the mask."""
    check_tokens(input_ids, model.config.vocab_size)
    cache = model.new_cache(input_ids.shape[0], input_ids.shape[1])
    if attention_mask is not None:
        cache.set_left_padding(left_padding(attention_mask, input_ids))
    return cache


def check_length(max_length: int, limit: int, name: str) -> None:
    if max_length > limit:
        raise InvalidInput(f"this model has {limit} positions ({name} in config.json): a sequence of {max_length} "
                           "tokens does not fit. Shorten the prompt or ask for fewer new tokens.")


# Set while a loader fits a checkpoint (lightpipe.loading): by_input_rows then only marks the matrix, and the loader
# lays it out in the same copy that casts it and puts it in place (one copy of each weight instead of two).
DEFER_LAYOUT: contextvars.ContextVar[bool] = contextvars.ContextVar("lightpipe_defer_layout", default=False)


def by_input_rows(matrix: torch.Tensor) -> torch.Tensor:
    """The same (out, in) matrix with its memory laid out (in, out): a batch-1 decode step reads it fastest so
    (see layers.linear). Embedding lookups still work on it (a strided gather of a few rows per step)."""
    if DEFER_LAYOUT.get():
        marked = matrix.view(matrix.shape)  # a new tensor object over the same memory, carrying the request
        marked.lightpipe_by_input_rows = True
        return marked
    return matrix.t().contiguous().t()

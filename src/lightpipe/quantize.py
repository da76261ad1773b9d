"""8-bit and 4-bit quantisation of a loaded model: its nn.Linear layers are replaced after loading.

Requests use transformers' spellings: `load_in_8bit=True`, `load_in_4bit=True` or a `quantization_config` (the
fields of transformers' BitsAndBytesConfig as a dict, or any object with those fields or a `to_dict()`), given to
`pipeline(...)` or inside its `model_kwargs`.

Where each layer's weights live decides how it is quantised:

- **CUDA**: bitsandbytes (the `quant` extra) — LLM.int8 (`Linear8bitLt`, outlier columns above
  `llm_int8_threshold` in float16) or 4-bit NF4/FP4 (`Linear4bit`, `bnb_4bit_compute_dtype`,
  `bnb_4bit_use_double_quant`, `bnb_4bit_quant_type`, `bnb_4bit_quant_storage`).
- **CPU**: lightpipe's own layers.
  `Int8Linear`: weights int8, symmetric, one scale per output channel (1 byte a weight). The product runs in torch's
  dynamic quantised linear kernel (`torch.ops.quantized.linear_dynamic`, FBGEMM / oneDNN, the engine of torch's
  `quantize_dynamic`), which quantises its input to uint8 with one range per call and multiplies in integers. Each
  row is scaled to a peak of 1 first and two anchor rows pin the range, so every row (token) gets its own 8-bit
  step and a batch gives the numbers of its rows alone. Measured fastest at every shape tried (2-3x float32 on
  bert-base and Whisper shapes, and on batch-1 decode steps): torch's weight-only `_weight_int8pack_mm` is ~10x
  slower than float32 for float32 input on this build, and `_int_mm` with per-token scales loses its gain to the
  extra passes. Input values above `llm_int8_threshold` (default 6.0; LLM.int8's outliers) are multiplied in
  float32 against their dequantised weight columns and the rest in int8: without that split Whisper tiny.en
  mishears the bundled sample ("brown fox" becomes nonsense) while weight-only int8 does not; 0 turns it off
  (faster where outliers are common: ~1.5% of the values in Whisper's encoder).
  Without a quantised engine the layer dequantises its weights on the fly (correct, not faster).
  `Int4Linear`: 4-bit codes in groups of `group_size` (32/64/128/256, default 64) input features, each group
  with a scale and a zero point, through `torch._weight_int4pack_mm_for_cpu` with bfloat16 (or float16)
  activations — the kernel's float32 path is ~1000x slower. bitsandbytes' NF4/FP4 code books are CUDA kernels: on
  the CPU a 4-bit request gets these uniform int4 groups (same memory, other levels), with one warning.

Which layers: every nn.Linear except, as transformers does, the output-embedding projection (weights tied to an
embedding, e.g. lm_head), the model's last layer (a classifier, Whisper's proj_out) and whatever
`llm_int8_skip_modules` names — a given list replaces those defaults. Norms, embeddings and convolutions keep the
compute dtype.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidInput, MissingDependency
from .models.layers import QuantizedLayer

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
QUANT_TYPES = ("fp4", "nf4")
GROUP_SIZES = (32, 64, 128, 256)
# Keys transformers' BitsAndBytesConfig.to_dict() writes, and lightpipe's one addition (group_size, CPU int4).
KEYS = ("load_in_8bit", "load_in_4bit", "llm_int8_threshold", "llm_int8_skip_modules", "llm_int8_enable_fp32_cpu_offload",
        "llm_int8_has_fp16_weight", "bnb_4bit_compute_dtype", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
        "bnb_4bit_quant_storage", "quant_method", "group_size")
ALIASES = {"_load_in_8bit": "load_in_8bit", "_load_in_4bit": "load_in_4bit"}
_warned: set[str] = set()


def _warn_once(key: str, message: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message, *args)


# ----------------------------------------------------------------------------------------------
# The request


@dataclass(frozen=True)
class QuantizationConfig:
    """A validated quantisation request. `bits` is 8 (load_in_8bit) or 4 (load_in_4bit); the other fields keep
    transformers' names and defaults. `given` holds the keys the caller set, for warnings about what the CPU ignores."""

    bits: int
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: tuple[str, ...] | None = None
    llm_int8_enable_fp32_cpu_offload: bool = False
    llm_int8_has_fp16_weight: bool = False
    bnb_4bit_compute_dtype: torch.dtype | None = None
    bnb_4bit_quant_type: str = "fp4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_quant_storage: str = "uint8"
    group_size: int = 64
    given: frozenset = field(default=frozenset(), compare=False)

    @property
    def load_in_8bit(self) -> bool:
        return self.bits == 8

    @property
    def load_in_4bit(self) -> bool:
        return self.bits == 4

    def to_dict(self) -> dict[str, Any]:
        """transformers' BitsAndBytesConfig fields (dtype as its name), plus group_size."""
        out = {"quant_method": "bitsandbytes", "load_in_8bit": self.load_in_8bit, "load_in_4bit": self.load_in_4bit}
        for key in KEYS[2:-2] + ("group_size",):
            value = getattr(self, key)
            out[key] = (str(value).replace("torch.", "") if isinstance(value, torch.dtype)
                        else list(value) if isinstance(value, tuple) else value)
        return out


def _as_dict(config: Any) -> dict[str, Any]:
    """A quantization_config as a dict: a dict, anything with to_dict(), or an object's public attributes."""
    if isinstance(config, dict):
        return dict(config)
    if callable(getattr(config, "to_dict", None)):
        found = config.to_dict()
        if isinstance(found, dict):
            return dict(found)
    if hasattr(config, "__dict__"):
        return {k: v for k, v in vars(config).items() if not k.startswith("__")}
    raise InvalidInput(f"quantization_config must be a dict or a BitsAndBytesConfig-like object, not "
                       f"{type(config).__name__}.")


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"{name} must be True or False, not {value!r}.")
    return value


def parse(load_in_8bit: Any = None, load_in_4bit: Any = None, quantization_config: Any = None) -> QuantizationConfig | None:
    """The request from pipeline()'s arguments; None when nothing asks for quantisation."""
    if quantization_config is None:
        if load_in_8bit is None and load_in_4bit is None:
            return None
        fields = {"load_in_8bit": bool(load_in_8bit is not None and _flag("load_in_8bit", load_in_8bit)),
                  "load_in_4bit": bool(load_in_4bit is not None and _flag("load_in_4bit", load_in_4bit))}
        if not (fields["load_in_8bit"] or fields["load_in_4bit"]):
            return None
    else:
        if load_in_8bit or load_in_4bit:
            raise InvalidInput("give load_in_8bit/load_in_4bit or a quantization_config, not both: put the flag "
                               "inside the quantization_config.")
        fields = {}
        for key, value in _as_dict(quantization_config).items():
            key = ALIASES.get(key, key)
            if key not in KEYS:
                raise InvalidInput(f"quantization_config has an unknown key {key!r}; lightpipe reads "
                                   f"{', '.join(KEYS)}.")
            fields[key] = value
    return _validated(fields)


def _validated(fields: dict[str, Any]) -> QuantizationConfig:
    method = fields.pop("quant_method", "bitsandbytes")
    method = getattr(method, "value", method)
    if method != "bitsandbytes":
        raise InvalidInput(f"quant_method {method!r} is not supported; lightpipe quantises with the bitsandbytes "
                           "fields (load_in_8bit / load_in_4bit).")
    given = frozenset(k for k, v in fields.items() if v is not None)
    eight = _flag("load_in_8bit", fields.pop("load_in_8bit", False) or False)
    four = _flag("load_in_4bit", fields.pop("load_in_4bit", False) or False)
    if eight and four:
        raise InvalidInput("load_in_8bit and load_in_4bit are both True: choose one.")
    if not (eight or four):
        raise InvalidInput("quantization_config sets neither load_in_8bit nor load_in_4bit: set one of them to True.")
    out: dict[str, Any] = {"bits": 8 if eight else 4, "given": given}
    threshold = fields.get("llm_int8_threshold")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0 \
                or math.isinf(threshold):
            raise InvalidInput(f"llm_int8_threshold must be a number >= 0 (0 turns outlier handling off), "
                               f"not {threshold!r}.")
        out["llm_int8_threshold"] = float(threshold)
    skip = fields.get("llm_int8_skip_modules")
    if skip is not None:
        if isinstance(skip, str) or not all(isinstance(s, str) and s for s in skip):
            raise InvalidInput(f"llm_int8_skip_modules must be a list of module names, not {skip!r}.")
        out["llm_int8_skip_modules"] = tuple(skip)
    for key in ("llm_int8_enable_fp32_cpu_offload", "llm_int8_has_fp16_weight", "bnb_4bit_use_double_quant"):
        if fields.get(key) is not None:
            out[key] = _flag(key, fields[key])
    if out.get("llm_int8_has_fp16_weight"):
        raise InvalidInput("llm_int8_has_fp16_weight=True keeps float16 weights for training; lightpipe runs "
                           "inference only: leave it False.")
    compute = fields.get("bnb_4bit_compute_dtype")
    if compute is not None:
        name = str(compute).replace("torch.", "")
        if name not in DTYPES:
            raise InvalidInput(f"bnb_4bit_compute_dtype must be one of {', '.join(DTYPES)}, not {compute!r}.")
        out["bnb_4bit_compute_dtype"] = DTYPES[name]
    quant_type = fields.get("bnb_4bit_quant_type")
    if quant_type is not None:
        if quant_type not in QUANT_TYPES:
            raise InvalidInput(f"bnb_4bit_quant_type must be 'fp4' or 'nf4', not {quant_type!r}.")
        out["bnb_4bit_quant_type"] = quant_type
    storage = fields.get("bnb_4bit_quant_storage")
    if storage is not None:
        name = str(storage).replace("torch.", "")
        if name not in ("uint8", "int8", "float16", "bfloat16", "float32"):
            raise InvalidInput(f"bnb_4bit_quant_storage {storage!r} is not a storage dtype bitsandbytes takes.")
        out["bnb_4bit_quant_storage"] = name
    group = fields.get("group_size")
    if group is not None:
        if group not in GROUP_SIZES or isinstance(group, bool):
            raise InvalidInput(f"group_size must be one of {GROUP_SIZES}, not {group!r}.")
        out["group_size"] = int(group)
    return QuantizationConfig(**out)


def pop_request(model_kwargs: dict, task_params: dict) -> QuantizationConfig | None:
    """Take load_in_8bit / load_in_4bit / quantization_config out of pipeline()'s model_kwargs and keyword
    arguments (transformers accepts them in both places) and validate them; each may be given in one place only."""
    found: dict[str, Any] = {}
    for key in ("load_in_8bit", "load_in_4bit", "quantization_config"):
        here = [where for where in (model_kwargs, task_params) if key in where]
        if len(here) == 2:
            raise InvalidInput(f"{key} was given twice: as an argument and in model_kwargs; give it once.")
        found[key] = here[0].pop(key) if here else None
    return parse(**found)


def model_dtype(request: QuantizationConfig | None, dtype: Any, device: torch.device | None) -> Any:
    """The dtype to load a model to be quantised in: as transformers does for bitsandbytes, float16 on CUDA when
    no dtype was given; on the CPU float32 (the int8 kernels take float32 activations)."""
    if request is not None and dtype is None and device is not None and device.type == "cuda":
        return torch.float16
    return dtype


# ----------------------------------------------------------------------------------------------
# Which layers


def _skipped(name: str, patterns: tuple[str, ...]) -> bool:
    """transformers' rule for llm_int8_skip_modules: a pattern matches a module name from its start up to a module
    boundary ("layer.1" skips "layer.1.fc", not "layer.11.fc"), as a regular expression with the same boundary,
    or as a suffix ("fc1" skips "model.layers.3.fc1")."""
    for pattern in patterns:
        if name.endswith(pattern):
            return True
        try:
            if re.match(rf"(?:{pattern})(?:(?<=\.)|(?=\.|$))", name):
                return True
        except re.error:
            continue
    return False


def default_skips(model: nn.Module) -> tuple[str, ...]:
    """Modules transformers keeps in full precision when no skip list is given: both ends of tied weights (the
    output embedding projection) and the module of the model's last parameter (a classifier, a vocabulary head)."""
    keys = set()
    for target, source in getattr(model, "tied_weights", {}).items():
        keys.update((target, source))
    parameters = list(model.named_parameters())
    if parameters:
        keys.add(parameters[-1][0])
    names = {key.rsplit(".", 1)[0] if "." in key else key for key in keys}
    return tuple(sorted(rf"{re.escape(n)}$" for n in names))


def targets(model: nn.Module, request: QuantizationConfig) -> list[tuple[str, nn.Linear]]:
    """The (name, layer) pairs to quantise: plain nn.Linear layers not skipped."""
    skip = request.llm_int8_skip_modules
    patterns = default_skips(model) if skip is None else skip
    return [(name, module) for name, module in model.named_modules()
            if type(module) is nn.Linear and not _skipped(name, patterns)]


# ----------------------------------------------------------------------------------------------
# CPU int8


_engine_ok: bool | None = None


def _prepack(qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """int8 (N, K) codes and float (N,) scales -> the quantised engine's packed weight (its own int8 copy)."""
    with warnings.catch_warnings():  # quantised tensors are deprecated as a user-facing type; the op still is the engine
        warnings.simplefilter("ignore")
        codes = torch._make_per_channel_quantized_tensor(qweight, scale.double(),
                                                         torch.zeros_like(scale, dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(codes, None if bias is None else bias.float())


def _unpack(packed) -> torch.Tensor:
    """The engine's packed weight -> its int8 (N, K) codes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ops.quantized.linear_unpack(packed)[0].int_repr()


def _dynamic_linear(x: torch.Tensor, packed) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ops.quantized.linear_dynamic(x, packed, False)


def engine_available() -> bool:
    """Whether torch's dynamic quantised linear kernel exists in this build and gives the right numbers."""
    global _engine_ok
    if _engine_ok is None:
        try:
            gen = torch.Generator().manual_seed(0)
            w, x, b = torch.randn(24, 40, generator=gen), torch.randn(5, 40, generator=gen), torch.randn(24, generator=gen)
            scale = w.abs().amax(1) / 127
            codes = torch.round(w / scale[:, None]).to(torch.int8)
            got = _dynamic_linear(x, _prepack(codes, scale, b))
            want = F.linear(x, codes.float() * scale[:, None], b)
            _engine_ok = bool((got - want).norm() <= 0.05 * want.norm()) and torch.equal(
                _unpack(_prepack(codes, scale, None)), codes)
        except Exception:  # no quantised engine in this build
            _engine_ok = False
    return _engine_ok


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> int8 codes (N, K) and float32 scales (N,): symmetric, one scale per output channel,
    codes in [-127, 127] (weight ~= codes * scale[:, None])."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def _row_peaks(flat: torch.Tensor) -> torch.Tensor:
    """(M, K) -> (M, 1): each row's largest |value|. Two row reductions: ~20x faster than an infinity norm or
    abs().amax() over a (6000, 384) encoder batch on the CPU."""
    return torch.maximum(flat.amax(dim=1, keepdim=True), flat.amin(dim=1, keepdim=True).neg_())


_ANCHORS: dict[int, torch.Tensor] = {}


def _anchor_rows(width: int) -> torch.Tensor:
    """(2, width): rows holding -1 and +1, which fix the quantised kernel's input range to [-1, 1]."""
    if width not in _ANCHORS:
        rows = torch.zeros(2, width)
        rows[0, 0], rows[1, 0] = -1.0, 1.0
        _ANCHORS[width] = rows
    return _ANCHORS[width]


class Int8Linear(QuantizedLayer):
    """y = x W^T + b with W stored as int8 codes (per output channel, symmetric) and float32 scales.

    `threshold` > 0: input values with |value| > threshold are multiplied in float32 against their dequantised
    weight columns, the rest through the integer kernel (LLM.int8's decomposition), row by row."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, threshold: float = 0.0):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.threshold = float(threshold)
        self.register_buffer("weight_scale", scale.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.packed = _prepack(codes, self.weight_scale, None) if engine_available() else None
        # Without the engine the codes themselves are kept and dequantised on every call.
        self.register_buffer("codes", None if self.packed is not None else codes)

    @classmethod
    def from_linear(cls, layer: nn.Linear, threshold: float = 0.0) -> "Int8Linear":
        codes, scale = quantize_int8(layer.weight)
        return cls(codes, scale, layer.bias, threshold)

    def int8_codes(self) -> torch.Tensor:
        return self.codes if self.codes is not None else _unpack(self.packed)

    def dequantized(self) -> torch.Tensor:
        """The float32 (N, K) weight the codes stand for."""
        return self.int8_codes().float() * self.weight_scale[:, None]

    def fuse(self, layers: tuple) -> "Int8Linear | None":
        if any(layer.threshold != self.threshold or layer.in_features != self.in_features for layer in layers):
            return None
        biases = [layer.bias for layer in layers]
        bias = None if all(b is None for b in biases) else torch.cat(
            [b if b is not None else torch.zeros(layer.out_features) for b, layer in zip(biases, layers)])
        return Int8Linear(torch.cat([layer.int8_codes() for layer in layers]),
                          torch.cat([layer.weight_scale for layer in layers]), bias, self.threshold)

    def nbytes(self) -> int:
        """Bytes of the weights this layer holds: int8 codes, scales and bias."""
        extra = sum(t.numel() * t.element_size() for t in (self.weight_scale, self.bias) if t is not None)
        copies = (self.packed is not None) + (self.codes is not None)
        return copies * self.out_features * self.in_features + extra

    def _outlier_weight(self, columns: torch.Tensor) -> torch.Tensor:
        """(N, k) float32 dequantised weight columns. The engine's packed copy is costly to read back, so a layer
        that meets outliers keeps its int8 codes beside it from then on (+1 byte a weight, only in such layers)."""
        if self.codes is None:
            self.codes = _unpack(self.packed)
        return self.codes.index_select(1, columns).float().mul_(self.weight_scale[:, None])

    def _outliers(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split off the input values above the threshold: (the input with them zeroed, their product with the
        weights in float32, (M, N)). Each row keeps to its own values, so the result of a row never depends on the
        other rows of its batch."""
        mask = flat.abs() > self.threshold  # (M, K)
        columns = mask.any(dim=0).nonzero().squeeze(1)  # the k columns holding outliers
        picked = flat.index_select(1, columns) * mask.index_select(1, columns)  # (M, k): each row's own outliers
        return flat.masked_fill(mask, 0.0), picked @ self._outlier_weight(columns).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        flat = x.reshape(-1, self.in_features)
        flat = flat if flat.dtype == torch.float32 else flat.float()  # (M, K)
        m = flat.shape[0]
        if m == 0:
            return x.new_zeros(*shape[:-1], self.out_features)
        if self.packed is None:
            y = F.linear(flat, self.dequantized(), self.bias)
            return y.to(dtype).view(*shape[:-1], self.out_features)
        peak = _row_peaks(flat)  # (M, 1) largest |value| per row
        outliers = None
        if self.threshold > 0 and float(peak.max()) > self.threshold:
            flat, outliers = self._outliers(flat)
            peak = _row_peaks(flat)
        # The kernel quantises its whole input with one range (uint8). Each row is scaled to a peak of 1 and two
        # anchor rows pin that range to exactly [-1, 1]: every row then gets its own step (per-token quantisation,
        # as LLM.int8 does) whatever else is in the batch, and a batch gives the numbers of its rows alone.
        # Rescaling the output rows undoes the scaling exactly.
        peak.clamp_(min=1e-30)
        rows = flat.new_empty(m + 2, self.in_features)
        torch.div(flat, peak, out=rows[:m])
        rows.narrow(0, m, 2).copy_(_anchor_rows(self.in_features))
        y = _dynamic_linear(rows, self.packed)[:m].mul_(peak)
        if self.bias is not None:
            y += self.bias
        if outliers is not None:
            y += outliers
        return y.to(dtype).view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"threshold={self.threshold}, engine={'dynamic int8' if self.packed is not None else 'dequantize'}")


# ----------------------------------------------------------------------------------------------
# CPU int4


_int4_ok: bool | None = None


def int4_kernel_available() -> bool:
    """Whether torch's CPU int4 kernel exists and agrees with the dequantised weights."""
    global _int4_ok
    if _int4_ok is None:
        try:
            gen = torch.Generator().manual_seed(0)
            w, x = torch.randn(32, 64, generator=gen), torch.randn(3, 64, generator=gen).bfloat16()
            codes, scales_and_zeros = quantize_int4(w, 32, torch.bfloat16)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            got = torch._weight_int4pack_mm_for_cpu(x, packed, 32, scales_and_zeros).float()
            scale, zero = (scales_and_zeros[..., i].float().t().repeat_interleave(32, dim=1) for i in (0, 1))
            want = x.float() @ ((codes.float() - 8) * scale + zero).t()
            _int4_ok = bool((got - want).norm() <= 0.02 * want.norm())
        except Exception:
            _int4_ok = False
    return _int4_ok


def quantize_int4(weight: torch.Tensor, group_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> codes (N, K) int32 in [0, 15] and (K // group_size, N, 2) scales and zeros in `dtype`,
    asymmetric per group of `group_size` input features: weight ~= (codes - 8) * scale + zero, the layout
    torch's int4 CPU kernel reads. Scales are rounded to `dtype` first and the codes fitted to the rounded values."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)  # (N, G)
    scale = ((high - low) / 15).clamp(min=1e-8).to(dtype).float()
    zero = (low + 8 * scale).to(dtype).float()
    codes = torch.round((w - zero[..., None]) / scale[..., None] + 8).clamp_(0, 15).to(torch.int32).reshape(n, k)
    scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()  # (G, N, 2)
    return codes, scales_and_zeros


class Int4Linear(QuantizedLayer):
    """y = x W^T + b with W as 4-bit codes in groups of `group_size` input features, each group with a scale and a
    zero point. The product runs in torch's int4 CPU kernel with activations in `kernel_dtype` (bfloat16 or
    float16); without that kernel the codes are kept two to a byte and dequantised on every call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int,
                 kernel_dtype: torch.dtype = torch.bfloat16, use_kernel: bool | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group_size, self.kernel_dtype = group_size, kernel_dtype
        codes, scales_and_zeros = quantize_int4(weight, group_size, kernel_dtype)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        # The kernel packs rows in blocks of 16: narrower layers (a 3-label classifier) take the fallback.
        self.use_kernel = (int4_kernel_available() if use_kernel is None else use_kernel) and self.out_features % 16 == 0
        if self.use_kernel:  # the kernel's own packed layout, (N, K / 2) uint8
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        else:  # two codes a byte, low nibble first
            self.register_buffer("packed", (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8))

    @classmethod
    def from_linear(cls, layer: nn.Linear, group_size: int, kernel_dtype: torch.dtype = torch.bfloat16) -> "Int4Linear":
        return cls(layer.weight, layer.bias, group_size, kernel_dtype)

    def dequantized(self) -> torch.Tensor:
        """The float32 (N, K) weight the codes stand for."""
        scale = self.scales_and_zeros[..., 0].float().t().repeat_interleave(self.group_size, dim=1)  # (N, K)
        zero = self.scales_and_zeros[..., 1].float().t().repeat_interleave(self.group_size, dim=1)
        if self.use_kernel:  # read the codes back through the kernel: identity rows times the weight
            eye = torch.eye(self.in_features, dtype=self.kernel_dtype)
            return torch._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size,
                                                     self.scales_and_zeros).float().t()
        codes = torch.stack([self.packed & 15, self.packed >> 4], dim=-1).reshape(self.out_features, -1)
        return (codes.float() - 8) * scale + zero

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_and_zeros, self.bias) if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] == 0:
            return x.new_zeros(*shape[:-1], self.out_features)
        if self.use_kernel:
            y = torch._weight_int4pack_mm_for_cpu(flat.to(self.kernel_dtype).contiguous(), self.packed,
                                                  self.group_size, self.scales_and_zeros).float()
            if self.bias is not None:
                y += self.bias
        else:
            y = F.linear(flat.float(), self.dequantized(), self.bias)
        return y.to(dtype).view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, kernel={'int4pack ' + str(self.kernel_dtype) if self.use_kernel else 'dequantize'}")


# ----------------------------------------------------------------------------------------------
# bitsandbytes (CUDA)


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as e:
        raise MissingDependency("8-bit and 4-bit quantisation on CUDA needs bitsandbytes: pip install "
                                "'lightpipe[quant]' (or pip install bitsandbytes).") from e
    return bitsandbytes


class BitsAndBytesLinear(QuantizedLayer):
    """A bitsandbytes Linear8bitLt / Linear4bit in place of an nn.Linear; its weights are quantised when they move
    from the CPU to the layer's device (bitsandbytes' own rule), which `build` does once."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    @classmethod
    def build(cls, layer: nn.Linear, request: QuantizationConfig, device: torch.device) -> "BitsAndBytesLinear":
        bnb = _bitsandbytes()
        weight = layer.weight.detach().to("cpu")
        bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().to("cpu"), requires_grad=False)
        with torch.device("meta"):
            if request.bits == 8:
                inner = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias is not None,
                                            has_fp16_weights=False, threshold=request.llm_int8_threshold)
            else:
                inner = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias is not None,
                                          compute_dtype=request.bnb_4bit_compute_dtype,
                                          compress_statistics=request.bnb_4bit_use_double_quant,
                                          quant_type=request.bnb_4bit_quant_type,
                                          quant_storage=getattr(torch, request.bnb_4bit_quant_storage))
        if request.bits == 8:
            inner.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            inner.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=request.bnb_4bit_quant_type,
                                             compress_statistics=request.bnb_4bit_use_double_quant,
                                             quant_storage=getattr(torch, request.bnb_4bit_quant_storage))
        inner.bias = bias
        inner.requires_grad_(False)
        return cls(inner.to(device))  # quantises here

    def nbytes(self) -> int:
        total = 0
        for tensor in list(self.inner.parameters()) + list(self.inner.buffers()):
            total += tensor.numel() * tensor.element_size()
        state = getattr(self.inner.weight, "quant_state", None)
        if state is not None and getattr(state, "absmax", None) is not None:
            total += state.absmax.numel() * state.absmax.element_size()
        return total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


# ----------------------------------------------------------------------------------------------
# Applying a request


def quantize_model(model: nn.Module, request: QuantizationConfig, device: torch.device | None = None,
                   backend: str | None = None) -> nn.Module:
    """Replace the model's nn.Linear layers (see `targets`) in place and return it.

    Each layer goes where its weights are (or to `device` when given): on CUDA a bitsandbytes layer, on the CPU an
    Int8Linear / Int4Linear. `backend` ("cpu" or "bitsandbytes") forces one path (bitsandbytes also has CPU code).
    Layers a device_map offloaded (weights on the meta device) stay as they are.
    """
    if backend not in (None, "cpu", "bitsandbytes"):
        raise InvalidInput(f"backend must be 'cpu' or 'bitsandbytes', not {backend!r}.")
    if any(isinstance(m, QuantizedLayer) for m in model.modules()):
        raise InvalidInput("this model is already quantised; load it again from its folder to quantise it otherwise.")
    chosen = targets(model, request)
    if not chosen:
        raise InvalidInput("no linear layer is left to quantise (llm_int8_skip_modules skips them all).")
    counts = {"int8": 0, "int4": 0, "bitsandbytes": 0, "kept": 0}
    for name, layer in chosen:
        where = device if device is not None else layer.weight.device
        if where.type == "meta":
            counts["kept"] += 1
            continue
        use_bnb = backend == "bitsandbytes" or (backend is None and where.type == "cuda")
        if use_bnb:
            new = BitsAndBytesLinear.build(layer, request, where)
            counts["bitsandbytes"] += 1
        elif where.type != "cpu":
            raise InvalidInput(f"8-bit and 4-bit quantisation runs on CUDA (bitsandbytes) or the CPU, not on {where}.")
        elif request.bits == 8:
            new = Int8Linear.from_linear(layer, request.llm_int8_threshold)
            counts["int8"] += 1
        elif layer.in_features % request.group_size:
            counts["kept"] += 1  # groups must tile the input features
            _warn_once(f"group:{layer.in_features}", "int4: %s has %d input features, not a multiple of group_size "
                       "%d: it stays in %s.", name, layer.in_features, request.group_size, layer.weight.dtype)
            continue
        else:
            kernel = torch.float16 if request.bnb_4bit_compute_dtype == torch.float16 else torch.bfloat16
            new = Int4Linear.from_linear(layer, request.group_size, kernel)
            counts["int4"] += 1
        model.set_submodule(name, new)
    if counts["int4"]:
        _cpu_four_bit_notes(request)
    model.quantization_config = request
    logger.info("quantised %s", ", ".join(f"{v} {k}" for k, v in counts.items() if v))
    return model


def _cpu_four_bit_notes(request: QuantizationConfig) -> None:
    _warn_once("cpu4", "load_in_4bit on the CPU: lightpipe quantises to uniform int4 in groups of %d with a scale and "
               "zero point each (bitsandbytes' %s code book is a CUDA kernel); products run in %s.",
               request.group_size, request.bnb_4bit_quant_type,
               "float16" if request.bnb_4bit_compute_dtype == torch.float16 else "bfloat16")
    if request.bnb_4bit_use_double_quant:
        _warn_once("cpu4dq", "bnb_4bit_use_double_quant has no CPU counterpart (int4 scales are kept in 16 bits); "
                   "ignored.")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights: parameters and buffers, quantised layers counted by what they hold."""
    total, seen = 0, set()
    for module in model.modules():
        if isinstance(module, QuantizedLayer) and hasattr(module, "nbytes"):
            total += module.nbytes()
            seen.update(id(t) for t in list(module.parameters()) + list(module.buffers()))
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


__all__ = ["QuantizationConfig", "Int8Linear", "Int4Linear", "BitsAndBytesLinear", "parse", "pop_request",
           "quantize_model", "targets", "default_skips", "weight_bytes", "model_dtype"]

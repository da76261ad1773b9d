"""Small C kernels for what torch has no fast CPU op for, compiled for this machine on first use.

Today one: the product of float32 rows with a weight kept as integer codes in blocks (ggml's quantised types:
w = scale * code, + zero, per block of 32 or 16 values), 4-bit codes (Q4_0, Q4_1, Q4_K) or 8-bit ones (Q5_0, Q5_1,
Q5_K, Q6_K, Q8_0), used for decode steps of GGUF models (see layers.linear and formats/gguf.attach_blocks). A
batch-1 decode step reads every weight once for one row of arithmetic, so its time is the weights' bytes: 0.6 or 1.1
bytes per weight here against 4 for the dequantised float32 matrix. Each weight is rebuilt in a register with one
multiply or fused multiply-add, exactly the float32 value the dequantised matrix holds, so results differ from a
product over that matrix only in the order of the sums (~1e-7 relative).

The source (blockwise.c) is compiled once per machine with the system's C compiler (`cc`, or $CC) into lightpipe's
cache folder ($LIGHTPIPE_CACHE, else $XDG_CACHE_HOME/lightpipe or ~/.cache/lightpipe), for the CPU it runs on
(-march=native), and checked against torch before use. It is used where the CPU has AVX-512 or AVX2 + FMA (the
paths written with vector instructions); elsewhere torch's float product runs (plain C loops measured 5-8x slower).
Its loops run on OpenMP: only where torch itself has loaded
GNU OpenMP (Linux wheels), so both share one thread pool instead of fighting over the cores. Without a compiler, on
other systems, or with LIGHTPIPE_NATIVE=0, `available()` is False and lightpipe uses its torch paths.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("blockwise.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
BLOCK = 32  # the kernel rebuilds 32 values at a time: widths are multiples of this

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False
_builder: threading.Thread | None = None


def _cache_folder() -> Path:
    root = os.environ.get("LIGHTPIPE_CACHE")
    if root:
        return Path(root) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lightpipe" / "native"


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            lines = [line for line in info.read(1 << 16).splitlines()
                     if line.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _torch_uses_gnu_openmp() -> bool:
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return "libgomp" in maps.read()
    except OSError:
        return False


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build(compiler: str) -> Path | None:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), _cpu_signature().encode(),
                                     sys.platform.encode()])).hexdigest()[:16]
    folder = _cache_folder()
    target = folder / f"blockwise-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    # Compiled to a private name and renamed into place: processes starting together never load a half-written file.
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        out = Path(scratch) / "blockwise.so"
        result = subprocess.run([compiler, *FLAGS, "-o", str(out), str(SOURCE)], capture_output=True, text=True,
                                timeout=120)
        if result.returncode != 0:
            logger.debug("native kernels not built (%s): %s", compiler, result.stderr.strip()[:2000])
            return None
        os.replace(out, target)
    return target


def _load() -> ctypes.CDLL | None:
    if os.environ.get("LIGHTPIPE_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if not sys.platform.startswith("linux") or not _torch_uses_gnu_openmp():
        return None
    compiler = _compiler()
    if compiler is None:
        return None
    try:
        path = _build(compiler)
        if path is None:
            return None
        library = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as error:
        logger.debug("native kernels unavailable: %s", error)
        return None
    library.lp_kernel_path.restype = ctypes.c_int
    if library.lp_kernel_path() == 0:
        # Built for a CPU with neither AVX-512 nor AVX2 + FMA: the library holds no kernel (see blockwise.c).
        logger.debug("native kernels not used: this CPU has no vector path the kernel is written for")
        return None
    function = library.lp_block_linear
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_void_p,
                         ctypes.c_void_p, ctypes.c_int]
    return library if _agrees_with_torch(function) else None


def sample_weight(out: int, width: int, bits: int, group: int, with_zero: bool, seed: int = 0) -> BlockWeight:
    """Random codes with float16-valued scales (and zeros), as ggml's blocks hold them."""
    generator = torch.Generator().manual_seed(seed)
    if bits == 4:
        codes = torch.randint(0, 256, (out, width // 2), dtype=torch.uint8, generator=generator)
    else:
        codes = torch.randint(-128, 128, (out, width), dtype=torch.int8, generator=generator)
    groups = width // group
    scale = (torch.rand(out, groups, generator=generator) * 0.02).half().float()
    zero = (torch.randn(out, groups, generator=generator) * 0.1).half().float() if with_zero else None
    return BlockWeight(codes, scale, zero, bits, group)


KINDS = ((4, 32, True), (8, 32, False), (8, 32, True), (8, 16, False))  # (bits, group, with a zero) of ggml's types


def _agrees_with_torch(function) -> bool:
    """The compiled product against torch's over the same weights, for every kind and tile shape the kernel has."""
    n, k = 13, 96  # not a multiple of the kernel's 4-row tiles: its tail path runs too
    generator = torch.Generator().manual_seed(0)
    for bits, group, with_zero in KINDS:
        weight = sample_weight(n, k, bits, group, with_zero)
        bias = torch.randn(n, generator=generator)
        for rows in (1, 2, 3, 4, 7):
            x = torch.randn(rows, k, generator=generator)
            y = torch.empty(rows, n)
            if function(x.data_ptr(), rows, k, *weight.pointers, n, bias.data_ptr(), y.data_ptr(), 1) != 0:
                return False
            expected = torch.nn.functional.linear(x, weight.dequantized(), bias)
            if not torch.allclose(y, expected, rtol=1e-5, atol=1e-5):
                logger.warning("lightpipe's native block kernel disagrees with torch on this machine; not used.")
                return False
    return True


def prepare() -> None:
    """Start building and checking the kernels in a background thread, when not done yet: a GGUF load calls this
    before it dequantises, so a first build (~2 s, once per machine) runs beside the load instead of after it."""
    global _builder
    if not _tried and _builder is None:
        _builder = threading.Thread(target=available, name="lightpipe-native-build", daemon=True)
        _builder.start()


def available() -> bool:
    """Whether the native kernels are built and checked (builds them on the first call)."""
    global _library, _tried
    if not _tried:
        with _lock:
            if not _tried:
                _library = _load()
                _tried = True
    return _library is not None


@dataclass
class BlockWeight:
    """An (out, in) weight as integer codes in blocks: w[n, k] = scale[n, g] * code[n, k] (+ zero[n, g]) with
    g = k // group. `bits` 4: `codes` is (out, in / 2) bytes, block g of a row at bytes 16 g .. 16 g + 15, byte j
    holding value 32 g + j in its low nibble and 32 g + 16 + j in its high nibble (ggml's Q4_0 / Q4_1 order), group
    32. `bits` 8: `codes` is (out, in) int8, group 32 or 16. `scale` and `zero` (None: no zero) are (out, in / group)
    float32; `in` is a multiple of 32."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int = 4
    group: int = BLOCK

    def __post_init__(self) -> None:
        self.codes = self.codes.contiguous()
        self.scale = self.scale.to(torch.float32).contiguous()
        self.zero = None if self.zero is None else self.zero.to(torch.float32).contiguous()
        out, stored = self.codes.shape
        width = stored * 2 if self.bits == 4 else stored
        kind = {(4, 32): torch.uint8, (8, 32): torch.int8, (8, 16): torch.int8}.get((self.bits, self.group))
        if kind is None or self.codes.dtype != kind or width % BLOCK or self.scale.shape != (out, width // self.group) \
                or (self.zero is not None and self.zero.shape != self.scale.shape):
            raise ValueError("BlockWeight: 4-bit codes are (out, in / 2) uint8 in groups of 32, 8-bit codes (out, in) "
                             "int8 in groups of 32 or 16; scale and zero are (out, in / group), in a multiple of 32")
        self.pointers = (self.codes.data_ptr(), self.scale.data_ptr(),
                         None if self.zero is None else self.zero.data_ptr(), self.bits, self.group)

    @property
    def shape(self) -> tuple[int, int]:
        out, stored = self.codes.shape
        return out, stored * 2 if self.bits == 4 else stored

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero) if t is not None)

    def rows(self, index: torch.Tensor) -> "BlockWeight":
        """The weight with its output rows reordered (llama.cpp's Q/K rows put back in transformers' order)."""
        return BlockWeight(self.codes[index], self.scale[index], None if self.zero is None else self.zero[index],
                           self.bits, self.group)

    def stacks_with(self, other: "BlockWeight") -> bool:
        return (self.bits, self.group, self.zero is None, self.shape[1]) == \
            (other.bits, other.group, other.zero is None, other.shape[1])

    @staticmethod
    def stacked(parts: list["BlockWeight"]) -> "BlockWeight":
        """Weights of one kind reading the same input, one above the other (fused q/k/v, gate/up)."""
        first = parts[0]
        if not all(first.stacks_with(p) for p in parts):
            raise ValueError("BlockWeight.stacked: the parts are of different kinds")
        zero = None if first.zero is None else torch.cat([p.zero for p in parts])
        return BlockWeight(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]), zero,
                           first.bits, first.group)

    def dequantized(self, rows: slice | None = None) -> torch.Tensor:
        """The float32 values (of `rows` only, when given), as the kernel rebuilds them (one rounding)."""
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        codes, scale = pick(self.codes), pick(self.scale)
        out = codes.shape[0]
        if self.bits == 4:
            blocks = codes.view(out, -1, 16)
            values = torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).to(torch.float32).view(out, -1, self.group)
        else:
            values = codes.to(torch.float32).view(out, -1, self.group)
        if self.zero is None:
            return (values * scale.unsqueeze(-1)).view(out, -1)
        return torch.addcmul(pick(self.zero).unsqueeze(-1), values, scale.unsqueeze(-1)).view(out, -1)

    def product(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (rows, in), float32, contiguous -> x @ w.T + bias (rows, out)."""
        rows, width = x.shape
        out = self.codes.shape[0]
        if x.dtype != torch.float32 or not x.is_contiguous() or width != self.shape[1] or x.device.type != "cpu":
            raise ValueError(f"BlockWeight.product takes contiguous float32 CPU rows of {self.shape[1]} values")
        if _library is None and not available():
            raise RuntimeError("lightpipe's native kernels are not available here (see lightpipe.native)")
        y = torch.empty(rows, out)
        status = _library.lp_block_linear(x.data_ptr(), rows, width, *self.pointers, out,
                                          None if bias is None else bias.data_ptr(), y.data_ptr(),
                                          torch.get_num_threads())
        if status:
            raise RuntimeError("native block product refused its arguments")  # guarded by the caller's checks
        return y


class BlockConcat:
    """Block weights of different kinds reading the same input (a fused q/k/v whose v is stored in another type):
    their products side by side."""

    def __init__(self, parts: list[BlockWeight]):
        self.parts = parts

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def product(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = torch.cat([p.product(x, None) for p in self.parts], dim=1)
        return y if bias is None else y.add_(bias)


def side_by_side(parts: list[BlockWeight]) -> "BlockWeight | BlockConcat":
    """One weight for parts read by the same input: stacked when of one kind, else multiplied in turn."""
    return BlockWeight.stacked(parts) if all(parts[0].stacks_with(p) for p in parts) else BlockConcat(parts)

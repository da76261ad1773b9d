"""Small C kernels for what torch has no fast CPU op for, compiled for this machine on first use.

Today one: the product of float32 rows with a weight kept as 4-bit codes in blocks of 32 (ggml's Q4_0, Q4_1 and
Q4_K: w = scale * code + zero per block), used for decode steps of GGUF models (see layers.linear and
formats/gguf.attach_four_bit). A batch-1 decode step reads every weight once for one row of arithmetic, so its time
is the weights' bytes: 0.625 bytes per weight here against 4 for the dequantised float32 matrix. Each weight is rebuilt
in a register with one fused multiply-add, exactly the float32 value the dequantised matrix holds, so results differ
from a product over that matrix only in the order of the sums (~1e-7 relative).

The source (blockwise.c) is compiled once per machine with the system's C compiler (`cc`, or $CC) into lightpipe's
cache folder ($LIGHTPIPE_CACHE, else $XDG_CACHE_HOME/lightpipe or ~/.cache/lightpipe), for the CPU it runs on
(-march=native), and checked against torch before use. Its loops run on OpenMP: only where torch itself has loaded
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
BLOCK = 32  # values per block of codes (one scale and one zero each)

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False


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
    function = library.lp_four_bit_linear
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return library if _agrees_with_torch(function) else None


def _agrees_with_torch(function) -> bool:
    """The compiled product against torch's over the same weights, for every tile shape the kernel has."""
    generator = torch.Generator().manual_seed(0)
    n, k = 13, 96  # not a multiple of the kernel's 4-row tiles: its tail path runs too
    weight = FourBitWeight(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=generator),
                           torch.rand(n, k // BLOCK, generator=generator), torch.randn(n, k // BLOCK, generator=generator))
    bias = torch.randn(n, generator=generator)
    for rows in (1, 2, 3, 4, 7):
        x = torch.randn(rows, k, generator=generator)
        y = torch.empty(rows, n)
        if function(x.data_ptr(), rows, k, *weight.pointers, n, bias.data_ptr(), y.data_ptr(), 1) != 0:
            return False
        expected = torch.nn.functional.linear(x, weight.dequantized(), bias)
        if not torch.allclose(y, expected, rtol=1e-5, atol=1e-5):
            logger.warning("lightpipe's native 4-bit kernel disagrees with torch on this machine; not used.")
            return False
    return True


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
class FourBitWeight:
    """An (out, in) weight as 4-bit codes in blocks of 32 values: w[n, k] = scale[n, g] * code[n, k] + zero[n, g]
    with g = k // 32. `codes` is (out, in / 2) bytes, block g of a row at bytes 16 g .. 16 g + 15, byte j holding
    value 32 g + j in its low nibble and value 32 g + 16 + j in its high nibble (ggml's Q4_0 / Q4_1 order);
    `scale` and `zero` are (out, in / 32) float32."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    def __post_init__(self) -> None:
        self.codes = self.codes.contiguous()
        self.scale = self.scale.to(torch.float32).contiguous()
        self.zero = self.zero.to(torch.float32).contiguous()
        out, half = self.codes.shape
        if self.codes.dtype != torch.uint8 or (half * 2) % BLOCK or self.scale.shape != (out, half * 2 // BLOCK) \
                or self.zero.shape != self.scale.shape:
            raise ValueError("FourBitWeight: codes must be (out, in / 2) uint8 and scale, zero (out, in / 32)")
        self.pointers = (self.codes.data_ptr(), self.scale.data_ptr(), self.zero.data_ptr())

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * 2

    def rows(self, index: torch.Tensor) -> "FourBitWeight":
        """The weight with its output rows reordered (llama.cpp's Q/K rows put back in transformers' order)."""
        return FourBitWeight(self.codes[index], self.scale[index], self.zero[index])

    @staticmethod
    def stacked(parts: list["FourBitWeight"]) -> "FourBitWeight":
        """Weights reading the same input, one above the other (fused q/k/v, gate/up)."""
        return FourBitWeight(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                             torch.cat([p.zero for p in parts]))

    def dequantized(self, rows: slice | None = None) -> torch.Tensor:
        """The float32 values (of `rows` only, when given), as the fused multiply-add in the kernel rebuilds them."""
        codes, scale, zero = (t if rows is None else t[rows] for t in (self.codes, self.scale, self.zero))
        out = codes.shape[0]
        blocks = codes.view(out, -1, BLOCK // 2)
        values = torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).to(torch.float32)  # (out, groups, 32)
        return torch.addcmul(zero.unsqueeze(-1), values, scale.unsqueeze(-1)).view(out, -1)

    def product(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (rows, in), float32, contiguous -> x @ w.T + bias (rows, out)."""
        rows, width = x.shape
        out = self.codes.shape[0]
        y = torch.empty(rows, out)
        status = _library.lp_four_bit_linear(x.data_ptr(), rows, width, *self.pointers, out,
                                             None if bias is None else bias.data_ptr(), y.data_ptr(),
                                             torch.get_num_threads())
        if status:
            raise RuntimeError("native 4-bit product refused its arguments")  # guarded by the caller's checks
        return y

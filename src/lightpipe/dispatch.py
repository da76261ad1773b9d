"""device_map: a model's blocks spread over accelerators, the CPU and the disk, as transformers' `device_map` does.

The unit of placement is a *block*: a module of a class the architecture names in `NO_SPLIT_MODULES` (a decoder
layer, an encoder layer: its residual stream must stay on one device), or a top-level part that holds no block
(embeddings, a final norm, a head). The plan is made on the meta-built model, before any weight is read:

- "sequential" fills the devices in order (accelerators by index, then the CPU, then the disk) up to `max_memory`;
- "balanced" / "auto" first spread the model evenly over the accelerators, "balanced_low_0" keeping as little as
  possible on the first one (room for generation's own tensors);
- a dict {module name: device} names places directly ("" is the whole model; the longest matching name wins).

Each weight then goes from the mapped checkpoint file straight to its place (lightpipe.loading.assign_weights).
Weights placed on "disk" are written once, in their final dtype, into a file in `offload_folder` and memory-mapped
from there: they never take anonymous memory, and the kernel reads their pages when their block runs (and may drop
them again under memory pressure). Blocks on the CPU and on disk execute on the *main device* (the first
accelerator in the map, or the CPU when there is none); when that is an accelerator, a block's weights are copied
to it for the block's forward and let go of after. Activations move to a block's device on the way in and back to
the main device on the way out, and a generation cache is made on the main device (each layer's buffers follow
that layer's device on first use). A model placed wholly on the CPU and the disk needs none of that: it runs as it
is, with no hooks at all.

`model.hf_device_map` (and `model.device_map`) says where every block went: an int for a CUDA device (as
transformers writes it), "cpu", "disk", or another device's name. A dispatched model is never moved with `.to()`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import mmap
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import models
from .errors import InvalidInput

logger = logging.getLogger(__name__)

DISK = "disk"
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
# Share of an accelerator's free memory (and of the RAM available) a plan fills when max_memory does not say:
# the rest is room for activations, caches and the allocator's slack.
DEFAULT_SHARE = 0.9
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------
# Arguments


def parse_size(value: Any, what: str = "max_memory") -> int:
    """A memory size: an int of bytes, or a string such as "20GiB", "500MB", "1.5GB", "2G" (as transformers reads
    them: GB and G are 10^9 bytes, GiB 2^30) -> bytes."""
    if isinstance(value, bool):
        raise InvalidInput(f"{what} must be a size such as '20GiB' or a number of bytes, not {value!r}.")
    if isinstance(value, (int, float)):
        if value < 0 or not math.isfinite(value):
            raise InvalidInput(f"{what} must be a non-negative size, not {value!r}.")
        return int(value)
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            number, unit = match.groups()
            unit = (unit or "").lower()
            unit = unit if unit.endswith("b") or not unit else unit + "b"
            if unit in _UNITS:
                return int(float(number) * _UNITS[unit])
    raise InvalidInput(f"{what} {value!r} is not a size: write it as '20GiB', '500MB', '1.5GB' or a number of bytes.")


def place_name(value: Any, *, what: str = "device_map") -> str:
    """A device as a device map or max_memory names it (an int, "cpu", "cuda:1", "disk", a torch.device) -> its
    canonical name ("cuda:0", "cpu", "disk", "mps", ...), checked to exist here."""
    from . import loading

    if isinstance(value, str) and value.strip().lower() == DISK:
        return DISK
    try:
        device = loading.resolve_device(value)
        loading.check_device_available(device)
    except InvalidInput as e:
        raise InvalidInput(f"{what}: {e}") from e
    if device.type in ("cuda", "xpu", "npu") and device.index is None:
        device = torch.device(device.type, 0)
    return str(device)


def _reported(place: str) -> int | str:
    """The value hf_device_map shows for a place: CUDA devices by index, as transformers reports them."""
    return int(place.split(":")[1]) if place.startswith("cuda:") else place


@dataclasses.dataclass
class Request:
    """device_map, max_memory and offload_folder as given, checked before any file is read."""

    strategy: str | None = None  # one of STRATEGIES, or None for an explicit map
    mapping: dict[str, str] | None = None  # module name -> place name
    max_memory: dict[str, int] | None = None  # place name -> bytes
    offload_folder: Path | None = None

    @classmethod
    def from_args(cls, device_map: Any, max_memory: Any = None, offload_folder: Any = None) -> "Request":
        request = cls()
        if isinstance(device_map, str) and device_map in STRATEGIES:
            request.strategy = device_map
        elif isinstance(device_map, dict):
            mapping = {}
            for name, value in device_map.items():
                if not isinstance(name, str):
                    raise InvalidInput(f"device_map keys are module names (strings), not {name!r}.")
                mapping[name] = place_name(value, what=f"device_map[{name!r}]")
            if not mapping:
                raise InvalidInput("device_map is an empty dict: name at least one module ('' is the whole model).")
            request.mapping = mapping
        else:
            # A single device (transformers takes device_map="cuda:0" or 0 as "all on that device").
            try:
                request.mapping = {"": place_name(device_map)}
            except InvalidInput as e:
                raise InvalidInput(f"device_map {device_map!r} is neither a device nor one of "
                                   f"{', '.join(STRATEGIES)}, nor a dict of module name -> device ({e}).") from e
            if request.mapping[""] == DISK:
                raise InvalidInput("device_map='disk' would leave nothing in memory; map some blocks to a device.")
        if max_memory is not None:
            if not isinstance(max_memory, dict) or not max_memory:
                raise InvalidInput("max_memory must be a dict of device -> size, e.g. {0: '20GiB', 'cpu': '30GiB'}.")
            budgets = {}
            for key, size in max_memory.items():
                name = place_name(key, what=f"max_memory key {key!r}")
                budgets[name] = parse_size(size, f"max_memory[{key!r}]")
            request.max_memory = budgets
        if offload_folder is not None:
            if not isinstance(offload_folder, (str, os.PathLike)):
                raise InvalidInput(f"offload_folder must be a folder path, not {type(offload_folder).__name__}.")
            request.offload_folder = Path(offload_folder)
        return request


# ----------------------------------------------------------------------------------------------
# Blocks and their sizes


def no_split_classes(model: nn.Module) -> tuple[str, ...]:
    """The class names of the blocks the model's architecture declares (`NO_SPLIT_MODULES` in its model file)."""
    config = getattr(model, "config", None)
    if config is None:
        return tuple(getattr(model, "no_split_modules", ()))
    return tuple(getattr(models.architecture_module(config.model_type), "NO_SPLIT_MODULES", ()))


def blocks(model: nn.Module) -> list[str]:
    """The model's units of placement in module order: each block, and each module outside the blocks that holds
    no block ("" alone when the architecture declares no block)."""
    return _units(model, "", set(no_split_classes(model)))


def _units(module: nn.Module, prefix: str, classes: set[str]) -> list[str]:
    """The units of placement under `module` (named `prefix`): see `blocks`."""
    units: list[str] = []

    def holds_block(module: nn.Module) -> bool:
        return any(type(m).__name__ in classes for m in module.modules())

    def walk(module: nn.Module, prefix: str, top: bool) -> None:
        if type(module).__name__ in classes or not holds_block(module):
            if top or any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
                units.append(prefix)
            return
        for name, child in module.named_children():
            if child is not None:
                walk(child, f"{prefix}.{name}" if prefix else name, False)

    walk(module, prefix, True)
    return units


def owner_of(key: str, names) -> str | None:
    """The longest of `names` that is `key` itself or a module above it ("" is above everything)."""
    parts = key.split(".")
    for end in range(len(parts), -1, -1):
        candidate = ".".join(parts[:end])
        if candidate in names:
            return candidate
    return None


def _loose(model: nn.Module, key: str) -> bool:
    """A tensor held directly by a module that also has submodules (BART's final_logits_bias on the model itself):
    no block owns it, and it stays on the main device."""
    owner = key.rpartition(".")[0]
    module = model.get_submodule(owner) if owner else model
    return any(True for _ in module.children())


def _tied_targets(model: nn.Module) -> set[str]:
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", True):
        return set()
    return set(getattr(model, "tied_weights", {}))


def block_sizes(model: nn.Module, units: list[str], dtype: torch.dtype) -> dict[str, int]:
    """Bytes each unit's weights take in `dtype` (floating-point tensors; others keep their own); a tied weight
    counts once, where its source lives."""
    sizes = dict.fromkeys(units, 0)
    tied = _tied_targets(model)
    for key, tensor in model.state_dict().items():
        if key in tied:
            continue
        unit = owner_of(key, sizes)
        if unit is not None:
            sizes[unit] += tensor.numel() * (dtype.itemsize if tensor.is_floating_point() else tensor.element_size())
    return sizes


# ----------------------------------------------------------------------------------------------
# Planning


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def default_budgets() -> dict[str, int]:
    """Every visible CUDA device's free memory and the RAM available, each times DEFAULT_SHARE."""
    budgets = {}
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, _ = torch.cuda.mem_get_info(index)
            budgets[f"cuda:{index}"] = int(free * DEFAULT_SHARE)
    budgets["cpu"] = int(_available_ram() * DEFAULT_SHARE)
    return budgets


def _order(place: str) -> tuple:
    """Accelerators first (by type, then index), then the CPU; the disk last."""
    if place == DISK:
        return (2, "", 0)
    if place == "cpu":
        return (1, "", 0)
    kind, _, index = place.partition(":")
    return (0, kind, int(index or 0))


def plan_blocks(units: list[str], sizes: dict[str, int], budgets: dict[str, int], strategy: str = "sequential",
                offload: bool = False) -> dict[str, str]:
    """Units (in order) -> places under `budgets` (place name -> bytes; the disk is unbounded when `offload`).

    Raises InvalidInput when some unit fits nowhere in memory and there is no offload folder."""
    places = sorted((p for p in budgets if p != DISK), key=_order)
    room = {p: budgets[p] for p in places}
    accelerators = [p for p in places if p != "cpu"]
    total = sum(sizes.values())
    if strategy in ("auto", "balanced", "balanced_low_0") and len(accelerators) > 1:
        low_zero = strategy == "balanced_low_0"
        share = total // (len(accelerators) - 1 if low_zero else len(accelerators))
        biggest = max(sizes.values(), default=0)
        for i, place in enumerate(accelerators):
            if low_zero and i == 0:
                continue
            room[place] = min(room[place], share + biggest)  # room for one more block than an even share
        if low_zero:
            others = sum(room[p] for p in accelerators[1:])
            room[accelerators[0]] = min(room[accelerators[0]], max(0, total - others))
    placed: dict[str, str] = {}
    current = 0
    for unit in units:
        size = sizes[unit]
        while current < len(places) and size > room[places[current]]:
            current += 1  # a block never skips back: the order of the model follows the order of the devices
        if current < len(places):
            room[places[current]] -= size
            placed[unit] = places[current]
        else:
            placed[unit] = DISK
    on_disk = [u for u, p in placed.items() if p == DISK]
    if on_disk and not offload:
        need = sum(sizes[u] for u in on_disk)
        given = ", ".join(f"{p}: {budgets[p] / 2**20:.1f} MiB" for p in places) or "nothing"
        raise InvalidInput(
            f"max_memory ({given}) leaves {len(on_disk)} block(s) ({need / 2**20:.1f} MiB, the first "
            f"{on_disk[0]!r}) with no room. Raise max_memory, or pass offload_folder= to keep them on disk.")
    return placed


def check_mapping(model: nn.Module, mapping: dict[str, str]) -> None:
    """Every name in a dict map is a module of the model, and every weight is covered."""
    names = {name for name, _ in model.named_modules()}
    unknown = sorted(k for k in mapping if k not in names)
    if unknown:
        top = ", ".join(repr(n) for n, _ in model.named_children())
        raise InvalidInput(f"device_map names {', '.join(map(repr, unknown))}, which {type(model).__name__} does not "
                           f"have (its top-level modules: {top}; blocks: {', '.join(blocks(model)[:6])} ...).")
    tied = _tied_targets(model)
    uncovered = [k for k in model.state_dict() if k not in tied and owner_of(k, mapping) is None and not _loose(model, k)]
    if uncovered:
        raise InvalidInput(f"device_map gives no device for {', '.join(uncovered[:8])}"
                           + (" ..." if len(uncovered) > 8 else "") + "; map their modules too, or map '' (everything else).")


# ----------------------------------------------------------------------------------------------
# Placing weights at load


class DevicePlacer:
    """Places each weight of a load by a device map (see lightpipe.loading.Placer); weights for the disk are
    written to one file in the offload folder and memory-mapped from it at `finish()`."""

    def __init__(self, mapping: dict[str, str], main: torch.device, offload_folder: Path | None):
        self.mapping = mapping
        self.main = main
        self.offload_folder = offload_folder
        self._file = None
        self._path: Path | None = None
        self._entries: list[tuple[str, int, torch.dtype, list[int], list[int]]] = []
        self._offset = 0
        self.mapped: mmap.mmap | None = None
        self.file = None

    @property
    def device(self) -> torch.device:
        return self.main

    def where(self, key: str) -> str:
        unit = owner_of(key, self.mapping)
        return self.mapping[unit] if unit is not None else str(self.main)

    def place(self, key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        from .loading import materialize

        where = self.where(key)
        if where != DISK:
            return materialize(tensor, where, dtype)
        self._write(key, materialize(tensor, "cpu", dtype))
        return None

    def _write(self, key: str, tensor: torch.Tensor) -> None:
        if self._file is None:
            folder = self.offload_folder
            try:
                folder.mkdir(parents=True, exist_ok=True)
                fd, name = tempfile.mkstemp(prefix="lightpipe-", suffix=".offload", dir=folder)
            except OSError as e:
                raise InvalidInput(f"offload_folder {str(folder)!r} cannot hold the offloaded weights ({e}).") from e
            self._file, self._path = os.fdopen(fd, "wb"), Path(name)
        # Written in memory order (dims by decreasing stride), so the mapped view keeps the layout sanitize chose.
        if tensor.dim() and not _dense(tensor):
            tensor = tensor.contiguous()
        order = sorted(range(tensor.dim()), key=lambda d: -tensor.stride(d))
        flat = tensor.permute(order).contiguous().reshape(-1)
        pad = -self._offset % 64
        self._file.write(b"\0" * pad)
        self._offset += pad
        self._file.write(memoryview(flat.view(torch.uint8).cpu().numpy()))
        self._entries.append((key, self._offset, tensor.dtype, list(tensor.shape), order))
        self._offset += flat.numel() * tensor.element_size()

    def finish(self) -> dict[str, torch.Tensor]:
        if self._file is None:
            return {}
        self._file.close()
        self.file = open(self._path, "rb")  # kept open: release_offloaded drops its pages from the page cache
        self.mapped = mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_COPY) if self._offset else None
        try:
            os.unlink(self._path)  # the mapping keeps the data; the file goes when the model does
        except OSError:
            logger.debug("could not remove %s; it stays until removed by hand", self._path)
        data = torch.frombuffer(self.mapped, dtype=torch.uint8) if self.mapped is not None else None
        out = {}
        for key, offset, dtype, shape, order in self._entries:
            count = math.prod(shape)
            permuted = [shape[d] for d in order]
            view = data[offset:offset + count * dtype.itemsize].view(dtype).view(permuted) if count else \
                torch.empty(permuted, dtype=dtype)
            inverse = sorted(range(len(order)), key=order.__getitem__)
            out[key] = view.permute(inverse)
        return out


def _dense(tensor: torch.Tensor) -> bool:
    """Non-overlapping and dense: the tensor's elements fill exactly numel slots of memory."""
    expected = 1
    for d in sorted(range(tensor.dim()), key=lambda d: tensor.stride(d)):
        if tensor.shape[d] == 1:
            continue
        if tensor.stride(d) != expected:
            return False
        expected *= tensor.shape[d]
    return True


def _main_device(places) -> torch.device:
    """Where inputs go and where CPU- and disk-held blocks run: the first accelerator, else the CPU."""
    accelerators = sorted({p for p in places if p not in ("cpu", DISK)}, key=_order)
    return torch.device(accelerators[0]) if accelerators else torch.device("cpu")


def plan(model: nn.Module, request: Request, dtype: torch.dtype) -> DevicePlacer:
    """The placement of a meta-built `model` (weights in `dtype`) for `request`."""
    if request.mapping is not None:
        mapping = dict(request.mapping)
        check_mapping(model, mapping)
    else:
        units = blocks(model)
        budgets = request.max_memory if request.max_memory is not None else default_budgets()
        if "cpu" not in budgets and request.max_memory is None:
            budgets["cpu"] = int(_available_ram() * DEFAULT_SHARE)
        sizes = block_sizes(model, units, dtype)
        mapping = plan_blocks(units, sizes, budgets, request.strategy, offload=request.offload_folder is not None)
    main = _main_device(mapping.values())
    mapping = pin_parts_outside_blocks(model, mapping, main)
    if DISK in mapping.values() and request.offload_folder is None:
        raise InvalidInput("the device_map puts blocks on 'disk': pass offload_folder= to say where they go.")
    return DevicePlacer(mapping, main, request.offload_folder)


def pin_parts_outside_blocks(model: nn.Module, mapping: dict[str, str], main: torch.device) -> dict[str, str]:
    """With an accelerator as main device, the mapped parts that hold no block (embeddings, a final norm, a head)
    go to the main device: model code reads their weights directly (`vocab_logits(hidden, self.lm_head)`) instead
    of calling them as modules, so a hook could not bring their weights over. Blocks are always called."""
    if main.type == "cpu":
        return mapping
    classes = set(no_split_classes(model))
    # A part that holds blocks (a whole encoder) is split into its units first: its own forward may be reached
    # through a method (`decode`) rather than a call, while blocks are always called. Deeper names come later and win.
    expanded: dict[str, str] = {}
    for name in sorted(mapping, key=lambda n: (n.count(".") + bool(n), n)):
        module = model.get_submodule(name) if name else model
        if type(module).__name__ in classes or not any(type(m).__name__ in classes for m in module.modules()):
            expanded[name] = mapping[name]
        else:
            expanded.update(dict.fromkeys(_units(module, name, classes), mapping[name]))
    mapping = expanded
    pinned = dict(mapping)
    for name, place in mapping.items():
        module = model.get_submodule(name) if name else model
        if place != str(main) and not any(type(m).__name__ in classes for m in module.modules()):
            pinned[name] = str(main)
    moved = sorted(k for k in pinned if pinned[k] != mapping[k])
    if moved:
        logger.info("device_map: %s placed on the main device %s (parts outside the blocks)", ", ".join(moved), main)
    return pinned


# ----------------------------------------------------------------------------------------------
# Running: hooks at block boundaries


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device, non_blocking=True)
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_move(v, device) for v in value)
    if isinstance(value, list):
        return [_move(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value


class BlockHook:
    """Runs one mapped module on its execution device: inputs moved there, weights held elsewhere (the CPU, the
    disk, a tied weight on another device) copied there for the call and let go of after, outputs moved back to the
    main device."""

    def __init__(self, module: nn.Module, execution: torch.device, main: torch.device):
        self.execution, self.main = execution, main
        self.remote = [(owner, name, kind)
                       for owner in module.modules()
                       for kind, table in (("param", owner._parameters), ("buffer", owner._buffers))
                       for name, t in table.items() if t is not None and t.device != execution]
        self._saved: list[list] = []
        self.handles = [module.register_forward_pre_hook(self.before, with_kwargs=True),
                        module.register_forward_hook(self.after, with_kwargs=True, always_call=True)]

    def before(self, module, args, kwargs):
        saved = []
        for owner, name, kind in self.remote:
            table = owner._parameters if kind == "param" else owner._buffers
            held = table[name]
            copy = held.detach().to(self.execution, non_blocking=True)
            table[name] = nn.Parameter(copy, requires_grad=False) if kind == "param" else copy
            saved.append((table, name, held))
        self._saved.append(saved)
        return _move(args, self.execution), _move(kwargs, self.execution)

    def after(self, module, args, kwargs, output):
        for table, name, held in self._saved.pop() if self._saved else ():
            table[name] = held
        return output if self.execution == self.main else _move(output, self.main)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def execution_device(place: str, main: torch.device) -> torch.device:
    return main if place in ("cpu", DISK) else torch.device(place)


def attach(model: nn.Module, placer: DevicePlacer) -> nn.Module:
    """Record the map on the model and, where a block runs away from the main device or away from its weights,
    hook it (see BlockHook); a generation cache is made on the main device."""
    mapping, main = placer.mapping, placer.main
    model.hf_device_map = {name: _reported(place) for name, place in mapping.items()}
    model.device_map = model.hf_device_map
    model._lightpipe_offload = placer.mapped  # the disk-held weights' mapping lives as long as the model
    model._lightpipe_offload_file = placer.file
    hooks = []
    if main.type != "cpu":
        for name, place in mapping.items():
            module = model.get_submodule(name) if name else model
            execution = execution_device(place, main)
            hook = BlockHook(module, execution, main)
            if hook.remote or execution != main:
                hooks.append(hook)
            else:
                hook.remove()
        new_cache = getattr(model, "new_cache", None)
        if new_cache is not None:
            def new_cache_on_main(*args, **kwargs):
                return new_cache(*args, **kwargs).to(main)

            model.new_cache = new_cache_on_main
    model._lightpipe_hooks = hooks
    return model


def release_offloaded(model: nn.Module) -> int:
    """Let go of the pages of a model's disk-held weights now: out of this process's memory and out of the kernel's
    page cache, so that the next forward reads them from the disk again (what a machine short of memory does by
    itself). Returns the bytes of disk-held weights; 0 when the model has none."""
    mapped = getattr(model, "_lightpipe_offload", None)
    if mapped is None:
        return 0
    if hasattr(mmap, "MADV_DONTNEED"):
        mapped.madvise(mmap.MADV_DONTNEED)
    file = getattr(model, "_lightpipe_offload_file", None)
    if file is not None and hasattr(os, "posix_fadvise"):
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return len(mapped)


def main_device(model: nn.Module) -> torch.device:
    """The device a dispatched model takes its inputs on."""
    places = [f"cuda:{v}" if isinstance(v, int) else v for v in model.hf_device_map.values()]
    return _main_device(places)


def dispatch_loaded(model: nn.Module, request: Request) -> nn.Module:
    """Place an already loaded model by `request` (weights copied to their places; the disk through the offload
    folder), as load_model would have placed it."""
    if getattr(model, "hf_device_map", None) is not None:
        raise InvalidInput("this model is already placed by a device_map; load it again to place it differently.")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    placer = plan(model, request, dtype)
    tied = _tied_targets(model)
    state = {k: v for k, v in model.state_dict().items() if k not in tied}
    final = {}
    for key, tensor in state.items():
        placed = placer.place(key, tensor, tensor.dtype)
        if placed is not None:
            final[key] = placed
    final.update(placer.finish())
    model.load_state_dict(final, strict=False, assign=True)
    from .loading import _retie

    _retie(model)
    return attach(model, placer)

"""The batching engine shared by every task.

Inputs are turned into model items by the task's `preprocess` (one input may give several
items: chunks), items are grouped into batches, padded by the rules the task declares, run
through `forward`, split back into per-item outputs, regrouped per input and handed to
`postprocess`. Lists are batched by similar length and returned in input order; streams are
preprocessed ahead in a background thread and yield results as they complete.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from .checks import positive_int


@dataclasses.dataclass
class ModelItem:
    """One unit of model work. `features` are batched (padded where the task says so); `meta` is
    carried to postprocess untouched."""

    features: dict[str, torch.Tensor]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: int = 0  # index of the input it came from
    is_last: bool = True  # the last item of its input
    length: int = 0  # length along the padded axis, set by the runtime


@dataclasses.dataclass(frozen=True)
class Padding:
    """How to collate a task's features: pad values per field (padded along dim 0), the side, and
    which outputs are sequences to trim back to each item's own length."""

    values: dict[str, float | int]
    side: str = "right"
    sequence_outputs: tuple[str, ...] = ()


def _length(item: ModelItem, padding: Padding) -> int:
    for name in padding.values:
        if name in item.features:
            return int(item.features[name].shape[0])
    return 0


def collate(items: list[ModelItem], padding: Padding) -> dict[str, torch.Tensor]:
    """Stack the items' features into (B, ...) tensors, padding fields listed in `padding.values`."""
    batch: dict[str, torch.Tensor] = {}
    for name in items[0].features:
        tensors = [item.features[name] for item in items]
        if name in padding.values and len({t.shape[0] for t in tensors}) > 1:
            longest = max(t.shape[0] for t in tensors)
            out = tensors[0].new_full((len(tensors), longest, *tensors[0].shape[1:]), padding.values[name])
            for row, t in enumerate(tensors):
                if padding.side == "left":
                    out[row, longest - t.shape[0]:] = t
                else:
                    out[row, : t.shape[0]] = t
            batch[name] = out
        else:
            try:
                batch[name] = torch.stack(tensors)
            except RuntimeError as e:
                raise AssertionError(f"feature {name!r} has uneven shapes and no padding rule") from e
    return batch


def split(outputs: dict[str, Any], items: list[ModelItem], padding: Padding) -> list[dict[str, Any]]:
    """(B, ...) outputs -> one dict per item, sequences trimmed to the item's own length.

    An output may also be ragged: a list with one entry per item (e.g. generated tokens of different lengths),
    which each item takes as it is, rather than a tensor padded only so that it could be split here."""
    outputs = {k: _to_cpu(v) for k, v in outputs.items()}
    for name, value in outputs.items():
        if isinstance(value, list) and len(value) != len(items):
            raise AssertionError(f"forward returned {len(value)} entries of {name!r} for {len(items)} items")
    per_item = []
    for row, item in enumerate(items):
        own = {}
        for name, value in outputs.items():
            value = value[row]
            if name in padding.sequence_outputs and value.shape[0] != item.length:
                value = value[value.shape[0] - item.length:] if padding.side == "left" else value[: item.length]
            own[name] = value
        per_item.append(own)
    return per_item


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, list):  # ragged: one entry per item
        return [v.detach().cpu() if isinstance(v, torch.Tensor) else v for v in value]
    return value


class Runner:
    """Runs items through a task's forward in batches; used by `Pipeline.__call__`."""

    def __init__(self, forward: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], padding: Padding,
                 batch_size: int, progress: Any = None):
        self.forward = forward
        self.padding = padding
        self.batch_size = batch_size
        self.progress = progress

    def run_batch(self, items: list[ModelItem]) -> list[dict[str, torch.Tensor]]:
        outputs = self.forward(collate(items, self.padding))
        if self.progress is not None:
            self.progress.update(len(items))
        return split(outputs, items, self.padding)

    def run_list(self, items: list[ModelItem]) -> list[dict[str, torch.Tensor]]:
        """All items, batched by similar length (longest first), outputs in the items' order."""
        for item in items:
            item.length = _length(item, self.padding)
        order = sorted(range(len(items)), key=lambda i: -items[i].length) if self.batch_size > 1 else range(len(items))
        order = list(order)
        results: list[dict[str, torch.Tensor] | None] = [None] * len(items)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            for i, out in zip(chunk, self.run_batch([items[i] for i in chunk])):
                results[i] = out
        return results  # type: ignore[return-value]

    def run_stream(self, items: Iterable[ModelItem]) -> Iterator[tuple[ModelItem, dict[str, torch.Tensor]]]:
        """Items as they arrive, in batches of batch_size, yielded in arrival order."""
        pending: list[ModelItem] = []
        for item in items:
            item.length = _length(item, self.padding)
            pending.append(item)
            if len(pending) == self.batch_size:
                yield from zip(pending, self.run_batch(pending))
                pending = []
        if pending:
            yield from zip(pending, self.run_batch(pending))


_DONE = object()


def prefetch(iterable: Iterable[Any], depth: int = 8) -> Iterator[Any]:
    """Iterate `iterable` in a background thread, keeping up to `depth` values ready.

    An exception raised while producing is re-raised in the consumer at the point it occurred.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        """Wait for room unless the consumer has gone; False when it has."""
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for value in iterable:
                if not put((True, value)):
                    return
            put((True, _DONE))
        except BaseException as e:  # handed to the consumer, which raises it
            put((False, e))

    thread = threading.Thread(target=produce, name="lightpipe-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, value = buffer.get()
            if not ok:
                raise value
            if value is _DONE:
                return
            yield value
    finally:
        stop.set()


def check_batch_size(value: Any) -> int:
    return 1 if value is None else positive_int("batch_size", value)

"""The batching engine shared by every task.

Inputs are turned into model items by the task's `preprocess` (one input may give several
items: chunks), items are grouped into batches, padded by the rules the task declares, run
through `forward`, split back into per-item outputs, regrouped per input and handed to
`postprocess`. Lists are batched by similar length and returned in input order; streams are
preprocessed ahead in a background thread (on `num_workers` threads with `parallel_map`, in order) and
yield results as they complete.

One bad item need not sink a call: a `Runner` made with `isolate_errors=True` runs a batch whose forward
fails again one item at a time, so that only the culprit fails (its `ModelItem.error` is set and its
output is None) and the good items of that batch still answer.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from .checks import positive_int
from .errors import InvalidInput


@dataclasses.dataclass
class ModelItem:
    """One unit of model work. `features` are batched (padded where the task says so); `meta` is
    carried to postprocess untouched."""

    features: dict[str, torch.Tensor]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: int = 0  # index of the input it came from
    is_last: bool = True  # the last item of its input
    length: int = 0  # length along the padded axis, set by the runtime
    error: Exception | None = None  # why this item has no output (on_error="skip" | "record"); never batched


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
    """Runs items through a task's forward in batches; used by `Pipeline.__call__`.

    isolate_errors: when a batch's forward (or its collation) raises an Exception, run its items again one
    at a time; an item that fails alone keeps its error in `item.error` and gets None as its output.
    Without it, the error propagates, as it always did.
    """

    def __init__(self, forward: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], padding: Padding,
                 batch_size: int, progress: Any = None, *, isolate_errors: bool = False):
        self.forward = forward
        self.padding = padding
        self.batch_size = batch_size
        self.progress = progress
        self.isolate_errors = isolate_errors

    def _forward_split(self, items: list[ModelItem]) -> list[dict[str, torch.Tensor] | None]:
        try:
            return split(self.forward(collate(items, self.padding)), items, self.padding)
        except Exception as e:  # KeyboardInterrupt and other BaseExceptions always propagate
            if not self.isolate_errors:
                raise
            if len(items) == 1:
                items[0].error = e
                return [None]
            return [out for item in items for out in self._forward_split([item])]

    def run_batch(self, items: list[ModelItem]) -> list[dict[str, torch.Tensor] | None]:
        outputs = self._forward_split(items) if items else []
        if self.progress is not None:
            self.progress.update(len(items))
        return outputs

    def run_list(self, items: list[ModelItem]) -> list[dict[str, torch.Tensor] | None]:
        """All items, batched by similar length (longest first), outputs in the items' order. Items that
        already carry an error are not run: their output is None."""
        for item in items:
            item.length = _length(item, self.padding)
        runnable = [i for i in range(len(items)) if items[i].error is None]
        order = sorted(runnable, key=lambda i: -items[i].length) if self.batch_size > 1 else runnable
        results: list[dict[str, torch.Tensor] | None] = [None] * len(items)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            for i, out in zip(chunk, self.run_batch([items[i] for i in chunk])):
                results[i] = out
        return results

    def run_stream(self, items: Iterable[ModelItem]) -> Iterator[tuple[ModelItem, dict[str, torch.Tensor] | None]]:
        """Items as they arrive, in batches of batch_size, yielded in arrival order. An item that arrives with
        an error is not run (its output is None); it waits for the batch before it, so the order holds."""
        pending: list[ModelItem] = []
        runnable = 0
        for item in items:
            pending.append(item)
            if item.error is None:
                item.length = _length(item, self.padding)
                runnable += 1
                if runnable == self.batch_size:
                    yield from self._flush(pending)
                    pending, runnable = [], 0
        if pending:
            yield from self._flush(pending)

    def _flush(self, pending: list[ModelItem]) -> Iterator[tuple[ModelItem, dict[str, torch.Tensor] | None]]:
        good = [item for item in pending if item.error is None]
        outputs = dict(zip(map(id, good), self.run_batch(good)))
        for item in pending:
            yield item, outputs.get(id(item))


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
        finally:
            close = getattr(iterable, "close", None)  # a generator left early runs its cleanup now, here
            if close is not None:
                close()

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


def parallel_map(fn: Callable[[Any], Any], iterable: Iterable[Any], workers: int, depth: int | None = None
                 ) -> Iterator[Any]:
    """`fn` over `iterable` on `workers` threads, results yielded in input order, at most `depth` (default
    2 * workers) values in flight: a lazy, bounded, ordered `map` for streams. An exception raised by `fn`
    is raised here, in order, as the plain `map(fn, iterable)` would raise it. Threads pay off because
    decoding (soundfile, PIL, soxr) and tokenising release the GIL."""
    from concurrent.futures import ThreadPoolExecutor

    depth = max(depth or 2 * workers, 1)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="lightpipe-preprocess")
    pending: collections.deque = collections.deque()
    try:
        for value in iterable:
            pending.append(pool.submit(fn, value))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=False, cancel_futures=True)


def check_batch_size(value: Any) -> int:
    return 1 if value is None else positive_int("batch_size", value)


ON_ERROR = ("raise", "skip", "record")


def check_on_error(value: Any) -> str:
    """on_error: "raise" (the default, None), "skip" or "record"; anything else is InvalidInput."""
    if value is None:
        return "raise"
    if not isinstance(value, str) or value not in ON_ERROR:
        raise InvalidInput(f"on_error must be one of {', '.join(map(repr, ON_ERROR))}, not {value!r}.")
    return value


def error_record(error: BaseException) -> dict[str, str]:
    """What on_error="record" returns in a failed input's place: {"error": message, "type": class name}."""
    return {"error": str(error) or type(error).__name__, "type": type(error).__name__}


def is_error_record(value: Any) -> bool:
    return isinstance(value, dict) and value.keys() == {"error", "type"}

"""Pipeline: parameters, preprocess -> forward -> postprocess, over the shared runtime.

A task subclasses `Pipeline` and writes three methods:

- `preprocess(input, **preprocess_params) -> list[ModelItem]` on the CPU (one input may give
  several items, e.g. windows of a long context);
- `forward(batch, **forward_params) -> dict[str, Tensor]`, which only calls the model;
- `postprocess(outputs, metas, **postprocess_params)`, given every item of one input, returning
  plain JSON-serialisable data.

Inputs are one value, a list, or a stream (a generator, a torch Dataset, a 🤗 datasets Dataset or
IterableDataset, a KeyDataset). `on_error` says what one failing input does to a list or a stream: "raise"
(the default), "skip" (dropped, one warning with the count at the end) or "record" ({"error", "type"} in its
place); see `Pipeline.__call__`.

It declares which call parameters go to which stage; anything else is an InvalidInput error. A stage may
also declare a runtime parameter (`progress`) to receive it too. `prepare_forward` turns the forward parameters
into what `forward` takes once per call, before any batch runs (e.g. a generation config built from options).
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import logging
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch

from ..checks import positive_int
from ..errors import InvalidInput, LightpipeError
from ..processing import limits
from ..processing.sources import is_file_object
from ..runtime import (
    ModelItem,
    Padding,
    Runner,
    check_batch_size,
    check_on_error,
    error_record,
    parallel_map,
    prefetch,
)

logger = logging.getLogger(__name__)

RUNTIME_PARAMS = ("batch_size", "num_workers", "progress", "on_error")


class KeyDataset:
    """Wraps a dataset of dicts so that iterating it yields one field: `KeyDataset(ds, "audio")`. A sized,
    indexable dataset (torch map-style Dataset, 🤗 datasets.Dataset) is read by index; an iterable one
    (datasets.IterableDataset, a torch IterableDataset) is iterated."""

    def __init__(self, dataset, key: str):
        self.dataset = dataset
        self.key = key

    def __len__(self) -> int:
        return len(self.dataset)  # TypeError for an iterable dataset, which has no length

    def __getitem__(self, i):
        return self.dataset[i][self.key]

    def __iter__(self):
        if _indexable(self.dataset):
            for i in range(len(self)):
                yield self[i]
        else:
            for row in self.dataset:
                yield row[self.key]


def _is_dataset(obj: Any) -> bool:
    """A torch Dataset (map-style or iterable), a 🤗 datasets.Dataset or IterableDataset, or a KeyDataset."""
    if isinstance(obj, (str, bytes, dict, list, tuple)):
        return False
    if isinstance(obj, KeyDataset):
        return True
    from torch.utils.data import Dataset
    if isinstance(obj, Dataset):
        return True
    return type(obj).__module__.startswith("datasets.") and (
        hasattr(obj, "__iter__") or (hasattr(obj, "__getitem__") and hasattr(obj, "__len__")))


def _size(obj: Any) -> int | None:
    """len(obj), or None when it has no length (a generator, an iterable dataset)."""
    if isinstance(obj, (str, bytes, dict)):
        return None
    try:
        return len(obj)
    except TypeError:
        return None


def _indexable(obj: Any) -> bool:
    """A sized dataset read by index 0..len-1 (as a DataLoader reads a map-style one), rather than iterated."""
    from torch.utils.data import IterableDataset
    if isinstance(obj, IterableDataset) or (isinstance(obj, KeyDataset) and not _indexable(obj.dataset)):
        return False
    return hasattr(obj, "__getitem__") and _size(obj) is not None


def _given(value: Any) -> Any:
    return value


class Pipeline:
    """The base of every task pipeline."""

    task: ClassVar[str] = ""
    preprocess_params: ClassVar[tuple[str, ...]] = ()
    forward_params: ClassVar[tuple[str, ...]] = ()
    postprocess_params: ClassVar[tuple[str, ...]] = ()

    # The preprocessing parts the factory loads for this task (see factory.COMPONENTS).
    components: ClassVar[tuple[str, ...]] = ("tokenizer",)

    # The kinds of input ("image", "audio") whose size limits (max_image_pixels, max_audio_seconds) this task
    # accepts as parameters; None: read from the components (an image processor takes images, a feature
    # extractor audio).
    input_kinds: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, model, tokenizer=None, *, feature_extractor=None, image_processor=None,
                 device: torch.device | None = None, batch_size: int | None = None, num_workers: int | None = None,
                 folder=None, **params):
        self.model = model
        self.folder = folder  # the checkpoint's folder, when the pipeline was built from one (pipeline() passes it)
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.image_processor = image_processor
        self.device = device or next(model.parameters()).device
        _give_model_attributes(model)
        self._defaults: dict[str, Any] = {}
        self._defaults.update(self._checked({"batch_size": batch_size, "num_workers": num_workers, **params},
                                            drop_none=True))

    # ------------------------------------------------------------------ as transformers' pipelines
    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (of its first floating-point weight)."""
        return _model_dtype(self.model)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Write the model (config.json, model.safetensors under the checkpoint's key names), its tokenizer, processor
        settings and generation config into `save_directory`, a folder transformers' from_pretrained and lightpipe's
        pipeline() load. transformers' options (safe_serialization ...) are accepted; weights are always safetensors."""
        from ..saving import save_pipeline

        unknown = set(kwargs) - {"safe_serialization", "max_shard_size", "push_to_hub", "token"}
        if unknown or kwargs.get("push_to_hub"):
            raise InvalidInput(f"save_pretrained does not take {sorted(unknown) or ['push_to_hub=True']}; "
                               "give the folder to write.")
        save_pipeline(self, save_directory)

    # ------------------------------------------------------------------ parameters
    @property
    def limit_params(self) -> tuple[str, ...]:
        """The input size limits this pipeline accepts (processing/limits.py): max_image_pixels, max_audio_seconds."""
        kinds = self.input_kinds
        if kinds is None:
            kinds = (("image",) if "image_processor" in self.components else ()) + (
                ("audio",) if "feature_extractor" in self.components else ())
        return tuple(name for name, kind in limits.PARAMS.items() if kind in kinds)

    @property
    def accepted_params(self) -> tuple[str, ...]:
        # A stage may list a runtime parameter too (progress), so names can repeat: each is accepted once.
        return tuple(dict.fromkeys(RUNTIME_PARAMS + self.limit_params + self.preprocess_params + self.forward_params
                                   + self.postprocess_params))

    def _checked(self, params: dict[str, Any], drop_none: bool = False) -> dict[str, Any]:
        unknown = [k for k in params if k not in self.accepted_params]
        if unknown:
            raise InvalidInput(
                f"{type(self).__name__} got unknown parameter(s) {', '.join(map(repr, unknown))}; "
                f"accepted: {', '.join(self.accepted_params)}."
            )
        if drop_none:
            params = {k: v for k, v in params.items() if v is not None or k not in RUNTIME_PARAMS}
        self.check_params(params)
        return params

    def check_params(self, params: dict[str, Any]) -> None:
        """Validate parameter values before any work is done; raise InvalidInput. Tasks extend this."""
        if "batch_size" in params:
            check_batch_size(params["batch_size"])
        positive_int("num_workers", params.get("num_workers"), allow_none=True, allow_zero=True)
        if "on_error" in params:
            check_on_error(params["on_error"])
        for name in limits.PARAMS:
            if name in params:
                params[name] = limits.check(name, params[name])

    def _route(self, call_params: dict[str, Any]) -> tuple[dict, dict, dict, dict]:
        # A runtime parameter given as None at call time keeps the pipeline's default (as in transformers).
        params = {**self._defaults, **self._checked(call_params, drop_none=True)}
        pick = lambda names: {k: params[k] for k in names if k in params}  # noqa: E731
        return (pick(RUNTIME_PARAMS + self.limit_params), pick(self.preprocess_params),
                self.prepare_forward(pick(self.forward_params)), pick(self.postprocess_params))

    def prepare_forward(self, params: dict[str, Any]) -> dict[str, Any]:
        """The call's checked forward parameters -> the keyword arguments of `forward`, once per call. Tasks whose
        options take work to resolve (a generation config) do it here, not in every forward. Default: as given."""
        return params

    # ------------------------------------------------------------------ the three stages
    padding: ClassVar[Padding] = Padding(values={})

    def collate_padding(self) -> Padding:
        """The padding rules of this pipeline's features (tasks with a tokenizer pad ids with its pad id)."""
        return self.padding

    def preprocess(self, inputs, **params) -> list[ModelItem]:
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor], **params) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def postprocess(self, outputs: list[dict[str, torch.Tensor]], metas: list[dict[str, Any]], **params):
        raise NotImplementedError

    # ------------------------------------------------------------------ calling
    def is_single(self, inputs: Any) -> bool:
        """Whether `inputs` is one input (rather than a list or a stream of inputs)."""
        return not isinstance(inputs, (list, tuple)) and not self._is_stream(inputs)

    # Whether an open file (io.BytesIO, open(path, "rb")) is one input, as for images, rather than a
    # stream of its lines: file objects are iterators too.
    file_is_one_input: ClassVar[bool] = False

    def _is_stream(self, inputs: Any) -> bool:
        if self.file_is_one_input and is_file_object(inputs):
            return False
        return isinstance(inputs, (collections.abc.Iterator, collections.abc.Generator)) or _is_dataset(inputs)

    def __call__(self, inputs, **params):
        """One input -> its result; a list -> a list in input order; a stream -> an iterator of results.

        on_error (a call or construction parameter) says what a failing input does to a list or a stream:
        "raise" (the default) raises its error, as a single input always does; "skip" drops it and logs one
        warning with the count at the end of the call; "record" puts {"error": message, "type": class name}
        in its place. An input fails when its preprocess, the forward of its items or its postprocess raises
        an Exception: lightpipe's typed errors (a bad or undecodable input) and any other, which may be a bug
        (the first such error of a call is logged with its traceback). A batch whose forward fails runs again
        one item at a time, so that its good items still answer. KeyboardInterrupt and other BaseExceptions
        always propagate, and an error raised by the stream's own iteration (a generator that raises) ends
        the stream: only a dataset read by index can go on past an unreadable row.
        """
        runtime, pre, fwd, post = self._route(params)
        batch_size = check_batch_size(runtime.get("batch_size"))
        sizes = {name: runtime[name] for name in limits.PARAMS if name in runtime}
        on_error = check_on_error(runtime.get("on_error"))
        if self._is_stream(inputs):  # nothing runs (no progress bar either) until the first result is asked for
            return self._run_stream(inputs, fwd, pre, post, batch_size, runtime.get("progress"), sizes,
                                    runtime.get("num_workers"), on_error)
        single = self.is_single(inputs)
        if single:
            on_error = "raise"  # one input has no other results to keep: its error is the answer
        progress = self._progress_bar(runtime.get("progress"), inputs)
        runner = Runner(self._forward_fn(fwd), self.collate_padding(), batch_size, progress,
                        isolate_errors=on_error != "raise")
        items_in = [inputs] if single else list(inputs)
        try:
            results = self._run_list(items_in, runner, pre, post, runtime.get("num_workers"), sizes, on_error)
        finally:
            if progress is not None:
                progress.close()
        return results[0] if single else results

    def _forward_fn(self, fwd: dict[str, Any]):
        def run(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with torch.inference_mode():
                return self.forward(batch, **fwd)
        return run

    def _preprocess_one(self, value, pre: dict, sizes: dict | None = None) -> list[ModelItem]:
        """preprocess(value) under the call's input size limits, in the thread that runs it."""
        with limits.applied(sizes or {}):
            return list(self.preprocess(value, **pre))

    def _prepared(self, read, pre: dict, sizes: dict | None, capture: bool) -> list[ModelItem]:
        """read() -> the input's model items; with `capture`, an input that fails to read or preprocess is one
        item carrying the error."""
        try:
            items = self._preprocess_one(read(), pre, sizes)
        except Exception as e:
            if not capture:
                raise
            return [ModelItem({}, error=e)]
        assert items, "preprocess must give at least one model item"
        return items

    def _preprocess_all(self, inputs: list, pre: dict, num_workers: int | None,
                        sizes: dict | None = None, capture: bool = False) -> list[list[ModelItem]]:
        prepare = lambda x: self._prepared(functools.partial(_given, x), pre, sizes, capture)  # noqa: E731
        if num_workers and num_workers > 1 and len(inputs) > 1:
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(num_workers) as pool:
                return list(pool.map(prepare, inputs))
        return [prepare(x) for x in inputs]

    def _run_list(self, inputs: list, runner: Runner, pre: dict, post: dict, num_workers: int | None,
                  sizes: dict | None = None, on_error: str = "raise") -> list:
        capture = on_error != "raise"
        per_input = self._preprocess_all(inputs, pre, num_workers, sizes, capture)
        flat: list[ModelItem] = []
        for source, items in enumerate(per_input):
            for item in items:
                item.source = source
            flat.extend(items)
        if runner.progress is not None:
            runner.progress.total = len(flat)
        outputs = runner.run_list(flat) if flat else []
        failures: dict[int, Exception] = {}
        grouped: list[tuple[list, list]] = [([], []) for _ in inputs]
        for item, out in zip(flat, outputs):
            if item.error is not None:
                failures.setdefault(item.source, item.error)
            grouped[item.source][0].append(out)
            grouped[item.source][1].append(item.meta)
        results: list = []
        report = _ErrorReport(on_error, self.task or type(self).__name__)
        for source, (outs, metas) in enumerate(grouped):
            error = failures.get(source)
            if error is None:
                try:
                    results.append(self.postprocess(outs, metas, **post))
                    continue
                except Exception as e:
                    if not capture:
                        raise
                    error = e
            if report.failed(error):
                results.append(error_record(error))
        report.close(len(inputs))
        return results

    def _reads(self, inputs: Iterable) -> Iterator:
        """The stream's values as calls that read them: a sized dataset is read by index 0..len-1, in the
        thread that preprocesses the value (so that a row's own decoding, e.g. a datasets Image, runs on the
        workers too and an unreadable row is that input's error); anything else is iterated here."""
        if _is_dataset(inputs) and _indexable(inputs):
            return (functools.partial(inputs.__getitem__, i) for i in range(len(inputs)))
        return (functools.partial(_given, value) for value in inputs)

    def _tagged_items(self, inputs: Iterable, pre: dict, sizes: dict | None = None, num_workers: int | None = None,
                      capture: bool = False) -> Iterator[ModelItem]:
        prepare = lambda read: self._prepared(read, pre, sizes, capture)  # noqa: E731
        reads = self._reads(inputs)
        prepared = parallel_map(prepare, reads, num_workers) if num_workers and num_workers > 1 else map(prepare, reads)
        for source, items in enumerate(prepared):
            for i, item in enumerate(items):
                item.source, item.is_last = source, i == len(items) - 1
            yield from items

    def _run_stream(self, inputs: Iterable, fwd: dict, pre: dict, post: dict, batch_size: int, progress,
                    sizes: dict | None = None, num_workers: int | None = None, on_error: str = "raise") -> Iterator:
        capture = on_error != "raise"
        runner = Runner(self._forward_fn(fwd), self.collate_padding(), batch_size,
                        self._progress_bar(progress, inputs), isolate_errors=capture)
        depth = max(8, 2 * runner.batch_size, 2 * (num_workers or 0))
        items = prefetch(self._tagged_items(inputs, pre, sizes, num_workers, capture), depth=depth)
        report = _ErrorReport(on_error, self.task or type(self).__name__)
        outs: list = []
        metas: list = []
        error: Exception | None = None
        count = 0
        try:
            for item, out in runner.run_stream(items):
                error = error or item.error
                outs.append(out)
                metas.append(item.meta)
                if not item.is_last:
                    continue
                count += 1
                result = None
                if error is None:
                    try:
                        result = self.postprocess(outs, metas, **post)
                    except Exception as e:
                        if not capture:
                            raise
                        error = e
                outs, metas = [], []
                if error is None:
                    yield result
                else:
                    failed, error = error, None
                    if report.failed(failed):
                        yield error_record(failed)
        finally:
            if runner.progress is not None:
                runner.progress.close()
            report.close(count)

    def _progress_bar(self, progress: Any, inputs: Any):
        if not progress:
            return None
        from tqdm.auto import tqdm
        return tqdm(total=_size(inputs), desc=self.task or type(self).__name__, unit="item")


def _model_dtype(model) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _model_device(model) -> torch.device:
    if getattr(model, "hf_device_map", None) is not None:  # placed by a device_map: where inputs go
        from ..dispatch import main_device

        return main_device(model)
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _live_attribute(name: str, compute) -> property:
    """A read-from-the-weights attribute that an instance may still set (its own value then wins)."""
    key = f"_{name}_set"

    def get(self):
        return self.__dict__[key] if key in self.__dict__ else compute(self)

    def set_(self, value):
        self.__dict__[key] = value

    return property(get, set_, doc=f"The model's {name}, read from its weights.")


def _give_model_attributes(model) -> None:
    """`model.device` and `model.dtype`, read live from the weights, as tools written for transformers' models read
    them (plain nn.Modules have neither). Added once to the model's class (lightpipe's own model classes)."""
    cls = type(model)
    for name, compute in (("device", _model_device), ("dtype", _model_dtype)):
        if not hasattr(cls, name):
            setattr(cls, name, _live_attribute(name, compute))


class TextPipeline(Pipeline):
    """A pipeline over a tokenizer: pads ids with the tokenizer's pad id, masks with 0."""

    def collate_padding(self) -> Padding:
        pad_id = self.tokenizer.pad_token_id
        return Padding(
            values={"input_ids": pad_id if pad_id is not None else 0, "attention_mask": 0, "token_type_ids": 0},
            side=self.tokenizer.padding_side,
            sequence_outputs=self.sequence_outputs,
        )

    sequence_outputs: ClassVar[tuple[str, ...]] = ()

    @property
    def max_positions(self) -> int:
        """The longest input the model can take, in tokens."""
        limit = getattr(self.model.config, "max_position_embeddings", None) or 10**9
        return min(limit - getattr(self.model, "position_offset", 0), self.tokenizer.model_max_length)

    def uses_token_type_ids(self) -> bool:
        return self.tokenizer.returns_token_type_ids and "token_type_ids" in inspect.signature(self.model.forward).parameters

    def features(self, encoding, with_types: bool | None = None) -> dict[str, torch.Tensor]:
        """A tokenizers Encoding -> the model's 1-D input tensors."""
        if len(encoding.ids) > self.max_positions:
            raise InvalidInput(
                f"the input is {len(encoding.ids)} tokens long, more than this model's {self.max_positions}; "
                "pass truncation=True to cut it."
            )
        out = {
            "input_ids": torch.tensor(encoding.ids, dtype=torch.long),
            "attention_mask": torch.tensor(encoding.attention_mask, dtype=torch.long),
        }
        if self.uses_token_type_ids() if with_types is None else with_types:
            out["token_type_ids"] = torch.tensor(encoding.type_ids, dtype=torch.long)
        return out

    @staticmethod
    def check_text(value: Any, what: str = "input", *, allow_empty: bool = False) -> str:
        """A string, or InvalidInput. allow_empty: an empty or blank text is a text (the tokenizer gives the special
        tokens alone), for tasks that answer it as transformers does (feature / text / token classification)."""
        if not isinstance(value, str):
            raise InvalidInput(f"{what} must be a string, not {type(value).__name__}.")
        if not allow_empty and not value.strip():
            raise InvalidInput(f"{what} is empty: give some text.")
        return value


class _ErrorReport:
    """What one call does with failed inputs under on_error: counts the skipped ones for one warning at the end,
    and logs the first error that is not one of lightpipe's (which may be a bug) with its traceback."""

    def __init__(self, on_error: str, what: str):
        self.on_error = on_error
        self.what = what
        self.skipped: list[Exception] = []
        self.logged = False

    def failed(self, error: Exception) -> bool:
        """Note a failed input; True when its record takes its place (on_error="record")."""
        if not isinstance(error, LightpipeError) and not self.logged:
            self.logged = True
            logger.warning("%s: an input failed with %s, not a lightpipe error (on_error=%r goes on)",
                           self.what, type(error).__name__, self.on_error, exc_info=error)
        if self.on_error == "skip":
            self.skipped.append(error)
        return self.on_error == "record"

    def close(self, total: int) -> None:
        if self.skipped:
            first = self.skipped[0]
            logger.warning("%s: %d of %d inputs failed and were skipped (on_error='skip'); the first: %s: %s",
                           self.what, len(self.skipped), total, type(first).__name__, first)
            self.skipped = []

"""Pipeline: parameters, preprocess -> forward -> postprocess, over the shared runtime.

A task subclasses `Pipeline` and writes three methods:

- `preprocess(input, **preprocess_params) -> list[ModelItem]` on the CPU (one input may give
  several items, e.g. windows of a long context);
- `forward(batch, **forward_params) -> dict[str, Tensor]`, which only calls the model;
- `postprocess(outputs, metas, **postprocess_params)`, given every item of one input, returning
  plain JSON-serialisable data.

It declares which call parameters go to which stage; anything else is an InvalidInput error. A stage may
also declare a runtime parameter (`progress`) to receive it too. `prepare_forward` turns the forward parameters
into what `forward` takes once per call, before any batch runs (e.g. a generation config built from options).
"""

from __future__ import annotations

import collections.abc
import inspect
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch

from ..checks import positive_int
from ..errors import InvalidInput
from ..processing import limits
from ..processing.sources import is_file_object
from ..runtime import ModelItem, Padding, Runner, check_batch_size, prefetch

RUNTIME_PARAMS = ("batch_size", "num_workers", "progress")


class KeyDataset:
    """Wraps a dataset of dicts so that iterating it yields one field: `KeyDataset(ds, "text")`."""

    def __init__(self, dataset, key: str):
        self.dataset = dataset
        self.key = key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][self.key]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


def _is_dataset(obj: Any) -> bool:
    """A torch Dataset, a 🤗 datasets.Dataset or a KeyDataset: indexable, sized, and not a plain sequence."""
    if isinstance(obj, (str, bytes, dict, list, tuple)):
        return False
    if isinstance(obj, KeyDataset):
        return True
    try:
        from torch.utils.data import Dataset
        if isinstance(obj, Dataset):
            return True
    except ImportError:  # pragma: no cover
        pass
    return type(obj).__module__.startswith("datasets.") and hasattr(obj, "__getitem__") and hasattr(obj, "__len__")


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
        runtime, pre, fwd, post = self._route(params)
        batch_size = check_batch_size(runtime.get("batch_size"))
        sizes = {name: runtime[name] for name in limits.PARAMS if name in runtime}
        if self._is_stream(inputs):  # nothing runs (no progress bar either) until the first result is asked for
            return self._run_stream(inputs, fwd, pre, post, batch_size, runtime.get("progress"), sizes)
        progress = self._progress_bar(runtime.get("progress"), inputs)
        runner = Runner(self._forward_fn(fwd), self.collate_padding(), batch_size, progress)
        single = self.is_single(inputs)
        items_in = [inputs] if single else list(inputs)
        try:
            results = self._run_list(items_in, runner, pre, post, runtime.get("num_workers"), sizes)
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

    def _preprocess_all(self, inputs: list, pre: dict, num_workers: int | None,
                        sizes: dict | None = None) -> list[list[ModelItem]]:
        if num_workers and num_workers > 1 and len(inputs) > 1:
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(num_workers) as pool:
                return list(pool.map(lambda x: self._preprocess_one(x, pre, sizes), inputs))
        return [self._preprocess_one(x, pre, sizes) for x in inputs]

    def _run_list(self, inputs: list, runner: Runner, pre: dict, post: dict, num_workers: int | None,
                  sizes: dict | None = None) -> list:
        per_input = self._preprocess_all(inputs, pre, num_workers, sizes)
        flat: list[ModelItem] = []
        for source, items in enumerate(per_input):
            for item in items:
                item.source = source
            flat.extend(items)
        if runner.progress is not None:
            runner.progress.total = len(flat)
        outputs = runner.run_list(flat) if flat else []
        grouped: list[tuple[list, list]] = [([], []) for _ in inputs]
        for item, out in zip(flat, outputs):
            grouped[item.source][0].append(out)
            grouped[item.source][1].append(item.meta)
        return [self.postprocess(outs, metas, **post) for outs, metas in grouped]

    @staticmethod
    def _values(inputs: Iterable) -> Iterator:
        """A stream's values. A sized dataset is read by index 0..len-1, as a DataLoader reads it, since
        iterating a map-style Dataset falls back to __getitem__ until IndexError, which a dataset need not raise."""
        if _is_dataset(inputs) and hasattr(inputs, "__len__") and not hasattr(type(inputs), "__iter__"):
            return (inputs[i] for i in range(len(inputs)))
        return iter(inputs)

    def _tagged_items(self, inputs: Iterable, pre: dict, sizes: dict | None = None) -> Iterator[ModelItem]:
        for source, value in enumerate(self._values(inputs)):
            items = self._preprocess_one(value, pre, sizes)
            for i, item in enumerate(items):
                item.source, item.is_last = source, i == len(items) - 1
            assert items, "preprocess must give at least one model item"
            yield from items

    def _run_stream(self, inputs: Iterable, fwd: dict, pre: dict, post: dict, batch_size: int, progress,
                    sizes: dict | None = None) -> Iterator:
        runner = Runner(self._forward_fn(fwd), self.collate_padding(), batch_size,
                        self._progress_bar(progress, inputs))
        items = prefetch(self._tagged_items(inputs, pre, sizes), depth=max(8, 2 * runner.batch_size))
        outs: list = []
        metas: list = []
        try:
            for item, out in runner.run_stream(items):
                outs.append(out)
                metas.append(item.meta)
                if item.is_last:
                    yield self.postprocess(outs, metas, **post)
                    outs, metas = [], []
        finally:
            if runner.progress is not None:
                runner.progress.close()

    def _progress_bar(self, progress: Any, inputs: Any):
        if not progress:
            return None
        from tqdm.auto import tqdm
        total = len(inputs) if hasattr(inputs, "__len__") and not isinstance(inputs, (str, dict)) else None
        return tqdm(total=total, desc=self.task or type(self).__name__, unit="item")


def _model_dtype(model) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _model_device(model) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _give_model_attributes(model) -> None:
    """`model.device` and `model.dtype`, read live from the weights, as tools written for transformers' models read
    them (plain nn.Modules have neither). Added once to the model's class."""
    cls = type(model)
    if isinstance(getattr(cls, "device", None), property) or "device" in vars(model):
        return
    if not hasattr(cls, "device"):
        cls.device = property(_model_device, doc="The device of the model's weights.")
    if not hasattr(cls, "dtype"):
        cls.dtype = property(_model_dtype, doc="The dtype of the model's floating-point weights.")


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

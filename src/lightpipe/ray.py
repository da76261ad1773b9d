"""Pipelines past one machine: a Ray Data predictor.

    import ray
    from lightpipe.ray import PipelinePredictor, map_pipeline

    ds = ray.data.read_parquet("texts/")                      # any Ray Dataset with an input column
    out = map_pipeline(ds, "text-classification", model="path/or/id", input_column="text",
                       batch_size=16, concurrency=4)           # 4 actors, each loads the pipeline once
    out.write_parquet("labels/")

`PipelinePredictor` is the callable class behind it, for `ds.map_batches(PipelinePredictor,
fn_constructor_kwargs={...}, batch_size=..., compute=ray.data.ActorPoolStrategy(size=n), num_gpus=...)`.
Each actor builds `lightpipe.pipeline(task, model, **params)` once; each batch (a dict of numpy columns, a
pandas DataFrame or a pyarrow Table) is one list call of the pipeline, so `batch_size` in `params` batches
the model inside it, sorted by length.

Results become columns, beside the batch's own (an id column keeps its place):

- a result that is a dict (automatic-speech-recognition: {"text", "chunks"}; zero-shot-classification:
  {"sequence", "labels", "scores"}; question-answering: {"score", "start", "end", "answer"};
  text-classification of a list: {"label", "score"}) gives one column per key;
- any other result (a list of {"label", "score"} with top_k, [{"generated_text"}], embeddings) goes whole
  into one column, `output_column` ("output" when not given);
- with `output_column` set, every result goes whole into that column, whatever its shape.

`on_error="record"` adds the columns "error" (the message) and "error_type" (the error's class name), None
on rows that worked, whose result columns are None on rows that failed; "skip" drops failed rows from the
output; "raise" (the default) fails the batch, and with it the Ray job, as Ray does for any error.

Ray is imported only by `map_pipeline` (an actor has it already): `pip install 'lightpipe[ray]'`.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import numpy as np

from .errors import InvalidInput, MissingDependency
from .runtime import check_on_error, is_error_record

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT_COLUMN = "output"
ERROR_COLUMNS = ("error", "error_type")


def _require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise MissingDependency("Ray Data is needed here: pip install 'lightpipe[ray]'") from e
    return ray


class PipelinePredictor:
    """A callable class for `ray.data.Dataset.map_batches`: builds the pipeline once per actor and answers
    batches with the pipeline's results as new columns.

    task, model, **params: as `lightpipe.pipeline(task, model=model, **params)` (device, dtype, batch_size,
        top_k, return_timestamps ...). Without a `device`, an actor given a GPU by Ray (num_gpus=...) runs
        on "cuda", any other on the CPU.
    input_column: the column holding the inputs: texts, image bytes or paths, audio file bytes or paths,
        audio arrays at the model's rate, or dicts ({"array", "sampling_rate"}, {"bytes", "path"},
        {"question", "context"} ...).
    output_column: None, to spread dict results over one column per key; a name, to keep each whole result
        in that one column.
    on_error: "raise", "skip" or "record" (see the module's docs).
    """

    def __init__(self, task: str, model: Any = None, *, input_column: str, output_column: str | None = None,
                 on_error: str | None = "raise", **params):
        from . import pipeline

        if not isinstance(input_column, str) or not input_column:
            raise InvalidInput(f"input_column must be a column name, not {input_column!r}.")
        if output_column is not None and (not isinstance(output_column, str) or not output_column):
            raise InvalidInput(f"output_column must be a column name or None, not {output_column!r}.")
        self.on_error = check_on_error(on_error)
        self.input_column = input_column
        self.output_column = output_column
        self._names: list[str] | None = None  # the result columns of the last batch that had results
        if params.get("device") is None and params.get("device_map") is None and _ray_gpu_ids():
            params["device"] = "cuda"
        self.pipe = pipeline(task, model=model, **params)

    def __call__(self, batch):
        """A batch (dict of numpy arrays, pandas DataFrame or pyarrow Table) -> the same kind, with result
        columns added (and, with on_error="skip", failed rows dropped)."""
        values = [_input_value(v) for v in _column(batch, self.input_column)]
        if not values:
            return batch
        # Some tasks answer a list of one input with its result rather than a list (question-answering,
        # fill-mask, as transformers does); a list of two never is, so a one-row batch asks twice.
        call = values if len(values) > 1 else values * 2
        # "skip" is "record" here, and the failed rows are dropped below: the batch has to know which rows failed.
        results = self.pipe(call, on_error="raise" if self.on_error == "raise" else "record")[: len(values)]
        if len(results) != len(values):
            raise AssertionError(f"{len(values)} inputs gave {len(results)} results")
        failed = [is_error_record(r) for r in results]
        keep = None
        if self.on_error == "skip" and any(failed):
            keep = np.array([not f for f in failed])
            logger.warning("%d of %d inputs of this batch failed and were dropped (on_error='skip'); the first: %s",
                           sum(failed), len(values), next(r for r in results if is_error_record(r))["error"])
            results = [r for r, f in zip(results, failed) if not f]
            failed = [False] * len(results)
        columns = self._columns(results, failed)
        if self.input_column in columns:
            raise InvalidInput(
                f"a result column would replace the input column {self.input_column!r}; set output_column."
            )
        return _with_columns(batch, columns, keep)

    def _columns(self, results: list, failed: list[bool]) -> dict[str, list]:
        good = [r for r, f in zip(results, failed) if not f]
        spread = self.output_column is None and good and all(isinstance(r, dict) for r in good)
        if self.output_column is None and not good and self._names:  # every row failed: the columns seen before
            spread, names = True, self._names
        elif spread:
            names = self._names = list(dict.fromkeys(k for r in good for k in r))
        if spread:
            columns = {name: [None if f else r.get(name) for r, f in zip(results, failed)] for name in names}
        else:
            columns = {self.output_column or DEFAULT_OUTPUT_COLUMN: [None if f else r for r, f in zip(results, failed)]}
        if self.on_error == "record":
            columns["error"] = [r["error"] if f else None for r, f in zip(results, failed)]
            columns["error_type"] = [r["type"] if f else None for r, f in zip(results, failed)]
        return columns


def map_pipeline(ds, task: str, model: Any = None, *, input_column: str, output_column: str | None = None,
                 concurrency: int = 1, ray_batch_size: int | None = None, num_gpus: float | None = None,
                 num_cpus: float | None = None, on_error: str | None = "raise", **params):
    """`ds` (a ray.data.Dataset) -> a Dataset with the pipeline's results as columns (lazy, as Ray Data is).

    concurrency: the number of actors, each holding one pipeline. ray_batch_size: rows per call of an actor
        (Ray's map_batches batch_size; default 4 x the pipeline's batch_size, at least 32). num_gpus /
        num_cpus: what each actor reserves. Every other parameter is the predictor's (see PipelinePredictor).
    """
    ray = _require_ray()
    check_on_error(on_error)
    from .checks import positive_int

    positive_int("concurrency", concurrency)
    positive_int("ray_batch_size", ray_batch_size, allow_none=True)
    if ray_batch_size is None:
        ray_batch_size = max(32, 4 * (params.get("batch_size") or 1))
    resources = {k: v for k, v in (("num_gpus", num_gpus), ("num_cpus", num_cpus)) if v is not None}
    return ds.map_batches(
        PipelinePredictor,
        fn_constructor_kwargs=dict(task=task, model=model, input_column=input_column, output_column=output_column,
                                   on_error=on_error, **params),
        batch_size=ray_batch_size,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        **resources,
    )


# ------------------------------------------------------------------ batches in and out


def _ray_gpu_ids() -> list:
    """The GPUs Ray gave this process; none outside Ray (where ray was never imported, it is not imported now)."""
    ray = sys.modules.get("ray")
    return list(ray.get_gpu_ids()) if ray is not None and ray.is_initialized() else []


def _column(batch, name: str) -> list:
    if isinstance(batch, dict):
        if name not in batch:
            raise InvalidInput(f"the batch has no column {name!r}; its columns: {', '.join(map(str, batch))}.")
        return list(batch[name])
    names = list(getattr(batch, "column_names", None) or getattr(batch, "columns", []))
    if name not in names:
        raise InvalidInput(f"the batch has no column {name!r}; its columns: {', '.join(map(str, names))}.")
    if hasattr(batch, "iloc"):  # pandas
        return batch[name].tolist()
    return batch.column(name).to_pylist()  # pyarrow


def _input_value(value: Any) -> Any:
    """A cell of a batch -> a pipeline input: numpy scalars to Python ones, lists of numbers in audio dicts
    (how Arrow gives them back) to arrays."""
    if isinstance(value, np.str_):
        return str(value)
    if isinstance(value, np.bytes_):
        return bytes(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        out = {k: _input_value(v) for k, v in value.items()}
        for key in ("array", "raw"):
            if isinstance(out.get(key), (list, tuple)):
                out[key] = np.asarray(out[key], dtype=np.float32)
        return out
    return value


def _as_numpy(values: list) -> np.ndarray:
    """A column of results -> a numpy column: plain values as such, anything else (dicts, lists, None among
    strings) as an object array, one cell per row."""
    kinds = {type(v) for v in values}
    if len(kinds) == 1 and kinds <= {str, float, int, bool}:
        return np.asarray(values)
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def _with_columns(batch, columns: dict[str, list], keep: np.ndarray | None):
    if isinstance(batch, dict):
        out = {k: (np.asarray(v)[keep] if keep is not None else v) for k, v in batch.items()}
        out.update({k: _as_numpy(v) for k, v in columns.items()})
        return out
    if hasattr(batch, "iloc"):  # pandas
        out = batch[keep].reset_index(drop=True) if keep is not None else batch.copy()
        for k, v in columns.items():
            out[k] = v
        return out
    import pyarrow as pa

    out = batch.filter(pa.array(keep)) if keep is not None else batch
    for k, v in columns.items():
        column = pa.array(v)
        out = out.set_column(out.column_names.index(k), k, column) if k in out.column_names else out.append_column(k, column)
    return out

"""Dynamic batching: one model worker thread fed by a bounded queue.

Requests (`Job`s) wait in arrival order. The worker blocks while nothing waits; when a request arrives, its
deadline is `max_wait_ms` after its arrival, and the worker starts a batch as soon as the requests that can join
it fill `batch_size` inputs or the token / audio-seconds budget, or the deadline passes (a request that waited
while the model was busy starts at once). Only requests with the same parameters share a batch, and those
closest in length to the oldest one join first. The batch runs through the pipeline's public call on the list of
their inputs (`pipe(inputs, batch_size=n, **params)`, which sorts them by length); each request gets its results,
in the shape the Python call `pipe(its_inputs, **params)` gives. A failing batch runs again request by
request, so that a bad input fails its own request only. A request running alone (a lone request, a streaming
generation) is the Python call itself. The event loop never runs the model: it only queues and awaits.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import threading
import time
from typing import Any

from .limits import HTTPError, Settings, from_exception
from .metrics import Metrics

log = logging.getLogger(__name__)

WAITING, RUNNING, DONE, CANCELLED = "waiting", "running", "done", "cancelled"
TEXT2TEXT = ("summarization", "translation", "text2text-generation")


class Job:
    """One request's work: `inputs` as the caller gave them (one input, or a list when `single` is False)."""

    def __init__(self, inputs: Any, params: dict[str, Any], *, single: bool, cost: float = 0.0,
                 budget: str = "tokens", solo: bool = False, call_kwargs: dict[str, Any] | None = None):
        self.inputs, self.params, self.single = inputs, params, single
        self.items = [inputs] if single else list(inputs)
        self.cost, self.budget = cost, budget
        self.solo = solo  # runs alone, as the exact Python call (streaming, inputs that cannot be split)
        self.call_kwargs = call_kwargs or {}  # passed to this call only (a streamer)
        self.key = json.dumps(params, sort_keys=True, default=repr)
        self.state = WAITING
        self.enqueued = time.monotonic()
        self.queue_s = 0.0
        self.inference_s = 0.0
        self.batch_inputs = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.future: asyncio.Future | None = None

    def bind(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.future = self.loop.create_future()

    def resolve(self, result: Any = None, error: HTTPError | None = None) -> None:
        """Hand the answer to the request's event loop (from the worker thread)."""
        if self.state == CANCELLED:
            return
        self.state = DONE
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(_settle, self.future, result, error)


def _settle(future: asyncio.Future, result: Any, error: HTTPError | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Batcher:
    """The queue and the model worker. `pipe` may be set later (the server loads it in the background)."""

    def __init__(self, settings: Settings, metrics: Metrics, pipe=None):
        self.settings, self.metrics, self.pipe = settings, metrics, pipe
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._running = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the event loop's side
    @property
    def queue_length(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return self._running

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="lightpipe-model-worker", daemon=True)
            self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job, or 429 when the queue is full, 503 while shutting down."""
        with self._cond:
            if self._stopping:
                raise HTTPError(503, "the server is shutting down.", "ShuttingDown", {"Retry-After": "5"})
            if len(self._pending) >= self.settings.max_queue:
                raise HTTPError(429, f"the queue is full ({self.settings.max_queue} requests wait); retry later.",
                                "QueueFull", {"Retry-After": str(self._retry_after())})
            job.enqueued = time.monotonic()
            self._pending.append(job)
            self._cond.notify()

    def _retry_after(self) -> int:
        """Seconds until the queue has likely drained a little: one average batch, at least 1."""
        batches = self.metrics.inference_seconds.count
        mean = self.metrics.inference_seconds.sum / batches if batches else 1.0
        return max(1, round(mean))

    def cancel(self, job: Job) -> bool:
        """Drop a job: a waiting one is taken out of the queue (True); a running one finishes unanswered."""
        with self._cond:
            was_waiting = job.state == WAITING
            if was_waiting:
                try:
                    self._pending.remove(job)
                except ValueError:
                    pass
            if job.state in (WAITING, RUNNING):
                job.state = CANCELLED
            return was_waiting

    async def run(self, job: Job, timeout_s: float | None = None) -> Any:
        """Queue `job` and await its answer; 504 when it takes longer than the timeout."""
        job.bind()
        self.submit(job)
        timeout = self.settings.timeout_s if timeout_s is None else timeout_s
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout)
        except asyncio.TimeoutError:
            dropped = self.cancel(job)
            raise HTTPError(504, f"the request took longer than {timeout:g} s"
                                 f"{' in the queue; it was dropped' if dropped else ''}.", "Timeout") from None
        except asyncio.CancelledError:  # the client went away
            self.cancel(job)
            raise

    def stop(self, wait_s: float | None = None) -> None:
        """Finish the requests already queued and running, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(wait_s)

    # ------------------------------------------------------------------ the worker thread
    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except BaseException as e:  # never lose the worker; each request gets an answer
                log.exception("the model worker failed")
                for job in batch:
                    job.resolve(error=from_exception(e))
            finally:
                with self._cond:
                    self._running = 0

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                if not self._pending:
                    if self._stopping:
                        return None
                    self._cond.wait()  # idle: no deadline runs while nothing waits
                    continue
                first = self._pending[0]
                if not first.solo:
                    deadline = first.enqueued + self.settings.max_wait_ms / 1000
                    while not self._stopping and first.state == WAITING:
                        left = deadline - time.monotonic()
                        if left <= 0 or self._full(first):
                            break
                        self._cond.wait(left)
                    if first.state != WAITING:  # dropped while waiting (timeout)
                        continue
                chosen = [first] if first.solo else self._choose(first)
                now = time.monotonic()
                for job in chosen:
                    self._pending.remove(job)
                    job.state, job.queue_s = RUNNING, now - job.enqueued
                self._running = len(chosen)
                return chosen

    def _joinable(self, first: Job) -> list[Job]:
        return [j for j in self._pending if j.key == first.key and not j.solo and j.state == WAITING]

    def _limit(self, job: Job) -> float:
        return self.settings.max_batch_audio_s if job.budget == "audio" else self.settings.max_batch_tokens

    def _full(self, first: Job) -> bool:
        jobs = self._joinable(first)
        return (sum(len(j.items) for j in jobs) >= self.settings.batch_size
                or sum(j.cost for j in jobs) >= self._limit(first))

    def _choose(self, first: Job) -> list[Job]:
        """The oldest job, then those of the same parameters closest to it in length per input, while the batch
        size and the budget allow (the oldest job always runs, however large)."""
        per_input = lambda j: j.cost / max(1, len(j.items))  # noqa: E731
        others = sorted(self._joinable(first)[1:], key=lambda j: abs(per_input(j) - per_input(first)))
        chosen, size, cost = [first], len(first.items), first.cost
        for job in others:
            if size + len(job.items) > self.settings.batch_size or cost + job.cost > self._limit(first):
                continue
            chosen.append(job)
            size, cost = size + len(job.items), cost + job.cost
        return chosen

    def _run(self, batch: list[Job]) -> None:
        pipe = self.pipe
        start = time.monotonic()
        for job in batch:
            self.metrics.queue_seconds.observe(job.queue_s)
        if len(batch) == 1:
            self._run_alone(pipe, batch[0])
            return
        flat = [item for job in batch for item in job.items]  # two inputs or more
        try:
            results = own_results(pipe.task, pipe(flat, batch_size=self.settings.batch_size, **batch[0].params))
        except Exception:  # one bad input: find it by running each request on its own
            self._observe(len(flat), time.monotonic() - start, [])
            for job in batch:
                self._run_alone(pipe, job)
            return
        elapsed = time.monotonic() - start
        self._observe(len(flat), elapsed, batch)
        offset = 0
        for job in batch:
            mine = results[offset:offset + len(job.items)]
            offset += len(job.items)
            job.resolve(shape(pipe.task, job, mine))

    def _run_alone(self, pipe, job: Job) -> None:
        if job.state == CANCELLED:
            return
        start = time.monotonic()
        try:
            result = pipe(job.inputs, batch_size=self.settings.batch_size, **job.params, **job.call_kwargs)
        except Exception as e:
            self._observe(len(job.items), time.monotonic() - start, [job])
            job.resolve(error=from_exception(e))
            return
        self._observe(len(job.items), time.monotonic() - start, [job])
        job.resolve(result)

    def _observe(self, inputs: int, seconds: float, jobs: list[Job]) -> None:
        self.metrics.batch_size.observe(inputs)
        self.metrics.inference_seconds.observe(seconds)
        for job in jobs:
            job.inference_s, job.batch_inputs = seconds, inputs


def own_results(task: str, results: list) -> list:
    """The Python call's answer to a list of two inputs or more -> each input's own result: the list itself, but
    for text2text tasks, which answer one dict per text (not a list of one) when each text has one sequence."""
    if task in TEXT2TEXT or task.startswith("translation"):
        return [[r] if isinstance(r, dict) else r for r in results]
    return results


def shape(task: str, job: Job, results: list) -> Any:
    """Each input's own result -> what `pipe(job.inputs, **job.params)` returns, by the
    pipelines' documented shape rules (transformers'): a lone string given to text-classification without top_k
    answers a list of one; a list of one question (question-answering) or text (fill-mask) answers the result
    itself; text2text tasks answer a list of texts with one dict per text when each has one sequence."""
    if job.single:
        result = results[0]
        if task == "text-classification" and isinstance(job.inputs, str) and "top_k" not in job.params:
            return [result]
        return result
    if task in ("question-answering", "fill-mask") and len(results) == 1:
        return results[0]
    if task in TEXT2TEXT or task.startswith("translation"):
        if all(isinstance(r, list) and len(r) == 1 for r in results):
            return [r[0] for r in results]
    return results


def solo_params(task: str, params: dict[str, Any]) -> bool:
    """Calls whose inputs cannot be split into independent items run alone (token-classification over words
    given pre-split, or with offsets given per input)."""
    return task == "token-classification" and bool(params.get("is_split_into_words") or "offset_mapping" in params)


"""Token streaming of text-generation: a generation runs alone on the model worker with a streamer (transformers'
put / end protocol, the mechanism `pipe.stream` is built on), whose text pieces reach the request's event loop as
they are decoded. A client that leaves stops the generation at its next token."""

from __future__ import annotations

import asyncio
from typing import Any

from .batching import Job
from .limits import HTTPError


class Stopped(Exception):
    """Raised inside generation when the client of a stream has gone: generation ends there."""


class EventStreamer:
    """transformers' streamer protocol (put / end) -> text pieces on an event loop's queue. The first put carries
    the prompt; each later one a generated token."""

    def __init__(self, pipe, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        from ..processing.detokenize import Detokenizer

        self.decoder = Detokenizer(pipe.tokenizer, skip_special_tokens=True)
        self.loop, self.queue = loop, queue
        self.prompt_tokens: int | None = None
        self.tokens: list[int] = []
        self.cancelled = False

    def put(self, token_ids) -> None:
        if self.cancelled:
            raise Stopped()
        if self.prompt_tokens is None:
            self.prompt_tokens = int(token_ids.numel())
            return
        ids = token_ids.reshape(-1).tolist()
        self.tokens += ids
        self._send(self.decoder.add(ids))

    def end(self) -> None:
        if not self.cancelled:
            self._send(self.decoder.finish())

    def _send(self, piece: str) -> None:
        if piece:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, piece)


class TokenStream:
    """One streamed generation. `await TokenStream.start(...)` queues it and waits for its first piece, so that a
    refusal (422) or a timeout (504) is still an HTTP error; `async for piece in stream` gives the text pieces;
    then `error` is the failure or None, `result` the Python call's answer, `streamer` the token counts. `close()`
    stops it (the client left)."""

    def __init__(self, server, job: Job, streamer: EventStreamer, queue: asyncio.Queue, first: asyncio.Future):
        self.server, self.job, self.streamer, self.queue, self.first = server, job, streamer, queue, first

    @classmethod
    async def start(cls, server, pipe, inputs: Any, params: dict[str, Any]) -> "TokenStream":
        from .inputs import make_job

        queue: asyncio.Queue = asyncio.Queue()
        streamer = EventStreamer(pipe, asyncio.get_running_loop(), queue)
        job = await make_job(server, pipe, inputs, True, params, solo=True, call_kwargs={"streamer": streamer})
        job.bind()
        server.batcher.submit(job)
        first = asyncio.ensure_future(queue.get())
        timeout = server.settings.timeout_s
        done, _ = await asyncio.wait({first, job.future}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            first.cancel()
            streamer.cancelled = True
            dropped = server.batcher.cancel(job)
            raise HTTPError(504, f"the request took longer than {timeout:g} s"
                                 f"{' in the queue; it was dropped' if dropped else ''}.", "Timeout")
        if first not in done and job.future.exception() is not None and queue.empty():
            first.cancel()
            raise job.future.exception()
        return cls(server, job, streamer, queue, first)

    async def __aiter__(self):
        pending = self.first
        while True:
            if not pending.done():
                await asyncio.wait({pending, self.job.future}, return_when=asyncio.FIRST_COMPLETED)
            if pending.done():
                yield pending.result()
                pending = asyncio.ensure_future(self.queue.get())
                continue
            break  # the job ended: the pieces it sent are all queued already
        pending.cancel()
        while not self.queue.empty():
            yield self.queue.get_nowait()

    @property
    def error(self) -> BaseException | None:
        return self.job.future.exception() if self.job.future.done() else None

    @property
    def result(self) -> Any:
        return self.job.future.result()

    def ended_by_model(self, pipe) -> bool:
        """Whether the last token was an end-of-sequence token (rather than the length limit)."""
        eos = set(pipe.generation_config.eos_token_ids)
        return bool(self.streamer.tokens) and self.streamer.tokens[-1] in eos

    def close(self) -> None:
        self.streamer.cancelled = True
        self.server.batcher.cancel(self.job)

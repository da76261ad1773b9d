"""A live HTTP server for the serve tests: uvicorn on 127.0.0.1, a free port, in a thread, stopped at the end."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx


@contextlib.contextmanager
def live(asgi, *, wait_ready: bool = True):
    """Run `asgi` with uvicorn in a thread; yield its base URL; stop it (finishing requests in flight)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(asgi, log_level="warning", lifespan="on", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    if wait_ready:
        while httpx.get(f"{url}/health").status_code != 200:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


_MADE: dict = {}


def tiny_speech(tmp_path_factory):
    """(a tiny random English-only Whisper pipeline that decodes at most 8 tokens, the test audio maker `clip`),
    built once per test session and shared by the serve tests."""
    if "speech" not in _MADE:
        import lightpipe
        from tasks.test_asr_whisper import clip, tiny_checkpoint

        folder = tiny_checkpoint(tmp_path_factory.mktemp("whisper-en"), multilingual=False, seed=1)
        # max_new_tokens as a default of the pipeline: short decodes for the server's calls too
        pipe = lightpipe.pipeline("automatic-speech-recognition", model=str(folder), max_new_tokens=8)
        _MADE["speech"] = (pipe, clip)
    return _MADE["speech"]


def tiny_generator(tmp_path_factory):
    """A tiny random GPT-2 text-generation pipeline with a ChatML template, built once per test session."""
    if "generator" not in _MADE:
        import lightpipe
        from text_generation_helpers import tiny_generation_checkpoint

        folder = tiny_generation_checkpoint(tmp_path_factory.mktemp("gpt2-chat"), "gpt2")
        _MADE["generator"] = lightpipe.pipeline("text-generation", model=str(folder))
    return _MADE["generator"]

"""The one URL fetcher (processing/sources.py) that image and audio loading share: URL quoting, short reads,
size limit and timeout behave the same for both kinds of input."""

from __future__ import annotations

import functools
import http.server
import io
import threading
import time

import numpy as np
import pytest
import soundfile

from lightpipe import InvalidInput
from lightpipe.processing import sources
from lightpipe.processing.audio_io import load_audio
from lightpipe.processing.image_io import load_image
from server_helpers import raw_server, stall
from vision_helpers import image_bytes, smooth_image

RATE = 16000


def flac_bytes() -> tuple[bytes, np.ndarray]:
    t = np.arange(RATE // 2) / RATE
    samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, RATE, format="FLAC")
    return buffer.getvalue(), samples


@pytest.fixture(scope="module")
def files():
    audio, _ = flac_bytes()
    return {"/with%20space.flac": audio, "/with%20space.png": image_bytes(smooth_image(20, 25), "PNG")}


@pytest.fixture(scope="module")
def server(files):
    """http://127.0.0.1:port serving `files` by their (percent-encoded) request paths, 404 elsewhere."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_audio_url_with_a_space_is_quoted_as_for_images(server, files):
    # http.client refuses a raw space; audio URLs used to fail here while image URLs were quoted
    want = load_audio(files["/with%20space.flac"], RATE)
    np.testing.assert_array_equal(load_audio(f"{server}/with space.flac", RATE, timeout=5), want)
    np.testing.assert_array_equal(load_audio(f"{server}/with%20space.flac", RATE, timeout=5), want)  # kept escaped
    np.testing.assert_array_equal(load_audio(f"HTTP://{server[7:]}/with space.flac", RATE, timeout=5), want)
    image = load_image(f"{server}/with space.png", timeout=5)
    assert image.size == (25, 20) and image.mode == "RGB"


def _whole_image_then_close_early(body: bytes):
    """A complete image, sent under a Content-Length 100 bytes longer: the connection closes before the end."""
    def behaviour(conn, stop):
        conn.recv(1024)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"
                     + f"Content-Length: {len(body) + 100}\r\n\r\n".encode() + body)
        conn.close()
    return behaviour


def test_image_whose_server_closes_early_is_invalid_input():
    # The bytes that arrived decode as a whole PNG: without short-read detection the image would be accepted
    body = image_bytes(smooth_image(20, 25), "PNG")
    load_image(body)  # decodable on its own
    url, stop = raw_server(_whole_image_then_close_early(body))
    try:
        with pytest.raises(InvalidInput, match="closed after .* short of its Content-Length") as error:
            load_image(url, timeout=5)
        assert url in str(error.value)
        with pytest.raises(InvalidInput, match="closed after"):
            load_audio(url, RATE, timeout=5)  # the same rule for audio
    finally:
        stop()


def test_a_body_past_the_size_limit_is_refused(server, files):
    with pytest.raises(InvalidInput, match="bytes allowed"):
        sources.fetch_url(f"{server}/with space.png", 5, max_bytes=10)  # refused from its Content-Length
    assert sources.fetch_url(f"{server}/with space.png", 5, max_bytes=10**6) == files["/with%20space.png"]


@pytest.mark.parametrize("load", [functools.partial(load_image), functools.partial(load_audio, sampling_rate=RATE)],
                         ids=["image", "audio"])
def test_one_timeout_for_both_kinds(load):
    url, stop = raw_server(stall)
    try:
        start = time.perf_counter()
        with pytest.raises(InvalidInput, match="fetching .* timed out|timeout"):
            load(url, timeout=0.5)
        assert time.perf_counter() - start < 1.5
        for bad in (0, -1, float("inf"), True, "soon"):
            with pytest.raises(InvalidInput, match="timeout must be a positive number of seconds"):
                load(url, timeout=bad)
    finally:
        stop()


def test_http_errors_name_the_url(server):
    with pytest.raises(InvalidInput, match="fetching .*/missing.png failed: HTTP 404"):
        load_image(f"{server}/missing.png", timeout=5)
    with pytest.raises(InvalidInput, match="fetching .*/missing.wav failed: HTTP 404"):
        load_audio(f"{server}/missing.wav", RATE, timeout=5)


def test_check_timeout():
    assert sources.check_timeout(None) == sources.DEFAULT_TIMEOUT_S
    assert sources.check_timeout(2) == 2.0
    with pytest.raises(InvalidInput, match="timeout"):
        sources.check_timeout(float("nan"))

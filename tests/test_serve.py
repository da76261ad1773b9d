"""lightpipe.serve over real HTTP (uvicorn on 127.0.0.1, a free port): answers equal the Python call for each task
family, concurrent requests are batched and each answer is its own, and the limits (401, 403, 413, 422, 429, 503,
504) answer JSON {"error", "type"}."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import soundfile

import lightpipe
from lightpipe.serve import app
from serve_helpers import live, tiny_generator, tiny_speech
from vision_helpers import image_bytes, smooth_image, tiny_vision_checkpoint

TEXTS = ["I love this movie", "the book was terrible and sad", "paris is the capital of france", "good",
         "what a great day in the city", "john works at google in london", "bad bad bad", "the river at night"]
RATE = 16000


@pytest.fixture(scope="module")
def classifier(checkpoint):
    return lightpipe.pipeline("text-classification", model=str(checkpoint("bert", "sequence-classification")))


@pytest.fixture(scope="module")
def server(classifier):
    with live(app(classifier, max_wait_ms=1, batch_size=8)) as url:
        yield url


@pytest.fixture(scope="module")
def waiting_server(classifier):
    """A classifier server that waits up to 300 ms for a batch to fill, so concurrent requests share batches."""
    with live(app(classifier, max_wait_ms=300, batch_size=8)) as url:
        yield url


def same(ours, ref, tol: float = 1e-5) -> bool:
    """Equal structures, floats within `tol` (a batch's shape may move the last bits, never more)."""
    if isinstance(ours, float) or isinstance(ref, float):
        return abs(ours - ref) <= tol
    if isinstance(ours, dict) and isinstance(ref, dict):
        return ours.keys() == ref.keys() and all(same(ours[k], ref[k], tol) for k in ours)
    if isinstance(ours, (list, tuple)) and isinstance(ref, (list, tuple)):
        return len(ours) == len(ref) and all(same(a, b, tol) for a, b in zip(ours, ref))
    return ours == ref


def wait_queued(url: str, n: int = 1, headers: dict | None = None) -> None:
    """Wait until `n` requests wait in the server's queue."""
    deadline = time.monotonic() + 10
    while f"lightpipe_queue_length {n}\n" not in httpx.get(f"{url}/metrics", headers=headers).text:
        assert time.monotonic() < deadline, "the request never reached the queue"
        time.sleep(0.01)


def batches(url: str) -> tuple[int, int]:
    """(batches run, batches of one input) from /metrics' batch-size histogram."""
    text = httpx.get(f"{url}/metrics").text
    ones = int(re.search(r'lightpipe_batch_size_bucket\{le="1"\} (\d+)', text).group(1))
    total = int(re.search(r"lightpipe_batch_size_count (\d+)", text).group(1))
    return total, ones


def test_text_classification_equals_the_python_call(server, classifier):
    one = httpx.post(f"{server}/", json={"inputs": TEXTS[0]})
    assert one.status_code == 200
    assert same(one.json(), classifier(TEXTS[0]))  # a lone string: a list of one, as in transformers
    assert float(one.headers["x-queue-time"]) >= 0 and float(one.headers["x-inference-time"]) > 0
    many = httpx.post(f"{server}/predict", json={"inputs": TEXTS[:3], "parameters": {"top_k": 2}})
    assert same(many.json(), classifier(TEXTS[:3], top_k=2))
    pair = httpx.post(f"{server}/", json={"inputs": {"text": "good", "text_pair": "bad"}})
    assert same(pair.json(), classifier({"text": "good", "text_pair": "bad"}))


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(waiting_server, classifier):
    server = waiting_server
    before, ones_before = batches(server)
    bodies = [{"inputs": t} if i % 3 else {"inputs": t, "parameters": {"top_k": None}} for i, t in enumerate(TEXTS)]
    bodies += [{"inputs": [TEXTS[1], TEXTS[2]]}, {"inputs": 17}]  # a list, and an input that fails alone
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: httpx.post(f"{server}/", json=b, timeout=30), bodies))
    for body, answer in zip(bodies[:-1], answers):
        assert answer.status_code == 200, answer.text
        assert same(answer.json(), classifier(body["inputs"], **body.get("parameters", {})))
    assert answers[-1].status_code == 422
    assert answers[-1].json() == {"error": "input must be a string, not int.", "type": "InvalidInput"}
    after, ones_after = batches(server)
    assert max(int(a.headers["x-batch-size"]) for a in answers[:-1]) > 1
    assert after - before < len(bodies)  # fewer batches than requests
    assert (after - before) - (ones_after - ones_before) >= 1  # at least one batch of several inputs


@pytest.mark.parametrize("task, head, inputs", [
    ("question-answering", "question-answering",
     [{"question": "who works?", "context": "john smith works at google in london"},
      [{"question": "where?", "context": "mary lives in berlin"}],
      [{"question": "what?", "context": "the river at night"}, {"question": "who?", "context": "the king and queen"}]]),
    ("fill-mask", "masked-lm",
     ["paris is the [MASK] of france", ["the [MASK] was good"], ["a [MASK] day", "[MASK] run"]]),
])
def test_batched_requests_keep_the_shapes_of_the_python_call(checkpoint, task, head, inputs):
    """A lone input, a list of one (which these tasks answer unwrapped) and a list of two, batched together."""
    pipe = lightpipe.pipeline(task, model=str(checkpoint("bert", head)))
    with live(app(pipe, max_wait_ms=300)) as url:
        with ThreadPoolExecutor(len(inputs)) as pool:
            answers = list(pool.map(lambda x: httpx.post(f"{url}/", json={"inputs": x}, timeout=30), inputs))
        assert max(int(a.headers["x-batch-size"]) for a in answers) > 1
    for x, answer in zip(inputs, answers):
        assert same(answer.json(), pipe(x))


def test_metrics_health_and_info(server):
    # Its own answered request, so that the counter below does not depend on which tests ran before on this worker.
    assert httpx.post(f"{server}/predict", json={"inputs": "counted"}).status_code == 200
    metrics = httpx.get(f"{server}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    for name in ("lightpipe_requests_total", "lightpipe_queue_length", "lightpipe_queue_seconds_bucket",
                 "lightpipe_inference_seconds_count", "lightpipe_batch_size_bucket"):
        assert name in metrics.text
    assert re.search(r'lightpipe_requests_total\{route="/predict",status="200"\} [1-9]', metrics.text)
    assert httpx.get(f"{server}/health").json() == {"status": "ok", "task": "text-classification"}
    info = httpx.get(f"{server}/info").json()
    assert info["task"] == "text-classification" and info["dtype"] == "float32" and info["device"] == "cpu"
    assert info["limits"]["batch_size"] == 8 and info["limits"]["allow_paths"] is False
    missing = httpx.get(f"{server}/nowhere")
    assert missing.status_code == 404 and missing.json()["type"] == "NotFound"


def test_bad_requests_answer_json_errors(server):
    for body, status in (({"inputs": None}, 422), ({"text": "x"}, 422),
                         ({"inputs": "x", "parameters": {"nope": 1}}, 422),
                         ({"inputs": "x", "parameters": {"batch_size": 64}}, 422)):
        answer = httpx.post(f"{server}/", json=body)
        assert answer.status_code == status
        assert set(answer.json()) == {"error", "type"} and answer.json()["error"]
    broken = httpx.post(f"{server}/", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and broken.json()["type"] == "BadRequest"
    assert httpx.post(f"{server}/", json={"inputs": "still answering"}).status_code == 200


def test_text_inputs_that_look_like_paths_stay_texts(server, classifier):
    answer = httpx.post(f"{server}/", json={"inputs": "/etc/passwd"})
    assert same(answer.json(), classifier("/etc/passwd"))


def test_limits_body_queue_timeout_and_key(classifier):
    with live(app(classifier, max_body_mb=0.001, max_queue=1, max_wait_ms=4000, timeout_s=1.0,
                  api_key="s3cret")) as url:
        key = {"Authorization": "Bearer s3cret"}
        assert httpx.post(f"{url}/", json={"inputs": "x"}).status_code == 401
        wrong = httpx.post(f"{url}/", json={"inputs": "x"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["type"] == "Unauthorized"
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200  # probes need no key
        big = httpx.post(f"{url}/", json={"inputs": "word " * 400}, headers=key)
        assert big.status_code == 413 and big.json()["type"] == "PayloadTooLarge"
        # The first request waits for its batch (4 s) longer than the timeout: 504, dropped unrun. While it
        # waits the queue (of 1) is full: 429 with Retry-After.
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(httpx.post, f"{url}/", json={"inputs": "first"}, headers=key, timeout=10)
            wait_queued(url, 1, key)
            full = httpx.post(f"{url}/", json={"inputs": "second"}, headers=key)
            assert full.status_code == 429 and full.headers["retry-after"].isdigit()
            assert full.json()["type"] == "QueueFull"
            late = slow.result()
        assert late.status_code == 504 and late.json()["type"] == "Timeout" and "dropped" in late.json()["error"]
        metrics = httpx.get(f"{url}/metrics", headers=key).text
        assert "lightpipe_batch_size_count 0" in metrics  # the dropped request never ran


def test_503_while_the_model_loads(classifier):
    release = threading.Event()

    def load():
        release.wait(10)
        return classifier

    with live(app(loader=load, task="text-classification"), wait_ready=False) as url:
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json() == {"status": "loading"}
        early = httpx.post(f"{url}/", json={"inputs": "hello"})
        assert early.status_code == 503 and early.json()["type"] == "ModelLoading" and "retry-after" in early.headers
        assert httpx.get(f"{url}/info").json()["ready"] is False
        release.set()
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert same(httpx.post(f"{url}/", json={"inputs": "hello"}).json(), classifier("hello"))


def test_shutdown_finishes_requests_in_flight(classifier):
    with ThreadPoolExecutor(1) as pool:
        with live(app(classifier, max_wait_ms=600)) as url:
            pending = pool.submit(httpx.post, f"{url}/", json={"inputs": "in flight"}, timeout=10)
            wait_queued(url)  # queued, waiting for its batch when the server is told to stop
        answer = pending.result()
    assert answer.status_code == 200 and same(answer.json(), classifier("in flight"))


def test_feature_extraction(checkpoint):
    pipe = lightpipe.pipeline("feature-extraction", model=str(checkpoint("bert", "base")))
    with live(app(pipe)) as url:
        answer = httpx.post(f"{url}/", json={"inputs": ["hello world", "good"]})
        assert same(answer.json(), pipe(["hello world", "good"]))


# ---------------------------------------------------------------------------------------------- images
@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    folder = tiny_vision_checkpoint(tmp_path_factory.mktemp("vit"), "vit", "image-classification")
    return lightpipe.pipeline("image-classification", model=str(folder))


def test_image_classification_from_base64_data_uri_multipart_and_raw_bytes(vision, tmp_path):
    png = image_bytes(smooth_image(40, 50, seed=3), "PNG")
    jpeg = image_bytes(smooth_image(30, 20, seed=4), "JPEG")
    expected = [vision(png), vision(jpeg)]
    with live(app(vision, max_wait_ms=50)) as url:
        b64 = base64.b64encode(png).decode()
        assert same(httpx.post(f"{url}/", json={"inputs": b64}).json(), expected[0])
        uri = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
        assert same(httpx.post(f"{url}/", json={"inputs": [b64, uri]}).json(), expected)
        upload = httpx.post(f"{url}/", files={"file": ("a.png", png, "image/png")}, data={"parameters": '{"top_k": 1}'})
        assert same(upload.json(), vision(png, top_k=1))
        raw = httpx.post(f"{url}/", content=jpeg, headers={"content-type": "image/jpeg"})
        assert same(raw.json(), expected[1])
        path = tmp_path / "cat.png"
        path.write_bytes(png)
        for refused in (str(path), f"file://{path}", "http://127.0.0.1:9/cat.png", "../../etc/passwd"):
            answer = httpx.post(f"{url}/", json={"inputs": refused})
            assert answer.status_code == 403, refused
            assert answer.json()["type"] in ("PathNotAllowed", "URLNotAllowed")
        garbage = httpx.post(f"{url}/", json={"inputs": base64.b64encode(b"not an image").decode()})
        assert garbage.status_code == 422 and garbage.json()["type"] == "InvalidInput"
    with live(app(vision, allow_paths=True)) as url:
        assert same(httpx.post(f"{url}/", json={"inputs": str(path)}).json(), expected[0])


# ---------------------------------------------------------------------------------------------- speech
def wav(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, RATE, format="FLAC")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    return tiny_speech(tmp_path_factory)


def test_speech_recognition_from_base64_and_upload(speech, tmp_path):
    pipe, clip = speech
    audios = [wav(clip(9000, 1)), wav(clip(14000, 2))]
    expected = [pipe(a, max_new_tokens=6) for a in audios]
    with live(app(pipe, max_wait_ms=100)) as url:
        params = {"max_new_tokens": 6}
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda a: httpx.post(f"{url}/", json={
                "inputs": base64.b64encode(a).decode(), "parameters": params}, timeout=30), audios))
        assert same([a.json() for a in answers], expected)
        upload = httpx.post(f"{url}/", files={"file": ("a.flac", audios[0])},
                            data={"parameters": '{"max_new_tokens": 6}'})
        assert same(upload.json(), expected[0])
        samples = clip(9000, 1)
        array = httpx.post(f"{url}/", json={"inputs": {"array": samples.tolist(), "sampling_rate": RATE},
                                            "parameters": params})
        assert same(array.json(), pipe({"array": samples, "sampling_rate": RATE}, max_new_tokens=6))
        assert httpx.post(f"{url}/", json={"inputs": "/etc/hosts"}).status_code == 403
        bad = httpx.post(f"{url}/", json={"inputs": base64.b64encode(b"RIFF nonsense").decode()})
        assert bad.status_code == 422 and bad.json()["type"] == "InvalidInput"
    path = tmp_path / "speech.flac"
    path.write_bytes(audios[1])
    with live(app(pipe, allow_paths=True)) as url:
        answer = httpx.post(f"{url}/", json={"inputs": str(path), "parameters": params})
        assert same(answer.json(), expected[1])


# ---------------------------------------------------------------------------------------------- generation
def test_text_generation(tmp_path_factory):
    pipe = tiny_generator(tmp_path_factory)
    params = {"do_sample": False, "max_new_tokens": 6}
    chat = [{"role": "user", "content": "Where is Paris?"}]
    with live(app(pipe, max_wait_ms=50)) as url:
        with ThreadPoolExecutor(3) as pool:
            prompts = ["The quick brown fox", "Paris is", chat]
            answers = list(pool.map(lambda p: httpx.post(f"{url}/", json={"inputs": p, "parameters": params},
                                                         timeout=30), prompts))
        for prompt, answer in zip(prompts, answers):
            assert same(answer.json(), pipe(prompt, **params))
        # "stream": true: the text as it is generated, then the Python call's answer
        with httpx.stream("POST", f"{url}/", json={"inputs": chat, "parameters": params, "stream": True}) as events:
            assert events.headers["content-type"].startswith("text/event-stream")
            data = [json.loads(line[6:]) for line in events.iter_lines() if line.startswith("data: ")]
        expected = pipe(chat, **params)
        assert "".join(d["token"] for d in data[:-1]) == expected[0]["generated_text"][-1]["content"]
        assert data[-1] == {"result": expected}
        refused = httpx.post(f"{url}/", json={"inputs": ["a", "b"], "stream": True})
        assert refused.status_code == 422


def test_cli_serve_passes_its_options(monkeypatch):
    from lightpipe import cli
    import lightpipe.serve

    seen = {}
    monkeypatch.setattr(lightpipe.serve, "serve", lambda task, model, **kw: seen.update(task=task, model=model, **kw))
    assert cli.main(["serve", "text-classification", "--model", "m", "--port", "9001", "--batch-size", "16",
                     "--max-wait-ms", "2", "--api-key", "k", "--allow-urls"]) == 0
    assert seen["task"] == "text-classification" and seen["model"] == "m" and seen["port"] == 9001
    assert seen["batch_size"] == 16 and seen["max_wait_ms"] == 2 and seen["api_key"] == "k"
    assert seen["allow_urls"] is True and seen["allow_paths"] is False and seen["host"] == "127.0.0.1"


def test_settings_are_checked():
    from lightpipe.errors import InvalidInput
    from lightpipe.serve import Settings

    for bad in ({"batch_size": 0}, {"max_queue": -1}, {"timeout_s": 0}, {"max_wait_ms": float("nan")}):
        with pytest.raises(InvalidInput):
            Settings(**bad)


def test_text2text_answers_keep_transformers_shapes():
    """summarization answers one text with a list of dicts, a list of texts with one dict each (one sequence)."""
    from lightpipe.serve.batching import Job, own_results, shape

    a, b = {"summary_text": "a"}, {"summary_text": "b"}
    per_input = own_results("summarization", [a, b])  # what pipe(["x", "y"]) returns, split per input
    assert per_input == [[a], [b]]
    assert shape("summarization", Job("x", {}, single=True), per_input[:1]) == [a]
    assert shape("summarization", Job(["x", "y"], {}, single=False), per_input) == [a, b]
    two = [[a, b], [b, a]]  # num_return_sequences=2: lists stay lists
    assert own_results("translation_en_to_de", two) == two
    assert shape("translation_en_to_de", Job(["x", "y"], {}, single=False), two) == two

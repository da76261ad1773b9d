"""The OpenAI-compatible routes, driven by the official `openai` client against a live server: embeddings,
chat and text completions (streaming and not), transcriptions; their results equal the Python call's."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import openai
import pytest
import soundfile

import lightpipe
from lightpipe.serve import app
from serve_helpers import live, tiny_generator, tiny_speech

RATE = 16000


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


# ---------------------------------------------------------------------------------------------- embeddings
def sentence_embedding(pipe, text: str) -> np.ndarray:
    hidden = pipe(text, return_tensors=True)[0]  # (tokens, hidden): the text's own tokens
    mean = hidden.mean(0)
    return (mean / mean.norm()).numpy()


def test_embeddings_float_and_base64(checkpoint):
    pipe = lightpipe.pipeline("feature-extraction", model=str(checkpoint("bert", "base")))
    texts = ["hello world", "paris is the capital of france", "good"]
    expected = [sentence_embedding(pipe, t) for t in texts]
    with live(app(pipe, max_wait_ms=20, model_name="tiny-bert")) as url:
        api = client(url)
        got = api.embeddings.create(model="tiny-bert", input=texts)  # the client asks for base64 and decodes it
        assert [d.index for d in got.data] == [0, 1, 2] and got.model == "tiny-bert"
        for d, ref in zip(got.data, expected):
            np.testing.assert_allclose(np.array(d.embedding), ref, atol=1e-5)
        tokens = sum(len(pipe.tokenizer.encode(t).ids) for t in texts)
        assert got.usage.prompt_tokens == tokens and got.usage.total_tokens == tokens
        floats = api.embeddings.create(model="x", input="good", encoding_format="float")
        np.testing.assert_allclose(np.array(floats.data[0].embedding), expected[2], atol=1e-5)
        raw = httpx.post(f"{url}/v1/embeddings", json={"input": "good", "encoding_format": "base64"}).json()
        decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
        np.testing.assert_allclose(decoded, expected[2], atol=1e-5)
        short = api.embeddings.create(model="x", input="good", dimensions=8, encoding_format="float")
        cut = expected[2][:8] / np.linalg.norm(expected[2][:8])
        np.testing.assert_allclose(np.array(short.data[0].embedding), cut, atol=1e-5)
        with pytest.raises(openai.BadRequestError):
            api.embeddings.create(model="x", input=[[1, 2, 3]])
        with pytest.raises(openai.NotFoundError) as wrong_task:  # this server runs feature-extraction
            api.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
        assert "text-generation" in wrong_task.value.body["message"]
        models = api.models.list()
        assert [m.id for m in models.data] == ["tiny-bert"]


# ---------------------------------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    return tiny_generator(tmp_path_factory)


@pytest.fixture(scope="module")
def chat_server(generator):
    with live(app(generator, max_wait_ms=20, api_key="k3y", model_name="tiny-gpt2")) as url:
        yield url


MESSAGES = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Where is Paris?"}]


def reply(pipe, messages, **params) -> str:
    return pipe(messages, do_sample=False, **params)[0]["generated_text"][-1]["content"]


def test_chat_completion(chat_server, generator):
    api = client(chat_server, "k3y")
    got = api.chat.completions.create(model="tiny-gpt2", messages=MESSAGES, temperature=0, max_tokens=12)
    expected = reply(generator, MESSAGES, max_new_tokens=12)
    choice = got.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected
    generated = generator(MESSAGES, do_sample=False, max_new_tokens=12, return_tensors=True)[0]["generated_token_ids"]
    prompt = len(generator.preprocess(MESSAGES)[0].features["input_ids"])
    assert got.usage.prompt_tokens == prompt and got.usage.completion_tokens == len(generated) - prompt
    ended = generated[-1] in generator.generation_config.eos_token_ids
    assert choice.finish_reason == ("stop" if ended else "length")
    assert got.object == "chat.completion" and got.model == "tiny-gpt2"
    # n samples with a seed: the Python call's, each its own choice
    sampled = api.chat.completions.create(model="m", messages=MESSAGES, temperature=0.9, top_p=0.95, n=2, seed=7,
                                          max_tokens=6)
    ref = generator(MESSAGES, do_sample=True, temperature=0.9, top_p=0.95, num_return_sequences=2, seed=7,
                    max_new_tokens=6)
    assert [c.message.content for c in sampled.choices] == [r["generated_text"][-1]["content"] for r in ref]
    assert [c.index for c in sampled.choices] == [0, 1]


def test_chat_completion_stream(chat_server, generator):
    api = client(chat_server, "k3y")
    expected = reply(generator, MESSAGES, max_new_tokens=20)
    pieces, finish, usage = [], None, None
    stream = api.chat.completions.create(model="m", messages=MESSAGES, temperature=0, max_tokens=20, stream=True,
                                         stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            continue
        delta = chunk.choices[0].delta
        if delta.content:
            pieces.append(delta.content)
            # other routes answer while the model streams
            assert httpx.get(f"{chat_server}/health").status_code == 200
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == expected and len(pieces) > 1
    assert finish in ("stop", "length") and usage.completion_tokens >= len(pieces)
    raw = httpx.post(f"{chat_server}/v1/chat/completions", headers={"Authorization": "Bearer k3y"},
                     json={"model": "m", "messages": MESSAGES, "max_tokens": 3, "temperature": 0, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_stop_strings_are_left_out(chat_server, generator):
    api = client(chat_server, "k3y")
    full = reply(generator, MESSAGES, max_new_tokens=20)
    stop = full[3:5]  # two characters inside the reply: generation stops there, the text ends before them
    expected = full[:full.find(stop)]
    got = api.chat.completions.create(model="m", messages=MESSAGES, temperature=0, max_tokens=20, stop=[stop])
    assert got.choices[0].message.content == expected and got.choices[0].finish_reason == "stop"
    streamed = api.chat.completions.create(model="m", messages=MESSAGES, temperature=0, max_tokens=20, stop=stop,
                                           stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


def test_logit_bias_is_the_pipelines_sequence_bias(chat_server, generator):
    api = client(chat_server, "k3y")
    token = generator.tokenizer("x", add_special_tokens=False)["input_ids"][-1]
    got = api.chat.completions.create(model="m", messages=MESSAGES, temperature=0, max_tokens=6,
                                      logit_bias={str(token): 100})
    expected = reply(generator, MESSAGES, max_new_tokens=6, sequence_bias={(token,): 100.0})
    assert got.choices[0].message.content == expected and expected != reply(generator, MESSAGES, max_new_tokens=6)
    assert set(expected) == {"x"}  # a bias of 100 makes the token all the model says
    for bad in ({"-1": 5}, {"x": 5}, {str(token): 101}, {str(token): "high"}, [token]):
        with pytest.raises(openai.BadRequestError):
            api.chat.completions.create(model="m", messages=MESSAGES, temperature=0, max_tokens=2, logit_bias=bad)
    with pytest.raises(openai.UnprocessableEntityError):  # past the vocabulary: the pipeline's own check
        api.chat.completions.create(model="m", messages=MESSAGES, temperature=0, max_tokens=2,
                                    logit_bias={"1000000": 5})


def test_completions(chat_server, generator):
    api = client(chat_server, "k3y")
    prompts = ["The quick brown fox", "Paris is the capital"]
    got = api.completions.create(model="m", prompt=prompts, max_tokens=8, temperature=0)
    expected = [generator(p, do_sample=False, max_new_tokens=8, return_full_text=False)[0]["generated_text"]
                for p in prompts]
    assert [c.text for c in got.choices] == expected and [c.index for c in got.choices] == [0, 1]
    echoed = api.completions.create(model="m", prompt=prompts[0], max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == prompts[0] + expected[0]
    streamed = api.completions.create(model="m", prompt=prompts[1], max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected[1]


def test_openai_errors(chat_server):
    with pytest.raises(openai.AuthenticationError) as denied:
        client(chat_server, "wrong").chat.completions.create(model="m", messages=MESSAGES)
    assert denied.value.status_code == 401 and denied.value.body["code"] == "invalid_api_key"
    api = client(chat_server, "k3y")
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model="m", messages=[])
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model="m", messages=MESSAGES, presence_penalty=1.0)
    with pytest.raises(openai.UnprocessableEntityError):  # lightpipe's own check: greedy decoding gives one answer
        api.chat.completions.create(model="m", messages=MESSAGES, temperature=0, n=2)
    raw = httpx.post(f"{chat_server}/v1/chat/completions", headers={"Authorization": "Bearer k3y"}, json={"n": 1})
    error = raw.json()["error"]
    assert raw.status_code == 400 and set(error) == {"message", "type", "code", "param"}
    assert error["type"] == "invalid_request_error"


def test_a_client_leaving_a_stream_stops_its_generation(generator):
    with live(app(generator, max_wait_ms=0)) as url:
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30, json={
                "model": "m", "messages": MESSAGES, "max_tokens": 80, "temperature": 0, "stream": True}) as response:
            next(response.iter_lines())
        # the worker is free again: a new request is answered
        api = client(url)
        got = api.completions.create(model="m", prompt="The", max_tokens=2, temperature=0)
        assert got.choices[0].text == generator("The", do_sample=False, max_new_tokens=2,
                                                return_full_text=False)[0]["generated_text"]


# ---------------------------------------------------------------------------------------------- transcriptions
def flac(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, RATE, format="FLAC")
    return buffer.getvalue()


def test_transcriptions(tmp_path_factory):
    pipe, clip = tiny_speech(tmp_path_factory)
    audio = flac(clip(14000, 3))
    plain = pipe(audio)
    timed = pipe(audio, return_timestamps=True)
    with live(app(pipe, max_wait_ms=10)) as url:
        api = client(url)
        got = api.audio.transcriptions.create(model="whisper", file=("a.flac", audio))
        assert got.text == plain["text"]
        text = api.audio.transcriptions.create(model="whisper", file=("a.flac", audio), response_format="text")
        assert text == plain["text"]
        verbose = api.audio.transcriptions.create(model="whisper", file=("a.flac", audio),
                                                  response_format="verbose_json",
                                                  timestamp_granularities=["segment", "word"])
        assert verbose.text == timed["text"] and verbose.duration == pytest.approx(14000 / RATE)
        assert [(s.start, s.end, s.text) for s in verbose.segments] == [
            (c["timestamp"][0], c["timestamp"][1] if c["timestamp"][1] is not None else 14000 / RATE, c["text"])
            for c in timed["chunks"]]
        import zlib

        for segment in verbose.segments:  # openai-whisper's measure: UTF-8 bytes over their zlib size
            data = segment.text.encode()
            assert segment.compression_ratio == pytest.approx(len(data) / len(zlib.compress(data)) if data else 0.0)
        words = pipe(audio, return_timestamps="word")["chunks"]
        assert [w.word for w in verbose.words] == [c["text"].strip() for c in words]
        srt = api.audio.transcriptions.create(model="whisper", file=("a.flac", audio), response_format="srt")
        from lightpipe.subtitles import to_srt, to_vtt

        assert srt == to_srt(timed)
        vtt = api.audio.transcriptions.create(model="whisper", file=("a.flac", audio), response_format="vtt")
        assert vtt.startswith("WEBVTT") and vtt == to_vtt(timed)
        prompted = api.audio.transcriptions.create(model="whisper", file=("a.flac", audio), prompt="the fox")
        ids = pipe.tokenizer.encode(" the fox", add_special_tokens=False).ids
        assert prompted.text == pipe(audio, generate_kwargs={"prompt_ids": ids})["text"]
        # English-only model: the language="en" that clients send is dropped; another language is refused
        assert not pipe.multilingual
        english = api.audio.transcriptions.create(model="whisper", file=("a.flac", audio), language="en")
        assert english.text == plain["text"]
        with pytest.raises(openai.UnprocessableEntityError):
            api.audio.transcriptions.create(model="whisper", file=("a.flac", audio), language="fr")
        with pytest.raises(openai.BadRequestError):
            api.audio.transcriptions.create(model="whisper", file=("a.flac", audio), response_format="docx")
        with pytest.raises(openai.UnprocessableEntityError):  # not audio
            api.audio.transcriptions.create(model="whisper", file=("a.flac", b"nothing to hear"))

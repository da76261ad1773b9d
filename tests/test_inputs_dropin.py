"""Inputs that do what users mean (integer PCM audio, size limits, empty texts) and what tools written for
transformers' pipelines read from a pipeline (tokenizer(text), model.device / dtype / config.name_or_path, task,
old argument spellings). Parity with transformers on tiny random checkpoints; the audio on real tiny.en weights."""

import io
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from lightpipe import InvalidInput, pipeline
from lightpipe.processing import audio as A
from lightpipe.processing import audio_io, image_io
from lightpipe.processing.text import Tokenizer

SHARED_WHISPER = Path(__file__).resolve().parents[1] / ".." / "shared" / "models" / "whisper-tiny.en"
SAMPLE = Path(__file__).resolve().parents[1] / "src" / "lightpipe" / "examples" / "sample.flac"
SR = 16000


def sample_clip(seconds: float = 4.0) -> np.ndarray:
    import soundfile as sf

    data, rate = sf.read(str(SAMPLE), dtype="float32")
    assert rate == SR
    return data[: int(seconds * SR)]


# ---------------------------------------------------------------------------------------------- audio arrays
def as_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 32768), -32768, 32767).astype(np.int16)


def test_integer_pcm_is_scaled():
    x = sample_clip(0.5)
    pcm16 = as_int16(x)
    want = pcm16.astype(np.float32) / 32768
    np.testing.assert_array_equal(audio_io.load_audio(pcm16, SR), want)
    np.testing.assert_array_equal(audio_io.load_audio(torch.from_numpy(pcm16), SR), want)
    np.testing.assert_array_equal(audio_io.load_audio({"raw": pcm16, "sampling_rate": SR}, SR), want)
    np.testing.assert_array_equal(audio_io.load_audio({"array": pcm16, "sampling_rate": SR}, SR), want)
    pcm32 = pcm16.astype(np.int32) * 65536
    np.testing.assert_allclose(audio_io.load_audio(pcm32, SR), want, atol=1e-7)
    np.testing.assert_allclose(audio_io.load_audio(torch.from_numpy(pcm32), SR), want, atol=1e-7)
    pcm8 = np.array([0, 128, 255, 64], dtype=np.uint8)
    assert audio_io.load_audio(pcm8, SR).tolist() == [-1.0, 0.0, 127 / 128, -0.5]
    assert audio_io.load_audio(np.array([-128, 64], dtype=np.int8), SR).tolist() == [-1.0, 0.5]
    f64 = audio_io.load_audio(x.astype(np.float64), SR)
    assert f64.dtype == np.float32 and np.array_equal(f64, x)
    # stereo int16, channels first, is scaled then averaged; (samples, 2) is refused with the fix in the message
    stereo = np.stack([pcm16, pcm16 // 2])
    np.testing.assert_allclose(audio_io.load_audio(stereo, SR), (want + (pcm16 // 2) / 32768) / 2, atol=1e-7)
    with pytest.raises(InvalidInput, match=r"array\.T"):
        audio_io.load_audio(stereo.T, SR)
    with pytest.raises(InvalidInput, match="3 dimensions"):
        audio_io.load_audio(pcm16.reshape(1, 2, -1), SR)


def test_int16_gives_the_same_features_for_whisper_and_ctc():
    x = sample_clip(2.0)
    pcm16 = as_int16(x)
    for extractor in (A.FeatureExtractor.whisper(80), A.FeatureExtractor.wav2vec2()):
        from_int = extractor(extractor.load({"raw": pcm16, "sampling_rate": SR}).array)
        from_float = extractor(pcm16.astype(np.float32) / 32768)
        for key in from_float:
            torch.testing.assert_close(from_int[key], from_float[key], rtol=0, atol=0)
        near = extractor(x)  # the float original: within the int16 rounding
        key = extractor.input_name
        assert (near[key] - from_int[key]).abs().max() < 5e-3


@pytest.fixture(scope="module")
def whisper():
    """(the real tiny.en pipeline, a 3 s clip, its text from float samples)."""
    pipe = pipeline("automatic-speech-recognition", model=str(SHARED_WHISPER))
    x = sample_clip(3.0)
    return pipe, x, pipe(x)["text"]


def test_int16_gives_the_same_text_on_real_tiny_en(whisper):
    pipe, x, want = whisper
    assert len(want.split()) >= 3
    assert pipe([as_int16(x), {"raw": as_int16(x), "sampling_rate": SR}], batch_size=2) == [{"text": want}] * 2


def test_max_audio_seconds(whisper, monkeypatch):
    pipe, x, want = whisper
    with pytest.raises(InvalidInput, match="max_audio_seconds"):
        pipe(x, max_audio_seconds=1.5)
    limited = pipeline("automatic-speech-recognition", model=str(SHARED_WHISPER), max_audio_seconds=1)
    with pytest.raises(InvalidInput, match="max_audio_seconds"):
        limited(x)
    with pytest.raises(InvalidInput, match="max_audio_seconds"):
        limited(io.BytesIO(SAMPLE.read_bytes()))  # files are checked from their header
    with pytest.raises(InvalidInput, match="max_audio_seconds"):
        limited([x[:SR // 2], x])
    assert limited(x, max_audio_seconds=3)["text"] == want  # the call's limit wins, for this call
    monkeypatch.setattr(audio_io, "MAX_DURATION_S", 1.0)  # the module default, for pipelines that set none
    with pytest.raises(InvalidInput, match="max_audio_seconds"):
        pipe(x)
    assert isinstance(pipe(x[:int(1.2 * SR)], max_audio_seconds=None)["text"], str)  # None: no limit
    for bad in (0, -1, "long", True):
        with pytest.raises(InvalidInput, match="max_audio_seconds"):
            pipe(x, max_audio_seconds=bad)


# ---------------------------------------------------------------------------------------------- image limits
@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    from vision_helpers import tiny_vision_checkpoint

    folder = tiny_vision_checkpoint(tmp_path_factory.mktemp("vit"), "vit", "image-classification")
    return pipeline("image-classification", model=str(folder))


def png_bytes(width: int, height: int) -> bytes:
    from vision_helpers import image_bytes, smooth_image

    return image_bytes(smooth_image(height, width), "PNG")


def test_max_image_pixels(vit, monkeypatch):
    import PIL.Image

    image = png_bytes(80, 60)  # 4800 pixels
    answer = vit(image)
    with pytest.raises(InvalidInput, match="max_image_pixels"):
        vit(image, max_image_pixels=4000)
    assert vit(image, max_image_pixels=4800) == answer
    small = pipeline("image-classification", model=vit.folder, max_image_pixels=1000)
    with pytest.raises(InvalidInput, match="80 x 60 pixels, more than the 1000"):
        small(image)
    with pytest.raises(InvalidInput, match="max_image_pixels"):
        list(small(iter([image])))  # streams apply it too
    assert small(image, max_image_pixels=None) == answer  # None: no limit, for this call
    assert small(png_bytes(20, 20))[0]["label"]
    monkeypatch.setattr(image_io, "MAX_IMAGE_PIXELS", 1000)  # the default, read at call time
    with pytest.raises(InvalidInput, match="max_image_pixels"):
        vit(image)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", None)  # the application lifted Pillow's limit
    assert vit(image) == answer
    assert small(image, max_image_pixels=None) == answer
    with pytest.raises(InvalidInput, match="max_image_pixels"):
        small(image)  # the pipeline's own setting still wins
    for bad in (0, -5, 2.5, "big"):
        with pytest.raises(InvalidInput, match="max_image_pixels"):
            vit(image, max_image_pixels=bad)


def test_max_image_pixels_for_documents(tmp_path):
    from layoutlm_helpers import layoutlm_checkpoint

    pipe = pipeline("document-question-answering", model=str(layoutlm_checkpoint(tmp_path / "doc", "bert")))
    with pytest.raises(InvalidInput, match="max_image_pixels"):
        pipe(image=png_bytes(80, 60), question="What is it?", max_image_pixels=1000)


def test_limits_only_where_they_apply(checkpoint):
    text = pipeline("text-classification", model=str(checkpoint("bert", "sequence-classification")))
    with pytest.raises(InvalidInput, match="unknown parameter"):
        text("hi", max_image_pixels=10)
    with pytest.raises(InvalidInput, match="unknown parameter"):
        text("hi", max_audio_seconds=10)


# ---------------------------------------------------------------------------------------------- empty texts
EMPTY_BATCH = ["", "Paris is the capital of France.", "   ", "a"]


def close(ours, ref, tol=1e-4):
    if isinstance(ref, list):
        assert isinstance(ours, list) and len(ours) == len(ref)
        for o, r in zip(ours, ref):
            close(o, r, tol)
    elif isinstance(ref, dict):
        assert ours.keys() == ref.keys()
        for key in ref:
            close(ours[key], ref[key], tol)
    elif isinstance(ref, (float, np.floating)):
        assert abs(float(ours) - float(ref)) <= tol
    else:
        assert ours == ref


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_empty_texts_as_transformers(checkpoint, arch):
    for task, head in (("feature-extraction", "base"), ("text-classification", "sequence-classification"),
                       ("token-classification", "token-classification")):
        folder = str(checkpoint(arch, head))
        ours, ref = pipeline(task, model=folder), transformers.pipeline(task, model=folder)
        for value in ("", "  "):
            close(ours(value), ref(value))
        close(ours(EMPTY_BATCH), ref(EMPTY_BATCH))
        close(ours(EMPTY_BATCH, batch_size=3), ref(EMPTY_BATCH))
        close(list(ours(iter(EMPTY_BATCH), batch_size=2)), ref(EMPTY_BATCH))
    assert ours("") == []  # token-classification: no entities
    text = pipeline("text-classification", model=str(checkpoint(arch, "sequence-classification")))
    pairs = [{"text": "", "text_pair": "b"}, {"text": "a", "text_pair": ""}]
    reference = transformers.pipeline("text-classification", model=str(checkpoint(arch, "sequence-classification")))
    close(text(pairs), reference(pairs))


def test_empty_texts_where_transformers_refuses(checkpoint):
    zero_shot = pipeline("zero-shot-classification", model=str(checkpoint(
        "bert", "sequence-classification", labels=["contradiction", "neutral", "entailment"])))
    with pytest.raises(InvalidInput):
        zero_shot("", candidate_labels=["a", "b"])
    reference = transformers.pipeline("zero-shot-classification", model=zero_shot.folder)
    close(zero_shot("  ", candidate_labels=["a", "b"]), reference("  ", candidate_labels=["a", "b"]))  # blank: answered
    fill = pipeline("fill-mask", model=str(checkpoint("bert", "masked-lm")))
    with pytest.raises(InvalidInput):
        fill("")
    assert fill("paris is the [MASK] of france.")  # still answers


# ---------------------------------------------------------------------------------------------- tokenizer(text)
TOKENIZE_TEXTS = ["Hello world.", "Paris is the capital of France, and John Smith works at Google.", ""]
TOKENIZE_CASES = [
    ((TOKENIZE_TEXTS[0],), {}),
    ((TOKENIZE_TEXTS,), {}),
    ((TOKENIZE_TEXTS,), dict(padding=True)),
    ((TOKENIZE_TEXTS,), dict(padding=True, return_tensors="pt")),
    ((TOKENIZE_TEXTS[1],), dict(return_tensors="pt")),
    ((TOKENIZE_TEXTS,), dict(truncation=True, max_length=5)),
    ((TOKENIZE_TEXTS,), dict(max_length=6)),
    ((TOKENIZE_TEXTS, ["a b", "c", "d"]), dict(padding="max_length", max_length=24)),
    ((TOKENIZE_TEXTS,), dict(padding=True, pad_to_multiple_of=8, padding_side="left", return_tensors="np")),
    ((TOKENIZE_TEXTS,), dict(padding="longest", truncation=True, max_length=8, return_tensors="pt")),
    ((["hello", "world"],), dict(is_split_into_words=True)),
    ((TOKENIZE_TEXTS,), dict(return_offsets_mapping=True, return_special_tokens_mask=True, padding=True)),
]


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
def test_tokenizer_call_equals_transformers(checkpoint, arch):
    folder = checkpoint(arch, "base")
    ours, ref = pipeline("feature-extraction", model=str(folder)).tokenizer, transformers.AutoTokenizer.from_pretrained(
        str(folder))
    for args, kwargs in TOKENIZE_CASES:
        got, want = ours(*args, **kwargs), ref(*args, **kwargs)
        assert set(got) == set(want), (kwargs, set(got), set(want))
        for key, value in want.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got[key], value), (kwargs, key)
            elif isinstance(value, np.ndarray):
                np.testing.assert_array_equal(got[key], value)
            else:
                assert got[key] == (value if key != "offset_mapping" else [[tuple(p) for p in row] for row in value]), (
                    kwargs, key)
    enc = ours(TOKENIZE_TEXTS[0], return_tensors="pt")
    assert torch.equal(enc.input_ids, enc["input_ids"])
    assert enc.to("cpu")["input_ids"].shape == (1, len(enc.encodings[0].ids))
    assert ours.batch_decode(ours(TOKENIZE_TEXTS[:2])["input_ids"], skip_special_tokens=True) == ref.batch_decode(
        ref(TOKENIZE_TEXTS[:2])["input_ids"], skip_special_tokens=True)
    assert ours.encode("hello").ids == ref("hello")["input_ids"]  # the Encoding-returning method still works
    with pytest.raises(InvalidInput):
        ours(TOKENIZE_TEXTS, return_tensors="pt")  # ragged rows
    with pytest.raises(InvalidInput):
        ours(5)
    with pytest.raises(InvalidInput):
        ours("a", padding="sideways")


def test_tokenizer_call_feeds_the_model(checkpoint):
    pipe = pipeline("feature-extraction", model=str(checkpoint("bert", "base")))
    batch = pipe.tokenizer(["hello world", "the city"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = pipe.model(**batch)["last_hidden_state"]
    np.testing.assert_allclose(hidden[1, :4].numpy(), np.array(pipe("the city"))[0], atol=1e-5)


# ---------------------------------------------------------------------------------------------- attributes
def test_dropin_attributes(checkpoint):
    folder = str(checkpoint("bert", "sequence-classification"))
    pipe = pipeline("sentiment-analysis", model=folder)
    ref = transformers.pipeline("sentiment-analysis", model=folder)
    # the canonical name (transformers keeps the alias)
    assert pipe.task == "text-classification" and ref.task == "sentiment-analysis"
    assert pipe.device == ref.device == torch.device("cpu")
    assert pipe.dtype == ref.dtype == torch.float32
    assert pipe.model.device == ref.model.device and pipe.model.dtype == ref.model.dtype
    assert pipe.model.config.name_or_path == ref.model.config.name_or_path == folder
    half = pipeline("text-classification", model=Path(folder), dtype="bfloat16")
    assert half.dtype == half.model.dtype == torch.bfloat16 and half.model.config.name_or_path == folder
    again = pipeline("text-classification", model=pipe.model, tokenizer=folder)
    assert again.model.config.name_or_path == folder and again.task == "text-classification"
    assert pipeline("ner", model=str(checkpoint("bert", "token-classification"))).task == "token-classification"


def test_fallback_notice_once_per_process(monkeypatch, caplog):
    from lightpipe import factory, hub
    from lightpipe.tasks import get_task

    spec = get_task("feature-extraction")
    if hub.is_cached(spec.default_model) or hub.package_folder(spec.fallback_model) is None:
        pytest.fail("this test needs the installed MiniLM package and no cached default model")
    monkeypatch.setattr(factory, "_FALLBACK_NOTICES", set())
    with caplog.at_level(logging.WARNING, logger="lightpipe.factory"):
        first = pipeline("feature-extraction")
        second = pipeline("feature-extraction")
    notices = [r for r in caplog.records if "is not cached" in r.getMessage()]
    assert len(notices) == 1
    assert first.model.config.name_or_path == second.model.config.name_or_path == spec.fallback_model


# ---------------------------------------------------------------------------------------------- old spellings
def test_return_all_scores(checkpoint):
    folder = str(checkpoint("bert", "sequence-classification", labels=["neg", "neutral", "pos"]))
    pipe = pipeline("text-classification", model=folder)
    texts = ["I love this movie", "bad"]
    with pytest.warns(FutureWarning, match="top_k"):
        every = pipe(texts[0], return_all_scores=True)
    # transformers 4's shape: one list per text, every label in the model's order
    assert [d["label"] for d in every[0]] == ["neg", "neutral", "pos"]
    assert sorted(every[0], key=lambda d: -d["score"]) == pipe(texts[0], top_k=None)
    with pytest.warns(FutureWarning):
        assert pipe(texts[0], return_all_scores=False) == pipe(texts[0])
    with pytest.warns(FutureWarning):
        built = pipeline("text-classification", model=folder, return_all_scores=True)
    with pytest.warns(FutureWarning):
        assert built(texts) == [pipe(t, return_all_scores=True)[0] for t in texts]
    with pytest.raises(InvalidInput):
        pipe(texts[0], return_all_scores="yes")


def test_grouped_entities(checkpoint):
    pipe = pipeline("token-classification", model=str(checkpoint("bert", "token-classification")))
    text = "John Smith works at Google in London."
    with pytest.warns(FutureWarning, match='aggregation_strategy="simple"'):
        assert pipe(text, grouped_entities=True) == pipe(text, aggregation_strategy="simple")
    with pytest.warns(FutureWarning, match='"first"'):
        assert pipe(text, grouped_entities=True, ignore_subwords=True) == pipe(text, aggregation_strategy="first")
    with pytest.warns(FutureWarning, match='"none"'):
        assert pipe(text, grouped_entities=False) == pipe(text)
    with pytest.warns(FutureWarning):
        built = pipeline("ner", model=str(checkpoint("bert", "token-classification")), grouped_entities=True)
    assert built(text) == pipe(text, aggregation_strategy="simple")


def test_use_fast_and_framework(checkpoint):
    folder = str(checkpoint("bert", "sequence-classification"))
    want = pipeline("text-classification", model=folder)("good")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pipeline("text-classification", model=folder, use_fast=True)("good") == want
    with pytest.warns(FutureWarning, match="fast"):
        assert pipeline("text-classification", model=folder, use_fast=False)("good") == want
    with pytest.warns(FutureWarning, match="PyTorch"):
        assert pipeline("text-classification", model=folder, framework="pt")("good") == want
    for framework in ("tf", "flax"):
        with pytest.raises(InvalidInput, match="PyTorch"):
            pipeline("text-classification", model=folder, framework=framework)

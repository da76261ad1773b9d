"""Robust transcription: voice activity detection (vad_filter) and hallucination guards on real Whisper tiny.en,
speech regions packed into windows and their times mapped back, the repetition stop, chunked timestamps that
restart inside a chunk, and vad_filter on a CTC model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import lightpipe
from lightpipe.errors import InvalidInput
from lightpipe.processing.regions import PackedWindow, Piece, pack_regions
from lightpipe.vad import speech_regions, vad_options
from lightpipe.whisper.guards import RepetitionStop, cut_repetition, repeated_tail
from helpers import word_error_rate, words

RATE = 16000
ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "src" / "lightpipe" / "examples" / "sample.flac"
SAMPLE_SCRIPT = "The quick brown fox jumps over the lazy dog. Speech recognition turns spoken words into text."
SAMPLE_SECONDS = 7.45  # the sample's first two sentences (the third starts at 7.5 s)
SHARED_TINY_EN = ROOT.parent / "shared" / "models" / "whisper-tiny.en"
PACKAGE_ID = "Systran/faster-whisper-tiny.en"
GUARDS = {"no_speech_threshold": 0.6, "logprob_threshold": -1.0, "compression_ratio_threshold": 1.35,
          "max_ngram_repeats": 4}


def longest_run(items: list[str]) -> int:
    """The most times one n-gram (n <= 8) comes back to back in `items`."""
    best = 1 if items else 0
    for n in range(1, 9):
        for start in range(len(items)):
            count, at = 1, start + n
            while items[at: at + n] == items[start: start + n] and len(items[at: at + n]) == n:
                count, at = count + 1, at + n
            best = max(best, count)
    return best


@pytest.fixture(scope="module")
def whisper():
    """Real Whisper tiny.en (the Hugging Face folder beside the project, else the installed CTranslate2 package), its
    encoder calls counted: pipe.encoded holds the batch size of each encoder pass."""
    model = str(SHARED_TINY_EN) if SHARED_TINY_EN.is_dir() else PACKAGE_ID
    pipe = lightpipe.pipeline("automatic-speech-recognition", model=model)
    pipe.encoded = []
    encode = pipe.model.encode

    def counted(features, *args, **kwargs):
        pipe.encoded.append(features.shape[0])
        return encode(features, *args, **kwargs)

    pipe.model.encode = counted
    return pipe


@pytest.fixture(scope="module")
def sample():
    import soundfile

    audio, rate = soundfile.read(str(SAMPLE), dtype="float32")
    assert rate == RATE
    return audio[: int(SAMPLE_SECONDS * RATE)]


def non_speech(kind: str, seconds: float, seed: int = 0) -> np.ndarray:
    n, rng = int(seconds * RATE), np.random.default_rng(seed)
    t = np.arange(n) / RATE
    if kind == "silence":
        return np.zeros(n, dtype=np.float32)
    if kind == "noise":
        return (0.1 * rng.standard_normal(n)).astype(np.float32)
    chord = sum(np.sin(2 * np.pi * 261.6 * ratio * t) for ratio in (1.0, 1.25, 1.5))  # a C major chord
    return (0.1 * chord * (0.6 + 0.4 * np.abs(np.sin(2 * np.pi * 1.5 * t)))).astype(np.float32)


# ---------------------------------------------------------------------------------------------- VAD, real Whisper
@pytest.mark.parametrize("kind", ["silence", "noise", "tones"])
def test_non_speech_alone_gives_no_text_and_is_not_decoded(whisper, kind):
    whisper.encoded.clear()
    audio = non_speech(kind, 6.0)
    assert whisper(audio, vad_filter=True) == {"text": ""}
    assert whisper(audio, vad_filter=True, return_timestamps=True) == {"text": "", "chunks": []}
    assert whisper.encoded == []  # the model never ran


def test_speech_between_long_silences_keeps_its_sentences_and_times(whisper, sample):
    """Two copies of two sentences between 6 s of silence and 5 s of noise: the right sentences, every segment and
    word inside the speech it was heard in, the second sentence group starting where its speech starts."""
    gap1, gap2, tail = non_speech("silence", 6.0), non_speech("noise", 5.0, 1), non_speech("silence", 3.0)
    audio = np.concatenate([gap1, sample, gap2, sample, tail])
    first = (len(gap1) / RATE, (len(gap1) + len(sample)) / RATE)
    second = (first[1] + len(gap2) / RATE, first[1] + (len(gap2) + len(sample)) / RATE)
    regions = [(r["start"], r["end"]) for r in speech_regions(audio, RATE, **vad_options(None))]
    margin = 1.0  # the VAD pads regions by 0.4 s (and the noise after the first copy sounds like more of it)
    assert len(regions) == 2 and all(abs(r[0] - s[0]) < margin and abs(r[1] - s[1]) < margin
                                     for r, s in zip(regions, (first, second)))

    def inside(start, end):  # both ends inside speech regions (a segment may run on from one region to the next)
        return start <= end and all(any(a - 1e-3 <= t <= b + 1e-3 for a, b in regions) for t in (start, end))

    whisper.encoded.clear()
    result = whisper(audio, vad_filter=True, return_timestamps=True, batch_size=2,
                     generate_kwargs={"num_beams": 1})
    assert word_error_rate(result["text"], SAMPLE_SCRIPT + " " + SAMPLE_SCRIPT) <= 0.35  # tiny.en, greedy
    assert sum(whisper.encoded) <= 2  # the two regions fit one 30 s window (a second pass at most)
    chunks = result["chunks"]
    assert all(inside(*c["timestamp"]) for c in chunks), chunks
    starts = [c["timestamp"][0] for c in chunks]
    assert starts == sorted(starts)
    assert abs(starts[0] - first[0]) < 1.0
    assert min(abs(s - second[0]) for s in starts) < 1.0  # a segment starts where the second copy does
    assert "".join(c["text"] for c in chunks) == result["text"]

    result = whisper(audio, vad_filter=True, return_timestamps="word", generate_kwargs={"num_beams": 1})
    spoken = result["chunks"]
    assert [w for c in spoken for w in words(c["text"])] == words(result["text"])
    assert all(inside(*w["timestamp"]) for w in spoken), spoken
    assert [w["timestamp"][0] for w in spoken] == sorted(w["timestamp"][0] for w in spoken)
    in_second = [w for w in spoken if w["timestamp"][0] >= second[0] - margin]
    assert len(in_second) >= len(words(SAMPLE_SCRIPT)) - 3  # the second copy's words are mapped to it


# ---------------------------------------------------------------------------------------------- guards, real Whisper
@pytest.mark.parametrize("seconds, timestamps", [(5.0, True), (0.1, False)])
def test_guards_alone_stop_runaway_repetition_on_silence(whisper, seconds, timestamps):
    """No VAD: plain decoding of silence loops (5 s: 'Thank you for watching.' again and again for 2421 characters;
    0.1 s: 'Mhm.' 28 times). The repetition stop ends the loop; with the no-speech guard too, little or nothing is
    left (openai's rule keeps a confident short guess such as ' you'; vad_filter is the cure)."""
    audio = non_speech("silence", seconds)
    params = {"return_timestamps": True} if timestamps else {}
    cut = whisper(audio, generate_kwargs={"max_ngram_repeats": 2, "compression_ratio_threshold": 1.35}, **params)
    assert longest_run(cut["text"].split()) <= 2 and len(cut["text"]) < 200, cut
    guarded = whisper(audio, generate_kwargs=GUARDS, **params)["text"]
    assert len(guarded) < 40 and longest_run(guarded.split()) <= 2, guarded


def test_guards_leave_clean_speech_alone(whisper, sample):
    params = {"return_timestamps": True}
    assert whisper(sample, generate_kwargs={**GUARDS, "num_beams": 1}, **params) == \
        whisper(sample, generate_kwargs={"num_beams": 1}, **params)


def test_bad_robust_options_are_invalid_input_and_the_pipeline_keeps_working(whisper):
    audio = non_speech("silence", 1.0)
    for params, message in [({"vad_filter": "yes"}, "vad_filter"),
                            ({"vad_filter": True, "vad_parameters": {"treshold": 0.5}}, "treshold"),
                            ({"vad_filter": True, "vad_parameters": {"threshold": 2}}, "threshold"),
                            ({"generate_kwargs": {"max_ngram_repeats": 0}}, "max_ngram_repeats")]:
        with pytest.raises(InvalidInput, match=message):
            whisper(audio, **params)
    assert whisper(audio, vad_filter=True, vad_parameters={"threshold": 0.6}) == {"text": ""}


# ---------------------------------------------------------------------------------------------- regions
def test_regions_are_packed_in_order_into_windows_that_fit():
    windows = pack_regions([(50, 60), (0, 10), (20, 45), (55, 70), (100, 190)], max_samples=40, total=180)
    assert [[(p.offset, p.start, p.length) for p in w.pieces] for w in windows] == [
        [(0, 0, 10), (10, 20, 25)],  # the next region (merged 50..70) does not fit: a new window
        [(0, 50, 20)],
        [(0, 100, 40)], [(0, 140, 40)],  # a region longer than a window is cut (and clipped to the audio)
    ]
    assert all(w.samples <= 40 for w in windows)
    audio = np.arange(200, dtype=np.float32)
    assert windows[0].gather(audio).tolist() == list(range(0, 10)) + list(range(20, 45))
    assert pack_regions([], 40) == []


def test_window_times_map_back_to_the_original_audio():
    window = PackedWindow((Piece(0, 100, 50), Piece(50, 300, 50)))  # samples at rate 100: 1 s, then 3 s
    rate = 100
    assert window.to_original(0.2, rate) == 1.2
    assert window.to_original(0.5, rate) == 3.0  # a start on the border opens the next piece
    assert window.to_original(0.5, rate, is_end=True) == 1.5  # an end on it closes the one before
    assert window.to_original(0.7, rate, is_end=True) == 3.2
    assert window.to_original(29.0, rate, is_end=True) == 3.5  # past the audio (Whisper's padding): its end
    # A segment that crosses the border by less than `snap` s starts (ends) in the piece that holds the rest.
    assert window.segment_to_original(0.42, 0.9, rate, snap=0.1) == (3.0, 3.4)
    assert window.segment_to_original(0.1, 0.55, rate, snap=0.1) == (1.1, 1.5)
    assert window.segment_to_original(0.1, 0.9, rate, snap=0.1) == (1.1, 3.4)
    # A word that crosses the border belongs to the piece that holds most of it.
    assert window.word_to_original(0.3, 0.6, rate) == (1.3, 1.5)
    assert window.word_to_original(0.45, 0.6, rate) == (3.0, 3.1)


# ---------------------------------------------------------------------------------------------- repetition stop
def test_repeated_tail_and_cut():
    assert repeated_tail([1, 2, 3, 3, 3], 2) == 4
    assert repeated_tail([1, 2, 3, 3], 2) is None
    assert repeated_tail([9, 5, 6, 5, 6, 5, 6], 2) == 5  # a 2-gram three times
    assert repeated_tail([5, 6, 5, 6, 5, 7], 2) is None
    begin, eot = 100, 50  # timestamps from 100, text below 50
    # Text-only: the third copy is cut.
    assert cut_repetition([7, 8, 7, 8, 7, 8], 2, eot, begin, False, 0) == [7, 8, 7, 8]
    # Segments repeating one sentence: timestamps are left out of the count; the cut ends in a lone timestamp.
    tokens = [100, 7, 8, 110, 110, 7, 8, 120, 120, 7, 8, 130]
    assert cut_repetition(tokens, 2, eot, begin, True, 1500) == [100, 7, 8, 110, 110, 7, 8, 120]
    # A cut inside a segment ends it at the window's end.
    assert cut_repetition([100, 7, 7, 7], 2, eot, begin, True, 250) == [100, 7, 7, 350]
    assert cut_repetition([100, 7, 8, 110], 2, eot, begin, True, 250) is None


def test_repetition_stop_forces_the_end_token_only_on_looping_rows():
    stop = RepetitionStop(max_repeats=2, eos_token_id=0, begin_index=1, text_end=50)
    ids = torch.tensor([[49, 7, 7, 7], [49, 7, 8, 7], [7, 7, 7, 9]])  # the prompt (first token) is not counted
    scores = torch.randn(3, 60)
    out = stop(ids, scores)
    assert out[0].argmax() == 0 and torch.isinf(out[0, 1:]).all() and out[0, 0] == scores[0].max()
    assert torch.equal(out[1:], scores[1:])


# ---------------------------------------------------------------------------------------------- chunked timestamps
def test_chunked_segments_collapse_after_a_second_pass_inside_a_chunk(whisper):
    """Why chunked timestamps collapse (as in transformers, whose merge decode_asr follows): a 30 s chunk whose last
    segment was cut off is decoded again from it, its timestamps restarting at 0. Compared by raw value with the
    strides, the restarted timestamps make the earlier ones look as if they lay in the right stride, and the chunk
    collapses into one segment; the same tokens counted from the chunk's start keep their segments."""
    from lightpipe.whisper.text import decode_asr

    vocab = whisper.decoding.vocabulary
    begin = vocab.tokens.timestamp_begin

    def t(seconds):
        return begin + int(round(seconds / 0.02))

    a, b, c, d = (vocab.tokenizer.encode(w, add_special_tokens=False).ids for w in (" one", " two", " three four five",
                                                                               " six"))
    restarted = [t(0), *a, t(10), t(10), *b, t(20), t(20), t(0), *c, t(3)]  # decoded again from 20 s
    exact = [t(0), *a, t(10), t(10), *b, t(20), t(20), t(20), *c, t(23)]
    second = [t(0), *c, t(3), t(3), *d, t(8)]  # the next chunk starts at 20 s (its first 5 s are its left stride)
    strides = [(30.0, 0.0, 5.0), (10.0, 5.0, 0.0)]

    def segments(chunks):
        outputs = [{"tokens": tokens, "stride": stride} for tokens, stride in zip(chunks, strides)]
        return [(c["text"], c["timestamp"]) for c in decode_asr(vocab, outputs, return_timestamps=True)[1]["chunks"]]

    assert segments([restarted, second])[0][1] == (0.0, 28.0)  # the reference's way: one segment
    assert segments([exact, second]) == [
        (" one", (0.0, 10.0)), (" two", (10.0, 20.0)), (" three four five six", (20.0, 28.0))]


# ---------------------------------------------------------------------------------------------- CTC
def test_ctc_decodes_only_the_speech_regions(tmp_path, sample):
    from test_asr_ctc import ctc_checkpoint

    pipe = lightpipe.pipeline("automatic-speech-recognition", model=str(ctc_checkpoint(tmp_path / "ctc", "hubert")))
    audio = np.concatenate([non_speech("silence", 1.0), sample[: 3 * RATE], non_speech("silence", 3.0),
                            sample[3 * RATE: 6 * RATE], non_speech("silence", 1.0)])
    regions = speech_regions(audio, RATE, **vad_options(None))
    assert len(regions) == 2
    spans = [(int(round(r["start"] * RATE)), int(round(r["end"] * RATE))) for r in regions]
    # Both regions fit one window: decoded as their samples back to back.
    joined = pipe(np.concatenate([audio[a:b] for a, b in spans]), return_timestamps="char")
    got = pipe(audio, vad_filter=True, return_timestamps="char")
    assert got["text"] == joined["text"]
    assert [c["text"] for c in got["chunks"]] == [c["text"] for c in joined["chunks"]]
    first = (spans[0][1] - spans[0][0]) / RATE  # where the second region starts in the joined audio

    def original(t):
        return t + regions[0]["start"] if t < first else t - first + regions[1]["start"]

    for mine, theirs in zip(got["chunks"], joined["chunks"]):
        assert mine["timestamp"][0] == pytest.approx(original(theirs["timestamp"][0]), abs=2e-3)
        assert mine["timestamp"][0] <= mine["timestamp"][1]
        assert all(any(r["start"] - 1e-3 <= t <= r["end"] + 1e-3 for r in regions) for t in mine["timestamp"])
    assert pipe(non_speech("silence", 1.0), vad_filter=True, return_timestamps="word") == {"text": "", "chunks": []}


# ---------------------------------------------------------------------------------------------- command line
def test_command_line_is_robust_by_default(capsys, monkeypatch):
    """`lightpipe run automatic-speech-recognition` turns on VAD and the guards (-p options win, --no-robust turns
    them off); --robust is refused for other tasks."""
    import json

    from lightpipe import cli
    from lightpipe.tasks.automatic_speech_recognition import ROBUST_GENERATE_KWARGS

    calls = []

    class Spy:
        task = "automatic-speech-recognition"

        def _checked(self, params):
            return params

        def _route(self, params):
            return params

        def __call__(self, inputs, **params):
            calls.append(params)
            return ({"text": ""} for _ in inputs)  # the command line streams its inputs

    monkeypatch.setattr(lightpipe, "pipeline", lambda *a, **k: Spy())
    assert cli.main(["run", "automatic-speech-recognition", str(SAMPLE), "-p",
                     'generate_kwargs={"num_beams": 1, "max_ngram_repeats": 3}']) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0]) == {"text": ""}
    assert calls[-1]["vad_filter"] is True
    assert calls[-1]["generate_kwargs"] == {**ROBUST_GENERATE_KWARGS, "num_beams": 1, "max_ngram_repeats": 3}
    assert cli.main(["run", "automatic-speech-recognition", str(SAMPLE), "--no-robust"]) == 0
    assert "vad_filter" not in calls[-1] and "generate_kwargs" not in calls[-1]
    assert cli.main(["run", "text-classification", "hello", "--robust"]) == 2
    assert "--robust is for automatic-speech-recognition" in capsys.readouterr().err

"""Voice activity detection: the Silero VAD network against the silero-vad package's TorchScript model,
the region rules against its get_speech_timestamps, and regions against where speech really is."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import soundfile
import soxr
import torch

from lightpipe import InvalidInput, audio as lp_audio, vad
from lightpipe.errors import CheckpointError
from lightpipe.models import silero_vad as sv

RATE = 16000
PHRASES = ["the quick brown fox jumps over the lazy dog", "voice activity detection finds where people speak",
           "please call me back tomorrow morning"]
GAPS_S = [1.0, 3.0, 1.2, 1.5]  # silence before the first phrase, between phrases, after the last

PARAMETER_SETS = [
    {},
    {"threshold": 0.3, "neg_threshold": 0.2},
    {"threshold": 0.7},
    {"min_silence_duration_ms": 500, "speech_pad_ms": 200},
    {"min_speech_duration_ms": 1000, "min_silence_duration_ms": 50},
    {"max_speech_duration_s": 1.0},
    {"max_speech_duration_s": 2.5, "min_silence_duration_ms": 1000, "speech_pad_ms": 100},
    {"max_speech_duration_s": 0.5, "speech_pad_ms": 0},
    vad.WHISPER_VAD_DEFAULTS,
]


# -------------------------------------------------------------------------------------------------
# Fixtures: espeak-ng speech with known silences, and the reference package
# -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phrases(tmp_path_factory):
    """Each phrase spoken by espeak-ng at 16 kHz, its own leading and trailing silence trimmed by amplitude."""
    assert shutil.which("espeak-ng"), "espeak-ng synthesises the test speech"
    folder = tmp_path_factory.mktemp("vad_speech")
    out = []
    for i, text in enumerate(PHRASES):
        wav = folder / f"{i}.wav"
        subprocess.run(["espeak-ng", "-w", str(wav), text], check=True, capture_output=True)
        samples, rate = soundfile.read(str(wav), dtype="float32")
        samples = soxr.resample(samples, rate, RATE).astype(np.float32)
        loud = np.nonzero(np.abs(samples) > 0.01)[0]
        out.append(samples[loud[0]:loud[-1] + 1])
    return out


@pytest.fixture(scope="module")
def speech(phrases):
    """(signal, truth): the phrases between known silences, and [(start, end)] of each phrase in seconds."""
    parts, truth, t = [np.zeros(int(GAPS_S[0] * RATE), np.float32)], [], GAPS_S[0]
    for phrase, gap in zip(phrases, GAPS_S[1:]):
        truth.append((t, t + len(phrase) / RATE))
        parts += [phrase, np.zeros(int(gap * RATE), np.float32)]
        t += len(phrase) / RATE + gap
    return np.concatenate(parts), truth


@pytest.fixture(scope="module")
def signals(speech, phrases):
    """Several 16 kHz test signals: clean speech, speech over noise, speech run together with short pauses."""
    rng = np.random.default_rng(0)
    clean = speech[0]
    noisy = (clean + 0.01 * rng.standard_normal(len(clean))).astype(np.float32)
    pause = np.zeros(int(0.15 * RATE), np.float32)
    together = np.concatenate([phrases[0], pause, phrases[1], pause, phrases[2], phrases[0][: RATE // 2]])
    return {"clean": clean, "noisy": noisy, "together": together}


@pytest.fixture(scope="module")
def oracle():
    """The silero-vad package and its TorchScript model (importing it sets torch to one thread: undone)."""
    threads = torch.get_num_threads()
    import silero_vad

    torch.set_num_threads(threads)
    with warnings.catch_warnings():  # its loader uses deprecated importlib and torch.jit calls
        warnings.simplefilter("ignore", DeprecationWarning)
        return silero_vad, silero_vad.load_silero_vad()


def oracle_probabilities(model, signal: np.ndarray, rate: int) -> list[float]:
    """The TorchScript model window by window, as the reference get_speech_timestamps runs it."""
    window = 512 if rate == 16000 else 256
    x = torch.from_numpy(signal)
    x = torch.nn.functional.pad(x, (0, (-len(x)) % window))
    model.reset_states()
    with torch.no_grad():
        return [model(x[i:i + window], rate).item() for i in range(0, len(x), window)]


def in_seconds(reference: list[dict], rate: int) -> list[dict]:
    return [{"start": r["start"] / rate, "end": r["end"] / rate} for r in reference]


# -------------------------------------------------------------------------------------------------
# The network
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [16000, 8000])
def test_probabilities_match_torchscript_model(oracle, signals, rate):
    _, model = oracle
    signal = signals["noisy"] if rate == RATE else soxr.resample(signals["clean"], RATE, rate).astype(np.float32)
    expected = np.array(oracle_probabilities(model, signal, rate))
    got, window_s = vad.speech_probabilities(signal, rate)
    assert window_s == pytest.approx(0.032)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-4
    assert got.max() > 0.9 and got.min() < 0.05  # speech and silence both present


def test_batched_and_blocked_probabilities_equal_whole(signals, monkeypatch):
    model = sv.load()
    a, b = signals["clean"][: 5 * RATE], signals["together"][: 3 * RATE + 100]
    whole_a, whole_b = model.speech_probabilities(torch.from_numpy(a)), model.speech_probabilities(torch.from_numpy(b))
    batch = torch.zeros(2, len(a))
    batch[0], batch[1, : len(b)] = torch.from_numpy(a), torch.from_numpy(b)
    both = model.speech_probabilities(batch)
    torch.testing.assert_close(both[0], whole_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(both[1, : len(whole_b)], whole_b, atol=1e-5, rtol=0)
    monkeypatch.setattr(sv, "ENCODE_BLOCK", 7)  # the LSTM state crosses block boundaries
    torch.testing.assert_close(model.speech_probabilities(torch.from_numpy(a)), whole_a, atol=1e-5, rtol=0)


def test_model_loads_once_across_threads():
    found = []
    threads = [threading.Thread(target=lambda: found.append(sv.load())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(found) == 4 and all(m is found[0] for m in found)
    assert sv.load(8000) is not found[0] and sv.load(8000).sampling_rate == 8000


def test_threads_share_the_model_and_get_the_same_regions(signals):
    signal = signals["noisy"]
    expected = vad.speech_regions(signal)
    results = [None] * 3

    def run(i):
        results[i] = vad.speech_regions(signal)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 3


def test_safetensors_weights_load_and_detect_speech(speech):
    path = sv.weights_path().parent / sv.SAFETENSORS_FILE
    model = sv.from_file(path)
    signal, truth = speech
    probs = model.speech_probabilities(torch.from_numpy(signal)).numpy()
    mid = [int((s + e) / 2 / 0.032) for s, e in truth]
    assert probs[mid].min() > 0.5 and probs[: int(0.8 / 0.032)].max() < 0.2  # an older network, still a VAD
    with pytest.raises(CheckpointError, match="16 kHz"):
        sv.from_file(path, 8000)


def test_bad_weight_file_is_a_checkpoint_error(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"conv1.weight": torch.zeros(2, 2, 3)}, str(bad))
    with pytest.raises(CheckpointError):
        sv.from_file(bad)
    junk = tmp_path / "junk.jit"
    junk.write_bytes(b"not a model")
    with pytest.raises(CheckpointError):
        sv.from_file(junk)


# -------------------------------------------------------------------------------------------------
# Regions: the reference's rules
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["clean", "noisy", "together"])
def test_regions_match_get_speech_timestamps(oracle, signals, name):
    silero, model = oracle
    signal = signals[name]
    for params in (PARAMETER_SETS[0], PARAMETER_SETS[6]):  # end to end, the reference running its own model
        expected = silero.get_speech_timestamps(torch.from_numpy(signal), model, sampling_rate=RATE, **params)
        assert vad.speech_regions(signal, **params) == in_seconds(expected, RATE), params
    probs = oracle_probabilities(model, signal, RATE)
    for params in PARAMETER_SETS:  # the rules alone, on the reference's probabilities
        expected = silero.get_speech_timestamps_from_probs(probs, sampling_rate=RATE, audio_length_samples=len(signal),
                                                           **params)
        got = vad.regions_from_probabilities(probs, len(signal), RATE, **params)
        assert got == [(r["start"], r["end"]) for r in expected], params


def test_regions_match_get_speech_timestamps_at_8khz(oracle, signals):
    silero, model = oracle
    signal = soxr.resample(signals["together"], RATE, 8000).astype(np.float32)
    for params in (PARAMETER_SETS[0], PARAMETER_SETS[5]):
        expected = silero.get_speech_timestamps(torch.from_numpy(signal), model, sampling_rate=8000, **params)
        assert vad.speech_regions(signal, 8000, **params) == in_seconds(expected, 8000)


def test_region_rules_match_reference_on_random_probabilities(oracle):
    silero, _ = oracle
    rng = np.random.default_rng(1)
    for trial in range(300):
        n = int(rng.integers(1, 400))
        # smoothed noise: runs of speech and silence of varied lengths, crossing both thresholds
        walk = np.convolve(rng.standard_normal(n + 8), np.ones(8) / 8, mode="valid")[:n]
        probs = (1 / (1 + np.exp(-4 * walk))).astype(np.float32).tolist()
        rate = RATE if trial % 4 else 8000
        n_samples = n * (512 if rate == RATE else 256) - int(rng.integers(0, 200))
        params = {
            "threshold": float(rng.uniform(0.2, 0.8)),
            "min_speech_duration_ms": int(rng.choice([0, 50, 250, 600])),
            "min_silence_duration_ms": int(rng.choice([0, 30, 100, 300, 2000])),
            "speech_pad_ms": int(rng.choice([0, 30, 100, 400])),
            "max_speech_duration_s": float(rng.choice([np.inf, 0.9, 1.5, 3.0])),
        }
        if trial % 3 == 0:
            params["neg_threshold"] = params["threshold"] * float(rng.uniform(0.3, 1.0))
        if params["max_speech_duration_s"] <= 0.032 + 2 * params["speech_pad_ms"] / 1000:
            params["max_speech_duration_s"] = np.inf
        expected = silero.get_speech_timestamps_from_probs(probs, sampling_rate=rate, audio_length_samples=n_samples,
                                                           **params)
        got = vad.regions_from_probabilities(probs, n_samples, rate, **params)
        assert got == [(r["start"], r["end"]) for r in expected], (trial, params)


# -------------------------------------------------------------------------------------------------
# Regions: where speech really is
# -------------------------------------------------------------------------------------------------


def test_regions_are_where_the_speech_was_inserted(speech):
    signal, truth = speech
    noisy = (signal + 0.005 * np.random.default_rng(2).standard_normal(len(signal))).astype(np.float32)
    for audio in (signal, noisy):
        for pad_ms in (0, 30):  # the padding moves each end outward on purpose: the error is counted without it
            regions = lp_audio.speech_regions(audio, speech_pad_ms=pad_ms)
            assert len(regions) == len(truth)
            for region, (start, end) in zip(regions, truth):
                assert -0.1 < region["start"] + pad_ms / 1000 - start < 0.1, (regions, truth)
                assert -0.1 < region["end"] - pad_ms / 1000 - end < 0.1, (regions, truth)
                assert isinstance(region["start"], float) and isinstance(region["end"], float)


def test_whisper_defaults_bridge_short_silences(speech):
    signal, truth = speech
    regions = vad.speech_regions(signal, **vad.vad_options(None))
    # 3 s of silence between phrases 1 and 2 closes a region (2 s needed); 1.2 s between 2 and 3 does not
    assert len(regions) == 2
    assert regions[0]["start"] == pytest.approx(truth[0][0] - 0.4, abs=0.1)
    assert regions[0]["end"] == pytest.approx(truth[0][1] + 0.4, abs=0.1)
    assert regions[1]["start"] == pytest.approx(truth[1][0] - 0.4, abs=0.1)
    assert regions[1]["end"] == len(signal) / RATE  # 1.5 s of silence at the end: the region runs to the end


def test_no_regions_in_silence_noise_or_tones():
    rng = np.random.default_rng(3)
    t = np.arange(3 * RATE) / RATE
    for name, x in {
        "silence": np.zeros_like(t),
        "white noise": 0.1 * rng.standard_normal(len(t)),
        "loud white noise": 0.5 * rng.standard_normal(len(t)),
        "tone 440 Hz": 0.5 * np.sin(2 * np.pi * 440 * t),
        "tone 1 kHz": 0.5 * np.sin(2 * np.pi * 1000 * t),
        "tone 200 Hz": 0.3 * np.sin(2 * np.pi * 200 * t),
    }.items():
        assert vad.speech_regions(x.astype(np.float32)) == [], name
    assert vad.speech_regions(np.zeros(100, np.float32)) == []  # shorter than one window


# -------------------------------------------------------------------------------------------------
# Inputs
# -------------------------------------------------------------------------------------------------


def test_int16_tensor_stereo_and_dict_inputs_equal_float(signals):
    signal = signals["together"]
    pcm = np.round(signal * 32767).astype(np.int16)
    as_float = pcm.astype(np.float32) / 32768
    expected = vad.speech_regions(as_float)
    assert expected
    assert vad.speech_regions(pcm) == expected
    assert vad.speech_regions(torch.from_numpy(pcm)) == expected
    assert vad.speech_regions(torch.from_numpy(as_float)) == expected
    assert vad.speech_regions(np.stack([as_float, as_float])) == expected  # (channels, samples) -> mono
    assert vad.speech_regions({"raw": pcm, "sampling_rate": RATE}) == expected
    assert vad.speech_regions(as_float.astype(np.float64)) == expected


def test_files_bytes_and_other_rates(signals, tmp_path):
    signal = signals["together"]
    expected = vad.speech_regions(signal)
    at_48k = soxr.resample(signal, RATE, 48000).astype(np.float32)
    path = tmp_path / "speech.wav"
    soundfile.write(str(path), at_48k, 48000, subtype="FLOAT")
    buffer = io.BytesIO()
    soundfile.write(buffer, signal, RATE, format="FLAC")
    duration = len(signal) / RATE
    for got in (vad.speech_regions(at_48k, 48000), vad.speech_regions(str(path)), vad.speech_regions(path),
                vad.speech_regions({"array": at_48k, "sampling_rate": 48000})):
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert abs(g["start"] - e["start"]) <= 0.07 and abs(g["end"] - e["end"]) <= 0.07
            assert g["end"] <= duration + 1e-9
    flac = vad.speech_regions(buffer.getvalue())  # FLAC is 16-bit: nearly the same samples
    assert [(round(r["start"], 1), round(r["end"], 1)) for r in flac] == \
        [(round(r["start"], 1), round(r["end"], 1)) for r in expected]


@pytest.mark.parametrize("kwargs", [
    {"threshold": 1.5}, {"threshold": -0.1}, {"threshold": "0.5"}, {"threshold": True}, {"threshold": None},
    {"neg_threshold": 2}, {"min_speech_duration_ms": -1}, {"min_silence_duration_ms": float("nan")},
    {"speech_pad_ms": -5}, {"speech_pad_ms": "30"}, {"max_speech_duration_s": 0}, {"max_speech_duration_s": -3},
    {"max_speech_duration_s": 0.05}, {"max_speech_duration_s": 0.5, "speech_pad_ms": 400},
    {"max_speech_duration_s": float("-inf")}, {"sampling_rate": 0}, {"sampling_rate": "16k"},
])
def test_bad_parameters_raise_invalid_input(kwargs):
    with pytest.raises(InvalidInput):
        vad.speech_regions(np.zeros(RATE, np.float32), **kwargs)


@pytest.mark.parametrize("audio", [
    np.zeros((2, 2, 100), np.float32), np.zeros(0, np.float32), np.zeros((3, 1000), np.float32),
    np.array([np.nan] * 1000, np.float32), np.zeros(10, bool), [0.0] * 1000, 5, "no/such/file.wav", b"not audio",
    {"raw": np.zeros(100)}, {"sampling_rate": RATE},
])
def test_bad_audio_raises_invalid_input(audio):
    with pytest.raises(InvalidInput):
        vad.speech_regions(audio)


def test_vad_options():
    assert vad.vad_options(None) == vad.WHISPER_VAD_DEFAULTS
    assert vad.vad_options({}) == {"threshold": 0.5, "neg_threshold": None, "min_speech_duration_ms": 0,
                                   "min_silence_duration_ms": 2000, "speech_pad_ms": 400,
                                   "max_speech_duration_s": float("inf")}
    options = vad.vad_options({"threshold": 0.6, "max_speech_duration_s": 30})
    assert options["threshold"] == 0.6 and options["max_speech_duration_s"] == 30 and options["speech_pad_ms"] == 400
    assert lp_audio.vad_options({"min_silence_duration_ms": 500})["min_silence_duration_ms"] == 500
    with pytest.raises(InvalidInput, match="threshold, neg_threshold"):
        vad.vad_options({"window_size_samples": 512})
    with pytest.raises(InvalidInput, match="speech_pad_ms"):
        vad.vad_options({"speech_pad_ms": -1})
    with pytest.raises(InvalidInput):
        vad.vad_options([("threshold", 0.5)])
    with pytest.raises(InvalidInput, match="accepted"):
        lp_audio.speech_regions(np.zeros(RATE, np.float32), min_speech_ms=3)
    regions = lp_audio.speech_regions(np.zeros(RATE, np.float32), **vad.vad_options({"threshold": 0.4}))
    assert regions == []


def test_import_is_light_and_torch_threads_are_left_alone():
    code = ("import sys, lightpipe.audio\n"
            "assert 'torch' not in sys.modules and 'lightpipe.vad' not in sys.modules\n"
            "import numpy as np, torch; torch.set_num_threads(2)\n"
            "assert lightpipe.audio.speech_regions(np.zeros(8000, np.float32)) == []\n"
            "assert torch.get_num_threads() == 2, torch.get_num_threads()\n"
            "assert 'silero_vad' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)

"""Audio inputs and features: decoding every supported format with no system ffmpeg, URLs, dicts,
bad inputs, and feature parity with transformers' WhisperFeatureExtractor and Wav2Vec2FeatureExtractor."""

from __future__ import annotations

import io
import json
import math
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

import soundfile as sf
import av
import soxr

from lightpipe import CheckpointError, InvalidInput, MissingDependency, UnsupportedModel  # noqa: E402
from lightpipe.processing import audio as A  # noqa: E402
from lightpipe.processing import audio_io  # noqa: E402

SHARED_WHISPER = Path(__file__).resolve().parents[1] / ".." / "shared" / "models" / "whisper-tiny.en"
SR = 16000


def speech_like(seconds: float, rate: int = SR, seed: int = 0) -> np.ndarray:
    """Voiced-speech-like float32 audio: harmonics of a wandering pitch under a syllable envelope, with
    a little noise and a pause, peak about 0.5."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * 3.1 * t), 0, None) ** 2
    envelope[(t > seconds * 0.4) & (t < seconds * 0.55)] = 0.0  # a pause: exact silence
    x = voice * envelope + 0.01 * rng.standard_normal(t.shape)
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def fitted(x: np.ndarray, length: int) -> np.ndarray:
    return np.pad(x, (0, max(0, length - len(x))))[:length]


def soxr_expected(x: np.ndarray, orig: int, target: int) -> np.ndarray:
    """What resampling must give: soxr HQ, padded or cut to ceil(n * target / orig) (librosa's length)."""
    return fitted(soxr.resample(x, orig, target, quality="HQ"), math.ceil(len(x) * target / orig))


def best_correlation(decoded: np.ndarray, source: np.ndarray, max_lag: int = 3000) -> float:
    """Highest correlation of the two signals over lags up to max_lag either way (lossy codecs add a
    delay), normalised by the whole signals' energies."""
    n = len(decoded) + len(source)
    cross = np.fft.irfft(np.fft.rfft(decoded, n) * np.conj(np.fft.rfft(source, n)), n)  # cross[lag] = sum d[t+lag] s[t]
    lags = np.concatenate([cross[: max_lag + 1], cross[-max_lag:]])
    return float(lags.max() / (np.linalg.norm(decoded) * np.linalg.norm(source) + 1e-12))


def encode_pyav(x: np.ndarray, rate: int, container: str, codec: str, codec_rate: int | None = None) -> bytes:
    """Encode mono or (2, samples) float audio with PyAV; the encoder converts format and rate itself."""
    try:
        av.codec.Codec(codec, "w")
    except Exception:
        pytest.skip(f"this PyAV build has no {codec} encoder")
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream(codec, rate=codec_rate or rate)
        stream.layout = "stereo" if x.ndim == 2 else "mono"
        planes = np.ascontiguousarray((x if x.ndim == 2 else x[None]).astype(np.float32))
        frame = av.AudioFrame.from_ndarray(planes, format="fltp", layout=stream.layout.name)
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


def encode_soundfile(x: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, x.T if x.ndim == 2 else x, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Decoding files
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source() -> np.ndarray:
    return speech_like(1.5)


@pytest.mark.parametrize("fmt,subtype,atol", [("WAV", "PCM_16", 1 / 32768), ("WAV", "FLOAT", 0.0),
                                               ("FLAC", "PCM_16", 1 / 32768), ("FLAC", "PCM_24", 2**-23)])
def test_lossless_files_decode_to_their_samples(tmp_path, source, fmt, subtype, atol):
    data = encode_soundfile(source, SR, fmt, subtype)
    path = tmp_path / f"a.{fmt.lower()}"
    path.write_bytes(data)
    for given in (path, str(path), data, bytearray(data)):
        out = audio_io.load_audio(given, SR)
        assert out.dtype == np.float32 and out.shape == source.shape
        np.testing.assert_allclose(out, source, atol=atol + 1e-7, rtol=0)


def test_other_rates_are_resampled_with_soxr(tmp_path):
    x = speech_like(1.0, rate=44100)
    path = tmp_path / "a.wav"
    sf.write(path, x, 44100, subtype="FLOAT")
    out = audio_io.load_audio(path, SR)
    np.testing.assert_allclose(out, soxr_expected(x, 44100, SR), atol=1e-6, rtol=0)
    assert out.shape == (math.ceil(len(x) * SR / 44100),)


def test_stereo_files_are_averaged(tmp_path, source):
    right = speech_like(1.5, seed=3)[::-1].copy()
    data = encode_soundfile(np.stack([source, right]), SR, "WAV", "FLOAT")
    np.testing.assert_allclose(audio_io.load_audio(data, SR), (source + right) / 2, atol=1e-6, rtol=0)
    m4a = encode_pyav(np.stack([source, right]), SR, "ipod", "aac")
    assert best_correlation(audio_io.load_audio(m4a, SR), (source + right) / 2) > 0.9


@pytest.mark.parametrize("name,encode", [
    ("ogg-vorbis", lambda x: encode_soundfile(x, SR, "OGG", "VORBIS")),
    ("mp3-soundfile", lambda x: encode_soundfile(x, SR, "MP3")),
    ("mp3-lame", lambda x: encode_pyav(x, SR, "mp3", "libmp3lame")),
    ("m4a-aac", lambda x: encode_pyav(x, SR, "ipod", "aac")),
    ("aac-adts", lambda x: encode_pyav(x, SR, "adts", "aac")),
    ("webm-opus", lambda x: encode_pyav(x, SR, "webm", "libopus", 48000)),
    ("ogg-opus", lambda x: encode_pyav(x, SR, "ogg", "libopus", 48000)),
])
def test_lossy_files_decode_close_to_their_source(tmp_path, source, name, encode):
    data = encode(source)
    path = tmp_path / f"a.{name}"
    path.write_bytes(data)
    for given in (data, path):
        out = audio_io.load_audio(given, SR)
        assert out.dtype == np.float32 and out.ndim == 1
        # codecs add up to a frame or two of priming/padding (AAC: 1024 samples and a tail)
        assert abs(len(out) - len(source)) <= 2048, (name, len(out))
        assert best_correlation(out, source) > 0.9, name


def test_pyav_decodes_what_soundfile_cannot(source):
    """The m4a bytes are not readable by soundfile at all: the result can only have come from PyAV."""
    data = encode_pyav(source, SR, "ipod", "aac")
    with pytest.raises(RuntimeError):
        sf.read(io.BytesIO(data))
    assert best_correlation(audio_io.load_audio(data, 8000), soxr_expected(source, SR, 8000), max_lag=1500) > 0.9


# ---------------------------------------------------------------------------------------------
# Arrays, tensors and dicts
# ---------------------------------------------------------------------------------------------


def test_arrays_are_taken_at_the_given_rate(source):
    out = audio_io.load_audio(source, SR)
    np.testing.assert_array_equal(out, source)
    np.testing.assert_array_equal(audio_io.load_audio(source.astype(np.float64), SR), source)
    # integer PCM is scaled as a WAV reader scales it; int64 names no PCM width and is taken as values
    assert audio_io.load_audio(np.array([0, 16384, -32768], dtype=np.int16), SR).tolist() == [0.0, 0.5, -1.0]
    assert audio_io.load_audio(np.array([0, 1000, -1000]), SR).tolist() == [0.0, 1000.0, -1000.0]


def test_tensors(source):
    np.testing.assert_array_equal(audio_io.load_audio(torch.from_numpy(source), SR), source)
    half = torch.from_numpy(source).to(torch.bfloat16)
    np.testing.assert_array_equal(audio_io.load_audio(half, SR), half.float().numpy())
    stereo = torch.from_numpy(np.stack([source, -source * 0.5]))
    np.testing.assert_allclose(audio_io.load_audio(stereo, SR), source * 0.25, atol=1e-7)


def test_channels_first_arrays_are_averaged_and_channels_last_refused(source):
    other = speech_like(1.5, seed=5)
    np.testing.assert_allclose(audio_io.load_audio(np.stack([source, other]), SR), (source + other) / 2, atol=1e-7)
    np.testing.assert_array_equal(audio_io.load_audio(source[None], SR), source)
    with pytest.raises(InvalidInput, match=r"array\.T"):
        audio_io.load_audio(np.stack([source, other], axis=1), SR)


def test_dict_inputs_are_resampled_and_keep_their_extra_keys():
    x = speech_like(1.0, rate=22050)
    given = {"raw": x, "sampling_rate": 22050, "stride": (2205, 1102), "id": 7}
    item = audio_io.load_audio_item(given, SR)
    np.testing.assert_allclose(item.array, soxr_expected(x, 22050, SR), atol=1e-6, rtol=0)
    n = math.ceil(len(x) * SR / 22050)
    assert item.stride == (n, round(2205 * SR / 22050), round(1102 * SR / 22050))
    assert item.extra == {"id": 7}
    assert set(given) == {"raw", "sampling_rate", "stride", "id"}  # the caller's dict is untouched
    # the `datasets` layout: "array" plus a "path" that is dropped
    item = audio_io.load_audio_item({"array": torch.from_numpy(x), "sampling_rate": 22050.0, "path": "x.wav"}, SR)
    np.testing.assert_allclose(item.array, soxr_expected(x, 22050, SR), atol=1e-6, rtol=0)
    assert item.stride is None and item.extra == {}
    same = audio_io.load_audio({"raw": x, "sampling_rate": SR}, SR)
    np.testing.assert_array_equal(same, x)


def test_dict_stereo_is_mixed_before_resampling():
    left, right = speech_like(0.5, rate=8000), speech_like(0.5, rate=8000, seed=9)
    out = audio_io.load_audio({"raw": np.stack([left, right]), "sampling_rate": 8000}, SR)
    np.testing.assert_allclose(out, soxr_expected((left + right) / 2, 8000, SR), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# URLs
# ---------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        if self.path == "/close":  # the connection drops with no response at all
            self.close_connection = True
            self.connection.close()
            return
        if self.path == "/stall":  # headers, then nothing
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.flush()
            time.sleep(3)
            return
        if self.path == "/short":  # promises more bytes than it sends, then closes
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"RIFF" + b"\0" * 100)
            self.close_connection = True
            return
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def server(source):
    _Handler.files = {"/a.flac": encode_soundfile(source, SR, "FLAC"),
                      "/a.webm": encode_pyav(source, SR, "webm", "libopus", 48000)}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_url_inputs(server, source):
    out = audio_io.load_audio(f"{server}/a.flac", SR, timeout=5)
    np.testing.assert_allclose(out, source, atol=1 / 32768 + 1e-7, rtol=0)
    assert best_correlation(audio_io.load_audio(f"{server}/a.webm", SR, timeout=5), source) > 0.9


@pytest.mark.parametrize("path,reason", [("/missing.wav", "404"), ("/close", "fetching"),
                                         ("/short", "closed after"), ("/stall", "timed out|timeout")])
def test_url_failures_are_invalid_input_within_the_timeout(server, path, reason):
    start = time.monotonic()
    with pytest.raises(InvalidInput, match=reason) as error:
        audio_io.load_audio(f"{server}{path}", SR, timeout=0.5)
    assert f"{server}{path}" in str(error.value)
    assert time.monotonic() - start < 2.5


def test_unreachable_host_is_invalid_input(server):
    port = int(server.rsplit(":", 1)[1])
    closed = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)  # bind a port, then close it: nothing listens there
    free = closed.server_address[1]
    closed.server_close()
    assert free != port
    with pytest.raises(InvalidInput, match=f"127.0.0.1:{free}"):
        audio_io.load_audio(f"http://127.0.0.1:{free}/a.wav", SR, timeout=2)


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------


def _flac(source) -> bytes:
    return encode_soundfile(source, SR, "FLAC")


BAD_INPUTS = {
    "empty bytes": (lambda tmp, s: b"", "empty"),
    "random bytes": (lambda tmp, s: np.random.default_rng(0).bytes(5000), "could not be decoded"),
    "truncated flac": (lambda tmp, s: _flac(s)[: len(_flac(s)) // 2], "truncated or corrupt"),
    "flac header only": (lambda tmp, s: _flac(s)[:100], "flac"),
    "missing path": (lambda tmp, s: str(tmp / "nope.wav"), "does not exist"),
    "directory": (lambda tmp, s: tmp, "not a file"),
    "zero-byte file": (lambda tmp, s: (tmp / "empty.wav").write_bytes(b"") or tmp / "empty.wav", "empty"),
    "empty array": (lambda tmp, s: np.zeros(0, np.float32), "empty"),
    "NaN": (lambda tmp, s: np.array([0.1, np.nan, 0.2], np.float32), "NaN"),
    "inf": (lambda tmp, s: np.array([0.1, np.inf], np.float64), "infinite"),
    "strings": (lambda tmp, s: np.array(["a", "b"]), "real numbers"),
    "objects": (lambda tmp, s: np.array([0.1, None], dtype=object), "real numbers"),
    "complex": (lambda tmp, s: np.ones(10, np.complex64), "real numbers"),
    "booleans": (lambda tmp, s: np.ones(10, bool), "real numbers"),
    "3-D": (lambda tmp, s: np.zeros((2, 2, 100), np.float32), "dimensions"),
    "scalar": (lambda tmp, s: np.float32(0.5), "must be a file path"),
    "0-d array": (lambda tmp, s: np.array(0.5), "single number"),
    "a list": (lambda tmp, s: [0.1, 0.2], "must be a file path"),
    "None": (lambda tmp, s: None, "must be a file path"),
    "dict without rate": (lambda tmp, s: {"raw": s}, "sampling_rate"),
    "dict rate as string": (lambda tmp, s: {"raw": s, "sampling_rate": "16000"}, "sampling_rate"),
    "dict rate zero": (lambda tmp, s: {"raw": s, "sampling_rate": 0}, "sampling_rate"),
    "dict rate negative": (lambda tmp, s: {"raw": s, "sampling_rate": -8000}, "sampling_rate"),
    "dict rate NaN": (lambda tmp, s: {"raw": s, "sampling_rate": float("nan")}, "sampling_rate"),
    "dict audio as a list": (lambda tmp, s: {"raw": [0.1, 0.2], "sampling_rate": SR}, "numpy array"),
    "dict stride too long": (lambda tmp, s: {"raw": s, "sampling_rate": SR, "stride": (len(s), 1)}, "stride"),
    "dict stride negative": (lambda tmp, s: {"raw": s, "sampling_rate": SR, "stride": (-1, 1)}, "stride"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_are_invalid_input(tmp_path, source, name):
    make, message = BAD_INPUTS[name]
    with pytest.raises(InvalidInput, match=message):
        audio_io.load_audio(make(tmp_path, source), SR)
    # nothing is left broken: good input still loads
    np.testing.assert_array_equal(audio_io.load_audio(source, SR), source)


@pytest.mark.parametrize("rate", ["16000", None, 0, -1, 16000.0, True, 1.5])
def test_bad_target_rates(source, rate):
    with pytest.raises(InvalidInput, match="sampling_rate"):
        audio_io.load_audio(source, rate)


def test_bad_timeout(server):
    with pytest.raises(InvalidInput, match="timeout"):
        audio_io.load_audio(f"{server}/a.flac", SR, timeout=-1)


def test_duration_cap(monkeypatch, source):
    monkeypatch.setattr(audio_io, "MAX_DURATION_S", 1.0)  # the source lasts 1.5 s
    for given in (source, encode_soundfile(source, SR, "FLAC"), encode_pyav(source, SR, "webm", "libopus", 48000),
                  {"raw": source, "sampling_rate": SR}):
        with pytest.raises(InvalidInput, match="max_audio_seconds"):
            audio_io.load_audio(given, SR)
    np.testing.assert_array_equal(audio_io.load_audio(source[:SR], SR), source[:SR])


def test_file_without_audio_stream():
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as out:  # a video with no sound
        stream = out.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 40 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    assert len(buffer.getvalue()) > 100
    with pytest.raises(InvalidInput, match="no audio stream"):
        audio_io.load_audio(buffer.getvalue(), SR)


def test_missing_packages_name_the_extra(monkeypatch, source):
    m4a = encode_pyav(source, SR, "ipod", "aac")
    monkeypatch.setitem(sys.modules, "soxr", None)  # importing it now raises ImportError
    with pytest.raises(MissingDependency, match=r"lightpipe\[audio\]"):
        audio_io.load_audio({"raw": source, "sampling_rate": 8000}, SR)
    np.testing.assert_array_equal(audio_io.load_audio(source, SR), source)  # no resampling: no soxr needed
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(MissingDependency, match=r"PyAV: pip install 'lightpipe\[audio\]'"):
        audio_io.load_audio(m4a, SR)
    with pytest.raises(InvalidInput):  # bytes that are no known format stay a bad input
        audio_io.load_audio(np.random.default_rng(1).bytes(3000), SR)
    np.testing.assert_allclose(audio_io.load_audio(encode_soundfile(source, SR, "FLAC"), SR), source, atol=1 / 32768 + 1e-7)
    monkeypatch.setitem(sys.modules, "soundfile", None)
    with pytest.raises(MissingDependency, match=r"lightpipe\[audio\]"):
        audio_io.load_audio(encode_soundfile(source, SR, "FLAC"), SR)


# ---------------------------------------------------------------------------------------------
# Whisper features
# ---------------------------------------------------------------------------------------------


def _signals() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "noise 1 s": (0.1 * rng.standard_normal(SR)).astype(np.float32),
        "speech 7 s": speech_like(7.0, seed=1),
        "speech 30 s exactly": speech_like(30.0, seed=2),
        "loud noise 31.3 s": (0.8 * rng.standard_normal(int(31.3 * SR) + 37)).astype(np.float32),
        "tiny 150 samples": (0.3 * rng.standard_normal(150)).astype(np.float32),
    }


SIGNALS = _signals()


def test_mel_filter_bank_equals_transformers():
    from transformers.audio_utils import mel_filter_bank

    for n_mels in (80, 128):
        expected = mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0,
                                   max_frequency=8000.0, sampling_rate=SR, norm="slaney", mel_scale="slaney")
        np.testing.assert_allclose(A.mel_filter_bank(n_mels), expected.T, rtol=1e-12, atol=1e-15)
        assert A.mel_filters(n_mels).shape == (n_mels, 201) and A.mel_filters(n_mels).dtype == torch.float32


def test_constants():
    assert (A.SAMPLE_RATE, A.N_FFT, A.HOP_LENGTH, A.CHUNK_LENGTH) == (16000, 400, 160, 30)
    assert (A.N_SAMPLES, A.N_FRAMES) == (480000, 3000)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_whisper_features_equal_transformers(n_mels):
    from transformers import WhisperFeatureExtractor

    reference = WhisperFeatureExtractor(feature_size=n_mels)
    ours = A.FeatureExtractor.whisper(n_mels)
    for name, x in SIGNALS.items():
        expected = reference(x, sampling_rate=SR, return_tensors="np", return_attention_mask=True)
        numpy_path = reference._np_extract_fbank_features(A.pad_or_trim(x[None]), "cpu")  # transformers without torch
        got = ours(x, return_attention_mask=True)
        assert got["input_features"].shape == (n_mels, 3000) and got["input_features"].dtype == torch.float32
        np.testing.assert_allclose(got["input_features"].numpy(), expected["input_features"][0], atol=1e-4, rtol=0,
                                   err_msg=name)
        np.testing.assert_allclose(got["input_features"].numpy(), numpy_path[0], atol=1e-4, rtol=0, err_msg=name)
        np.testing.assert_array_equal(got["attention_mask"].numpy(), expected["attention_mask"][0])
        assert "attention_mask" not in ours(x)  # the checkpoint's default: no mask


@pytest.mark.parametrize("n_mels", [80, 128])
def test_whisper_long_form_features_equal_transformers(n_mels):
    from transformers import WhisperFeatureExtractor

    reference = WhisperFeatureExtractor(feature_size=n_mels)
    ours = A.FeatureExtractor.whisper(n_mels)
    x = np.concatenate([SIGNALS["speech 7 s"]] * 5 + [SIGNALS["noise 1 s"][:12345]])  # 35.8 s, not a multiple of 160
    expected = reference(x, sampling_rate=SR, truncation=False, padding="longest", return_tensors="np",
                         return_attention_mask=True)
    got = ours(x, long_form=True, return_attention_mask=True)
    assert got["input_features"].shape == (n_mels, len(x) // 160) == expected["input_features"].shape[1:]
    np.testing.assert_allclose(got["input_features"].numpy(), expected["input_features"][0], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(got["attention_mask"].numpy(), expected["attention_mask"][0])
    # audio that fits in 30 s gets the standard window even in long-form mode (the pipeline's rule)
    short = SIGNALS["speech 7 s"]
    np.testing.assert_array_equal(ours(short, long_form=True)["input_features"], ours(short)["input_features"])


def test_whisper_batch_equals_transformers_and_single_items():
    from transformers import WhisperFeatureExtractor

    reference = WhisperFeatureExtractor()
    ours = A.FeatureExtractor.whisper()
    items = [SIGNALS["noise 1 s"], SIGNALS["loud noise 31.3 s"], SIGNALS["tiny 150 samples"]]
    expected = reference(items, sampling_rate=SR, return_tensors="np", return_attention_mask=True)
    got = ours.batch(items, return_attention_mask=True)
    assert got["input_features"].shape == (3, 80, 3000) and got["attention_mask"].shape == (3, 3000)
    np.testing.assert_allclose(got["input_features"].numpy(), expected["input_features"], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(got["attention_mask"].numpy(), expected["attention_mask"])
    for row, x in enumerate(items):
        np.testing.assert_allclose(got["input_features"][row], ours(x)["input_features"], atol=1e-5, rtol=0)
    # long-form batch: everything padded to the longest item
    long_items = [SIGNALS["loud noise 31.3 s"], SIGNALS["speech 7 s"]]
    expected = reference(long_items, sampling_rate=SR, truncation=False, padding="longest", return_tensors="np",
                         return_attention_mask=True)
    got = ours.batch(long_items, long_form=True, return_attention_mask=True)
    assert got["input_features"].shape == (2, 80, len(long_items[0]) // 160)
    np.testing.assert_allclose(got["input_features"].numpy(), expected["input_features"], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(got["attention_mask"].numpy(), expected["attention_mask"])


def test_log_mel_spectrogram_batched_on_a_device():
    x = np.stack([A.pad_or_trim(SIGNALS["noise 1 s"]), A.pad_or_trim(SIGNALS["speech 7 s"])])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batched = A.log_mel_spectrogram(torch.from_numpy(x), 80, device=device)
    assert batched.shape == (2, 80, 3000) and batched.device.type == device
    for row in range(2):
        single = A.log_mel_spectrogram(x[row], 80)
        np.testing.assert_allclose(batched[row].cpu().numpy(), single.numpy(), atol=1e-4, rtol=0)
    assert A.log_mel_spectrogram(SIGNALS["speech 7 s"], 80).shape == (80, len(SIGNALS["speech 7 s"]) // 160)
    with pytest.raises(InvalidInput, match="too short"):
        A.log_mel_spectrogram(np.zeros(100, np.float32))
    with pytest.raises(InvalidInput):
        A.log_mel_spectrogram(np.zeros((2, 2, 1000), np.float32))


def test_feature_extractor_rejects_bad_waveforms():
    ours = A.FeatureExtractor.whisper()
    for bad in (np.zeros(0, np.float32), np.array([np.nan] * 500, np.float32), "audio.wav", np.zeros((3, 500))):
        with pytest.raises(InvalidInput):
            ours(bad)
    with pytest.raises(InvalidInput):
        ours.batch([])
    assert ours(SIGNALS["noise 1 s"])["input_features"].shape == (80, 3000)


# ---------------------------------------------------------------------------------------------
# Wav2Vec2 features
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("do_normalize", [True, False])
@pytest.mark.parametrize("return_attention_mask", [True, False])
def test_wav2vec2_features_equal_transformers(do_normalize, return_attention_mask):
    from transformers import Wav2Vec2FeatureExtractor

    reference = Wav2Vec2FeatureExtractor(do_normalize=do_normalize, return_attention_mask=return_attention_mask,
                                         padding_value=0.0)
    ours = A.FeatureExtractor.from_dict(reference.to_dict())
    assert ours == A.FeatureExtractor.wav2vec2(do_normalize=do_normalize, return_attention_mask=return_attention_mask)
    assert ours.kind == "wav2vec2"
    assert (ours.do_normalize, ours.return_attention_mask) == (do_normalize, return_attention_mask)
    rng = np.random.default_rng(1)
    items = [speech_like(0.3, seed=4) + 0.05, (0.2 * rng.standard_normal(2500) - 0.1).astype(np.float32),
             speech_like(0.1, seed=6)]
    for x in items:  # one at a time: how the pipeline calls it
        expected = reference(x, sampling_rate=SR, return_tensors="np")
        got = ours(x)
        assert sorted(got) == sorted(expected.keys())
        np.testing.assert_allclose(got["input_values"].numpy(), expected["input_values"][0], atol=1e-5, rtol=0)
        if return_attention_mask:
            np.testing.assert_array_equal(got["attention_mask"].numpy(), expected["attention_mask"][0])
    expected = reference(items, sampling_rate=SR, padding=True, return_tensors="np")
    got = ours.batch(items)
    assert sorted(got) == sorted(expected.keys()) and got["input_values"].shape == (3, 4800)
    np.testing.assert_allclose(got["input_values"].numpy(), expected["input_values"], atol=1e-5, rtol=0)
    if return_attention_mask:
        np.testing.assert_array_equal(got["attention_mask"].numpy(), expected["attention_mask"])
        # with a mask, a padded row is the item's own features followed by padding
        for row, x in enumerate(items):
            np.testing.assert_allclose(got["input_values"][row, : len(x)], ours(x)["input_values"], atol=1e-6)
            assert (got["input_values"][row, len(x):] == 0).all()
    # the pipeline asks for a mask whatever the checkpoint says
    asked = ours(items[0], return_attention_mask=True)
    assert asked["attention_mask"].dtype == torch.long and asked["attention_mask"].tolist() == [1] * len(items[0])


# ---------------------------------------------------------------------------------------------
# Settings from checkpoint folders
# ---------------------------------------------------------------------------------------------


def _same_settings(ours: A.FeatureExtractor, reference) -> None:
    assert ours.sampling_rate == reference.sampling_rate
    assert ours.feature_size == reference.feature_size
    assert ours.padding_value == reference.padding_value
    assert ours.return_attention_mask == reference.return_attention_mask
    if ours.kind == "whisper":
        assert (ours.hop_length, ours.n_fft, ours.chunk_length) == (reference.hop_length, reference.n_fft,
                                                                      reference.chunk_length)
        assert (ours.n_samples, ours.n_frames, ours.n_mels) == (reference.n_samples, reference.nb_max_frames,
                                                                  reference.feature_size)
    else:
        assert ours.do_normalize == reference.do_normalize


def test_from_folder_preprocessor_config_layout(tmp_path):
    from transformers import AutoFeatureExtractor, Wav2Vec2FeatureExtractor, WhisperFeatureExtractor

    WhisperFeatureExtractor(feature_size=128, return_attention_mask=True).save_pretrained(tmp_path / "whisper")
    Wav2Vec2FeatureExtractor(do_normalize=False, return_attention_mask=True).save_pretrained(tmp_path / "w2v")
    assert (tmp_path / "whisper" / "preprocessor_config.json").is_file()
    for name, kind in (("whisper", "whisper"), ("w2v", "wav2vec2")):
        ours = A.FeatureExtractor.from_folder(tmp_path / name)
        assert ours.kind == kind
        reference = AutoFeatureExtractor.from_pretrained(str(tmp_path / name))
        _same_settings(ours, reference)
        x = SIGNALS["noise 1 s"]
        expected = reference(x, sampling_rate=SR, return_tensors="np")
        got = ours(x)
        assert sorted(got) == sorted(expected.keys())
        np.testing.assert_allclose(got[ours.input_name].numpy(), expected[ours.input_name][0], atol=1e-4, rtol=0)


def test_from_folder_processor_config_layout(tmp_path):
    """transformers 5 processors fold the feature-extractor settings into processor_config.json."""
    from helpers import bpe_vocab_folder
    from transformers import (AutoFeatureExtractor, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Processor,
                              WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer)

    vocab = bpe_vocab_folder(tmp_path / "bpe")
    tokenizer = WhisperTokenizer(vocab_file=str(vocab / "vocab.json"), merges_file=str(vocab / "merges.txt"))
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tokenizer
                     ).save_pretrained(tmp_path / "whisper")
    letters = ["<pad>", "<s>", "</s>", "<unk>", "|", "a", "b"]
    (tmp_path / "ctc.json").write_text(json.dumps({c: i for i, c in enumerate(letters)}))
    Wav2Vec2Processor(feature_extractor=Wav2Vec2FeatureExtractor(return_attention_mask=True, padding_value=0.5),
                      tokenizer=Wav2Vec2CTCTokenizer(str(tmp_path / "ctc.json"))).save_pretrained(tmp_path / "w2v")
    for name, kind in (("whisper", "whisper"), ("w2v", "wav2vec2")):
        assert not (tmp_path / name / "preprocessor_config.json").exists()
        assert "feature_extractor" in json.loads((tmp_path / name / "processor_config.json").read_text())
        ours = A.FeatureExtractor.from_folder(tmp_path / name)
        assert ours.kind == kind
        _same_settings(ours, AutoFeatureExtractor.from_pretrained(str(tmp_path / name)))
    assert A.FeatureExtractor.from_folder(tmp_path / "whisper").n_mels == 128
    assert A.FeatureExtractor.from_folder(tmp_path / "w2v").padding_value == 0.5


def test_processor_config_wins_over_preprocessor_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"feature_extractor_type": "WhisperFeatureExtractor",
                                                                   "feature_size": 80}))
    (tmp_path / "processor_config.json").write_text(json.dumps({"feature_extractor": {
        "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128}}))
    assert A.FeatureExtractor.from_folder(tmp_path).n_mels == 128
    # a processor_config.json without feature-extractor settings is passed over
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "WhisperProcessor"}))
    assert A.FeatureExtractor.from_folder(tmp_path).n_mels == 80


def test_whisper_folders_without_preprocessor_config_get_defaults(tmp_path):
    from transformers import WhisperConfig

    WhisperConfig(num_mel_bins=128).save_pretrained(tmp_path / "hf")
    ours = A.FeatureExtractor.from_folder(tmp_path / "hf")
    assert (ours.kind, ours.n_mels, ours.sampling_rate, ours.n_samples, ours.n_frames) == ("whisper", 128, 16000,
                                                                                          480000, 3000)
    # CTranslate2 exports (their mel bins come from model.bin) are tested in test_ct2.py


def test_from_folder_errors(tmp_path):
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        A.FeatureExtractor.from_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        A.FeatureExtractor.from_folder(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        A.FeatureExtractor.from_folder(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"feature_extractor_type": "ASTFeatureExtractor"}))
    with pytest.raises(UnsupportedModel, match="WhisperFeatureExtractor"):
        A.FeatureExtractor.from_folder(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"sampling_rate": 16000}))
    with pytest.raises(CheckpointError, match="feature_extractor_type"):
        A.FeatureExtractor.from_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "hubert"}))  # the model type decides
    assert A.FeatureExtractor.from_folder(tmp_path).kind == "wav2vec2"
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"feature_extractor_type": "WhisperFeatureExtractor",
                                                                   "sampling_rate": "16k"}))
    with pytest.raises(CheckpointError, match="sampling_rate"):
        A.FeatureExtractor.from_folder(tmp_path)
    with pytest.raises(UnsupportedModel):
        A.FeatureExtractor(kind="speech_t5")


def test_load_uses_the_extractor_rate():
    ours = A.FeatureExtractor.wav2vec2(sampling_rate=8000)
    x = speech_like(0.5)
    np.testing.assert_allclose(ours.load({"raw": x, "sampling_rate": SR}).array, soxr_expected(x, SR, 8000), atol=1e-6)


@pytest.mark.skipif(not (SHARED_WHISPER / "preprocessor_config.json").is_file(),
                    reason="../shared/models/whisper-tiny.en is not present")
def test_real_whisper_tiny_en_settings():
    from transformers import AutoFeatureExtractor

    ours = A.FeatureExtractor.from_folder(SHARED_WHISPER)
    reference = AutoFeatureExtractor.from_pretrained(str(SHARED_WHISPER))
    assert ours.kind == "whisper" and ours.n_mels == 80
    _same_settings(ours, reference)
    x = SIGNALS["speech 7 s"]
    np.testing.assert_allclose(ours(x)["input_features"].numpy(),
                               reference(x, sampling_rate=SR, return_tensors="np")["input_features"][0], atol=1e-4)

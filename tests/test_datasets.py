"""Datasets as inputs, with the real 🤗 `datasets` library on local data (no Hub): Dataset.from_dict in the python,
numpy and torch formats, IterableDataset, load_dataset("audiofolder" / "imagefolder") offline, the Audio feature's
undecoded {"path", "bytes"} rows, torch datasets, and num_workers on streams. Results equal the list call's."""

import io
import os
import threading

import datasets
import numpy as np
import pytest
import soundfile
import torch

from ctc_helpers import CLIPS, RATE, ctc_checkpoint
from lightpipe import KeyDataset, pipeline
from vision_helpers import smooth_image, tiny_vision_checkpoint
from helpers import results_close

TEXTS = ["I love this movie, it is great!", "bad", "The river flows through the old city at night.", "ok then",
         "what where who when why how does did do can will would should could not no yes very much many"]


close = results_close  # results equal up to float noise (tests/helpers.py)


@pytest.fixture(scope="module")
def asr(tmp_path_factory):
    return pipeline("automatic-speech-recognition", model=str(ctc_checkpoint(tmp_path_factory.mktemp("ctc"))))


@pytest.fixture(scope="module")
def asr_expected(asr):
    expected = asr(list(CLIPS), batch_size=1)
    assert len({r["text"] for r in expected}) == len(CLIPS)  # the transcripts tell the clips apart
    return expected


@pytest.fixture(scope="module")
def classify(checkpoint):
    return pipeline("text-classification", model=str(checkpoint("bert", "sequence-classification")), top_k=None)


@pytest.fixture(scope="module")
def audio_folder(tmp_path_factory):
    """The clips as FLAC files, named in their order."""
    folder = tmp_path_factory.mktemp("audiofolder")
    paths = []
    for i, clip in enumerate(CLIPS):
        path = folder / f"clip{i}.flac"
        soundfile.write(path, clip, RATE)
        paths.append(str(path))
    return folder, paths


# ------------------------------------------------------------------ text


@pytest.mark.parametrize("fmt", [None, "numpy", "torch"])
@pytest.mark.parametrize("num_workers", [None, 2])
def test_dataset_formats_equal_the_list_call(classify, fmt, num_workers):
    expected = classify(TEXTS, batch_size=2)
    ds = datasets.Dataset.from_dict({"text": TEXTS, "id": list(range(len(TEXTS)))})
    ds = ds.with_format(fmt) if fmt else ds
    stream = classify(KeyDataset(ds, "text"), batch_size=2, num_workers=num_workers)
    assert not isinstance(stream, list)  # lazy: an iterator
    assert close(list(stream), expected)


def test_iterable_dataset_and_generator(classify):
    expected = classify(TEXTS, batch_size=3)
    ds = datasets.Dataset.from_dict({"text": TEXTS}).to_iterable_dataset(num_shards=2)
    assert close(list(classify(KeyDataset(ds, "text"), batch_size=3)), expected)
    assert close(list(classify((t for t in TEXTS), batch_size=3, num_workers=3)), expected)
    texts = datasets.Dataset.from_dict({"text": TEXTS}).to_iterable_dataset().map(lambda row: row)
    assert close(list(classify((row["text"] for row in texts), batch_size=3)), expected)


class TorchTexts(torch.utils.data.Dataset):
    def __len__(self):
        return len(TEXTS)

    def __getitem__(self, i):
        return TEXTS[i]


class TorchStream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(TEXTS)


def test_torch_datasets(classify):
    expected = classify(TEXTS, batch_size=2)
    assert close(list(classify(TorchTexts(), batch_size=2, num_workers=2)), expected)
    assert close(list(classify(TorchStream(), batch_size=2, num_workers=2)), expected)


def test_num_workers_preprocess_a_stream_in_parallel_and_in_order(classify, monkeypatch):
    """Each preprocess waits until two run at once, which only happens on two threads."""
    real = type(classify).preprocess
    both = threading.Barrier(2, timeout=10)
    threads = set()

    def preprocess(self, inputs, **params):
        threads.add(threading.get_ident())
        both.wait()
        return real(self, inputs, **params)

    expected = classify(TEXTS[:4], batch_size=2)
    monkeypatch.setattr(type(classify), "preprocess", preprocess)
    ds = datasets.Dataset.from_dict({"text": TEXTS[:4]})
    assert close(list(classify(KeyDataset(ds, "text"), batch_size=2, num_workers=2)), expected)
    assert len(threads) == 2


# ------------------------------------------------------------------ audio


def test_audiofolder_offline_paths_and_undecoded_rows(asr, asr_expected, audio_folder):
    """datasets 5 decodes and encodes audio with torchcodec; a column read as file paths, or cast to
    Audio(decode=False) rows {"path", "bytes": None}, needs neither: lightpipe decodes the files."""
    folder, paths = audio_folder
    assert datasets.config.HF_HUB_OFFLINE  # set before datasets was imported (conftest): no Hub
    ds = datasets.load_dataset("audiofolder", data_dir=str(folder), split="train",
                               features=datasets.Features({"audio": datasets.Value("string")}))
    assert [os.path.basename(p) for p in ds["audio"]] == [os.path.basename(p) for p in paths]
    assert asr(paths, batch_size=2) == asr_expected
    assert list(asr(KeyDataset(ds, "audio"), batch_size=2, num_workers=2)) == asr_expected
    undecoded = ds.cast_column("audio", datasets.Audio(decode=False))
    assert undecoded[0]["audio"] == {"bytes": None, "path": paths[0]}
    for fmt in (None, "numpy", "torch"):
        rows = undecoded.with_format(fmt) if fmt else undecoded
        assert list(asr(KeyDataset(rows, "audio"), batch_size=3)) == asr_expected


def test_undecoded_rows_with_bytes(asr, asr_expected):
    files = []
    for clip in CLIPS:
        buffer = io.BytesIO()
        soundfile.write(buffer, clip, RATE, format="WAV")
        files.append({"bytes": buffer.getvalue(), "path": "clip.wav"})
    ds = datasets.Dataset.from_dict({"audio": files}).cast_column("audio", datasets.Audio(decode=False))
    assert list(asr(KeyDataset(ds, "audio"), batch_size=2)) == asr_expected
    assert asr(files, batch_size=4) == asr_expected
    # an empty file among them: its own error, the others answer
    rows = files[:2] + [{"bytes": b"", "path": "empty.wav"}] + files[2:]
    results = asr(rows, on_error="record")
    assert results[:2] + results[3:] == asr_expected
    assert results[2]["type"] == "InvalidInput" and "empty" in results[2]["error"]


@pytest.mark.parametrize("fmt", [None, "numpy", "torch"])
def test_decoded_audio_rows_in_each_format(asr, asr_expected, fmt):
    """{"array", "sampling_rate"} rows: lists (python format), arrays with a 0-d sampling_rate array (numpy),
    tensors (torch). At 8 kHz they are resampled, as the list call's dicts are."""
    rows = [{"array": clip, "sampling_rate": RATE} for clip in CLIPS]
    ds = datasets.Dataset.from_dict({"audio": rows})
    ds = ds.with_format(fmt) if fmt else ds
    row = ds[0]["audio"]
    if fmt == "numpy":
        assert isinstance(row["sampling_rate"], np.ndarray) and row["sampling_rate"].ndim == 0
    assert list(asr(KeyDataset(ds, "audio"), batch_size=2)) == asr_expected
    slow = [{"array": clip[::2].copy(), "sampling_rate": RATE // 2} for clip in CLIPS]
    expected = asr([{"raw": r["array"], "sampling_rate": r["sampling_rate"]} for r in slow], batch_size=2)
    ds = datasets.Dataset.from_dict({"audio": slow})
    ds = ds.with_format(fmt) if fmt else ds
    assert list(asr(KeyDataset(ds, "audio"), batch_size=2)) == expected


# ------------------------------------------------------------------ images


def test_imagefolder_in_each_format(tmp_path):
    model = tiny_vision_checkpoint(tmp_path / "vit", "vit", "image-classification")
    classify = pipeline("image-classification", model=str(model))
    images = tmp_path / "images"
    images.mkdir()
    paths = []
    for i, (h, w) in enumerate([(40, 50), (33, 33), (60, 20)]):
        paths.append(str(images / f"image{i}.png"))
        smooth_image(h, w, seed=i).save(paths[-1])
    expected = classify(paths, batch_size=2)
    ds = datasets.load_dataset("imagefolder", data_dir=str(images), split="train")
    for fmt in (None, "numpy", "torch"):  # PIL images, (H, W, 3) arrays, (3, H, W) tensors
        rows = ds.with_format(fmt) if fmt else ds
        assert close(list(classify(KeyDataset(rows, "image"), batch_size=2, num_workers=2)), expected)

"""image-classification parity with transformers on tiny random checkpoints, every input form, bad inputs."""

import base64
import json
import time

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from lightpipe import InvalidInput, pipeline
from server_helpers import close_at_once, raw_server, stall
from vision_helpers import image_bytes, sample_files, smooth_image, tiny_vision_checkpoint

ARCHS = ("vit", "deit", "convnext", "beit", "swin")
LABELS = ["cat", "dog", "bird", "fish", "horse", "cow", "frog"]  # more than the default top_k of 5


def assert_same(ours, ref, tol=1e-4):
    if isinstance(ref, list):
        assert isinstance(ours, list) and len(ours) == len(ref)
        for o, r in zip(ours, ref):
            assert_same(o, r, tol)
    else:
        assert ours.keys() == ref.keys()
        assert ours["label"] == ref["label"]
        assert abs(ours["score"] - ref["score"]) <= tol


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return [str(p) for p in sample_files(tmp_path_factory.mktemp("images"))]


@pytest.fixture(scope="module", params=ARCHS)
def pipes(request, tmp_path_factory):
    head = "image-classification-with-teacher" if request.param == "deit" else "image-classification"
    folder = tiny_vision_checkpoint(tmp_path_factory.mktemp(request.param), request.param, head, labels=LABELS)
    return pipeline("image-classification", model=str(folder)), transformers.pipeline("image-classification",
                                                                                      model=str(folder))


@pytest.mark.parametrize("kwargs", [{}, {"top_k": 2}, {"top_k": 10}, {"function_to_apply": "sigmoid"},
                                    {"function_to_apply": "none", "top_k": 7}])
def test_parity_paths(pipes, files, kwargs):
    ours, ref = pipes
    assert_same(ours(files, **kwargs), ref(files, **kwargs))


def test_parity_single_input_shapes(pipes, files):
    ours, ref = pipes
    result = ours(files[0])
    assert isinstance(result, list) and len(result) == 5 and isinstance(result[0], dict)
    assert_same(result, ref(files[0]))
    assert_same(ours(images=files[:2]), ref(files[:2]))  # transformers keyword for the inputs


def test_input_forms(pipes, files, tmp_path):
    """PIL images, bytes, base64, data URIs, numpy arrays and torch tensors give what their files give."""
    ours, ref = pipes
    pils = [Image.open(f) for f in files]
    expected = ref(files)
    assert_same(ours(pils), ref(pils))
    assert_same(ours(pils), expected)
    raw = [open(f, "rb").read() for f in files]
    assert_same(ours(raw), expected)
    encoded = [base64.b64encode(r).decode() for r in raw]
    assert_same(ours(encoded), ref(encoded))
    assert_same(ours(["data:image/jpeg;base64," + e for e in encoded]), expected)
    arrays = [np.array(Image.open(f).convert("RGB")) for f in files[:3]]
    assert_same(ours(arrays), ref(arrays))
    assert_same(ours([torch.from_numpy(a) for a in arrays]), ref(arrays))


def test_batched_equals_unbatched(pipes, files):
    ours, ref = pipes
    one = ours(files * 2, top_k=7)
    assert_same(ours(files * 2, top_k=7, batch_size=4), one, tol=1e-5)
    assert_same(ours(files, batch_size=4), ref(files, batch_size=4))
    assert_same(ours(files, num_workers=2, batch_size=3), ref(files))


def test_stream_input(pipes, files):
    ours, ref = pipes
    results = list(ours((f for f in files), batch_size=3))
    assert_same(results, ref(files))


def test_construction_params_are_defaults(tmp_path, files):
    folder = tiny_vision_checkpoint(tmp_path, "vit", "image-classification", labels=LABELS)
    ours = pipeline("image-classification", model=str(folder), top_k=3)
    ref = transformers.pipeline("image-classification", model=str(folder), top_k=3)
    assert_same(ours(files), ref(files))
    assert_same(ours(files, top_k=1), ref(files, top_k=1))
    assert len(ours(files[0])) == 3  # the call-only top_k did not stick


@pytest.mark.parametrize("overrides", [{"problem_type": "regression"}, {"problem_type": "multi_label_classification"},
                                       {"num_labels": 1}])
def test_default_function(tmp_path, files, overrides):
    labels = ["only"] if overrides.get("num_labels") == 1 else LABELS[:3]
    overrides = {k: v for k, v in overrides.items() if k != "num_labels"}
    folder = tiny_vision_checkpoint(tmp_path, "vit", "image-classification", labels=labels, **overrides)
    ours, ref = pipeline("image-classification", model=str(folder)), transformers.pipeline(
        "image-classification", model=str(folder))
    assert_same(ours(files), ref(files))


def test_task_inferred_from_checkpoint(tmp_path, files):
    folder = tiny_vision_checkpoint(tmp_path, "convnext", "image-classification", labels=LABELS)
    ours = pipeline(model=str(folder))
    assert ours.task == "image-classification"
    assert_same(ours(files[:2]), transformers.pipeline("image-classification", model=str(folder))(files[:2]))


def png_bomb() -> bytes:
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def closing_url():
    url, stop = raw_server(close_at_once, "/cat.jpg")
    yield url
    stop()


@pytest.fixture(scope="module")
def stalling_url():
    url, stop = raw_server(stall, "/cat.jpg")
    yield url
    stop()


def test_bad_inputs_then_still_answers(pipes, files, tmp_path, closing_url, stalling_url):
    ours, ref = pipes
    good = image_bytes(smooth_image(60, 60), "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "bomb.png").write_bytes(png_bomb())
    (tmp_path / "text.jpg").write_bytes(b"not an image, just text")
    bad_inputs = [str(tmp_path / "truncated.jpg"), str(tmp_path / "empty.jpg"), str(tmp_path / "bomb.png"),
                  str(tmp_path / "text.jpg"), b"not an image", str(tmp_path / "missing.jpg"), closing_url, stalling_url, None, 42,
                  np.zeros((4, 4, 3, 2), np.uint8)]
    for bad in bad_inputs:
        start = time.perf_counter()
        with pytest.raises(InvalidInput):
            ours(bad, timeout=0.5)
        assert time.perf_counter() - start < 2
        with pytest.raises(InvalidInput):
            ours([files[0], bad], batch_size=2, timeout=0.5)
        assert_same(ours(files[0]), ref(files[0]))  # still answers


@pytest.mark.parametrize("params", [{"top_k": 0}, {"top_k": "x"}, {"function_to_apply": "relu"}, {"unknown": 1},
                                    {"batch_size": 0}, {"timeout": -1}, {"timeout": "soon"}])
def test_bad_params(pipes, files, params):
    ours, ref = pipes
    with pytest.raises(InvalidInput):
        ours(files[0], **params)
    assert_same(ours(files[0]), ref(files[0]))


def test_numeric_label_names_come_back_as_config_json_gives_them(tmp_path):
    """config.json may name labels by numbers ({"0": 5, ...}); transformers returns them unchanged (an int
    stays an int), and so does lightpipe."""
    folder = tiny_vision_checkpoint(tmp_path, "vit", "image-classification", labels=LABELS)
    image = smooth_image(40, 50, seed=1)
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {str(i): 10 + i for i in range(len(LABELS))}
    (folder / "config.json").write_text(json.dumps(config))
    ours = pipeline("image-classification", model=str(folder))(image, top_k=4)
    ref = transformers.pipeline("image-classification", model=str(folder))(image, top_k=4)
    assert all(type(d["label"]) is int for d in ours)
    assert_same(ours, ref)

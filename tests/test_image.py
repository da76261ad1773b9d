"""Image loading and preprocessing: parity with transformers' PIL-backend image processors, and bad inputs."""

import base64
import http.server
import io
import json
import socket
import struct
import sys
import threading
import time
import zlib

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers.image_utils import load_image as ref_load_image

from lightpipe import InvalidInput, MissingDependency
from lightpipe.processing.image import ImageProcessor
from lightpipe.processing.image_io import MAX_IMAGE_PIXELS, load_image
from server_helpers import close_at_once, raw_server, stall, trickle
from vision_helpers import exif_rotated_jpeg, image_bytes, sample_files, smooth_image

SIZES = [(224, 224), (37, 53), (480, 640), (640, 480), (301, 199), (1, 5), (10, 300), (23, 23)]

# name -> transformers processor class, settings
PROCESSORS = {
    "vit": ("ViTImageProcessor", {}),
    "vit-shortest-edge": ("ViTImageProcessor", {"size": {"shortest_edge": 50}}),
    "vit-shortest-longest": ("ViTImageProcessor", {"size": {"shortest_edge": 40, "longest_edge": 60}}),
    "vit-nearest-no-normalize": ("ViTImageProcessor", {"resample": 0, "do_normalize": False, "size": {"height": 30, "width": 20}}),
    "vit-no-rescale": ("ViTImageProcessor", {"do_rescale": False, "image_mean": [100.0, 120.0, 90.0], "image_std": [50.0, 60.0, 70.0]}),
    "deit": ("DeiTImageProcessor", {}),
    "deit-crop-larger-than-image": ("DeiTImageProcessor", {"size": {"height": 100, "width": 120},
                                                           "crop_size": {"height": 131, "width": 90}}),
    "beit": ("BeitImageProcessor", {}),
    "beit-center-crop": ("BeitImageProcessor", {"do_center_crop": True, "size": {"height": 64, "width": 72},
                                                "crop_size": {"height": 48, "width": 48}}),
    "convnext-crop-pct": ("ConvNextImageProcessor", {"size": {"shortest_edge": 224}}),
    "convnext-crop-pct-odd": ("ConvNextImageProcessor", {"size": {"shortest_edge": 61}, "crop_pct": 0.9}),
    "convnext-384-warp": ("ConvNextImageProcessor", {}),
    "clip": ("CLIPImageProcessor", {}),
    "bit": ("BitImageProcessor", {"size": {"shortest_edge": 40}, "crop_size": {"height": 36, "width": 36}}),
    "clip-lanczos": ("CLIPImageProcessor", {"resample": 1, "size": {"shortest_edge": 33},
                                            "crop_size": {"height": 33, "width": 30}}),
}


@pytest.fixture(scope="module")
def processor_folders(tmp_path_factory):
    folders = {}
    for name, (cls, settings) in PROCESSORS.items():
        folder = tmp_path_factory.mktemp(name)
        getattr(transformers, cls)(**settings).save_pretrained(str(folder))
        folders[name] = folder
    return folders


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return sample_files(tmp_path_factory.mktemp("images"))


def assert_same_pixels(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4):
    assert tuple(ours.shape) == tuple(ref.shape)
    assert ours.dtype == torch.float32
    assert (ours - ref.float()).abs().max().item() <= tol


# ---------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("name", list(PROCESSORS))
def test_processor_parity_sizes_and_modes(processor_folders, name):
    folder = processor_folders[name]
    ours = ImageProcessor.from_folder(folder)
    ref = transformers.AutoImageProcessor.from_pretrained(str(folder))
    assert type(ref).__name__.endswith("Pil")  # the backend this environment gives: the one we match
    for i, (h, w) in enumerate(SIZES):
        for mode in ("RGB", "RGBA", "L", "P"):
            image = smooth_image(h, w, seed=i, mode=mode)
            expected = ref(ref_load_image(image), return_tensors="pt")["pixel_values"][0]
            assert_same_pixels(ours(load_image(image))["pixel_values"], expected)
            if ours.do_convert_rgb:  # the processor's own RGB conversion: transparency onto white
                assert_same_pixels(ours(image)["pixel_values"], ref(image, return_tensors="pt")["pixel_values"][0])


@pytest.mark.parametrize("name", ["vit", "deit", "convnext-crop-pct", "clip"])
def test_processor_parity_files(processor_folders, files, name):
    folder = processor_folders[name]
    ours, ref = ImageProcessor.from_folder(folder), transformers.AutoImageProcessor.from_pretrained(str(folder))
    for path in files:
        expected = ref(ref_load_image(str(path)), return_tensors="pt")["pixel_values"][0]
        assert_same_pixels(ours(load_image(str(path)))["pixel_values"], expected)


def test_batched_call_equals_single(processor_folders, files):
    ours = ImageProcessor.from_folder(processor_folders["deit"])
    images = [load_image(str(p)) for p in files]
    batch = ours(images)["pixel_values"]
    assert batch.shape == (len(images), 3, 224, 224)
    for row, image in zip(batch, images):
        assert torch.equal(row, ours(image)["pixel_values"])
    ref = transformers.AutoImageProcessor.from_pretrained(str(processor_folders["deit"]))
    assert_same_pixels(batch, ref(images, return_tensors="pt")["pixel_values"])


def test_uneven_batch_is_refused(processor_folders):
    ours = ImageProcessor.from_folder(processor_folders["vit-shortest-edge"])
    with pytest.raises(InvalidInput, match="different sizes"):
        ours([smooth_image(50, 80), smooth_image(80, 50)])


def test_processor_config_json_layout(tmp_path):
    """transformers 5 saves a processor (image processor + tokenizer) as processor_config.json."""
    settings = {"size": {"shortest_edge": 40}, "crop_size": {"height": 36, "width": 36}}
    transformers.CLIPImageProcessor(**settings).save_pretrained(str(tmp_path / "plain"))
    raw = json.loads((tmp_path / "plain" / "preprocessor_config.json").read_text())
    (tmp_path / "v5").mkdir()
    (tmp_path / "v5" / "processor_config.json").write_text(json.dumps({"image_processor": raw,
                                                                          "processor_class": "CLIPProcessor"}))
    ours = ImageProcessor.from_folder(tmp_path / "v5")
    assert ours == ImageProcessor.from_folder(tmp_path / "plain")
    ref = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "plain"))
    image = smooth_image(70, 50)
    assert_same_pixels(ours(image)["pixel_values"], ref(image, return_tensors="pt")["pixel_values"][0])


@pytest.mark.parametrize("raw, model_type", [
    # Hub configs written before image processors existed: int sizes, feature_extractor_type, missing keys.
    ({"feature_extractor_type": "ViTFeatureExtractor", "size": 48, "do_normalize": True, "resample": 2}, "vit"),
    ({"feature_extractor_type": "DeiTFeatureExtractor", "size": 40, "crop_size": 32, "do_center_crop": True}, "deit"),
    ({"feature_extractor_type": "CLIPFeatureExtractor", "size": 36, "crop_size": 30}, "clip"),
    ({"feature_extractor_type": "ConvNextFeatureExtractor", "size": 64, "crop_pct": 0.8}, "convnext"),
    ({"image_processor_type": "BeitImageProcessorFast", "size": {"height": 40, "width": 40}}, "beit"),
    ({"do_resize": True, "size": {"height": 24, "width": 24}}, "swin"),  # the type comes from config.json
])
def test_legacy_configs_take_class_defaults(tmp_path, raw, model_type):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(raw))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    ours = ImageProcessor.from_folder(tmp_path)
    ref = transformers.AutoImageProcessor.from_pretrained(str(tmp_path))
    for h, w in [(50, 90), (90, 50), (30, 30)]:
        image = smooth_image(h, w)
        assert_same_pixels(ours(image)["pixel_values"], ref(image, return_tensors="pt")["pixel_values"][0])


def test_with_options(processor_folders):
    base = ImageProcessor.from_folder(processor_folders["vit"])
    small = base.with_options(size={"height": 16, "width": 20})
    assert small(smooth_image(40, 40))["pixel_values"].shape == (3, 16, 20)
    assert base.size == {"height": 224, "width": 224}  # unchanged
    with pytest.raises(InvalidInput, match="unknown image processor option"):
        base.with_options(flip=True)
    with pytest.raises(InvalidInput):
        base.with_options(size={"depth": 3})


def test_missing_settings_file(tmp_path):
    with pytest.raises(Exception, match="preprocessor_config.json"):
        ImageProcessor.from_folder(tmp_path)


# ---------------------------------------------------------------------------------------------- loading

def test_load_image_forms_agree(tmp_path):
    image = smooth_image(30, 41)
    path = tmp_path / "x.png"
    image.save(path)
    data = path.read_bytes()
    encoded = base64.b64encode(data).decode()
    expected = np.array(ref_load_image(str(path)))
    for form in (str(path), path, data, bytearray(data), encoded, "data:image/png;base64," + encoded,
                 encoded[:40] + "\n" + encoded[40:], image, np.array(image), np.array(image).transpose(2, 0, 1),
                 torch.from_numpy(np.array(image)), np.array(image).astype(np.float32),
                 np.array(image).astype(np.float64) / 255):
        loaded = load_image(form)
        assert loaded.mode == "RGB" and loaded.size == (41, 30)
        got = np.array(loaded)
        if isinstance(form, np.ndarray) and form.dtype == np.float64:  # 0..1 floats: truncated to bytes
            assert np.abs(got.astype(int) - expected).max() <= 1
        else:
            assert np.array_equal(got, expected), type(form)


def test_load_image_grayscale_and_rgba_arrays():
    gray = np.array(smooth_image(20, 30, mode="L"))
    assert np.array_equal(np.array(load_image(gray)), np.repeat(gray[:, :, None], 3, axis=-1))
    rgba = np.array(smooth_image(20, 30, mode="RGBA"))
    alpha = rgba[..., 3:4] / 255
    expected = np.round(alpha * rgba[..., :3] + (1 - alpha) * 255).astype(np.uint8)  # onto white
    assert np.array_equal(np.array(load_image(rgba)), expected)


def test_exif_orientation_is_applied(tmp_path):
    path = exif_rotated_jpeg(tmp_path / "r.jpg", orientation=6, size=(48, 30))
    loaded = load_image(str(path))
    assert loaded.size == (30, 48)  # rotated a quarter turn
    assert np.array_equal(np.array(loaded), np.array(ref_load_image(str(path))))
    opened = Image.open(path)
    assert np.array_equal(np.array(load_image(opened)), np.array(loaded))
    assert opened.size == (48, 30)  # a caller's image is not changed in place


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but holds almost no data: a decompression bomb's header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [20000, 10000])  # above Pillow's hard limit, and between its warning and hard limit
def test_decompression_bomb_refused_fast(tmp_path, side):
    assert side * side > MAX_IMAGE_PIXELS
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(side, side))
    start = time.perf_counter()
    with pytest.raises(InvalidInput, match="too large|more than"):
        load_image(str(path))
    with pytest.raises(InvalidInput):
        load_image(path.read_bytes())
    assert time.perf_counter() - start < 1.0


def test_bad_files(tmp_path):
    good = image_bytes(smooth_image(64, 64), "JPEG")
    cases = {
        "truncated.jpg": (good[: len(good) // 2], "truncated|decoded"),
        "empty.png": (b"", "empty"),
        "text.png": (b"this is not an image at all", "not an image"),
        "random.bin": (bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8)), "not an image"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InvalidInput, match=message):
            load_image(str(tmp_path / name))
        with pytest.raises(InvalidInput):
            load_image(data)
    with pytest.raises(InvalidInput, match="neither an existing file"):
        load_image(str(tmp_path / "missing.jpg"))
    with pytest.raises(InvalidInput, match="folder"):
        load_image(str(tmp_path))
    with pytest.raises(InvalidInput, match="not valid base64|not an image"):
        load_image("data:image/png;base64,@@@@")
    for bad in (None, 3, {"image": "x"}, np.zeros((2, 3, 4, 5), np.uint8), np.zeros((5, 6, 7), np.uint8),
                np.full((4, 4, 3), 300.0), np.full((4, 4, 3), np.nan), np.zeros((0, 4, 3), np.uint8)):
        with pytest.raises(InvalidInput):
            load_image(bad)


def test_missing_pillow_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(MissingDependency, match=r"lightpipe\[vision\]"):
        load_image(b"\x89PNG")


# ---------------------------------------------------------------------------------------------- URLs

@pytest.fixture(scope="module")
def image_server():
    """http://127.0.0.1:port/ serving /image.png and 404 elsewhere."""
    body = image_bytes(smooth_image(20, 25), "PNG")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/image.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", body
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("behaviour, timeout", [(close_at_once, 2.0), (stall, 0.5), (trickle, 0.6)])
def test_unreachable_urls_fail_within_the_timeout(behaviour, timeout):
    url, stop = raw_server(behaviour)
    try:
        start = time.perf_counter()
        with pytest.raises(InvalidInput, match="fetching"):
            load_image(url, timeout=timeout)
        assert time.perf_counter() - start < timeout + 1.0
    finally:
        stop()


def test_refused_connection():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with pytest.raises(InvalidInput, match="fetching"):
        load_image(f"http://127.0.0.1:{port}/x.png", timeout=2)

"""Image inputs of the vision pipelines against transformers: file objects (in zero-shot and document QA too),
data: URIs, base64 padding and alphabets, whitespace, file:// and URL spelling, malformed HTTP answers, closed
and empty PIL images, and numpy arrays and tensors of every layout and dtype.

Where transformers itself fails on an input, the test says so and checks lightpipe's sensible answer (the
answer for the same image given as a path) or its InvalidInput.
"""

from __future__ import annotations

import base64
import functools
import http.server
import io
import threading
import urllib.parse

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from clip_helpers import sample_images, tiny_clip_checkpoint
from layoutlm_helpers import assert_same as assert_same_answers
from layoutlm_helpers import layoutlm_checkpoint, render_page
from lightpipe import InvalidInput, pipeline
from server_helpers import raw_server
from vision_helpers import image_bytes, smooth_image, tiny_vision_checkpoint

ATOL = 1e-4
LABELS = ["cat", "dog", "bird", "fish"]
QUESTION = "What is the invoice number?"


def reference(task, folder):
    transformers.logging.set_verbosity_error()
    return transformers.pipeline(task, model=str(folder))


def assert_same(ours, ref, tol=ATOL):
    """Classification answers: labels and their order equal, scores within tol."""
    if isinstance(ref, list) and ref and isinstance(ref[0], list):
        assert isinstance(ours, list) and len(ours) == len(ref)
        for o, r in zip(ours, ref):
            assert_same(o, r, tol)
        return
    assert isinstance(ours, list), type(ours)
    assert [d["label"] for d in ours] == [d["label"] for d in ref]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(ours, ref)) <= tol


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    folder = tiny_vision_checkpoint(tmp_path_factory.mktemp("vit"), "vit", "image-classification", labels=LABELS)
    return pipeline("image-classification", model=str(folder)), reference("image-classification", folder)


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    """A PNG file, its bytes, and the answer transformers gives for its path."""
    path = tmp_path_factory.mktemp("picture") / "picture.png"
    smooth_image(40, 52, seed=4).save(path)
    return path, path.read_bytes()


# ---------------------------------------------------------------------------------------------- file objects
def test_open_file_objects_are_one_image(vit, picture):
    # A file object is an iterator (of lines), so lightpipe used to take it for a stream of inputs and
    # returned a generator whose items failed. transformers refuses file objects (TypeError).
    ours, ref = vit
    path, data = picture
    want = ref(str(path))
    assert_same(ours(io.BytesIO(data)), want)
    with open(path, "rb") as f:
        assert_same(ours(f), want)
    assert_same(ours([io.BytesIO(data), str(path)], batch_size=2), [want, want])
    assert_same(list(ours(iter([io.BytesIO(data)]))), [want])  # inside a stream, one image each
    with pytest.raises(InvalidInput, match="binary mode"):
        with open(path, encoding="latin-1") as f:
            ours(f)
    written = io.BytesIO()
    written.write(data)
    with pytest.raises(InvalidInput, match="seek"):  # left at its end after writing
        ours(written)
    assert_same(ours(str(path)), want)


def test_file_objects_in_zero_shot_and_document_qa(tmp_path):
    clip = tiny_clip_checkpoint(tmp_path / "clip", seed=3)
    image = sample_images(1, seed=2)[0]
    data = image_bytes(image, "PNG")
    zero_shot = pipeline("zero-shot-image-classification", model=str(clip))
    assert_same(zero_shot(io.BytesIO(data), candidate_labels=LABELS),
                reference("zero-shot-image-classification", clip)(image, candidate_labels=LABELS))

    docqa_folder = layoutlm_checkpoint(tmp_path / "docqa", "bert")
    page, _, _ = render_page()
    page_png = image_bytes(page, "PNG")
    docqa = pipeline("document-question-answering", model=str(docqa_folder))
    want = reference("document-question-answering", docqa_folder)(image=page, question=QUESTION, top_k=2)
    assert_same_answers(docqa(io.BytesIO(page_png), QUESTION, top_k=2), want)
    assert_same_answers(docqa({"image": io.BytesIO(page_png), "question": QUESTION}, top_k=2), want)


# ---------------------------------------------------------------------------------------------- strings
def test_data_uri_without_the_base64_marker(vit, picture):
    # transformers reads what follows the comma of data:image/...,<data> as base64 whether or not the URI
    # says ";base64"; lightpipe refused it. Percent-encoded bytes (RFC 2397's plain form) load too.
    ours, ref = vit
    path, data = picture
    encoded = base64.b64encode(data).decode()
    assert_same(ours("data:image/png," + encoded), ref("data:image/png," + encoded))
    want = ref(str(path))
    assert_same(ours("data:image/png," + urllib.parse.quote_from_bytes(data)), want)
    assert_same(ours("DATA:image/png;BASE64," + encoded), want)  # schemes are case-insensitive (transformers fails)
    assert_same(ours("data:application/octet-stream;base64," + encoded), want)  # transformers fails: not data:image/
    with pytest.raises(InvalidInput, match="comma"):
        ours("data:image/png;base64")


def test_base64_padding_and_alphabet(vit, picture):
    ours, ref = vit
    path, data = picture
    encoded = base64.b64encode(data).decode()
    # transformers' decoder ignores excess padding; lightpipe refused it ("Excess data after padding").
    assert_same(ours(encoded + "=="), ref(encoded + "=="))
    want = ref(str(path))
    # The URL-safe alphabet: transformers drops "-" and "_" and fails on the corrupt stream; it is the same image.
    assert_same(ours(base64.urlsafe_b64encode(data).decode()), want)
    assert_same(ours(base64.encodebytes(data).decode()), ref(base64.encodebytes(data).decode()))  # wrapped lines


def test_missing_padding_decodes(vit):
    # Encoders that strip the "=" padding (JWT-style): transformers fails ("Incorrect padding").
    ours, _ = vit
    paddings = set()
    for width in (40, 41, 42, 43):
        encoded = base64.b64encode(image_bytes(smooth_image(33, width, seed=width), "PNG")).decode()
        paddings.add(len(encoded) - len(encoded.rstrip("=")))
        assert_same(ours(encoded.rstrip("=")), ours(encoded))
    assert paddings >= {1, 2}


def test_paths_with_whitespace_and_file_uris(vit, picture, tmp_path):
    # transformers fails on all of these ("Incorrect image source"): a path read from a line keeps its
    # newline, a file:// URI names a local file. A file whose name really ends in a space is still found.
    ours, ref = vit
    path, _ = picture
    want = ref(str(path))
    for form in (f"{path}\n", f"  {path} ", path.as_uri(), "file://localhost" + str(path)):
        assert_same(ours(form), want)
    spaced = tmp_path / "spaced.png "
    smooth_image(30, 30, seed=9).save(spaced, format="PNG")
    assert_same(ours(str(spaced)), ref(str(spaced)))
    with pytest.raises(InvalidInput, match="another host"):
        ours("file://elsewhere" + str(path))
    with pytest.raises(InvalidInput, match="not an existing file"):
        ours((tmp_path / "missing.png").as_uri())


@pytest.fixture(scope="module")
def image_server(picture):
    folder = picture[0].parent
    (folder / "with space.png").write_bytes(picture[1])

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_urls_with_spaces_and_uppercase_schemes(vit, image_server):
    # http.client refused the raw space with its own InvalidURL (not an InvalidInput); transformers' httpx
    # percent-encodes it and fetches the image.
    ours, ref = vit
    url = image_server + "/with space.png"
    want = ref(url, timeout=10)
    assert_same(ours(url, timeout=10), want)
    assert_same(ours(image_server + "/with%20space.png", timeout=10), want)
    assert_same(ours(" " + url.replace("http://", "HTTP://") + "\n", timeout=10), want)  # transformers fails


def _not_http(conn, stop):
    conn.recv(1024)
    conn.sendall(b"NOT HTTP AT ALL\r\n\r\n")
    conn.close()


def test_malformed_http_response_is_invalid_input(vit, picture):
    # http.client's BadStatusLine (an HTTPException, not an OSError) used to escape as itself.
    ours, ref = vit
    url, stop = raw_server(_not_http)
    try:
        with pytest.raises(InvalidInput, match="fetching"):
            ours(url, timeout=5)
    finally:
        stop()
    assert_same(ours(str(picture[0])), ref(str(picture[0])))


# ---------------------------------------------------------------------------------------------- PIL images
def test_closed_and_empty_pil_images_are_invalid_input(vit, picture):
    # A closed RGB image passed through unread and failed in the resize with a bare ValueError; a 0 x 0 one
    # with ZeroDivisionError. transformers fails on both with the same bare errors.
    ours, ref = vit
    closed = smooth_image(30, 30)
    closed.close()
    with pytest.raises(InvalidInput, match="closed"):
        ours(closed)
    with pytest.raises(InvalidInput, match="no pixels"):
        ours(Image.new("RGB", (0, 5)))
    with pytest.raises(InvalidInput):
        ours([smooth_image(30, 30), closed], batch_size=2)
    assert_same(ours(str(picture[0])), ref(str(picture[0])))


# ---------------------------------------------------------------------------------------------- arrays
def test_array_forms(vit):
    """transformers hands arrays straight to its image processor: uint8 (H, W, 3) or (3, H, W), integer
    floats, bool (read as 0 and 1) and tensors agree with it."""
    ours, ref = vit
    rgb = np.array(smooth_image(40, 50, seed=5))
    for array in (rgb, rgb.transpose(2, 0, 1).copy(), rgb.astype(np.float32), rgb.astype(np.int64), rgb > 120,
                  torch.from_numpy(rgb), rgb[:3, :3].copy(), rgb[:, ::2]):
        assert_same(ours(array, top_k=4), ref(array, top_k=4))


def test_arrays_transformers_refuses(vit):
    """(1, N, 3), (1, 1, 3) and (4, N, 3) arrays are RGB images (transformers takes their first axis for
    1 or 4 channels and fails on the 3-channel normalisation); greyscale and RGBA arrays, which it also
    refuses, read as their PIL images do (RGBA composited onto white)."""
    ours, ref = vit
    rgb = np.array(smooth_image(40, 50, seed=6))
    for array in (rgb[:1], rgb[:1, :1], rgb[:4]):
        assert_same(ours(array.copy()), ref(Image.fromarray(array.copy())))
    gray = np.array(smooth_image(40, 50, seed=7, mode="L"))
    for array in (gray, gray[:, :, None], gray[None]):
        assert_same(ours(array), ref(Image.fromarray(gray)))
    rgba = np.array(smooth_image(40, 50, seed=8, mode="RGBA"))
    white = Image.alpha_composite(Image.new("RGBA", (50, 40), (255,) * 4), Image.fromarray(rgba)).convert("RGB")
    assert_same(ours(rgba), ref(white), tol=2e-2)  # compositing rounds a little differently


def test_float_arrays_in_0_1_are_intensities(vit):
    """A deliberate difference: transformers 5 rescales float images in 0..1 twice (once converting them to
    PIL for resizing, once more by rescale_factor), so the model sees a nearly black image. lightpipe
    reads them as intensities: the answer is that of the same image in bytes (within byte truncation)."""
    ours, ref = vit
    rgb = np.array(smooth_image(40, 50, seed=9))
    floats = rgb.astype(np.float32) / 255
    bytes_back = (floats * 255).astype(np.uint8)  # what truncation to bytes gives
    assert_same(ours(floats), ref(bytes_back))
    assert_same(ours(torch.from_numpy(floats)), ref(bytes_back))


def test_bad_arrays_then_still_answers(vit):
    ours, ref = vit
    rgb = np.array(smooth_image(20, 20))
    for bad in (rgb.astype(np.uint16) * 257, rgb[..., :2], np.zeros((0, 4, 3), np.uint8), rgb.astype(np.complex64),
                np.full((4, 4, 3), np.nan, np.float32), np.zeros((2, 4, 4, 3), np.uint8)):
        with pytest.raises(InvalidInput):
            ours(bad)
    assert_same(ours(rgb), ref(rgb))

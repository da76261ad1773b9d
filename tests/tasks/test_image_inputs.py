"""A second acceptance audit of the vision pipelines against transformers: image input forms (file objects,
data: URIs, base64 padding, whitespace, file:// and URL spelling), images and processor options that used to
fail with bare Python errors, CLIP and DeiT checkpoint variants, and OCR options of document QA.

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
from PIL import Image

from clip_helpers import randomize_clip, sample_images, tiny_clip_checkpoint
from layoutlm_helpers import assert_same as assert_same_answers
from layoutlm_helpers import layoutlm_checkpoint, render_page
from lightpipe import InvalidInput, pipeline
from server_helpers import raw_server
from vision_helpers import image_bytes, smooth_image, tiny_vision_checkpoint

ATOL = 1e-4
LABELS = ["cat", "dog", "bird"]
QUESTION = "What is the invoice number?"


def reference(task, folder):
    import transformers

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


# ---------------------------------------------------------------------------------------------- processor options
def test_bad_numeric_processor_options_are_invalid_input(tmp_path, picture):
    # rescale_factor="a" failed with float()'s ValueError, crop_pct=0 with ZeroDivisionError in preprocessing.
    folder = tiny_vision_checkpoint(tmp_path, "convnext", "base")
    ours, ref = pipeline("image-feature-extraction", model=str(folder)), reference("image-feature-extraction", folder)
    for options in ({"rescale_factor": "a"}, {"rescale_factor": [1]}, {"crop_pct": 0}, {"crop_pct": "0.9"},
                    {"crop_pct": -1.0}):
        with pytest.raises(InvalidInput, match="positive number"):
            ours(str(picture[0]), image_processor_kwargs=options)
    options = {"crop_pct": 0.5, "rescale_factor": 1 / 127.5}
    got = ours(str(picture[0]), image_processor_kwargs=options)
    want = ref(str(picture[0]), image_processor_kwargs=options)
    assert np.abs(np.asarray(got) - np.asarray(want)).max() <= ATOL


# ---------------------------------------------------------------------------------------------- checkpoints
CLIP_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                   patch_size=8, projection_dim=16)


@pytest.mark.parametrize("cls, overrides", [
    ("CLIPVisionModel", dict(hidden_act="gelu", image_size=30, patch_size=8)),
    ("CLIPVisionModelWithProjection", dict(hidden_act="gelu_new", image_size=24, patch_size=6, num_hidden_layers=3,
                                           projection_dim=8)),
    ("CLIPVisionModel", dict(image_size=32, patch_size=32, hidden_size=48, num_attention_heads=3, layer_norm_eps=1e-3)),
])
def test_clip_vision_config_variants_equal_transformers(tmp_path, cls, overrides):
    import transformers

    config = transformers.CLIPVisionConfig(**{**CLIP_VISION, **overrides})
    torch.manual_seed(0)
    randomize_clip(getattr(transformers, cls)(config), 0).save_pretrained(str(tmp_path))
    size = config.image_size
    transformers.CLIPImageProcessor(size={"shortest_edge": size},
                                    crop_size={"height": size, "width": size}).save_pretrained(str(tmp_path))
    ours, ref = pipeline(model=str(tmp_path)), reference("image-feature-extraction", tmp_path)
    assert ours.task == "image-feature-extraction"
    images = sample_images(3, seed=6)
    for pool in (False, True):
        for got, want in zip(ours(images, pool=pool, batch_size=2), ref(images, pool=pool)):
            got, want = np.asarray(got), np.asarray(want)
            assert got.shape == want.shape and np.abs(got - want).max() <= ATOL


def test_distilled_deit_on_a_non_square_grid_equals_transformers(tmp_path):
    folder = tiny_vision_checkpoint(tmp_path, "deit", "image-classification-with-teacher", num_labels=4,
                                    image_size=[32, 48], patch_size=8,
                                    processor=dict(size={"height": 40, "width": 56},
                                                   crop_size={"height": 32, "width": 48}))
    ours, ref = pipeline(model=str(folder)), reference("image-classification", folder)
    assert ours.task == "image-classification"
    images = sample_images(3, seed=8)
    assert_same(ours(images, top_k=4, batch_size=3), ref(images, top_k=4))
    assert_same(ours(images, function_to_apply="none"), ref(images, function_to_apply="none"))


# ---------------------------------------------------------------------------------------------- document QA OCR
def test_empty_ocr_language_is_invalid_input(tmp_path):
    # Tesseract crashes on an empty -l: transformers raises TesseractError(-11, ...), lightpipe said "Tesseract
    # failed on this image"; the page is fine, the option is not.
    folder = layoutlm_checkpoint(tmp_path, "bert")
    ours, ref = pipeline("document-question-answering", model=str(folder)), reference("document-question-answering",
                                                                                       folder)
    page, _, _ = render_page()
    for lang in ("", "  "):
        with pytest.raises(InvalidInput, match="lang"):
            ours(page, QUESTION, lang=lang)
    assert_same_answers(ours(page, QUESTION, lang="eng", top_k=2), ref(page, QUESTION, lang="eng", top_k=2))

"""OCR: words and 0-1000 boxes read by Tesseract from a rendered page, equal to transformers' apply_tesseract."""

from __future__ import annotations

import sys

import pytest

from layoutlm_helpers import render_page
from lightpipe import InvalidInput, MissingDependency
from lightpipe.processing import ocr

BOX_TOLERANCE = 10  # grid units (1 % of the page): Tesseract's boxes hug the ink, PIL's include the line's ascent


@pytest.fixture(scope="module")
def page():
    return render_page()


@pytest.fixture(scope="module")
def read(page):
    """ocr_words on the page, through pytesseract (installed in the test environment)."""
    return ocr.ocr_words(page[0])


def without_pytesseract(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytesseract", None)  # `import pytesseract` now raises ImportError


def test_words_in_reading_order_with_boxes_on_the_grid(page, read):
    image, expected_words, pixel_boxes = page
    words, boxes = read
    assert len(words) == len(boxes)
    # Every rendered word is read, in order (a stray mark read as a word would not break this).
    position = 0
    for word, pixels in zip(expected_words, pixel_boxes):
        assert word in words[position:], f"{word!r} not read after position {position}: {words}"
        position = words.index(word, position) + 1
        x0, y0, x1, y1 = boxes[position - 1]
        expected = ocr.normalize_box(pixels, *image.size)
        assert all(abs(a - b) <= BOX_TOLERANCE for a, b in zip((x0, y0, x1, y1), expected)), (word, boxes[position - 1],
                                                                                            expected)
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 <= x1 <= 1000 and 0 <= y0 <= y1 <= 1000


def test_equals_transformers_apply_tesseract(page, read):
    from transformers.pipelines.document_question_answering import apply_tesseract

    words, boxes = apply_tesseract(page[0], lang=None, tesseract_config="")
    assert read == (words, boxes)


def test_jpeg_file_equals_transformers_load_image_and_apply_tesseract(page, tmp_path):
    """A page decoded from JPEG is OCR'd as transformers does it: upright RGB, handed to Tesseract losslessly."""
    from transformers.image_utils import load_image
    from transformers.pipelines.document_question_answering import apply_tesseract

    path = tmp_path / "page.jpg"
    page[0].save(path, quality=70)
    words, boxes = ocr.ocr_words(str(path))
    assert (words, boxes) == apply_tesseract(load_image(str(path)), lang=None, tesseract_config="")
    assert "US-001" in words


def test_tesseract_program_without_pytesseract_gives_the_same(page, read, monkeypatch):
    without_pytesseract(monkeypatch)
    assert ocr.ocr_words(page[0]) == read


def test_normalize_box_equals_reference():
    from transformers.pipelines.document_question_answering import normalize_box

    for box, size in [((0, 0, 10, 10), (640, 480)), ((13, 7, 333, 101), (333, 101)), ((1, 2, 3, 4), (7, 3))]:
        assert ocr.normalize_box(box, *size) == normalize_box(list(box), *size)


TSV = ("level\tpage_num\tleft\ttop\twidth\theight\tconf\ttext\n"
       "1\t1\t0\t0\t100\t50\t-1\t\n"
       "5\t1\t10\t20\t30\t30\t96.5\tHello\n"
       "5\t1\t50\t20\t30\t40\t91\t")  # the last row's empty text cell is missing


def test_parse_tsv_reads_tesseract_rows():
    table = ocr.parse_tsv(TSV)
    assert table["text"] == ["", "Hello", ""]
    assert table["conf"] == [-1, 96, 91]
    assert ocr.parse_tsv("level\ttext\n") == {}


def test_tesseract_rows_become_words_and_grid_boxes(monkeypatch, tmp_path):
    """A stand-in `tesseract` program on PATH writes TSV rows; ocr_words keeps the non-empty words, with boxes
    scaled to the 0-1000 grid of the (100 x 50) page."""
    from PIL import Image

    program = tmp_path / "tesseract"
    program.write_text(f"#!{sys.executable}\nimport sys\nopen(sys.argv[2] + '.tsv', 'w').write({TSV!r})\n")
    program.chmod(0o755)
    without_pytesseract(monkeypatch)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert ocr.ocr_words(Image.new("RGB", (100, 50), "white")) == (["Hello"], [[100, 400, 400, 1000]])


def test_missing_tesseract_program_with_pytesseract(page, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no tesseract to run
    with pytest.raises(MissingDependency, match="apt-get install tesseract-ocr") as info:
        ocr.ocr_words(page[0])
    assert "lightpipe[ocr]" in str(info.value) and "word_boxes" in str(info.value)


def test_missing_tesseract_without_pytesseract(page, monkeypatch, tmp_path):
    without_pytesseract(monkeypatch)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no tesseract to run
    with pytest.raises(MissingDependency, match="apt-get install tesseract-ocr") as info:
        ocr.ocr_words(page[0])
    assert "lightpipe[ocr]" in str(info.value) and "word_boxes" in str(info.value)


@pytest.mark.parametrize("with_pytesseract", [True, False])
def test_unknown_language_is_invalid_input(page, monkeypatch, with_pytesseract):
    if not with_pytesseract:
        without_pytesseract(monkeypatch)
    with pytest.raises(InvalidInput, match="language 'qqq'"):
        ocr.ocr_words(page[0], lang="qqq")


def test_bad_arguments_are_invalid_input(page):
    with pytest.raises(InvalidInput, match="lang"):
        ocr.ocr_words(page[0], lang=3)
    with pytest.raises(InvalidInput, match="tesseract_config"):
        ocr.ocr_words(page[0], tesseract_config=["--psm", "6"])
    with pytest.raises(InvalidInput):
        ocr.ocr_words(b"not an image at all")


@pytest.mark.parametrize("with_pytesseract", [True, False])
def test_bad_tesseract_flags_are_invalid_input_naming_them(page, monkeypatch, with_pytesseract):
    # Tesseract exits with status 1 and no message on some bad flags (transformers raises TesseractError(1, '')).
    if not with_pytesseract:
        without_pytesseract(monkeypatch)
    with pytest.raises(InvalidInput, match=r"tesseract_config='--psm 99'.*without a message"):
        ocr.ocr_words(page[0], tesseract_config="--psm 99")

"""Words and their boxes from a page image, through Tesseract OCR.

`ocr_words(image)` returns the words Tesseract reads, in its reading order, each with its box
(x0, y0, x1, y1) on a 0-1000 grid of the page: x scaled by the image width, y by its height,
truncated to integers. This is the input LayoutLM expects, and the same words and boxes that
transformers' document-question-answering pipeline computes.

Tesseract runs through pytesseract when it is installed, else by calling the `tesseract` program
directly with the same arguments and reading its TSV output the same way.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from typing import Any

from ..errors import InvalidInput, MissingDependency

GRID = 1000  # boxes are given on a GRID x GRID page, whatever the image size
TESSERACT = "tesseract"  # the program's name on PATH
TSV_TEXT_COLUMN = "text"

INSTALL_HINT = (
    "Tesseract OCR is needed to read words from an image but it is not installed. Install the program "
    "(Debian/Ubuntu: apt-get install tesseract-ocr; macOS: brew install tesseract) and, optionally, the "
    "Python wrapper with pip install 'lightpipe[ocr]'. Or skip OCR: pass the document's words yourself as "
    "word_boxes=[(word, [x0, y0, x1, y1]), ...] with boxes on a 0-1000 grid."
)


def normalize_box(box: tuple[int, int, int, int], width: int, height: int) -> list[int]:
    """(x0, y0, x1, y1) in pixels -> the same box on the 0-1000 grid, truncated as the reference does."""
    x0, y0, x1, y1 = box
    return [int(GRID * (x0 / width)), int(GRID * (y0 / height)), int(GRID * (x1 / width)), int(GRID * (y1 / height))]


def ocr_words(image: Any, lang: str | None = None, tesseract_config: str = "") -> tuple[list[str], list[list[int]]]:
    """A page image -> (words, boxes): the non-empty words Tesseract reads, and their 0-1000 boxes.

    `image`: anything lightpipe.processing.image_io.load_image accepts (a PIL image, path, URL, bytes ...); it is
    read upright (EXIF orientation applied) and in RGB, as the document-question-answering pipeline reads it,
    and the boxes are relative to that upright page. `lang`: Tesseract language code(s), e.g. "eng" or
    "deu+eng" (Tesseract's default when None). `tesseract_config`: extra command-line flags for Tesseract,
    e.g. "--psm 6".
    Raises MissingDependency when Tesseract is not installed, InvalidInput when the image cannot be read or
    the language is not available.
    """
    from .image_io import load_image

    check_ocr_options(lang, tesseract_config)
    image = load_image(image)
    table = _run_tesseract(image, lang, tesseract_config or "")
    return _words_and_boxes(table, image.size)


def check_ocr_options(lang: Any, tesseract_config: Any) -> None:
    """InvalidInput unless `lang` is None or a language code and `tesseract_config` None or a string of flags; checked
    before any work (Tesseract crashes on an empty -l: transformers raises its TesseractError(-11, ...))."""
    if lang is not None and (not isinstance(lang, str) or not lang.strip()):
        raise InvalidInput(f"lang must be a Tesseract language code such as 'eng', not {lang!r}.")
    if tesseract_config is not None and not isinstance(tesseract_config, str):
        raise InvalidInput(f"tesseract_config must be a string of Tesseract flags, not {tesseract_config!r}.")


def _words_and_boxes(table: dict[str, list], size: tuple[int, int]) -> tuple[list[str], list[list[int]]]:
    """Tesseract's TSV columns -> the non-empty words and their boxes on the 0-1000 grid."""
    width, height = size
    words, boxes = [], []
    columns = (table.get(TSV_TEXT_COLUMN, []), table.get("left", []), table.get("top", []),
               table.get("width", []), table.get("height", []))
    for text, left, top, w, h in zip(*columns):
        text = str(text)
        if not text.strip():  # the rows of pages, blocks, paragraphs and lines have no text
            continue
        words.append(text)
        boxes.append(normalize_box((left, top, left + w, top + h), width, height))
    return words, boxes


def _run_tesseract(image, lang: str | None, config: str) -> dict[str, list]:
    try:
        import pytesseract
    except ImportError:
        return _run_tesseract_program(image, lang, config)
    try:
        # A copy: pytesseract writes its own attribute on the image, and saves it in the format it was decoded
        # from (a JPEG page would be re-compressed); a copy has no format, so it is saved as PNG, losslessly.
        return pytesseract.image_to_data(image.copy(), lang=lang, config=config, output_type=pytesseract.Output.DICT)
    except pytesseract.TesseractNotFoundError as e:
        raise MissingDependency(INSTALL_HINT) from e
    except pytesseract.TesseractError as e:
        raise _tesseract_failure(str(e.message), lang, config) from e
    except (TypeError, ValueError) as e:  # pytesseract's unsupported image types, shlex errors in config
        raise InvalidInput(f"Tesseract could not be run on this image: {e}") from e


def _tesseract_failure(message: str, lang: str | None, config: str = "") -> InvalidInput:
    message = message.strip()
    if lang is not None and "language" in message.lower():
        return InvalidInput(
            f"Tesseract cannot read language {lang!r} ({message}). Install its data (Debian/Ubuntu: "
            f"apt-get install tesseract-ocr-<code>) or pass a language listed by `tesseract --list-langs`."
        )
    # Tesseract stops without a word on some bad flags (e.g. --psm 99): name the flags, the likely cause.
    flags = f" with tesseract_config={config!r}" if config.strip() else ""
    return InvalidInput(f"Tesseract failed on this image{flags}: {message or 'it exited without a message'}")


# ---------------------------------------------------------------------------------------- without pytesseract
def _run_tesseract_program(image, lang: str | None, config: str) -> dict[str, list]:
    """Run the tesseract program as pytesseract does (an RGB PNG in, `-c tessedit_create_tsv=1`, TSV out)."""
    program = shutil.which(TESSERACT)
    if program is None:
        raise MissingDependency(INSTALL_HINT)
    try:
        flags = shlex.split(f"-c tessedit_create_tsv=1 {config.strip()}")
    except ValueError as e:
        raise InvalidInput(f"tesseract_config {config!r} is not a valid list of flags: {e}") from e
    with tempfile.TemporaryDirectory(prefix="lightpipe-ocr-") as folder:
        source, target = os.path.join(folder, "page.png"), os.path.join(folder, "page")
        image.save(source, format="PNG")
        command = [program, source, target] + (["-l", lang] if lang is not None else []) + flags
        try:
            done = subprocess.run(command, capture_output=True)
        except OSError as e:
            raise MissingDependency(INSTALL_HINT) from e
        if done.returncode != 0:
            raise _tesseract_failure(" ".join(done.stderr.decode("utf-8", "replace").splitlines()), lang, config)
        with open(target + ".tsv", encoding="utf-8") as f:
            return parse_tsv(f.read())


def parse_tsv(tsv: str) -> dict[str, list]:
    """Tesseract's TSV -> {column: values}; numbers as int, the last column (the text) as str.

    The last row may lack its text cell when the text is empty: it then counts as ""."""
    rows = [row.split("\t") for row in tsv.strip().split("\n")]
    if len(rows) < 2:
        return {}
    header, rows = rows[0], rows[1:]
    if len(rows[-1]) < len(header):
        rows[-1].append("")
    text_index = len(header) - 1
    table: dict[str, list] = {}
    for i, name in enumerate(header):
        table[name] = [row[i] if i == text_index else _number(row[i]) for row in rows if len(row) > i]
    return table


def _number(cell: str):
    try:
        return int(float(cell))
    except ValueError:
        return cell

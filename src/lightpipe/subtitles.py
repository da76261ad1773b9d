"""Subtitles from speech recognition results: SubRip (.srt), WebVTT (.vtt) and plain text.

    asr = lightpipe.pipeline("automatic-speech-recognition")
    result = asr("talk.mp3", return_timestamps="word")      # or return_timestamps=True (segments)
    open("talk.srt", "w").write(lightpipe.subtitles.to_srt(result))

A result is what the pipeline returns for one input: `{"text": ..., "chunks": [{"text", "timestamp": (start_s,
end_s)}]}`. Word chunks (one word each: Whisper's `return_timestamps="word"`, CTC's `"word"` or `"char"`) are
grouped into cues; segment chunks (Whisper's `return_timestamps=True`) give one cue each, split into several
when their text does not fit in one. Either way a cue holds at most `max_lines` lines (2) of at most
`max_line_length` characters (42, the usual broadcast limit), cues never overlap and each ends after it starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import InvalidInput

MAX_LINE_LENGTH = 42  # characters per line (the common broadcast / streaming guideline)
MAX_LINES = 2  # lines per cue
MAX_CUE_SECONDS = 7.0  # word cues: a longer cue is split (a reader needs the next one by then)
PAUSE_SECONDS = 1.0  # word cues: a silence this long between two words starts a new cue
READING_CPS = 15.0  # characters per second read: estimates the end of a last chunk whose end is None
MIN_CUE_SECONDS = 1.0  # the shortest estimated duration of such a chunk, or of a cue that had none
SENTENCE_ENDS = (".", "?", "!", "…", "。", "？", "！")

__all__ = ["Cue", "cues", "to_srt", "to_vtt", "to_txt", "FORMATS"]


@dataclass(frozen=True)
class Cue:
    """One subtitle: times in whole milliseconds (start < end), text with at most `max_lines` lines joined by "\\n"."""

    start_ms: int
    end_ms: int
    text: str


@dataclass
class _Word:
    text: str  # without surrounding whitespace
    start: float
    end: float
    space_before: bool  # whether a space separates it from the word before (when both share a line)
    break_after: bool = False  # a cue must end after this word (end of a segment)


# ---------------------------------------------------------------------------------------------- reading results
def _chunks(result: Any) -> list[dict]:
    if isinstance(result, list) and (not result or isinstance(result[0], dict) and "timestamp" in result[0]):
        return result  # the chunks themselves
    if isinstance(result, list):
        raise InvalidInput(f"subtitles are made from one speech recognition result at a time, got a list of "
                           f"{len(result)} results: convert each one.")
    if not isinstance(result, dict) or "text" not in result and "chunks" not in result:
        raise InvalidInput(f"expected a speech recognition result ({{'text', 'chunks'}}), got {type(result).__name__}.")
    chunks = result.get("chunks")
    if chunks is None:
        raise InvalidInput("this result has no timestamps (no 'chunks'): call the automatic-speech-recognition "
                           "pipeline with return_timestamps=True (segments) or return_timestamps='word'.")
    if not isinstance(chunks, list) or not all(isinstance(c, dict) and "timestamp" in c for c in chunks):
        raise InvalidInput("a result's 'chunks' must be a list of {'text', 'timestamp': (start, end)} dicts.")
    return chunks


def _time(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        raise InvalidInput(f"a chunk's {what} time must be a number of seconds >= 0 or None, got {value!r}.")
    return float(value)


def _spans(chunks: list[dict], duration: float | None) -> list[tuple[str, float, float]]:
    """Chunks -> (raw text, start, end) with every None filled: a missing start is the previous end (or 0), a
    missing end the next start, else `duration`, else a reading-time estimate."""
    spans = []
    previous_end = 0.0
    for i, chunk in enumerate(chunks):
        stamp = chunk["timestamp"]
        if not isinstance(stamp, (tuple, list)) or len(stamp) != 2:
            raise InvalidInput(f"a chunk's timestamp must be (start, end), got {stamp!r}.")
        text = chunk.get("text", "")
        if not isinstance(text, str):
            raise InvalidInput(f"a chunk's text must be a string, got {type(text).__name__}.")
        start = _time(stamp[0], "start")
        end = _time(stamp[1], "end")
        start = previous_end if start is None else start
        if end is None:
            following = next((_time(c["timestamp"][0], "start") for c in chunks[i + 1:]
                              if isinstance(c.get("timestamp"), (tuple, list)) and c["timestamp"][0] is not None),
                             None)
            if following is not None and following > start:
                end = following
            elif duration is not None and duration > start:
                end = float(duration)
            else:
                end = start + max(MIN_CUE_SECONDS, len(text.strip()) / READING_CPS)
        spans.append((text, start, max(end, start)))
        previous_end = max(end, start)
    return spans


def _is_words(chunks: list[dict]) -> bool:
    """Word (or character) chunks: none holds whitespace inside its text."""
    texts = [c.get("text", "") for c in chunks]
    return bool(texts) and all(len(t.split()) <= 1 for t in texts if isinstance(t, str))


def _word_units(spans: list[tuple[str, float, float]], full_text: str | None, max_len: int) -> list[_Word]:
    """Word or character chunks -> words. Whether a space separates two chunks is read from the result's text when
    the chunks can be found in it (Whisper words carry a leading space, CTC words none, characters of one word
    join, scripts without spaces join), else from the chunk's own leading whitespace. Chunks that join are glued
    into one word while it fits on a line."""
    words: list[_Word] = []
    position = 0
    pending_space = False
    for raw, start, end in spans:
        text = raw.strip()
        if not text:  # a space character (CTC "char" chunks)
            pending_space = True
            continue
        found = full_text.find(text, position) if full_text is not None else -1
        if found >= 0:
            space = bool(full_text[position:found]) and full_text[position:found].isspace() or pending_space
            position = found + len(text)
        else:
            space = raw[:1].isspace() or pending_space or full_text is None
        pending_space = False
        if words and not space and len(words[-1].text) + len(text) <= max_len:
            words[-1].text += text
            words[-1].end = max(words[-1].end, end)
            continue
        words.append(_Word(text, start, end, space_before=bool(words) and space))
    return words


def _segment_units(spans: list[tuple[str, float, float]]) -> list[_Word]:
    """Segment chunks -> words with times shared out by characters; each segment's last word ends a cue."""
    words: list[_Word] = []
    for raw, start, end in spans:
        pieces = raw.split()
        if not pieces:
            continue
        total = sum(len(p) + 1 for p in pieces)
        at = 0
        for piece in pieces:
            w_start = start + (end - start) * at / total
            at += len(piece) + 1
            words.append(_Word(piece, w_start, start + (end - start) * at / total, space_before=True))
        words[-1].break_after = True
    return words


def _split_long(words: list[_Word], max_len: int) -> list[_Word]:
    """A word longer than a line is cut into line-long pieces (times shared out by characters)."""
    out = []
    for word in words:
        if len(word.text) <= max_len:
            out.append(word)
            continue
        n = len(word.text)
        for i in range(0, n, max_len):
            piece = word.text[i:i + max_len]
            out.append(_Word(piece, word.start + (word.end - word.start) * i / n,
                             word.start + (word.end - word.start) * min(n, i + max_len) / n,
                             space_before=word.space_before if i == 0 else False,
                             break_after=word.break_after and i + max_len >= n))
    return out


# ---------------------------------------------------------------------------------------------- lines and cues
def _join(words: list[_Word]) -> str:
    return "".join((" " if i and w.space_before else "") + w.text for i, w in enumerate(words))


def _wrap(words: list[_Word], max_len: int) -> list[list[_Word]]:
    """Greedy wrap into lines of at most max_len characters (every word fits on a line by itself)."""
    lines: list[list[_Word]] = []
    for word in words:
        if lines and len(_join(lines[-1] + [word])) <= max_len:
            lines[-1].append(word)
        else:
            lines.append([word])
    return lines


def _lines(words: list[_Word], max_len: int) -> list[str]:
    """The cue's lines; two lines are balanced (the break that makes the longer line shortest)."""
    lines = _wrap(words, max_len)
    if len(lines) == 2:
        best = None
        for cut in range(1, len(words)):
            top, bottom = _join(words[:cut]), _join(words[cut:])
            if len(top) <= max_len and len(bottom) <= max_len:
                key = (max(len(top), len(bottom)), len(top))
                if best is None or key < best[0]:
                    best = (key, [top, bottom])
        if best is not None:
            return best[1]
    return [_join(line) for line in lines]


def _runs(words: list[_Word], by_words: bool) -> list[list[_Word]]:
    """Words -> runs that no cue crosses: a segment's end, and for word chunks a sentence end or a pause."""
    runs: list[list[_Word]] = []
    current: list[_Word] = []
    for word in words:
        if current and by_words and word.start - current[-1].end >= PAUSE_SECONDS:
            runs.append(current)
            current = []
        current.append(word)
        if word.break_after or by_words and word.text.endswith(SENTENCE_ENDS):
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def _fits(group: list[_Word], max_len: int, max_lines: int, by_words: bool) -> bool:
    return (len(_wrap(group, max_len)) <= max_lines
            and not (by_words and len(group) > 1 and group[-1].end - group[0].start > MAX_CUE_SECONDS))


def _split_run(run: list[_Word], max_len: int, max_lines: int, by_words: bool) -> list[list[_Word]]:
    """A run -> as few cues as the greedy fill gives, then the words shared out evenly by characters between that
    many cues (so that no cue is left with one orphan word) when every share still fits."""
    greedy: list[list[_Word]] = []
    for word in run:
        if greedy and _fits(greedy[-1] + [word], max_len, max_lines, by_words):
            greedy[-1].append(word)
        else:
            greedy.append([word])
    k = len(greedy)
    if k == 1:
        return greedy
    total = len(_join(run))
    balanced: list[list[_Word]] = [[]]
    done = 0  # characters in the closed groups
    for i, word in enumerate(run):
        left = len(run) - i
        closed = len(balanced) - 1
        size = len(_join(balanced[-1] + [word]))
        target = total * (closed + 1) / k - done
        if balanced[-1] and closed < k - 1 and (size - len(word.text) / 2 > target or left <= k - 1 - closed):
            done += len(_join(balanced[-1])) + 1
            balanced.append([])
        balanced[-1].append(word)
    if len(balanced) == k and all(_fits(g, max_len, max_lines, by_words) for g in balanced):
        return balanced
    return greedy


def _group(words: list[_Word], max_len: int, max_lines: int, by_words: bool) -> list[list[_Word]]:
    return [g for run in _runs(words, by_words) for g in _split_run(run, max_len, max_lines, by_words)]


def cues(result: Any, *, max_line_length: int = MAX_LINE_LENGTH, max_lines: int = MAX_LINES,
         duration: float | None = None) -> list[Cue]:
    """A speech recognition result (or its list of chunks) -> subtitle cues.

    Word chunks are grouped into cues that end at a sentence end, a pause of `PAUSE_SECONDS`, `MAX_CUE_SECONDS`, or
    when the next word would not fit in `max_lines` lines of `max_line_length` characters; segment chunks give one
    cue each, split by the same line rule. `duration` (seconds of audio, optional) ends a last chunk whose end is
    None; without it the end is estimated from the text's length. Times are rounded to milliseconds; a cue starts no
    earlier than the one before ends, and ends at least 1 ms after it starts."""
    for name, value in (("max_line_length", max_line_length), ("max_lines", max_lines)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInput(f"{name} must be a positive integer, got {value!r}.")
    if duration is not None:
        duration = _time(duration, "duration")
    chunks = _chunks(result)
    spans = _spans(chunks, duration)
    by_words = _is_words(chunks)
    full_text = result.get("text") if isinstance(result, dict) and isinstance(result.get("text"), str) else None
    words = _word_units(spans, full_text, max_line_length) if by_words else _segment_units(spans)
    words = _split_long(words, max_line_length)
    raw = [(round(g[0].start * 1000), round(max(w.end for w in g) * 1000),
            "\n".join(_lines(g, max_line_length))) for g in _group(words, max_line_length, max_lines, by_words)]
    out: list[Cue] = []
    for i, (start, end, text) in enumerate(raw):
        if out:
            start = max(start, out[-1].end_ms)
        if end <= start:  # an instant (or overlapped) cue: give it up to a second, before the next one starts
            following = raw[i + 1][0] if i + 1 < len(raw) else None
            end = start + round(MIN_CUE_SECONDS * 1000)
            if following is not None and start < following < end:
                end = following
        out.append(Cue(start, end, text))
    return out


# ---------------------------------------------------------------------------------------------- formats
def _clock(ms: int, separator: str) -> str:
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    seconds, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}{separator}{ms:03d}"


def to_srt(result: Any, **options) -> str:
    """SubRip text: numbered cues, `HH:MM:SS,mmm --> HH:MM:SS,mmm`, a blank line after each. Options: see `cues`."""
    return "".join(f"{i}\n{_clock(c.start_ms, ',')} --> {_clock(c.end_ms, ',')}\n{c.text}\n\n"
                   for i, c in enumerate(cues(result, **options), 1))


def _vtt_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_vtt(result: Any, **options) -> str:
    """WebVTT text: the `WEBVTT` header, then cues `HH:MM:SS.mmm --> HH:MM:SS.mmm` (&, <, > escaped)."""
    body = "".join(f"{_clock(c.start_ms, '.')} --> {_clock(c.end_ms, '.')}\n{_vtt_text(c.text)}\n\n"
                   for c in cues(result, **options))
    return "WEBVTT\n\n" + body


def to_txt(result: Any) -> str:
    """Plain text: one line per segment when the result has segment timestamps, else its text (no timestamps
    needed). Ends with a newline."""
    if isinstance(result, dict) and result.get("chunks") and not _is_words(_chunks(result)):
        lines = [c.get("text", "").strip() for c in result["chunks"]]
        return "\n".join(line for line in lines if line) + "\n"
    if isinstance(result, dict) and isinstance(result.get("text"), str):
        return result["text"].strip() + "\n"
    if isinstance(result, list) and all(isinstance(c, dict) for c in result):  # bare chunks
        return "\n".join(c.get("text", "").strip() for c in result if c.get("text", "").strip()) + "\n"
    raise InvalidInput(f"expected a speech recognition result ({{'text': ...}}), got {type(result).__name__}.")


FORMATS = {"srt": to_srt, "vtt": to_vtt, "txt": to_txt}

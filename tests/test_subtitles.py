"""Subtitles from speech recognition results: cue grouping, line limits, times, SRT / WebVTT / text formats."""

import random
import re

import pytest

from lightpipe import InvalidInput
from lightpipe.subtitles import MAX_LINE_LENGTH, cues, to_srt, to_txt, to_vtt

SRT_TIME = r"(\d{2,}):([0-5]\d):([0-5]\d),(\d{3})"
VTT_TIME = r"(\d{2,}):([0-5]\d):([0-5]\d)\.(\d{3})"


def ms(match, first: int) -> int:
    h, m, s, milli = (int(match.group(first + i)) for i in range(4))
    return ((h * 60 + m) * 60 + s) * 1000 + milli


def parse_srt(text: str) -> list[tuple[int, int, list[str]]]:
    """SRT text -> (start_ms, end_ms, lines) per cue, checking numbering and layout strictly."""
    assert text.endswith("\n\n") or text == ""
    blocks = text[:-2].split("\n\n") if text else []
    out = []
    for number, block in enumerate(blocks, 1):
        lines = block.split("\n")
        assert lines[0] == str(number)
        match = re.fullmatch(f"{SRT_TIME} --> {SRT_TIME}", lines[1])
        assert match, lines[1]
        out.append((ms(match, 1), ms(match, 5), lines[2:]))
    return out


def parse_vtt(text: str) -> list[tuple[int, int, list[str]]]:
    assert text.startswith("WEBVTT\n\n")
    body = text[len("WEBVTT\n\n"):]
    out = []
    for block in (body[:-2].split("\n\n") if body else []):
        lines = block.split("\n")
        match = re.fullmatch(f"{VTT_TIME} --> {VTT_TIME}", lines[0])
        assert match, lines[0]
        out.append((ms(match, 1), ms(match, 5), lines[1:]))
    return out


def check_cues(parsed, max_len=MAX_LINE_LENGTH, max_lines=2):
    previous_end = 0
    for start, end, lines in parsed:
        assert start >= previous_end, "cues overlap"
        assert end > start
        assert 1 <= len(lines) <= max_lines
        assert all(0 < len(line) <= max_len and line == line.strip() for line in lines)
        previous_end = end


def words_result(text_words, times, leading_space=True):
    chunks = [{"text": (" " if leading_space else "") + w, "timestamp": t} for w, t in zip(text_words, times)]
    return {"text": ("" if not leading_space else " ") + " ".join(text_words), "chunks": chunks}


SENTENCES = [" The quick brown fox jumps over the lazy dog.",
             " Speech recognition turns spoken words into text, and this sentence goes on for a good while longer.",
             " Short one."]


def segments_result(last_end=9.0):
    return {"text": "".join(SENTENCES),
            "chunks": [{"text": SENTENCES[0], "timestamp": (0.0, 3.0)},
                       {"text": SENTENCES[1], "timestamp": (3.0, 8.0)},
                       {"text": SENTENCES[2], "timestamp": (8.0, last_end)}]}


def test_word_chunks_are_grouped_into_cues_at_sentence_ends():
    words = "The quick brown fox jumps over the lazy dog. Then it sleeps.".split()
    times = [(i * 0.4, i * 0.4 + 0.35) for i in range(len(words))]
    result = words_result(words, times)
    parsed = parse_srt(to_srt(result))
    check_cues(parsed)
    assert [" ".join(lines) for _, _, lines in parsed] == ["The quick brown fox jumps over the lazy dog.",
                                                           "Then it sleeps."]
    assert parsed[0][:2] == (0, 8 * 400 + 350) and parsed[1][:2] == (9 * 400, 11 * 400 + 350)
    assert parsed[0][2] == ["The quick brown fox", "jumps over the lazy dog."]  # two balanced lines


def test_long_word_runs_respect_line_length_line_count_and_duration():
    rng = random.Random(0)
    vocabulary = ["a", "speech", "recognition", "pipeline", "transcribes", "audio", "into", "subtitles", "with",
                  "timestamps", "quickly"]
    words = [rng.choice(vocabulary) for _ in range(120)]
    times, t = [], 0.0
    for _ in words:
        length = rng.uniform(0.1, 0.5)
        times.append((round(t, 2), round(t + length, 2)))
        t += length + rng.choice([0.0, 0.05, 0.1, 1.5])  # sometimes a pause
    result = words_result(words, times)
    parsed = parse_srt(to_srt(result))
    check_cues(parsed)
    assert " ".join(" ".join(lines) for _, _, lines in parsed).split() == words
    assert all(end - start <= 7000 or len(" ".join(lines).split()) == 1 for start, end, lines in parsed)
    for start, end, lines in parsed:  # a pause of 1.5 s never sits inside a cue
        inside = [(a, b) for a, b in times if start <= round(a * 1000) and round(b * 1000) <= end]
        assert all(later[0] - earlier[1] < 1.0 for earlier, later in zip(inside, inside[1:]))


def test_segments_give_cues_and_long_segments_split_evenly():
    parsed = parse_srt(to_srt(segments_result()))
    check_cues(parsed)
    texts = [" ".join(lines) for _, _, lines in parsed]
    assert texts[0] == SENTENCES[0].strip() and texts[-1] == SENTENCES[2].strip()
    middle = texts[1:-1]
    assert len(middle) == 2 and " ".join(middle) == SENTENCES[1].strip()
    assert abs(len(middle[0]) - len(middle[1])) < 20  # shared out evenly, not one full cue and an orphan
    assert parsed[1][0] == 3000 and parsed[2][1] == 8000 and parsed[1][1] == parsed[2][0]
    assert [c[:2] for c in parsed][::3] == [(0, 3000), (8000, 9000)]


def test_a_last_end_of_none_is_estimated_or_taken_from_the_duration():
    open_end = segments_result(last_end=None)
    parsed = parse_srt(to_srt(open_end))
    check_cues(parsed)
    assert parsed[-1][0] == 8000 and parsed[-1][1] > 8000
    assert parse_srt(to_srt(open_end, duration=12.5))[-1][1] == 12500
    words = words_result(["Hello", "world."], [(0.5, 1.0), (1.0, None)])
    parsed = parse_srt(to_srt(words))
    assert len(parsed) == 1 and parsed[0][0] == 500 and parsed[0][1] > 1000


def test_overlapping_and_instant_chunks_become_ordered_cues():
    result = {"text": " One. Two. Three.",
              "chunks": [{"text": " One.", "timestamp": (1.0, 2.0)}, {"text": " Two.", "timestamp": (1.5, 1.5)},
                         {"text": " Three.", "timestamp": (1.5, 1.8)}]}
    parsed = parse_srt(to_srt(result))
    check_cues(parsed)
    assert [lines for _, _, lines in parsed] == [["One."], ["Two."], ["Three."]]


def test_times_past_an_hour_and_webvtt_layout():
    result = {"text": " a <b> & c", "chunks": [{"text": " a <b> & c", "timestamp": (3725.5, 3727.25)}]}
    assert to_srt(result) == "1\n01:02:05,500 --> 01:02:07,250\na <b> & c\n\n"
    assert to_vtt(result) == "WEBVTT\n\n01:02:05.500 --> 01:02:07.250\na &lt;b&gt; &amp; c\n\n"
    parsed = parse_vtt(to_vtt(segments_result()))
    check_cues(parsed)
    assert [c[:2] for c in parsed] == [c[:2] for c in parse_srt(to_srt(segments_result()))]


def test_ctc_words_and_characters_join_as_in_the_text():
    words = {"text": "HELLO WORLD", "chunks": [{"text": "HELLO", "timestamp": (0.1, 0.5)},
                                               {"text": "WORLD", "timestamp": (0.6, 1.0)}]}
    assert parse_srt(to_srt(words)) == [(100, 1000, ["HELLO WORLD"])]
    chars = {"text": "HI YOU", "chunks": [{"text": c, "timestamp": (i / 10, i / 10 + 0.05)}
                                          for i, c in enumerate("HI YOU")]}
    assert parse_srt(to_srt(chars)) == [(0, 550, ["HI YOU"])]
    no_spaces = {"text": "今日は良い天気です", "chunks": [{"text": t, "timestamp": (i, i + 0.5)}
                                                      for i, t in enumerate(["今日", "は", "良い", "天気", "です"])]}
    assert parse_srt(to_srt(no_spaces))[0][2] == ["今日は良い天気です"]


def test_options_and_overlong_words():
    result = segments_result()
    parsed = parse_srt(to_srt(result, max_line_length=16, max_lines=1))
    check_cues(parsed, max_len=16, max_lines=1)
    assert " ".join(" ".join(lines) for _, _, lines in parsed) == "".join(SENTENCES).strip()
    long_word = {"text": " " + "x" * 100, "chunks": [{"text": " " + "x" * 100, "timestamp": (0.0, 2.0)}]}
    parsed = parse_srt(to_srt(long_word))
    check_cues(parsed)
    assert "".join("".join(lines) for _, _, lines in parsed) == "x" * 100
    assert [(c.start_ms, c.end_ms, c.text) for c in cues(result)] == [
        (start, end, "\n".join(lines)) for start, end, lines in parse_srt(to_srt(result))]
    for bad in ({"max_line_length": 0}, {"max_lines": "2"}, {"duration": -1}):
        with pytest.raises(InvalidInput):
            to_srt(result, **bad)


def test_results_without_timestamps_are_invalid_input_with_a_hint():
    with pytest.raises(InvalidInput, match="return_timestamps=True"):
        to_srt({"text": "no stamps"})
    with pytest.raises(InvalidInput, match="return_timestamps"):
        to_vtt({"text": "no stamps"})
    with pytest.raises(InvalidInput, match="one speech recognition result"):
        to_srt([{"text": "a"}, {"text": "b"}])
    with pytest.raises(InvalidInput, match="start time must be a number"):
        to_srt({"text": "x", "chunks": [{"text": "x", "timestamp": ("0", 1)}]})
    with pytest.raises(InvalidInput):
        to_txt("just a string")
    assert to_srt({"text": "", "chunks": []}) == "" and to_vtt({"text": "", "chunks": []}) == "WEBVTT\n\n"


def test_plain_text_output():
    assert to_txt({"text": " no stamps here "}) == "no stamps here\n"
    assert to_txt(segments_result()) == "\n".join(s.strip() for s in SENTENCES) + "\n"
    words = words_result(["Hello", "world."], [(0.0, 0.5), (0.5, 1.0)])
    assert to_txt(words) == "Hello world.\n"

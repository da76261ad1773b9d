"""Tiny random BART checkpoints built with transformers (the oracle), and what BART tests share."""

from __future__ import annotations

from pathlib import Path

import torch

from helpers import STD, bpe_vocab_folder

NLI_LABELS = ["contradiction", "neutral", "entailment"]  # bart-large-mnli's id2label
MAX_POSITIONS = 64  # short, so that a long premise is easy to write
SIZES = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
             encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=MAX_POSITIONS)
CLASSES = {"base": "BartModel", "sequence-classification": "BartForSequenceClassification",
           "seq2seq-lm": "BartForConditionalGeneration"}


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight (and final_logits_bias, a buffer) drawn with std STD; layer-norm weights around 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(STD * torch.randn(p.shape, generator=gen))
    return model.eval()


def tiny_bart(folder: Path, head: str = "sequence-classification", *, labels: list[str] | None = None,
              seed: int = 0, **overrides) -> Path:
    """Save a tiny random BART with `head` and its byte-level BPE tokenizer (the tokenizer's model_max_length is
    the model's, as bart-large-mnli's is) into `folder`; NLI labels unless `labels` says otherwise."""
    import transformers

    bpe_vocab_folder(folder)
    tokenizer = transformers.BartTokenizerFast(vocab=str(folder / "vocab.json"),
                                               merges=str(folder / "merges.txt"))
    tokenizer.model_max_length = overrides.get("max_position_embeddings", MAX_POSITIONS)
    tokenizer.save_pretrained(str(folder))
    labels = labels if labels is not None else NLI_LABELS
    config = transformers.BartConfig(vocab_size=tokenizer.vocab_size + 8, id2label=dict(enumerate(labels)),
                                     label2id={label: i for i, label in enumerate(labels)}, **{**SIZES, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, CLASSES[head])(config)
    randomize(model, seed)
    model.save_pretrained(str(folder))
    return folder


def reference(folder: Path, head: str = "sequence-classification") -> torch.nn.Module:
    """transformers' model for `head` loaded from `folder`."""
    import transformers

    return getattr(transformers, CLASSES[head]).from_pretrained(str(folder)).eval()


def encode(folder: Path, texts: list[str], pairs: list[str] | None = None, padding_side: str = "right",
           truncation: bool = False) -> dict[str, torch.Tensor]:
    """transformers' tokenizer on texts (and pairs), padded on `padding_side`."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    tokenizer.padding_side = padding_side
    return dict(tokenizer(texts, pairs, padding=True, truncation=truncation, return_tensors="pt"))

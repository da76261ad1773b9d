"""Tiny random DeBERTa-v2/v3 checkpoints built with transformers (the oracle), with a SentencePiece-style
Unigram tokenizer saved as DebertaV2Tokenizer saves it (tokenizer.json + tokenizer_config.json)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from helpers import BPE_CORPUS, WORDS, randomize

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # DebertaV2Tokenizer's ids 0..4 on the Hub too

# The v3 layout (microsoft/deberta-v3-base shape, scaled down): relative attention with log buckets, no absolute
# positions, no token types, both relative terms, shared keys, layer-normalised relative embeddings.
V3 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
          max_position_embeddings=128, relative_attention=True, position_buckets=8, max_relative_positions=64,
          pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False,
          type_vocab_size=0, layer_norm_eps=1e-7)

HEADS = {
    "base": "DebertaV2Model",
    "sequence-classification": "DebertaV2ForSequenceClassification",
    "token-classification": "DebertaV2ForTokenClassification",
    "question-answering": "DebertaV2ForQuestionAnswering",
    "masked-lm": "DebertaV2ForMaskedLM",
}


def unigram_tokenizer_folder(folder: Path, model_max_length: int = 128) -> Path:
    """A Unigram vocabulary trained on a small corpus, wrapped by transformers' DebertaV2Tokenizer and saved
    (model_max_length: the tiny models' max_position_embeddings, as the Hub's v3 checkpoints have 512 for both)."""
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    trainer_tok = Tokenizer(models.Unigram())
    trainer_tok.normalizer = normalizers.NFKC()
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=[], shrinking_factor=0.75)
    trainer_tok.train_from_iterator(BPE_CORPUS.split(". ") + [" ".join(WORDS)] * 3, trainer=trainer)
    pieces = json.loads(trainer_tok.to_str())["model"]["vocab"]
    vocab = [(s, 0.0) for s in SPECIALS] + [(p, float(score)) for p, score in pieces if p not in SPECIALS]
    tokenizer = transformers.DebertaV2Tokenizer(vocab=vocab)
    tokenizer.model_max_length = model_max_length
    tokenizer.save_pretrained(str(folder))
    return folder


def tiny_deberta(folder: Path, head: str = "sequence-classification", *, labels: list[str] | None = None,
                 seed: int = 0, **overrides) -> Path:
    """Save a tiny random DeBERTa-v2 `head` (the V3 layout unless `overrides` change it) and its tokenizer."""
    import transformers

    unigram_tokenizer_folder(folder)
    vocab_size = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]) + 3
    num_labels = 2 if head == "question-answering" else 3
    labels = labels or [f"LABEL_{i}" for i in range(num_labels)]
    config = transformers.DebertaV2Config(vocab_size=vocab_size, id2label=dict(enumerate(labels)),
                                          label2id={label: i for i, label in enumerate(labels)},
                                          pad_token_id=0, **{**V3, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, HEADS[head])(config)
    randomize(model, seed)
    model.save_pretrained(str(folder))
    return folder


def reference_deberta(folder: Path, head: str) -> torch.nn.Module:
    import transformers

    return getattr(transformers, HEADS[head]).from_pretrained(str(folder)).eval()


def encode(folder: Path, texts: list[str], pairs: list[str] | None = None, padding_side: str = "right"):
    """transformers' tokenizer on `texts` (and `pairs`), padded on `padding_side`, with token_type_ids."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    tokenizer.padding_side = padding_side
    return dict(tokenizer(texts, pairs, padding=True, return_tensors="pt"))

"""Tiny random checkpoints built with transformers (the oracle), saved the way the Hub has them."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import torch

# The word error rate the speech tests hold transcriptions to is the benchmarks' own (stdlib-only) scorer.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from common import word_error_rate, words  # noqa: E402,F401  (re-exported for the tests)

WORDS = (
    "the a an of to in and is was it he she they we you i my your his her this that with for on at by from "
    "paris france berlin germany london england john smith mary works lives city capital country river "
    "love hate good bad great terrible movie film book story day night happy sad new old big small "
    "what where who when why how does did do can will would should could not no yes very much many "
    "apple google microsoft company founded year president king queen water fire earth air red blue green "
    "run walk talk eat drink sleep read write play sing dance think know see hear feel make take give "
    "un ##s ##ing ##ed ##er ##est ##ly ##ion ##al ##y ##e ##a ##o ##i ##n ##t ##r"
).split()
BPE_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France. John Smith works at Google "
    "in London. Mary lives in Berlin, Germany. I love this movie, it is great! This book was terrible and sad. "
    "What is the capital of England? Where does John work? The river flows through the old city at night. "
) * 20

STD = 0.2  # larger than transformers' 0.02, so outputs depend clearly on every input token


def bert_vocab_folder(folder: Path, lowercase: bool = True) -> Path:
    """A vocab.txt with BERT's special tokens, and the tokenizer saved by transformers."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(".,!?'-:;()") + list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = list(dict.fromkeys(vocab + list(WORDS)))
    vocab = list(dict.fromkeys(vocab + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=lowercase)
    tok.model_max_length = 512
    tok.save_pretrained(str(folder))
    return folder


def bpe_vocab_folder(folder: Path) -> Path:
    """A byte-level BPE vocabulary (vocab.json + merges.txt) trained on a small corpus, RoBERTa style."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator([BPE_CORPUS], vocab_size=400, min_frequency=2,
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    trainer.save_model(str(folder))
    tok = RobertaTokenizerFast(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    tok.model_max_length = 512
    tok.save_pretrained(str(folder))
    return folder


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw every weight with std STD (LayerNorm weights around 1) so masking bugs show at 1e-4."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name or "layer_norm.weight" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(STD * torch.randn(p.shape, generator=gen))
    return model.eval()


ARCH = {
    "bert": ("BertConfig", "bert", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=37, max_position_embeddings=128)),
    "roberta": ("RobertaConfig", "bpe", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=37, max_position_embeddings=130, pad_token_id=1,
                                             bos_token_id=0, eos_token_id=2, type_vocab_size=1,
                                             layer_norm_eps=1e-5)),
    "xlm-roberta": ("XLMRobertaConfig", "bpe", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                    intermediate_size=37, max_position_embeddings=130,
                                                    pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                                    type_vocab_size=1, layer_norm_eps=1e-5)),
    "distilbert": ("DistilBertConfig", "bert", dict(dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                                                    max_position_embeddings=128)),
}
HEAD_CLASS = {
    "base": "Model",
    "sequence-classification": "ForSequenceClassification",
    "token-classification": "ForTokenClassification",
    "question-answering": "ForQuestionAnswering",
    "masked-lm": "ForMaskedLM",
}
PREFIX = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta", "distilbert": "DistilBert"}


def tiny_checkpoint(folder: Path, arch: str, head: str, *, num_labels: int | None = None, seed: int = 0,
                    labels: list[str] | None = None, **config_overrides) -> Path:
    """Save a tiny random `arch` model with `head` plus its tokenizer into `folder`.

    num_labels defaults to 2 for the question-answering head (its qa_outputs give start and end
    logits) and to 3 otherwise."""
    import transformers

    config_name, vocab_kind, sizes = ARCH[arch]
    if vocab_kind == "bert":
        bert_vocab_folder(folder)
    else:
        bpe_vocab_folder(folder)
    vocab_size = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]) + 8
    if num_labels is None:
        num_labels = 2 if head == "question-answering" else 3
    labels = labels or [f"LABEL_{i}" for i in range(num_labels)]
    config = getattr(transformers, config_name)(
        vocab_size=vocab_size, id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
        **{**sizes, **config_overrides},
    )
    torch.manual_seed(seed)
    model = getattr(transformers, PREFIX[arch] + HEAD_CLASS[head])(config)
    randomize(model, seed)
    model.save_pretrained(str(folder))
    return folder


def left_padded_copy(folder: Path, target: Path) -> Path:
    """A copy of a checkpoint whose tokenizer pads on the left (padding_side in tokenizer_config.json)."""
    import shutil

    if not target.exists():
        shutil.copytree(folder, target)
        config_path = target / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["padding_side"] = "left"
        config_path.write_text(json.dumps(config))
    return target


# ---------------------------------------------------------------------------------------- text model parity
# Texts of different lengths, so every batch has padding; pairs give BERT two token types.
TEXTS = ["Hello world.", "Paris is the capital of France, and John Smith works at Google in London.", "a",
         "The river flows through the old city at night."]
PAIRS = ["Where is it?", "What does John do?", "Who lives in Berlin, Germany?", "b"]
SEQUENCE_OUTPUTS = {("base", "pooler_output"), ("sequence-classification", "logits")}  # one row per text


def reference_model(folder: Path, arch: str, head: str) -> torch.nn.Module:
    """transformers' model for `head` loaded from `folder` (the oracle)."""
    import transformers

    return getattr(transformers, PREFIX[arch] + HEAD_CLASS[head]).from_pretrained(str(folder)).eval()


def encode_texts(folder: Path, arch: str, texts: list[str], pairs: list[str] | None = None,
                 padding_side: str = "right") -> dict[str, torch.Tensor]:
    """transformers' tokenizer on `texts` (and `pairs`), padded on `padding_side`; token_type_ids for BERT only
    (RoBERTa has one type and DistilBERT none)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    tokenizer.padding_side = padding_side
    batch = dict(tokenizer(texts, pairs, padding=True, return_tensors="pt"))
    if arch != "bert":
        batch.pop("token_type_ids", None)
    return batch


def assert_text_model_parity(folder: Path, arch: str, head: str, texts: list[str] = TEXTS,
                             pairs: list[str] | None = None, tol: float = 1e-4) -> dict[str, torch.Tensor]:
    """lightpipe's model on `folder` against transformers', on every output of `head`:

    - a right-padded batch equals transformers' on the same batch (on real tokens: lightpipe leaves zeros in
      padded slots, transformers computes them anyway);
    - every row of a right-padded and of a left-padded batch equals transformers on that text alone
      (transformers itself moves a left-padded BERT row's positions; lightpipe counts real tokens only).
    Returns lightpipe's outputs on the right-padded batch."""
    from lightpipe.loading import load_model

    ours, ref = load_model(folder, head), reference_model(folder, arch, head)
    alone = []
    with torch.inference_mode():
        for i, text in enumerate(texts):
            single = encode_texts(folder, arch, [text], None if pairs is None else [pairs[i]])
            alone.append(ref(**single))
        right = encode_texts(folder, arch, texts, pairs)
        got, want = ours(**right), ref(**right)
        assert set(got) == {key for key in want.keys() if key not in ("hidden_states", "attentions")}
        for key, value in got.items():
            real = slice(None) if (head, key) in SEQUENCE_OUTPUTS else right["attention_mask"].bool()
            assert (value[real] - want[key][real]).abs().max() <= tol, (arch, head, key)
        for side in ("right", "left"):
            batch = right if side == "right" else encode_texts(folder, arch, texts, pairs, "left")
            out = ours(**batch)
            for i, single in enumerate(alone):
                mask = batch["attention_mask"][i].bool()
                for key, value in out.items():
                    row = value[i] if (head, key) in SEQUENCE_OUTPUTS else value[i][mask]
                    assert (row - single[key][0]).abs().max() <= tol, (arch, head, key, side, texts[i])
    return got


def results_close(a, b, tol: float = 1e-5) -> bool:
    """Pipeline results equal up to float noise: the same structure, labels and words, numbers within tol
    (lists, tuples and numpy arrays compared item by item, numpy scalars as floats)."""
    import numpy as np

    if isinstance(a, (list, tuple, np.ndarray)):
        return isinstance(b, (list, tuple, np.ndarray)) and len(a) == len(b) and all(
            results_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(results_close(a[k], b[k], tol) for k in a)
    if isinstance(a, (float, np.floating)):
        return abs(a - b) <= tol
    return a == b


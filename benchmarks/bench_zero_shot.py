"""zero-shot-classification in the bart-large-mnli shape: lightpipe vs transformers on the same random weights.

    python benchmarks/bench_zero_shot.py [--layers 12] [--sentences 16] [--repeat 2]

The checkpoint has bart-large-mnli's shape (d_model 1024, 16 heads, ffn 4096, 50265-token vocabulary, NLI labels)
with `--layers` encoder and decoder layers each (12, the real depth, by default) and random weights. Its tokenizer
is a byte-level BPE trained on English words, so that a word is about one token as with BART's own vocabulary.
Both libraries classify the same sentences (8 to 40 words) against the seed's five labels, at batch size 1 and 8,
taking turns run by run (common.timed_together). transformers' batch_size counts (text, label) pairs and lightpipe's
counts texts (each with all its labels), so at batch 1 transformers runs 80 passes of one pair and lightpipe 16
passes of five. Prints a Markdown table of median wall times and speed-ups (transformers time / lightpipe time).
"""

from __future__ import annotations

import argparse
import os

from common import CACHE, mixed_texts, minilm_tokenizer_folder, table, timed_together

LABELS = ["urgent", "not urgent", "phone", "tablet", "computer"]
NLI_LABELS = {0: "contradiction", 1: "neutral", 2: "entailment"}
VOCAB = 50265  # bart-large-mnli's


def english_words() -> list[str]:
    """Whole English words of the MiniLM vocabulary (what common.mixed_texts draws sentences from)."""
    import json

    vocab = json.loads((minilm_tokenizer_folder() / "tokenizer.json").read_text())["model"]["vocab"]
    return [w for w in vocab if w.isalpha() and w.islower() and len(w) > 2][:8000]


def bart_mnli_checkpoint(layers: int):
    """A random bart-large-mnli-shaped checkpoint with `layers` encoder and decoder layers, built once."""
    folder = CACHE / f"zero-shot-bart-large-mnli-{layers}-layers"
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    folder.mkdir(parents=True, exist_ok=True)
    words = english_words() + [w for label in LABELS for w in label.split()] + "this example is".split()
    trainer = ByteLevelBPETokenizer()
    # Each word twice, after a space as in running text: every word becomes one token ("Ġword").
    trainer.train_from_iterator([" ".join(words)] * 2, vocab_size=VOCAB - 1, min_frequency=2,
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    trainer.save_model(str(folder))
    tokenizer = transformers.BartTokenizerFast(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    tokenizer.model_max_length = 1024
    tokenizer.save_pretrained(str(folder))
    config = transformers.BartConfig(vocab_size=VOCAB, encoder_layers=layers, decoder_layers=layers,
                                     id2label=NLI_LABELS, label2id={v: k for k, v in NLI_LABELS.items()})
    torch.manual_seed(0)
    transformers.BartForSequenceClassification(config).eval().save_pretrained(str(folder))
    return folder


def assert_agree(got: list[dict], want: list[dict]) -> None:
    """The two libraries give the same scores per label (the timing means nothing otherwise)."""
    for g, w in zip(got, want):
        assert g["sequence"] == w["sequence"]
        mine, theirs = dict(zip(g["labels"], g["scores"])), dict(zip(w["labels"], w["scores"]))
        assert mine.keys() == theirs.keys() and all(abs(mine[k] - theirs[k]) <= 1e-4 for k in mine), (g, w)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12, help="encoder and decoder layers each (12: bart-large)")
    parser.add_argument("--sentences", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    import transformers

    import lightpipe

    folder = bart_mnli_checkpoint(args.layers)
    sentences = mixed_texts(args.sentences, low=8, high=40, seed=1)
    ours = lightpipe.pipeline("zero-shot-classification", model=str(folder))
    ref = transformers.pipeline("zero-shot-classification", model=str(folder))
    transformers.logging.set_verbosity_error()
    tokens = [len(ours.tokenizer.encode(s, f"This example is {LABELS[0]}.").ids) for s in sentences]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, transformers {transformers.__version__}; "
          f"BART d_model 1024, {args.layers}+{args.layers} layers; {len(sentences)} sentences x {len(LABELS)} labels, "
          f"{min(tokens)}-{max(tokens)} tokens per pair")

    rows = []
    for batch_size in (1, 8):
        assert_agree(ours(sentences[:2], candidate_labels=LABELS, batch_size=batch_size),
                     ref(sentences[:2], candidate_labels=LABELS, batch_size=batch_size))
        a, b = timed_together([lambda: ours(sentences, candidate_labels=LABELS, batch_size=batch_size),
                               lambda: ref(sentences, candidate_labels=LABELS, batch_size=batch_size)], args.repeat)
        rows.append((f"zero-shot, bart-large-mnli shape ({args.layers}+{args.layers} layers), batch {batch_size}, "
                     f"{len(sentences)} sentences x {len(LABELS)} labels", a, b, "s"))
    print(table(rows))


if __name__ == "__main__":
    main()

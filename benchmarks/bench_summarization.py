"""summarization in the distilbart-cnn-12-6 shape: lightpipe's pipeline vs transformers' generate() on the same weights.

    python benchmarks/bench_summarization.py [--encoder-layers 12] [--decoder-layers 6] [--texts 8] [--tokens 500]
                                             [--new-tokens 60] [--repeat 1]

The checkpoint has sshleifer/distilbart-cnn-12-6's shape (d_model 1024, 16 heads, ffn 4096, 50264-token vocabulary,
12 encoder and 6 decoder layers by default) with random weights, and its summarization settings (4 beams,
no_repeat_ngram_size 3, length_penalty 2, early stopping) with at most `--new-tokens` new tokens. Its tokenizer is a
byte-level BPE trained on English words (about one token per word, as with BART's own vocabulary). transformers 5
has no summarization pipeline, so its side is what that pipeline did: tokenize the batch (right padding), generate(),
decode. Both summarize the same news-length texts (about `--tokens` tokens each) in one batch, taking turns run by
run (common.timed_together), after checking that they return the same summaries. Prints a Markdown table of median
wall times and the speed-up (transformers time / lightpipe time).
"""

from __future__ import annotations

import argparse
import os

from bench_zero_shot import english_words
from common import CACHE, mixed_texts, table, timed_together

VOCAB = 50264  # distilbart-cnn-12-6's
SETTINGS = dict(num_beams=4, no_repeat_ngram_size=3, length_penalty=2.0, early_stopping=True)


def distilbart_cnn_checkpoint(encoder_layers: int, decoder_layers: int):
    """A random distilbart-cnn-shaped BartForConditionalGeneration with its summarization settings, built once."""
    folder = CACHE / f"summarization-distilbart-cnn-{encoder_layers}-{decoder_layers}"
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    folder.mkdir(parents=True, exist_ok=True)
    trainer = ByteLevelBPETokenizer()
    # Each word twice, after a space as in running text: every word becomes one token ("Ġword").
    trainer.train_from_iterator([" ".join(english_words())] * 2, vocab_size=VOCAB - 1, min_frequency=2,
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    trainer.save_model(str(folder))
    tokenizer = transformers.BartTokenizerFast(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    tokenizer.model_max_length = 1024
    tokenizer.save_pretrained(str(folder))
    config = transformers.BartConfig(vocab_size=VOCAB, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
                                     forced_bos_token_id=0, task_specific_params={"summarization": SETTINGS})
    torch.manual_seed(0)
    transformers.BartForConditionalGeneration(config).eval().save_pretrained(str(folder))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder-layers", type=int, default=12)
    parser.add_argument("--decoder-layers", type=int, default=6)
    parser.add_argument("--texts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=500, help="about this many tokens per text")
    parser.add_argument("--new-tokens", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    import transformers

    import lightpipe

    folder = distilbart_cnn_checkpoint(args.encoder_layers, args.decoder_layers)
    texts = mixed_texts(args.texts, low=args.tokens - 40, high=args.tokens + 40, seed=2)
    summarize = lightpipe.pipeline("summarization", model=str(folder))
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(folder)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))

    def ours():
        return [r["summary_text"] for r in summarize(texts, batch_size=len(texts), max_new_tokens=args.new_tokens)]

    def reference():
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.inference_mode():
            ids = model.generate(**batch, max_new_tokens=args.new_tokens, **SETTINGS)
        return tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    tokens = [len(summarize.tokenizer.encode(t).ids) for t in texts]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, transformers {transformers.__version__}; "
          f"BART d_model 1024, {args.encoder_layers}+{args.decoder_layers} layers; {len(texts)} texts of "
          f"{min(tokens)}-{max(tokens)} tokens, {SETTINGS['num_beams']} beams, {args.new_tokens} new tokens at most")
    got, want = ours(), reference()
    assert got == want, "the two libraries summarize differently: the timing would mean nothing"
    a, b = timed_together([ours, reference], args.repeat)
    rows = [(f"summarization, distilbart-cnn shape ({args.encoder_layers}+{args.decoder_layers} layers), "
             f"{len(texts)} texts in one batch, beams {SETTINGS['num_beams']}", a, b, "s")]
    print(table(rows))


if __name__ == "__main__":
    main()

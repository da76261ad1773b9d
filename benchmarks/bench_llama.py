"""Greedy text generation with a Llama-family model: lightpipe's generate vs transformers' model.generate.

    python benchmarks/bench_llama.py [--repeat 3] [--new-tokens 64] [--threads N]

The model has SmolLM2-135M's shape (30 layers, 576 wide, 9 query and 3 key/value heads, 1536-wide SwiGLU, 49152
tokens, tied embeddings) with random weights from transformers' own initialisation, built once under .bench/.
Work, timing and the token check are bench_textgen.py's: 8 prompts of 5 to 40 tokens, greedy, 64 new tokens each,
at batch 1 and batch 8 (one left-padded batch), the libraries taking turns.
"""

from __future__ import annotations

import argparse

import bench_textgen
from bench_textgen import PROMPTS, runners
from common import table, timed_together

NAME = "smollm2-135m"
bench_textgen.SHAPES[NAME] = ("LlamaConfig", "LlamaForCausalLM", dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    lightpipe_run, transformers_run = runners(NAME, args.new_tokens)
    rows = []
    for batch in (1, PROMPTS):
        same = lightpipe_run(batch) == transformers_run(batch)
        print(f"{NAME} batch {batch}: {'the same tokens' if same else 'DIFFERENT TOKENS'} from both libraries")
        ours, ref = timed_together([lambda: lightpipe_run(batch), lambda: transformers_run(batch)], args.repeat)
        tokens = PROMPTS * args.new_tokens
        rows.append((f"{NAME}, {PROMPTS} prompts, batch {batch}, {args.new_tokens} new tokens (ms per token)",
                     ours / tokens * 1000, ref / tokens * 1000, "ms"))
        print(table(rows[-1:]), flush=True)
    print(f"\ntorch threads: {torch.get_num_threads()}\n")
    print(table(rows))


if __name__ == "__main__":
    main()

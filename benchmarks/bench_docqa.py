"""Document question answering: lightpipe vs transformers on the same layoutlm-base-sized weights.

    python benchmarks/bench_docqa.py [--repeat 3] [--questions 16] [--threads N]

LayoutLM (microsoft/layoutlm-base-uncased's shape: 12 layers, 768 hidden, random weights saved with
transformers' save_pretrained) answers questions over documents given as words with boxes (word_boxes, so no
OCR runs), through each library's document-question-answering pipeline, at batch 1 and batch 8 (transformers
runs batch 1 only: its pipeline fails on batches of padded windows). The tokenizer is an uncased WordPiece one
built here from a generated vocab.txt; nothing comes from the Hub. Documents hold 150 to 400 words (about 220 to
560 tokens), so the longest are cut into two windows of 512 tokens. Prints a Markdown table of median times and
speed-ups, then the arithmetic bound: how much faster than transformers any float32 library doing the same
matrix products could be on this machine (common.arithmetic_bound).
"""

from __future__ import annotations

import argparse
import random

from common import CACHE, arithmetic_bound, both_pipelines, matmul_flops, table, timed_together

LETTERS = "abcdefghijklmnopqrstuvwxyz"
SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]  # 90 syllables -> pseudo-English words


def vocabulary(size: int = 8000, seed: int = 0) -> list[str]:
    """Distinct lower-case words of 1-3 syllables: the whole words of the vocabulary."""
    rng = random.Random(seed)
    words: dict[str, None] = {}
    while len(words) < size:
        words["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3)))] = None
    return list(words)


def tokenizer_files(folder) -> None:
    """An uncased BERT-style WordPiece tokenizer: BERT's special tokens, punctuation, single characters and
    their ## continuations (so any word can be spelled), numbers (as BERT's vocabulary has them), then words."""
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = list(".,:;!?'-()/$%#") + list(LETTERS + "0123456789") + ["##" + c for c in LETTERS + "0123456789"]
    numbers = [f"{i:02d}" for i in range(10)] + [str(i) for i in range(2100)]
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(specials + pieces + numbers + vocabulary())) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.model_max_length = 512
    tokenizer.save_pretrained(str(folder))


def layoutlm_base_checkpoint():
    folder = CACHE / "layoutlm-base-uncased-qa"
    if (folder / "model.safetensors").is_file() and (folder / "vocab.txt").is_file():
        return folder
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = transformers.LayoutLMForQuestionAnswering(transformers.LayoutLMConfig()).eval()  # layoutlm-base sizes
    model.save_pretrained(str(folder))
    tokenizer_files(folder)
    return folder


def documents(n: int, seed: int = 0) -> list[list[tuple[str, list[int]]]]:
    """n documents of 150-400 words laid out in lines on a page, as word_boxes on the 0-1000 grid. Most words
    come from the vocabulary; some are amounts, dates and codes the tokenizer splits into pieces."""
    rng = random.Random(seed)
    words = vocabulary()[:3000]
    docs = []
    for _ in range(n):
        count = rng.randint(150, 400)
        text = []
        for _ in range(count):
            roll = rng.random()
            if roll < 0.08:
                text.append(f"{rng.randint(1, 2099)}.{rng.randint(0, 99):02d}")
            elif roll < 0.12:
                text.append(f"{rng.randint(2000, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}")
            elif roll < 0.15:
                text.append(rng.choice(words).upper() + f"-{rng.randint(1, 999):03d}")
            else:
                text.append(rng.choice(words))
        per_line, boxes = 12, []
        for i, word in enumerate(text):
            line, column = divmod(i, per_line)
            x0, y0 = 20 + 80 * column, 20 + 28 * line % 960
            boxes.append([x0, y0, min(999, x0 + 6 * len(word)), y0 + 18])
        docs.append(list(zip(text, boxes)))
    return docs


def questions(n: int, seed: int = 1) -> list[dict]:
    """n questions, four over each document: {"image": None, "question", "word_boxes"}."""
    rng = random.Random(seed)
    words = vocabulary()[:3000]
    docs = documents((n + 3) // 4)
    asked = []
    for i in range(n):
        question = "what is the " + " ".join(rng.choice(words) for _ in range(rng.randint(2, 5))) + " ?"
        asked.append({"image": None, "question": question, "word_boxes": docs[i // 4]})
    return asked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default: 1,8)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    args = parser.parse_args()
    folder = layoutlm_base_checkpoint()
    inputs = questions(args.questions)
    ours, ref = both_pipelines("document-question-answering", folder, args.threads)
    check_same_answers(ours(inputs), ref(inputs))
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    # transformers 5.24 cannot batch this task: its postprocess fails on padded windows (p_mask is not padded
    # with the batch), so every lightpipe batch size is compared with its one-at-a-time run. All runs take turns
    # (common.timed_together), so load drift on a shared machine hits each the same.
    runs = [lambda b=b: ours(inputs, batch_size=b) for b in batch_sizes] + [lambda: ref(inputs, batch_size=1)]
    *ours_times, ref_time = timed_together(runs, args.repeat)
    rows = []
    for batch_size, spent in zip(batch_sizes, ours_times):
        case = f"LayoutLM-base, {len(inputs)} questions on 150-400 words, batch {batch_size}"
        if batch_size > 1:
            case += " (transformers: batch 1)"
        rows.append((case, spent / len(inputs) * 1000, ref_time / len(inputs) * 1000, "ms/question"))
    print(table(rows))
    flops = matmul_flops(lambda: ref(inputs, batch_size=1)) / len(inputs)
    print("\n" + arithmetic_bound(flops, ours_times[0] / len(inputs), ref_time / len(inputs), "question"))


def check_same_answers(ours: list, ref: list) -> None:
    """Both libraries must give the same answers, or the timings compare different work."""
    for got, expected in zip(ours, ref):
        got, expected = got if isinstance(got, list) else [got], expected if isinstance(expected, list) else [expected]
        if [a["answer"] for a in got] != [a["answer"] for a in expected] or any(
                abs(a["score"] - b["score"]) > 1e-4 for a, b in zip(got, expected)):
            raise SystemExit(f"the answers differ: {got} vs {expected}")


if __name__ == "__main__":
    main()

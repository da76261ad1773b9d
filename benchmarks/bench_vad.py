"""Voice activity detection on 3 minutes of speech: lightpipe's Silero VAD against the silero-vad package's own
get_speech_timestamps (its TorchScript model, window by window) and faster-whisper's VAD (ONNX, encoder batched),
all on the same 16 kHz samples, in turns.

    python benchmarks/bench_vad.py [--repeat 3] [--threads 1]

Prints the median seconds, the real-time factor (seconds of compute per second of audio) and how many
times faster than real time each runs, and checks that lightpipe finds the reference's regions.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np

from common import ROOT, timed_together

LONG_FILE = ROOT / "tests" / "data" / "long_speech.flac"
SECONDS = 180


def three_minutes() -> np.ndarray:
    """The long speech file at 16 kHz, repeated to 3 minutes."""
    from lightpipe.processing.audio_io import load_audio

    speech = load_audio(str(LONG_FILE), 16000)
    reps = -(-SECONDS * 16000 // len(speech))
    return np.tile(speech, reps)[: SECONDS * 16000]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    import torch

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    audio = three_minutes()

    from lightpipe.audio import speech_regions

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import silero_vad

        torch.set_num_threads(threads)  # importing silero_vad sets one thread
        reference_model = silero_vad.load_silero_vad()
    tensor = torch.from_numpy(audio)

    cases = [
        ("lightpipe speech_regions", lambda: speech_regions(audio)),
        ("silero-vad get_speech_timestamps (TorchScript, per window)",
         lambda: silero_vad.get_speech_timestamps(tensor, reference_model)),
    ]
    try:
        from faster_whisper.vad import VadOptions, get_speech_timestamps as fw_timestamps

        options = VadOptions(min_speech_duration_ms=250, min_silence_duration_ms=100, speech_pad_ms=30)
        cases.append(("faster-whisper get_speech_timestamps (ONNX, 1 thread)", lambda: fw_timestamps(audio, options)))
    except ImportError:
        print("faster-whisper is not installed: its row is left out")

    ours = speech_regions(audio)
    reference = [{"start": r["start"] / 16000, "end": r["end"] / 16000}
                 for r in silero_vad.get_speech_timestamps(tensor, reference_model)]
    print(f"{len(ours)} regions; same as the reference: {ours == reference}")

    times = timed_together([fn for _, fn in cases], repeat=args.repeat)
    print(f"\n{SECONDS} s of 16 kHz speech, torch threads: {threads}\n")
    print("| implementation | seconds | real-time factor | × real time |")
    print("|---|---:|---:|---:|")
    for (name, _), spent in zip(cases, times):
        print(f"| {name} | {spent:.3f} | {spent / SECONDS:.5f} | {SECONDS / spent:,.0f}× |")


if __name__ == "__main__":
    main()

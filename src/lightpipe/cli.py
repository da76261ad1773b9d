"""Command line: `lightpipe run | chat | tasks | demo`.

    lightpipe run text-classification "I love it" "I hate it" --model ./my-model --batch-size 8
    lightpipe run text-generation "Once upon a time" -p max_new_tokens=40     (streams the text)
    lightpipe chat --model ./my-chat-model
    lightpipe run question-answering '{"question": "Who?", "context": "John did."}'
    echo "one text per line" | lightpipe run feature-extraction -
    lightpipe tasks
    lightpipe demo
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from .errors import LightpipeError

EXAMPLES = Path(__file__).resolve().parent / "examples"


def _value(text: str):
    """A --param value: JSON when it parses (3, 0.5, true, null, ["a","b"]), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _params(pairs: list[str]) -> dict:
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--param expects key=value, got {pair!r}")
        params[key.replace("-", "_")] = _value(value)
    return params


def _inputs(raw: list[str]) -> Iterator:
    for item in raw:
        if item == "-":
            for line in sys.stdin:
                line = line.rstrip("\n")
                if line:
                    yield _input(line)
        else:
            yield _input(item)


def _input(text: str):
    """A JSON object or array stands for a structured input (QA, text pairs); anything else is text."""
    if text[:1] in "{[":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return text


def _json_default(value):
    try:
        import torch

        if isinstance(value, torch.Tensor):
            return value.tolist()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot print {type(value).__name__} as JSON")


def cmd_run(args) -> int:
    from . import pipeline

    pipe = pipeline(args.task, model=args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    inputs = list(_inputs(args.inputs))
    if not inputs:
        raise SystemExit("no inputs: give them as arguments, or '-' to read lines from standard input")
    params = _params(args.param)
    if pipe.task == "text-generation" and not args.json and int(params.get("num_beams", 1)) == 1:
        for prompt in inputs:  # text as it is generated, one reply per line
            if isinstance(prompt, str) and params.get("return_full_text", True):
                print(prompt, end="", flush=True)
            for piece in pipe.stream(prompt, **params):
                print(piece, end="", flush=True)
            print(flush=True)
        return 0
    for result in pipe(iter(inputs), **params):
        print(json.dumps(result, ensure_ascii=False, default=_json_default), flush=True)
    return 0


def cmd_chat(args) -> int:
    """An interactive chat in the terminal: the history is kept, replies stream; /reset forgets, Ctrl-D leaves."""
    from . import pipeline

    pipe = pipeline("text-generation", model=args.model, device=args.device, dtype=args.dtype)
    params = _params(args.param)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    print("lightpipe chat: /reset forgets the conversation, Ctrl-D leaves.", file=sys.stderr)
    while True:
        try:
            text = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not text.strip():
            continue
        if text.strip() == "/reset":
            history = list(system)
            print("(conversation reset)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        reply = []
        try:
            for piece in pipe.stream(history, **params):
                reply.append(piece)
                print(piece, end="", flush=True)
        except KeyboardInterrupt:  # stop this reply, keep the chat
            pass
        except LightpipeError as e:
            history.pop()
            print(f"lightpipe: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        print(flush=True)
        history.append({"role": "assistant", "content": "".join(reply)})


def cmd_tasks(args) -> int:
    from .tasks import TASKS

    rows = [(spec.name, ", ".join(spec.aliases) or "-", spec.default_model + (f" (offline: {spec.fallback_model})"
                                                                              if spec.fallback_model else ""))
            for spec in TASKS.values()]
    width = max(len(r[0]) for r in rows)
    alias_width = max(len(r[1]) for r in rows)
    print(f"{'task':<{width}}  {'aliases':<{alias_width}}  default model")
    for name, aliases, model in rows:
        print(f"{name:<{width}}  {aliases:<{alias_width}}  {model}")
    return 0


def cmd_demo(args) -> int:
    """Transcribe the bundled spoken sample with the task's default (offline) speech model, embed the bundled
    sentences with the real all-MiniLM-L6-v2 weights and rank them by similarity, then ask the default (offline)
    chat model a question - no network."""
    import torch

    from . import pipeline

    transcribe = pipeline("automatic-speech-recognition")
    print(f"transcript of {(EXAMPLES / 'sample.flac').name}: {transcribe(str(EXAMPLES / 'sample.flac'))['text'].strip()}")
    sentences = [s for s in (EXAMPLES / "sentences.txt").read_text(encoding="utf-8").splitlines() if s.strip()]
    embed = pipeline("feature-extraction", model="sentence-transformers/all-MiniLM-L6-v2")
    vectors = []
    for hidden in embed(sentences, batch_size=8, return_tensors=True):
        mean = hidden[0].mean(0)  # mean pooling, as all-MiniLM-L6-v2 was trained
        vectors.append(mean / mean.norm())
    matrix = torch.stack(vectors)
    similarity = matrix @ matrix.T
    query = 0
    print(f"query: {sentences[query]}")
    order = similarity[query].argsort(descending=True).tolist()
    for i in order[1:]:
        print(f"  {similarity[query, i]:.3f}  {sentences[i]}")
    chat = pipeline("text-generation")
    question = "What is the capital of France?"
    print(f"chat: {question}\n  ", end="", flush=True)
    for piece in chat.stream([{"role": "user", "content": question}], do_sample=False, max_new_tokens=40):
        print(piece, end="", flush=True)
    print()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightpipe", description="Fast inference pipelines, transformers' API.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a task on inputs and print one JSON line per result")
    run.add_argument("task")
    run.add_argument("inputs", nargs="*", help="texts, JSON objects, or - for lines on standard input")
    run.add_argument("--model", "-m", default=None, help="Hub id, local folder or weight package (default: the task's)")
    run.add_argument("--batch-size", "-b", type=int, default=None)
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or a GPU index")
    run.add_argument("--dtype", default=None, help="auto, float32, float16 or bfloat16")
    run.add_argument("--param", "-p", action="append", default=[], metavar="KEY=VALUE",
                     help="a task parameter, e.g. top_k=3 or aggregation_strategy=simple (repeatable)")
    run.add_argument("--json", action="store_true",
                     help="text-generation: print JSON results instead of streaming the text")
    run.set_defaults(func=cmd_run)
    chat = sub.add_parser("chat", help="chat with a text-generation model in the terminal")
    chat.add_argument("--model", "-m", default=None, help="Hub id, local folder, GGUF file (default: the task's)")
    chat.add_argument("--system", default=None, help="a system message that starts the conversation")
    chat.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or a GPU index")
    chat.add_argument("--dtype", default=None, help="auto, float32, float16 or bfloat16")
    chat.add_argument("--param", "-p", action="append", default=[], metavar="KEY=VALUE",
                      help="a generation parameter, e.g. max_new_tokens=200 or do_sample=false (repeatable)")
    chat.set_defaults(func=cmd_chat)
    tasks = sub.add_parser("tasks", help="list tasks, aliases and default models")
    tasks.set_defaults(func=cmd_tasks)
    demo = sub.add_parser("demo", help="an offline demo on the bundled sample sentences")
    demo.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LightpipeError as e:
        print(f"lightpipe: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

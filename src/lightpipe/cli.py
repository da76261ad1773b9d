"""Command line: `lightpipe run | chat | tasks | demo | offline-demo`.

    lightpipe run text-classification "I love it" "I hate it" --model ./my-model --batch-size 8
    lightpipe run text-generation "Once upon a time" -p max_new_tokens=40     (streams the text)
    lightpipe run automatic-speech-recognition talk.mp3 --format srt > talk.srt
    lightpipe chat --model ./my-chat-model
    lightpipe run question-answering '{"question": "Who?", "context": "John did."}'
    echo "one text per line" | lightpipe run feature-extraction -
    lightpipe tasks
    lightpipe demo                     (the offline console demo; also `lightpipe offline-demo`)
    lightpipe demo text-classification --model ./my-model      (a Gradio web demo)
    lightpipe --version

Usage errors (a malformed -p, no inputs, a --format the task cannot give) exit with status 2 before any model is
loaded; lightpipe's own errors too. An input that fails does not stop a run: its line holds an error record and the
run exits with status 1 at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from .errors import LightpipeError

EXAMPLES = Path(__file__).resolve().parent / "examples"
SUBTITLE_FORMATS = ("srt", "vtt", "txt")
FORMATS = ("json",) + SUBTITLE_FORMATS


class UsageError(Exception):
    """A command line that cannot run (printed as `lightpipe: error: ...`, exit status 2, before any model loads)."""


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
            raise UsageError(f"--param expects key=value, got {pair!r}")
        params[key.replace("-", "_")] = _value(value)
    return params


def _inputs(raw: list[str]) -> Iterator:
    """The inputs in order; `-` reads standard input, one input a line. A blank line is the input "" (the pipeline
    answers it or gives an error record in its place), so output lines stay aligned with input lines."""
    for item in raw:
        if item == "-":
            for line in sys.stdin:
                yield _input(line.rstrip("\r\n"))
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


def _print_error(error: BaseException) -> None:
    kind = error.record["type"] if isinstance(error, _Failed) else type(error).__name__
    print(f"lightpipe: {kind}: {error}", file=sys.stderr, flush=True)


class _Failed(Exception):
    """An input's error record from a pipeline called with on_error="record"."""

    def __init__(self, record: dict):
        super().__init__(record["error"])
        self.record = record


def _is_record(result) -> bool:
    return isinstance(result, dict) and set(result) == {"error", "type"}


def _results(pipe, inputs: Iterator, params: dict) -> Iterator[tuple]:
    """(input, result or _Failed) per input, in order: the inputs go to the pipeline as one stream (batched and
    prefetched as it does), with on_error="record" keeping each failure in its place."""
    import collections

    given: collections.deque = collections.deque()

    def remembered():
        for item in inputs:
            given.append(item)
            yield item

    for result in pipe(remembered(), **params, on_error="record"):
        yield given.popleft(), _Failed(result) if _is_record(result) else result


def _audio_seconds(item) -> float | None:
    """The length of an audio file input (ends a last subtitle whose end Whisper left open), when it can be read."""
    if not isinstance(item, str) or not Path(item).is_file():
        return None
    try:
        import soundfile

        return float(soundfile.info(item).duration)
    except Exception:  # noqa: BLE001 - only a refinement; the subtitles estimate the end without it
        return None


def _output_name(item, index: int, fmt: str, used: set) -> str:
    stem = Path(item).stem if isinstance(item, str) and item and "\n" not in item and len(item) < 4096 else ""
    name = f"{stem or f'input-{index}'}.{fmt}"
    n = 1
    while name in used:
        n += 1
        name = f"{stem or f'input-{index}'}-{n}.{fmt}"
    used.add(name)
    return name


def _check_run_args(args, params: dict) -> str:
    """Usage checks of `run` that need no model; returns the output format."""
    from .tasks import get_task

    task = get_task(args.task).name  # UnsupportedTask (status 2) before anything loads
    fmt = args.format or ("json" if args.json else None)
    if args.json and fmt != "json":
        raise UsageError(f"--json and --format {fmt} disagree; give one of them.")
    if fmt in SUBTITLE_FORMATS and task != "automatic-speech-recognition":
        if not (fmt == "txt" and task == "text-generation"):
            raise UsageError(f"--format {fmt} is for automatic-speech-recognition; {task} prints JSON lines "
                             "(--format json).")
    if args.output_dir is not None and (fmt not in SUBTITLE_FORMATS or task != "automatic-speech-recognition"):
        raise UsageError("--output-dir writes subtitle or transcript files: give automatic-speech-recognition "
                         "--format srt, vtt or txt.")
    if fmt in ("srt", "vtt"):
        stamps = params.setdefault("return_timestamps", True)  # subtitles need timestamps: ask for them
        if stamps in (None, False):
            raise UsageError(f"--format {fmt} needs timestamps: drop return_timestamps={json.dumps(stamps)} "
                             "(or give return_timestamps=true or \"word\").")
    if "on_error" in params:
        raise UsageError("run keeps a failing input's error in its place (its JSON line holds {\"error\", \"type\"}); "
                         "on_error is not a -p option here.")
    if not args.inputs:
        raise UsageError("no inputs: give them as arguments, or '-' to read lines from standard input.")
    return fmt or ("txt" if task == "text-generation" else "json")


def _check_params(pipe, params: dict) -> None:
    """An unknown or invalid parameter is one error for the whole run (status 2), not one per input: the names and
    values, and what the call resolves from them (a generation config)."""
    pipe._checked(dict(params))
    try:
        pipe._route(dict(params))
    except LightpipeError:
        raise
    except Exception:  # noqa: BLE001 - a parameter the task checks per call (zero-shot's candidate_labels)
        pass


def _robust(args, params: dict) -> dict:
    """--robust (the default for automatic-speech-recognition; --no-robust turns it off): voice activity detection and
    the hallucination guards, under the -p parameters (which win)."""
    from .tasks import get_task

    if get_task(args.task).name != "automatic-speech-recognition":
        if args.robust:
            raise UsageError("--robust is for automatic-speech-recognition.")
        return params
    if args.robust is False:
        return params
    from .tasks.automatic_speech_recognition import robust_params

    return robust_params(params)


def cmd_run(args) -> int:
    params = _params(args.param)
    fmt = _check_run_args(args, params)
    params = _robust(args, params)
    inputs = _inputs(args.inputs)
    first = next(inputs, _NOTHING)  # standard input may hold nothing: say so before a model loads
    if first is _NOTHING:
        raise UsageError("no inputs: standard input was empty.")
    inputs = _chain(first, inputs)
    if args.output_dir is not None:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)

    from . import pipeline

    pipe = pipeline(args.task, model=args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    _check_params(pipe, params)
    failed = 0
    beams = params.get("num_beams", 1)
    if pipe.task == "text-generation" and fmt == "txt" and isinstance(beams, int) and beams > 1:
        fmt = "json"  # beam search cannot stream: results as JSON lines
    if pipe.task == "text-generation" and fmt == "txt":
        for prompt in inputs:  # text as it is generated, one reply per line
            try:
                if isinstance(prompt, str) and params.get("return_full_text", True):
                    print(prompt, end="", flush=True)
                for piece in pipe.stream(prompt, **params):
                    print(piece, end="", flush=True)
            except Exception as error:  # noqa: BLE001 - the reply's line stays (empty), the run goes on
                failed += 1
                _print_error(error)
            print(flush=True)
        return 1 if failed else 0
    used: set = set()
    for index, (item, result) in enumerate(_results(pipe, inputs, params)):
        if isinstance(result, Exception):
            failed += 1
            if fmt == "json":
                print(json.dumps(result.record, ensure_ascii=False), flush=True)
            else:
                _print_error(result)
            continue
        if fmt == "json":
            print(json.dumps(result, ensure_ascii=False, default=_json_default), flush=True)
            continue
        from . import subtitles

        try:
            if fmt == "txt":
                text = subtitles.to_txt(result)
            else:
                text = subtitles.FORMATS[fmt](result, duration=_audio_seconds(item))
        except LightpipeError as error:
            failed += 1
            _print_error(error)
            continue
        if args.output_dir is not None:
            path = Path(args.output_dir) / _output_name(item, index, fmt, used)
            path.write_text(text, encoding="utf-8")
            print(path, file=sys.stderr, flush=True)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()
    return 1 if failed else 0


_NOTHING = object()


def _chain(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest


def cmd_chat(args) -> int:
    """An interactive chat in the terminal: the history is kept, replies stream; /reset forgets, Ctrl-D leaves."""
    from . import pipeline

    params = _params(args.param)
    pipe = pipeline("text-generation", model=args.model, device=args.device, dtype=args.dtype)
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
    """`lightpipe demo TASK`: a Gradio web demo of the task's pipeline; `lightpipe demo` alone: the console demo."""
    if args.task is None:
        if args.model is not None or args.share or args.port is not None:
            raise UsageError("--model, --share and --port go with a task: lightpipe demo TASK [--model M] [--share]; "
                             "`lightpipe demo` alone runs the offline console demo.")
        return cmd_offline_demo(args)
    from .tasks import get_task

    get_task(args.task)  # an unknown task fails before anything loads
    params = _params(args.param)
    try:
        import gradio  # noqa: F401
    except ImportError as e:
        raise UsageError('the web demo needs Gradio: pip install "lightpipe[demo]"') from e
    from . import pipeline
    from .demo import demo

    pipe = pipeline(args.task, model=args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    app = demo(pipe, **params)
    app.launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


def cmd_offline_demo(args) -> int:
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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # every usage error as `lightpipe: error: ...`, status 2 (subcommands too)
        self.print_usage(sys.stderr)
        self.exit(2, f"lightpipe: error: {message}\n")


def _log_notices() -> logging.Handler:
    """lightpipe's warnings (the offline fallback notice, ignored options) on standard error, each message once."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("lightpipe: %(message)s"))
    seen: set = set()

    def once(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in seen:
            return False
        seen.add(message)
        return True

    handler.addFilter(once)
    return handler


def cmd_serve(args) -> int:
    """Listen at once and load the pipeline in the background (503 until ready); SIGTERM finishes requests in
    flight, then stops."""
    import os

    from .serve import serve

    serve(args.task, args.model, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
          batch_size=args.batch_size, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
          timeout_s=args.timeout_s, max_body_mb=args.max_body_mb,
          api_key=args.api_key or os.environ.get("LIGHTPIPE_API_KEY") or None,
          allow_paths=args.allow_paths, allow_urls=args.allow_urls, access_log=args.access_log)
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    parser = _Parser(prog="lightpipe", description="Fast inference pipelines, transformers' API.")
    parser.add_argument("--version", action="version", version=f"lightpipe {__version__}")
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
                     help="text-generation: print JSON results instead of streaming the text (= --format json)")
    run.add_argument("--format", "-f", choices=FORMATS, default=None,
                     help="json: one JSON line per input (default; text-generation streams text); speech: srt or "
                          "vtt subtitles (timestamps asked for), txt the transcript")
    run.add_argument("--output-dir", "-o", default=None, metavar="DIR",
                     help="with --format srt|vtt|txt: one file per input in DIR (named after the input file)")
    run.add_argument("--robust", action=argparse.BooleanOptionalAction, default=None,
                     help="speech: decode only the speech (voice activity detection) with hallucination guards "
                          "(on by default for automatic-speech-recognition; --no-robust: plain decoding)")
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
    demo = sub.add_parser("demo", help="a Gradio web demo of a task (lightpipe demo TASK); without a task, the "
                                       "offline console demo")
    demo.add_argument("task", nargs="?", default=None, help="the task to demo in the browser (default: console demo)")
    demo.add_argument("--model", "-m", default=None, help="Hub id, local folder or weight package (default: the task's)")
    demo.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    demo.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)")
    demo.add_argument("--port", type=int, default=None, help="the port (default: Gradio's, 7860 or the next free)")
    demo.add_argument("--batch-size", "-b", type=int, default=None,
                      help="requests batched together by Gradio's queue and the pipeline")
    demo.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or a GPU index")
    demo.add_argument("--dtype", default=None, help="auto, float32, float16 or bfloat16")
    demo.add_argument("--param", "-p", action="append", default=[], metavar="KEY=VALUE",
                      help="a task parameter used for every request (repeatable)")
    demo.set_defaults(func=cmd_demo)
    offline = sub.add_parser("offline-demo", help="the offline console demo: transcribe the bundled sample, rank "
                                                  "the bundled sentences, ask the chat model (no network)")
    offline.set_defaults(func=cmd_offline_demo)
    serve = sub.add_parser("serve", help="serve a task over HTTP: dynamic batching, OpenAI-compatible routes")
    serve.add_argument("task")
    serve.add_argument("--model", "-m", default=None, help="Hub id, local folder or weight package (default: the task's)")
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--batch-size", "-b", type=int, default=8, help="inputs per model batch, at most (default 8)")
    serve.add_argument("--max-wait-ms", type=float, default=5.0,
                       help="how long a request may wait for others to join its batch (default 5)")
    serve.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429 (default 256)")
    serve.add_argument("--timeout-s", type=float, default=60.0, help="a request's time limit before 504 (default 60)")
    serve.add_argument("--max-body-mb", type=float, default=25.0, help="the largest request body (default 25)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: none)")
    serve.add_argument("--allow-paths", action="store_true", help="let inputs name files on the server")
    serve.add_argument("--allow-urls", action="store_true", help="let inputs name http(s) URLs for the server to fetch")
    serve.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or a GPU index")
    serve.add_argument("--dtype", default=None, help="auto, float32, float16 or bfloat16")
    serve.add_argument("--access-log", action="store_true", help="log a line per request")
    serve.set_defaults(func=cmd_serve)
    args = parser.parse_args(argv)
    notices = _log_notices()
    logger = logging.getLogger("lightpipe")
    logger.addHandler(notices)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"lightpipe: error: {e}", file=sys.stderr)
        return 2
    except LightpipeError as e:
        print(f"lightpipe: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    finally:
        logger.removeHandler(notices)


if __name__ == "__main__":
    sys.exit(main())

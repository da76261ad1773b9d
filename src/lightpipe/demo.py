"""A Gradio web demo of a pipeline, its inputs and outputs chosen by the task.

    import lightpipe
    pipe = lightpipe.pipeline("automatic-speech-recognition")
    app = lightpipe.demo(pipe)          # a gradio Interface (ChatInterface for chat models), not launched
    app.launch()                        # or: lightpipe demo automatic-speech-recognition

Speech takes an uploaded file or the microphone; images an upload; zero-shot tasks their labels beside the input;
text generation streams its text (`pipe.stream`), in a chat when the tokenizer has a chat template. Requests that
wait in Gradio's queue are answered together (`batch=True`, `max_batch_size` = the pipeline's batch size), one batch
at a time on the model. Gradio is imported when a demo is built, never by `import lightpipe`.
"""

from __future__ import annotations

import json
import logging
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import LightpipeError, MissingDependency

logger = logging.getLogger(__name__)

EXAMPLES = Path(__file__).resolve().parent / "examples"
DEFAULT_BATCH_SIZE = 4  # requests answered together when the pipeline was built without a batch size

__all__ = ["demo"]


def _gradio():
    try:
        import gradio
    except ImportError as e:
        raise MissingDependency('the web demo needs Gradio: pip install "lightpipe[demo]"') from e
    return gradio


def _sentences() -> list[str]:
    path = EXAMPLES / "sentences.txt"
    return [s for s in path.read_text(encoding="utf-8").splitlines() if s.strip()] if path.is_file() else []


def _labels(text: Any) -> list[str]:
    """ "a, b, c" -> ["a", "b", "c"] (a Gradio text box's labels)."""
    return [label.strip() for label in str(text or "").split(",") if label.strip()]


class _Failed(Exception):
    """A request's error record (the pipeline was called with on_error="record")."""

    def __init__(self, record: dict):
        super().__init__(f"{record['type']}: {record['error']}")


class _Batched:
    """A Gradio batch function over the pipeline: `fn(*columns)` gets one list per input component and returns one
    list per output component. Requests are grouped by their call parameters (zero-shot labels differ between users)
    and each group is one pipeline call with on_error="record": one bad request gets an empty output (or, alone in
    its batch, Gradio's error message) and the others their answers."""

    def __init__(self, gr, pipe, params: dict, batch_size: int, prepare: Callable, show: Callable, n_outputs: int = 1):
        # prepare(*row) -> (pipeline input, call parameters); show(result, pipeline input) -> the output value(s)
        self.gr, self.pipe, self.params, self.batch_size = gr, pipe, params, batch_size
        self.prepare, self.show, self.n_outputs = prepare, show, n_outputs

    def _call(self, inputs: list, params: dict) -> list:
        """One pipeline call for a group of requests; a failing input comes back as a _Failed in its place."""
        options = {**self.params, **params, "batch_size": self.batch_size}
        try:
            if len(inputs) == 1:  # called alone: a list of one would be unwrapped by some tasks (fill-mask, QA)
                return [self.pipe(inputs[0], **options)]
            results = self.pipe(inputs, **options, on_error="record")
        except LightpipeError as error:  # the group's parameters (e.g. no labels): each of its requests fails
            return [_Failed({"error": str(error), "type": type(error).__name__})] * len(inputs)
        return [_Failed(r) if isinstance(r, dict) and set(r) == {"error", "type"} else r for r in results]

    def __call__(self, *columns):
        rows = list(zip(*columns))
        prepared: list = [None] * len(rows)
        groups: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            try:
                value, params = self.prepare(*row)
            except LightpipeError as error:
                prepared[i] = _Failed({"error": str(error), "type": type(error).__name__})
                continue
            prepared[i] = (value, params)
            groups.setdefault(json.dumps(params, sort_keys=True, default=str), []).append(i)
        results: list = [p if isinstance(p, _Failed) else None for p in prepared]
        for indices in groups.values():
            params = prepared[indices[0]][1]
            for i, answer in zip(indices, self._call([prepared[i][0] for i in indices], params)):
                results[i] = answer
        errors = [r for r in results if isinstance(r, _Failed)]
        if errors and len(rows) == 1:
            raise self.gr.Error(str(errors[0]))
        for error in errors:
            logger.warning("a demo request failed: %s", error)
        shown = [(None,) * self.n_outputs if isinstance(r, _Failed) else self._tuple(self.show(r, prepared[i][0]))
                 for i, r in enumerate(results)]
        return [list(column) for column in zip(*shown)] if shown else [[] for _ in range(self.n_outputs)]

    def _tuple(self, value) -> tuple:
        return value if self.n_outputs > 1 else (value,)


# ------------------------------------------------------------------------------------------------ outputs
def _scores(result: Any, key: str = "label") -> dict[str, float]:
    """[{"label", "score"}, ...] (or one dict) -> {label: score} for gr.Label."""
    items = result if isinstance(result, list) else [result]
    if items and isinstance(items[0], list):  # one input's list of lists (top_k per text): the first
        items = items[0]
    return {str(item[key]): float(item["score"]) for item in items}


def _zero_shot_scores(result: dict) -> dict[str, float]:
    return dict(zip(result["labels"], map(float, result["scores"])))


def _entities(result: list[dict], text: str) -> dict:
    """Token classification -> gr.HighlightedText's {"text", "entities"}."""
    return {"text": text, "entities": [{"entity": e.get("entity_group", e.get("entity")), "start": e["start"],
                                        "end": e["end"]} for e in result]}


def _generated_text(result: Any) -> str:
    item = result[0] if isinstance(result, list) else result
    for key in ("generated_text", "summary_text", "translation_text"):
        if key in item:
            return item[key]
    return json.dumps(item, ensure_ascii=False)


def _embedding(result: Any) -> dict:
    import torch

    hidden = torch.as_tensor(result, dtype=torch.float32)
    pooled = hidden.reshape(-1, hidden.shape[-1]).mean(0)
    return {"shape": list(hidden.shape), "mean_pooled": [round(float(x), 6) for x in pooled]}


# ------------------------------------------------------------------------------------------------ the app
def _text_generation(gr, pipe, params: dict, title: str, examples):
    """Streaming text generation: a ChatInterface when the tokenizer has a chat template, else prompt -> text."""
    def plain_text(content: Any) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, list):  # Gradio's message parts
            return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
        if isinstance(content, dict):
            return content.get("text", "")
        return str(content)

    def failed(error: LightpipeError):
        return gr.Error(f"{type(error).__name__}: {error}")

    if getattr(pipe.tokenizer, "chat_template", None):
        def reply(message: Any, history: list) -> Iterator[str]:
            chat = [{"role": m["role"], "content": plain_text(m["content"])} for m in history
                    if isinstance(m, dict) and m.get("role") in ("user", "assistant", "system")]
            chat.append({"role": "user", "content": plain_text(message)})
            text = ""
            try:
                for piece in pipe.stream(chat, **params):
                    text += piece
                    yield text
            except LightpipeError as error:
                raise failed(error) from error

        return gr.ChatInterface(reply, title=title, examples=examples or ["What is the capital of France?"],
                                cache_examples=False, analytics_enabled=False, concurrency_limit=1,
                                api_name="chat")

    def complete(prompt: str) -> Iterator[str]:
        text = prompt if params.get("return_full_text", True) else ""
        try:
            for piece in pipe.stream(prompt, **params):
                text += piece
                yield text
        except LightpipeError as error:
            raise failed(error) from error

    return gr.Interface(complete, gr.Textbox(label="prompt", lines=3), gr.Textbox(label="text", lines=8),
                        examples=examples or [["Once upon a time"]], title=title, cache_examples=False,
                        flagging_mode="never", analytics_enabled=False, concurrency_limit=1, api_name="predict")


def demo(pipe, *, title: str | None = None, examples: list | None = None, batch_size: int | None = None, **params):
    """A Gradio app for `pipe`, chosen by its task; `.launch()` it (or mount it) yourself.

    title: the page title (default: the task). examples: Gradio examples in the inputs' order (default: the bundled
    samples where the task has some). batch_size: requests answered together (default: the pipeline's batch size,
    else 4). Other keyword arguments are task parameters used for every request (e.g. max_new_tokens=64).
    Returns a `gr.Interface`, or a `gr.ChatInterface` for a text-generation model with a chat template."""
    gr = _gradio()
    task = getattr(pipe, "task", None)
    if not task:
        raise LightpipeError("demo() takes a lightpipe pipeline (pipeline(task, ...)).")
    pipe._checked(dict(params))  # unknown or invalid parameters fail here, not at the first request
    title = title or f"lightpipe: {task}"
    size = batch_size or pipe._defaults.get("batch_size") or DEFAULT_BATCH_SIZE
    sentences = _sentences()
    if task == "text-generation":
        return _text_generation(gr, pipe, params, title, examples).queue(default_concurrency_limit=1)

    def batched(prepare, show, n_outputs=1) -> _Batched:
        return _Batched(gr, pipe, params, size, prepare, show, n_outputs)

    def plain(value):
        return value, {}

    text_in = gr.Textbox(label="text", lines=3)
    image_in = gr.Image(label="image", type="filepath")
    labels_in = gr.Textbox(label="labels (comma separated)")
    if task == "automatic-speech-recognition":
        fn = batched(plain, lambda r, _: r["text"].strip())
        inputs = [gr.Audio(label="speech", sources=["upload", "microphone"], type="filepath")]
        outputs = [gr.Textbox(label="transcript", lines=4)]
        default = [[str(EXAMPLES / "sample.flac")]] if (EXAMPLES / "sample.flac").is_file() else None
    elif task == "text-classification":
        params.setdefault("top_k", None)  # every label with its score
        fn = batched(plain, lambda r, _: _scores(r))
        inputs, outputs, default = [text_in], [gr.Label(label="labels")], [[s] for s in sentences[2:5]]
    elif task == "token-classification":
        params.setdefault("aggregation_strategy", "simple")
        fn = batched(plain, _entities)
        inputs, outputs = [text_in], [gr.HighlightedText(label="entities")]
        default = [["My name is Clara and I live in Berkeley, California."]]
    elif task == "fill-mask":
        mask = getattr(pipe.tokenizer, "mask_token", None) or "[MASK]"
        fn = batched(plain, lambda r, _: _scores(r, "token_str"))
        inputs, outputs = [text_in], [gr.Label(label="fillers")]
        default = [[f"Paris is the {mask} of France."]]
    elif task == "question-answering":
        fn = batched(lambda q, c: ({"question": q, "context": c}, {}), lambda r, _: _scores(r, "answer"))
        inputs = [gr.Textbox(label="question"), gr.Textbox(label="context", lines=5)]
        outputs = [gr.Label(label="answer")]
        default = [["What is the man riding?", sentences[3]]] if len(sentences) > 3 else None
    elif task == "zero-shot-classification":
        def prepare(text, labels, multi):
            return text, {"candidate_labels": _labels(labels), "multi_label": bool(multi)}
        fn = batched(prepare, lambda r, _: _zero_shot_scores(r))
        inputs = [text_in, labels_in, gr.Checkbox(label="several labels can be true (multi_label)")]
        outputs = [gr.Label(label="labels")]
        default = [[s, "food, sports, finance, animals", False] for s in sentences[:5:2]]
    elif task in ("feature-extraction", "image-feature-extraction"):
        fn = batched(plain, lambda r, _: _embedding(r))
        text = task == "feature-extraction"
        inputs, outputs = [text_in if text else image_in], [gr.JSON(label="embedding")]
        default = [[s] for s in sentences[:2]] if text else None
    elif task == "image-classification":
        fn = batched(plain, lambda r, _: _scores(r))
        inputs, outputs, default = [image_in], [gr.Label(label="labels")], None
    elif task == "zero-shot-image-classification":
        fn = batched(lambda image, labels: (image, {"candidate_labels": _labels(labels)}), lambda r, _: _scores(r))
        inputs, outputs, default = [image_in, labels_in], [gr.Label(label="labels")], None
    elif task == "document-question-answering":
        fn = batched(lambda image, question: ({"image": image, "question": question}, {}),
                     lambda r, _: _scores(r, "answer"))
        inputs, outputs, default = [image_in, gr.Textbox(label="question")], [gr.Label(label="answer")], None
    else:  # summarization, translation, text2text-generation
        fn = batched(plain, lambda r, _: _generated_text(r))
        inputs, outputs = [text_in], [gr.Textbox(label="output", lines=5)]
        default = [[" ".join(sentences[:4])]] if sentences else None
    app = gr.Interface(fn, inputs, outputs, examples=examples or default, title=title, batch=True,
                       max_batch_size=size, cache_examples=False, flagging_mode="never", analytics_enabled=False,
                       concurrency_limit=1, api_name="predict")
    return app.queue(default_concurrency_limit=1)


class _CallableModule(types.ModuleType):
    """`lightpipe.demo(pipe)` works whether `lightpipe.demo` is this function or, once imported, this module."""

    def __call__(self, *args, **kwargs):
        return demo(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

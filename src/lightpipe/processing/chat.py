"""Chat templates: a conversation (a list of {"role", "content"} messages) rendered into one prompt string.

Checkpoints ship their prompt format as a Jinja2 template (tokenizer_config.json's "chat_template", or a
chat_template.jinja file beside it). We render it the way transformers' `apply_chat_template(...,
tokenize=False)` does, so the same conversation gives the same prompt, character for character:

- a sandboxed, immutable Jinja2 environment (templates come from the Hub: untrusted code) with
  trim_blocks, lstrip_blocks and the loop-control extension (`{% break %}`, `{% continue %}`);
- the helpers templates call: `raise_exception(message)`, `strftime_now(format)`, a `tojson` filter that
  does not escape HTML and takes `indent`, `ensure_ascii`, `separators`, `sort_keys`, a `dict` builder,
  and a `namespace` that refuses underscore names; a `{% generation %}` block renders its body;
- the variables: `messages`, `tools`, `documents`, `add_generation_prompt`, the tokenizer's special
  tokens (`bos_token`, `eos_token`, ...) and any extra keyword a caller passes (`enable_thinking=False`);
- `continue_final_message`: the prompt ends right after the final message's text (no end-of-turn
  token), so the model continues that message instead of starting a new one.

Everything a template may refuse or fail on becomes an `InvalidInput` that says what to change.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from ..errors import InvalidInput, MissingDependency

# Names under which a message may carry its reasoning; templates read the first, gpt-oss ones "thinking".
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# Appended to the text of the final message to find where it ends in the rendered prompt (the same
# marker transformers uses, so templates that test the content see the same string).
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
NO_TEMPLATE = ("this checkpoint has no chat template; pass a plain prompt or a tokenizer with a chat_template "
               "(or give the template itself as chat_template=...).")


# ----------------------------------------------------------------------------------------------
# Telling chats from prompts


def is_chat(inputs: Any) -> bool:
    """Whether `inputs` is one conversation: a non-empty list (or tuple) whose first item is a message-like
    dict (it has a "role"). Such a list is one chat, never a batch of inputs."""
    return isinstance(inputs, (list, tuple)) and len(inputs) > 0 and _looks_like_message(inputs[0])


def is_chat_batch(inputs: Any) -> bool:
    """Whether `inputs` is a list of conversations (each one `is_chat`)."""
    return (isinstance(inputs, (list, tuple)) and len(inputs) > 0
            and all(is_chat(chat) for chat in inputs))


def _looks_like_message(item: Any) -> bool:
    return isinstance(item, Mapping) and "role" in item


# ----------------------------------------------------------------------------------------------
# Rendering


def render_chat(template: str | None, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
                continue_final_message: bool | str = False, bos_token: str | None = None,
                eos_token: str | None = None, tools: Sequence[Mapping[str, Any]] | None = None,
                documents: Sequence[Mapping[str, Any]] | None = None,
                part_types: Sequence[str] = ("text",), **extra: Any) -> str:
    """Render one conversation with a chat template, as transformers' apply_chat_template(tokenize=False).

    add_generation_prompt: end with the header that opens an assistant reply. continue_final_message:
    end right after the final message's text so the model continues it (True continues "content"; a
    string names another field, e.g. "reasoning_content"). The two exclude each other. bos_token,
    eos_token and `extra` (other special tokens such as unk_token, or template switches such as
    enable_thinking) become template variables; None values are left out, as transformers leaves out a
    tokenizer's unset special tokens. `part_types`: the kinds of content parts accepted in messages whose
    content is a list of {"type": ...} parts.
    """
    if template is None or (isinstance(template, str) and not template.strip()):
        raise InvalidInput(NO_TEMPLATE)
    if not isinstance(template, str):
        raise InvalidInput(f"a chat template is a Jinja2 string, not {type(template).__name__}.")
    if continue_final_message and add_generation_prompt:
        raise InvalidInput("continue_final_message and add_generation_prompt exclude each other: "
                           "continue_final_message lets the model continue the final message, add_generation_prompt "
                           "opens a new assistant message. Set one of them.")
    chat = _checked_messages(messages, part_types)
    variables = {name: value for name, value in {"bos_token": bos_token, "eos_token": eos_token, **extra}.items()
                 if value is not None}
    variables = _template_data(variables)
    tools = _checked_tools(tools)
    documents = _checked_documents(documents)
    compiled = _compile(template)
    final_text = None
    if continue_final_message:
        final_text = _tag_final_message(chat, template, continue_final_message)
    rendered = _render(compiled, messages=chat, tools=tools, documents=documents,
                       add_generation_prompt=bool(add_generation_prompt), **variables)
    if final_text is not None:
        rendered = _cut_after_final_message(rendered, final_text)
    return rendered


def apply_chat_template(tokenizer: Any, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
                        continue_final_message: bool | str = False, chat_template: str | None = None,
                        tools: Sequence[Mapping[str, Any]] | None = None,
                        documents: Sequence[Mapping[str, Any]] | None = None, **extra: Any) -> str:
    """render_chat with a lightpipe Tokenizer's template and special tokens. `chat_template` overrides the
    tokenizer's: a template string, or the name of one of the checkpoint's named templates."""
    template = select_template(getattr(tokenizer, "chat_template", None), chat_template, tools=tools)
    special = dict(getattr(tokenizer, "special_tokens", {}) or {})
    return render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                       continue_final_message=continue_final_message, tools=tools, documents=documents,
                       **{**special, **extra})  # a caller's keyword wins over a special token, as in transformers


def select_template(templates: str | Mapping[str, str] | None, chosen: str | None = None, *,
                    tools: Sequence[Any] | None = None) -> str:
    """The template to render: `chosen` (a template string, or the name of one of `templates`), else the
    checkpoint's single template, else from its named ones "tool_use" when tools are given, then "default"."""
    if isinstance(templates, Mapping):
        if chosen is not None:
            return templates.get(chosen, chosen)
        if tools is not None and "tool_use" in templates:
            return templates["tool_use"]
        if "default" in templates:
            return templates["default"]
        raise InvalidInput("this checkpoint has several chat templates and none is the default; name one with "
                           f"chat_template=..., one of {sorted(templates)}.")
    if chosen is not None:
        return chosen
    if templates is None:
        raise InvalidInput(NO_TEMPLATE)
    return templates


def wants_continuation(messages: Sequence[Mapping[str, Any]],
                       continue_final_message: bool | str | None = None) -> bool | str:
    """The continue_final_message to use: the caller's, else True when the chat ends with an assistant message
    (a prefilled reply is continued, as transformers' text-generation pipeline does by default)."""
    if continue_final_message is not None:
        return continue_final_message
    return bool(messages) and isinstance(messages[-1], Mapping) and messages[-1].get("role") == "assistant"


def append_reply(messages: Sequence[Mapping[str, Any]], reply: str, *, continued: bool | str = False) -> list[dict]:
    """The conversation a text-generation pipeline returns: the input messages plus the reply as a new
    assistant message, or, when the final message was continued, that message with the reply appended to its
    content. The caller's messages are not changed."""
    out = [dict(message) for message in messages]
    if not continued:
        out.append({"role": "assistant", "content": reply})
        return out
    last = out[-1]
    content = last.get("content")
    if isinstance(content, str):
        last["content"] = content + reply
    elif isinstance(content, list):
        # transformers fails on a list content here; we extend its last text part, as rendering continued it.
        parts = [dict(part) if isinstance(part, Mapping) else part for part in content]
        for part in reversed(parts):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                part["text"] += reply
                break
        last["content"] = parts
    else:
        last["content"] = reply
    return out


# ----------------------------------------------------------------------------------------------
# Checking what goes into the template


def _checked_messages(messages: Any, part_types: Sequence[str]) -> list[dict]:
    """A fresh, plain copy of the conversation (the template may not touch the caller's objects), with the
    keys whose value is None dropped (as transformers does: templates test for a key, not for None) and the
    reasoning fields aliased."""
    if isinstance(messages, Mapping) or not isinstance(messages, (list, tuple)):
        raise InvalidInput("a chat is a list of {'role': ..., 'content': ...} messages, "
                           f"not {type(messages).__name__}.")
    if not messages:
        raise InvalidInput("the chat is empty: give at least one {'role': ..., 'content': ...} message.")
    chat = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) and (_is_dataclass_object(message) or _has_model_dump(message)):
            message = _template_data(message)  # a dataclass or pydantic message (the OpenAI client's), as a dict
        if not isinstance(message, Mapping):
            raise InvalidInput(f"chat message {index} is a {type(message).__name__}; each message must be a dict with "
                               "'role' and 'content'.")
        if not isinstance(message.get("role"), str) or not message["role"]:
            raise InvalidInput(f"chat message {index} has no 'role' string (e.g. 'system', 'user', 'assistant'): "
                               f"{_short(message)}")
        if "content" not in message:
            raise InvalidInput(f"chat message {index} has no 'content': {_short(message)}")
        _check_content(index, message["content"], part_types)
        chat.append(_template_data({key: value for key, value in message.items() if value is not None}))
    return _aliased_reasoning(chat)


def _check_content(index: int, content: Any, part_types: Sequence[str]) -> None:
    if content is None or isinstance(content, str):
        return  # None: an assistant turn that only calls tools
    if not isinstance(content, (list, tuple)):
        raise InvalidInput(f"chat message {index} has content of type {type(content).__name__}; it must be a string "
                           "or a list of parts such as {'type': 'text', 'text': ...}.")
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if not isinstance(kind, str):
            raise InvalidInput(f"chat message {index} has a content part without a 'type': {_short(part)}; "
                               "use {'type': 'text', 'text': ...}.")
        if kind not in part_types:
            raise InvalidInput(f"chat message {index} has a content part of type {kind!r}; this pipeline reads "
                               f"parts of type {', '.join(map(repr, part_types))} only.")
        if kind == "text" and not isinstance(part.get("text"), str):
            raise InvalidInput(f"chat message {index} has a text part without a 'text' string: {_short(part)}")


def _aliased_reasoning(chat: list[dict]) -> list[dict]:
    """Reasoning given under any of REASONING_FIELDS is also seen as "reasoning_content" and "thinking"."""
    out = []
    for message in chat:
        reasoning = next((message[key] for key in REASONING_FIELDS if message.get(key) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _checked_tools(tools: Any) -> list | None:
    if tools is None:
        return None
    if isinstance(tools, Mapping) or not isinstance(tools, (list, tuple)):
        raise InvalidInput("tools must be a list of JSON-schema dicts ({'type': 'function', 'function': {...}}).")
    for tool in tools:
        if not isinstance(tool, Mapping):
            raise InvalidInput(f"a tool must be given as its JSON-schema dict, not {type(tool).__name__}: lightpipe "
                               "does not turn Python functions into schemas.")
    return _template_data(list(tools))


def _checked_documents(documents: Any) -> list | None:
    if documents is None:
        return None
    if isinstance(documents, Mapping) or not isinstance(documents, (list, tuple)) \
            or not all(isinstance(doc, Mapping) for doc in documents):
        raise InvalidInput("documents must be a list of dicts, such as {'title': ..., 'text': ...}.")
    return _template_data(list(documents))


def _template_data(value: Any) -> Any:
    """A copy made of plain JSON-like types only. The sandbox guards attribute access, but objects a caller
    puts in a chat (arrays, images, models) have methods it does not know to be dangerous; anything that is
    not plain data becomes a placeholder naming its type, e.g. "<ndarray>" (templates only test for such keys)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums) may carry methods: keep the plain value
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_template_data(key): _template_data(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_template_data(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_template_data(item) for item in value)
    if type(value).__module__ == "numpy" and callable(getattr(value, "item", None)) and getattr(value, "ndim", 1) == 0:
        return _template_data(value.item())  # a numpy scalar (np.bool_(False) must stay falsy)
    if _is_dataclass_object(value):
        return {field.name: _template_data(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if _has_model_dump(value):  # pydantic models, e.g. the OpenAI client's messages
        return _template_data(value.model_dump())
    return f"<{type(value).__name__}>"


def _is_dataclass_object(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _has_model_dump(value: Any) -> bool:
    return not isinstance(value, type) and callable(getattr(value, "model_dump", None))


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ----------------------------------------------------------------------------------------------
# continue_final_message


def _tag_final_message(chat: list[dict], template: str, continue_final_message: bool | str) -> str:
    """Append CONTINUE_TAG to the text the final message is continued from; return that text (untagged)."""
    field = continue_final_message if isinstance(continue_final_message, str) else "content"
    final = chat[-1]
    text = final.get(field)
    if text is None:
        raise InvalidInput(f"continue_final_message is set but the final message has no {field!r} to continue.")
    fields = [field]
    if field in REASONING_FIELDS:  # the reasoning is under several names: tag each copy the template may read
        fields = [name for name in REASONING_FIELDS if final.get(name) == text]
    if not any(name in template for name in fields):
        raise InvalidInput(f"continue_final_message is set to continue {field!r}, but this chat template never reads "
                           "that field.")
    if isinstance(text, (list, tuple)):
        for part in reversed(text):  # the last text part is the one continued
            if isinstance(part, dict) and "text" in part:
                original = part["text"]
                part["text"] = original + CONTINUE_TAG
                return original
        raise InvalidInput("continue_final_message is set but the final message has no text part to continue.")
    if not isinstance(text, str):
        raise InvalidInput(f"continue_final_message is set but the final message's {field!r} is not text.")
    for name in fields:
        final[name] = final[name] + CONTINUE_TAG
    return text


def _cut_after_final_message(rendered: str, final_text: str) -> str:
    """Cut the rendered prompt where the tagged final message ends, dropping the template's end-of-turn."""
    tag = CONTINUE_TAG.strip()
    if final_text.strip() not in rendered or tag not in rendered:
        raise InvalidInput("continue_final_message is set but this chat template does not render the final message "
                           "as given (it changes or drops its text), so there is nothing to continue. Use "
                           "add_generation_prompt instead, or a template that keeps the message.")
    at = rendered.rindex(tag)
    if rendered[at:at + len(CONTINUE_TAG)] == CONTINUE_TAG:
        return rendered[:at]  # the template kept the message's spacing as given
    return rendered[:at].rstrip()  # it trimmed trailing whitespace (e.g. with |trim): so do we


# ----------------------------------------------------------------------------------------------
# The Jinja2 environment


class _TemplateRefused(Exception):
    """raise_exception(...) was called by a template: the message is the template's own."""


def _render(compiled: Any, **variables: Any) -> str:
    from jinja2.exceptions import TemplateError

    try:
        return compiled.render(**variables)
    except _TemplateRefused as e:
        raise InvalidInput(f"the chat template refused these messages: {e}") from e
    except TemplateError as e:  # undefined names used wrongly, sandbox violations, {% ... %} misuse
        raise InvalidInput(f"the chat template failed on these messages ({type(e).__name__}: {e}); check the "
                           "messages' roles and fields against what the template expects.") from e
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
        # A template's own expressions fail on data it did not expect, e.g. `content + '...'` on a parts list.
        raise InvalidInput(f"the chat template failed on these messages ({type(e).__name__}: {e}); check the "
                           "messages' roles and fields against what the template expects.") from e


@functools.lru_cache(maxsize=64)
def _compile(template: str) -> Any:
    """A template string compiled once (the cache is keyed by the string itself)."""
    from jinja2.exceptions import TemplateSyntaxError

    environment = _environment()
    try:
        return environment.from_string(template)
    except TemplateSyntaxError as e:
        raise InvalidInput(f"the chat template is not valid Jinja2 (line {e.lineno}: {e.message}); fix it or pass "
                           "another one with chat_template=...") from e


@functools.lru_cache(maxsize=1)
def _environment() -> Any:
    """The one sandboxed environment all templates compile in (built on first use: jinja2 loads lazily)."""
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.nodes import CallBlock
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from jinja2.utils import Namespace
    except ImportError as e:
        raise MissingDependency("chat templates need jinja2: pip install 'jinja2>=3.1.6'") from e
    if tuple(int(part) for part in jinja2.__version__.split(".")[:3] if part.isdigit()) < (3, 1, 6):
        # Older releases have known sandbox escapes, and chat templates are untrusted code from the Hub.
        raise MissingDependency(f"chat templates need jinja2>=3.1.6 (installed: {jinja2.__version__}): "
                                "pip install -U jinja2")

    class GenerationBlock(Extension):
        """{% generation %}...{% endgeneration %} marks the assistant's tokens for training masks; rendering
        only needs its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class SafeNamespace(Namespace):
        """namespace(...) that refuses underscore names, which could reach Python internals."""

        def __init__(*args, **kwargs):  # the first positional is self, so that namespace(self=...) still works
            self, args = args[0], args[1:]
            attributes = dict(*args, **kwargs)
            for name in attributes:
                SafeNamespace._check(name)
            Namespace.__init__(self, attributes)

        def __setitem__(self, name, value):
            SafeNamespace._check(name)
            Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates may not store underscore names on a namespace ({name!r})")

    class DictBuilder:
        """dict(...) and dict.fromkeys(...) without exposing the dict type itself to the template."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise _TemplateRefused(message)

    def strftime_now(format):
        return _now().strftime(format)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes <, >, & and ' for HTML, which would change prompts; templates expect json.dumps.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[GenerationBlock, loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    environment.globals["dict"] = DictBuilder()
    environment.globals["namespace"] = SafeNamespace
    return environment


def _now() -> datetime:
    """The local time strftime_now formats (a function, so tests can pin the date)."""
    return datetime.now()

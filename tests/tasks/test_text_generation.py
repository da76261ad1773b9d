"""text-generation against transformers' pipeline on tiny random GPT-2, OPT, Llama and Qwen2 checkpoints: prompts and
chats, batched and unbatched, greedy / beams / sampling, stop strings, streaming, the pipeline's defaults, bad input."""

from __future__ import annotations

import threading

import pytest
import torch

import lightpipe
import transformers
from lightpipe.errors import InvalidInput
from text_generation_helpers import reference_pipeline, tiny_generation_checkpoint

PROMPTS = ["The quick brown fox", "Paris is", "What is the capital of England? Where does John", "I love"]
CHAT = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Where is Paris?"}]
GREEDY = dict(do_sample=False, max_new_tokens=12)


@pytest.fixture(scope="module", params=["gpt2", "opt", "llama", "qwen2"])
def pair(request, tmp_path_factory):
    """(lightpipe pipeline, transformers pipeline) on the same tiny checkpoint."""
    folder = tiny_generation_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=3)
    return lightpipe.pipeline("text-generation", model=str(folder)), reference_pipeline(folder)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    folder = tiny_generation_checkpoint(tmp_path_factory.mktemp("gpt2-plain"), "gpt2", seed=5)
    return lightpipe.pipeline("text-generation", model=str(folder)), reference_pipeline(folder), folder


def test_greedy_prompts_equal_transformers_batched_and_alone(pair):
    ours, ref = pair
    expected = [ref(p, **GREEDY) for p in PROMPTS]
    assert any(e[0]["generated_text"] != p for e, p in zip(expected, PROMPTS))  # the model does generate text
    assert [ours(p, **GREEDY) for p in PROMPTS] == expected
    assert ours(PROMPTS, batch_size=4, **GREEDY) == expected
    assert ours(PROMPTS, batch_size=3, return_full_text=False, **GREEDY) == [
        [{"generated_text": e[0]["generated_text"][len(p):]}] for e, p in zip(expected, PROMPTS)]


def test_chat_equals_transformers(pair):
    ours, ref = pair
    expected = ref(CHAT, **GREEDY)
    assert ours(CHAT, **GREEDY) == expected
    assert expected[0]["generated_text"][:2] == CHAT and expected[0]["generated_text"][2]["role"] == "assistant"
    prefilled = CHAT + [{"role": "assistant", "content": "It is"}]
    assert ours([CHAT, prefilled], batch_size=2, **GREEDY) == [expected, ref(prefilled, **GREEDY)]


def test_beam_search_equals_transformers(pair):
    ours, ref = pair
    options = dict(do_sample=False, max_new_tokens=8, num_beams=3, num_return_sequences=2)
    expected = [ref(p, **options) for p in PROMPTS[:3]]
    assert [ours(p, **options) for p in PROMPTS[:3]] == expected
    assert ours(PROMPTS[:3], batch_size=3, **options) == expected


@pytest.mark.parametrize("options", [
    dict(repetition_penalty=1.3), dict(no_repeat_ngram_size=2),
    dict(num_beams=2, no_repeat_ngram_size=2, repetition_penalty=1.3), dict(min_new_tokens=8, bad_words_ids=[[50]])],
    ids=["repetition", "ngram", "beams-ngram-repetition", "min-new-bad-words"])
def test_penalties_and_token_rules_batched_equal_alone(pair, options):
    # The repetition penalty skips a row's left padding (transformers does too): a padded prompt is penalised for
    # its own tokens only, so batched rows equal the same prompts alone.
    ours, ref = pair
    options = dict(do_sample=False, max_new_tokens=10, **options)
    expected = [ref(p, **options) for p in PROMPTS]
    assert [ours(p, **options) for p in PROMPTS] == expected
    assert ours(PROMPTS, batch_size=4, **options) == expected


@pytest.mark.parametrize("options, changes", [
    (dict(sequence_bias={(50,): 5.0}), True),
    (dict(sequence_bias=[[[50], 8.0], [[50, 61], 25.0]], num_beams=2), True),  # list form; 61 follows 50
    (dict(exponential_decay_length_penalty=(0, 3.0)), True),
    (dict(renormalize_logits=True, num_beams=3, repetition_penalty=1.2), False),
    (dict(do_sample=True, top_k=1, epsilon_cutoff=0.01, eta_cutoff=0.001), False)],
    ids=["bias", "bias-list-beams", "decay", "renormalize-beams", "cutoffs-one-candidate"])
def test_more_of_transformers_options_equal_transformers(pair, options, changes):
    ours, ref = pair
    options = {"do_sample": False, "max_new_tokens": 10, **options}
    expected = [ref(p, **options) for p in PROMPTS]
    if changes:  # the option does change the text here, so the comparison tests it
        plain = {k: v for k, v in options.items() if k in ("do_sample", "max_new_tokens", "num_beams")}
        assert expected != [ref(p, **plain) for p in PROMPTS]
    assert [ours(p, **options) for p in PROMPTS] == expected
    assert ours(PROMPTS, batch_size=4, **options) == expected


def test_tensors_and_sampling_with_one_candidate(pair):
    ours, ref = pair
    assert ours(PROMPTS[1], return_tensors=True, **GREEDY) == ref(PROMPTS[1], return_tensors=True, **GREEDY)
    greedy = ours(PROMPTS[2], **GREEDY)
    assert ours(PROMPTS[2], do_sample=True, top_k=1, max_new_tokens=12, seed=4) == greedy


def test_stop_strings_end_generation_where_transformers_does(gpt2):
    ours, ref, _ = gpt2
    text = ours(PROMPTS[0], return_full_text=False, **GREEDY)[0]["generated_text"]
    ids = ours(PROMPTS[0], return_tensors=True, **GREEDY)[0]["generated_token_ids"]
    pieces = [ours.tokenizer.decode([i]) for i in ids]
    # Inside the reply, across token boundaries, starting in the prompt, never generated.
    candidates = [text[3:6], text[1:2], pieces[-3][-1:] + pieces[-2][:1], PROMPTS[0][-2:] + text[:1], "never said"]
    candidates = [c for c in dict.fromkeys(candidates) if c.strip() and "\ufffd" not in c]
    assert len(candidates) >= 4
    for stop in candidates:
        expected = ref(PROMPTS[0], return_full_text=False, stop_sequence=stop, **GREEDY)
        assert ours(PROMPTS[0], return_full_text=False, stop_strings=[stop], **GREEDY) == expected, stop
    stop = text[3:6]
    got = ours(PROMPTS[0], return_full_text=False, stop_sequence=stop, **GREEDY)
    assert stop in got[0]["generated_text"] and len(got[0]["generated_text"]) < len(text)


def test_checkpoint_generation_config_and_pipeline_defaults(tmp_path):
    folder = tiny_generation_checkpoint(tmp_path / "cfg", "gpt2", generation=dict(do_sample=False, max_new_tokens=5))
    pipe = lightpipe.pipeline("text-generation", model=str(folder))
    config, _ = pipe.generation_options({})
    assert config.do_sample is False and config.max_new_tokens == 5  # the checkpoint's own options win
    assert pipe(PROMPTS[0]) == reference_pipeline(folder)(PROMPTS[0])
    plain = lightpipe.pipeline("text-generation", model=str(tiny_generation_checkpoint(tmp_path / "p", "gpt2")))
    config, _ = plain.generation_options({})
    assert (config.do_sample, config.temperature, config.max_new_tokens) == (True, 0.7, 256)  # transformers' defaults
    config, _ = plain.generation_options({"do_sample": False})
    assert config.temperature == 1.0  # sampling defaults are dropped when not sampling
    config, _ = plain.generation_options({"max_length": 30})
    assert config.max_new_tokens is None and config.max_length == 30


def test_seeded_sampling_is_reproducible(gpt2):
    ours, _, _ = gpt2
    options = dict(do_sample=True, max_new_tokens=10, top_p=0.9, temperature=1.3, seed=11)
    first = ours(PROMPTS[1], **options)
    assert ours(PROMPTS[1], **options) == first
    several = ours(PROMPTS[1], num_return_sequences=3, **options)
    assert len(several) == 3 and len({r["generated_text"] for r in several}) > 1


def test_transformers_streamers_work_unchanged(gpt2):
    ours, _, folder = gpt2
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    streamer = transformers.TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=ours(PROMPTS[0], streamer=streamer, **GREEDY)))
    worker.start()
    pieces = list(streamer)
    worker.join()
    assert PROMPTS[0] + "".join(pieces) == result["out"][0]["generated_text"]


def test_stream_yields_pieces_that_join_to_the_reply(gpt2):
    ours, _, _ = gpt2
    for prompt in (PROMPTS[0], CHAT):
        reply = ours(prompt, return_full_text=False, **GREEDY)[0]["generated_text"]
        pieces = list(ours.stream(prompt, **GREEDY))
        assert "".join(pieces) == reply and len(pieces) > 1
        # A broken character shows only where the reply itself has one (random weights can end on half a character).
        assert sum(piece.count("\ufffd") for piece in pieces) == reply.count("\ufffd")


def test_a_stream_of_prompts_is_answered_in_order(gpt2):
    ours, _, _ = gpt2
    expected = ours(PROMPTS, batch_size=2, **GREEDY)
    assert list(ours((p for p in PROMPTS), batch_size=2, **GREEDY)) == expected


def test_long_prompts_are_refused_or_keep_their_end(gpt2):
    ours, _, _ = gpt2
    long = "the quick brown fox jumps over the lazy dog " * 40
    with pytest.raises(InvalidInput, match="tokens too many"):
        ours(long, **GREEDY)
    out = ours(long, truncation=True, return_full_text=False, **GREEDY)
    assert isinstance(out[0]["generated_text"], str)
    ids = ours(long, truncation=True, return_tensors=True, **GREEDY)[0]["generated_token_ids"]
    assert len(ids) <= 96


@pytest.mark.parametrize("call", [
    lambda p: p(PROMPTS[0], max_new_tokens=0),
    lambda p: p(PROMPTS[0], max_new_tokens=-3),
    lambda p: p(PROMPTS[0], do_sample=True, temperature=0.0),
    lambda p: p(PROMPTS[0], do_sample=True, top_p=1.5),
    lambda p: p(PROMPTS[0], do_sample=True, top_p=0.0),
    lambda p: p(PROMPTS[0], num_return_sequences=4, num_beams=2, do_sample=False),
    lambda p: p(PROMPTS[0], num_return_sequences=2, do_sample=False),
    lambda p: p([{"role": "user"}]),
    lambda p: p([{"content": "hi"}]),
    lambda p: p(PROMPTS[0], streamer=object()),
    lambda p: p(PROMPTS[0], num_beams=2, streamer=transformers.TextStreamer(None)),
    lambda p: p(PROMPTS[0], generate_kwargs={"no_such_option": 1}),
    lambda p: p(PROMPTS[0], return_tensors=True, return_full_text=True),
    lambda p: p(PROMPTS[0], sequence_bias={(10 ** 6,): 1.0}),
    lambda p: p(12),
    lambda p: p([]),
], ids=["zero-new", "negative-new", "temperature-0", "top-p-high", "top-p-zero", "more-returns-than-beams",
        "returns-greedy", "no-content", "no-role", "bad-streamer", "beam-streamer", "unknown-option",
        "tensors-and-text", "bias-past-vocabulary", "not-text", "empty-list"])
def test_bad_input_is_invalid_input_and_the_pipeline_keeps_working(gpt2, call):
    ours, _, _ = gpt2
    with pytest.raises(InvalidInput):
        call(ours)
    assert ours(PROMPTS[1], **GREEDY)[0]["generated_text"].startswith(PROMPTS[1])


def test_chat_without_template_and_empty_prompt_without_bos(tmp_path):
    folder = tiny_generation_checkpoint(tmp_path / "nochat", "llama", chat_template=None)
    pipe = lightpipe.pipeline("text-generation", model=str(folder))
    with pytest.raises(InvalidInput, match="chat template"):
        pipe(CHAT)
    # An empty prompt starts from the beginning-of-sequence token, as transformers does.
    assert pipe("", **GREEDY) == reference_pipeline(folder)("", **GREEDY)
    pipe.generation_config = pipe.generation_config.replace(bos_token_id=None)
    pipe.tokenizer.special_tokens.pop("bos_token", None)
    with pytest.raises(InvalidInput, match="empty"):
        pipe("", **GREEDY)
    assert pipe(PROMPTS[1], **GREEDY)


def test_static_cache_gives_the_same_text(gpt2):
    ours, _, _ = gpt2
    assert ours(PROMPTS, batch_size=4, cache_implementation="static", **GREEDY) == ours(PROMPTS, **GREEDY)


def test_task_is_inferred_from_a_causal_lm_checkpoint(gpt2):
    _, _, folder = gpt2
    pipe = lightpipe.pipeline(model=str(folder))
    assert pipe.task == "text-generation" and torch.is_inference_mode_enabled() is False

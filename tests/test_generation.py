"""Generation parts: logits processors against transformers' own, the KV cache, the options dataclass, and
the generation loop - on a small decoder-only model written here (cache = no cache, left padding, streaming)
and against transformers' generate() on a tiny random Whisper (greedy, beam search and their options)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightpipe import loading
from lightpipe.errors import CheckpointError, InvalidInput
from lightpipe.generation import GenerationConfig, KVCache, generate
from lightpipe.generation import processors as P
from lightpipe.models.layers import cached_attention as self_attention
from whisper_helpers import tiny_whisper, whisper_special_ids

import transformers
from transformers.generation import GenerationMixin, logits_process as hf  # noqa: E402

VOCAB = 40


# ----------------------------------------------------------------------------------------------
# Logits processors equal transformers'


def _scores(rows=4, vocab=VOCAB, seed=0):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 6, (rows, 7), generator=gen)  # few distinct tokens: n-grams repeat
    return torch.randn(rows, vocab, generator=gen) * 3, input_ids


@pytest.mark.parametrize("make", [
    lambda: (P.Temperature(0.7), hf.TemperatureLogitsWarper(0.7)),
    lambda: (P.TopK(5), hf.TopKLogitsWarper(5)),
    lambda: (P.TopK(2, min_tokens_to_keep=4), hf.TopKLogitsWarper(2, min_tokens_to_keep=4)),
    lambda: (P.TopP(0.8), hf.TopPLogitsWarper(0.8)),
    lambda: (P.TopP(0.05, min_tokens_to_keep=3), hf.TopPLogitsWarper(0.05, min_tokens_to_keep=3)),
    lambda: (P.RepetitionPenalty(1.7), hf.RepetitionPenaltyLogitsProcessor(1.7)),
    lambda: (P.SuppressTokens([0, 5, 39, 77]), hf.SuppressTokensLogitsProcessor([0, 5, 39, 77])),
    lambda: (P.SuppressTokensAtBegin([3, 4], 7), hf.SuppressTokensAtBeginLogitsProcessor([3, 4], 7)),
    lambda: (P.SuppressTokensAtBegin([3, 4], 6), hf.SuppressTokensAtBeginLogitsProcessor([3, 4], 6)),
    lambda: (P.MinLength(9, [2, 3]), hf.MinLengthLogitsProcessor(9, [2, 3])),
    lambda: (P.MinLength(7, [2]), hf.MinLengthLogitsProcessor(7, [2])),
    lambda: (P.NoRepeatNGram(2), hf.NoRepeatNGramLogitsProcessor(2)),
    lambda: (P.NoRepeatNGram(3), hf.NoRepeatNGramLogitsProcessor(3)),
    lambda: (P.ForcedLastToken(8, [3, 4]), hf.ForcedEOSTokenLogitsProcessor(8, [3, 4])),
    lambda: (P.ForcedLastToken(9, [3]), hf.ForcedEOSTokenLogitsProcessor(9, [3])),
    lambda: (P.MinP(0.1), hf.MinPLogitsWarper(0.1)),
    lambda: (P.MinP(0.9, min_tokens_to_keep=3), hf.MinPLogitsWarper(0.9, min_tokens_to_keep=3)),
    lambda: (P.TypicalP(0.5), hf.TypicalLogitsWarper(0.5)),
    lambda: (P.TypicalP(0.05, min_tokens_to_keep=2), hf.TypicalLogitsWarper(0.05, min_tokens_to_keep=2)),
    lambda: (P.BadWords([[4], [1, 2], [5, 5, 3], [2]], [2]), hf.NoBadWordsLogitsProcessor([[4], [1, 2], [5, 5, 3], [2]], 2)),
    lambda: (P.EpsilonCutoff(0.01), hf.EpsilonLogitsWarper(0.01)),
    lambda: (P.EpsilonCutoff(0.2, 3), hf.EpsilonLogitsWarper(0.2, min_tokens_to_keep=3)),
    lambda: (P.EtaCutoff(0.01), hf.EtaLogitsWarper(0.01)),
    lambda: (P.EtaCutoff(0.3, 2), hf.EtaLogitsWarper(0.3, min_tokens_to_keep=2)),
    lambda: (P.LogNormalize(), hf.LogitNormalization()),
    lambda: (P.SequenceBias({(4,): 2.5, (1, 3): -1.0, (2, 5, 0): 4.0, (5, 5): 1.5}),
             hf.SequenceBiasLogitsProcessor({(4,): 2.5, (1, 3): -1.0, (2, 5, 0): 4.0, (5, 5): 1.5})),
    lambda: (P.ExponentialDecayLengthPenalty(2, 1.7, 3, [2, 3]), hf.ExponentialDecayLengthPenalty((2, 1.7), [2, 3], 3)),
    lambda: (P.ExponentialDecayLengthPenalty(4, 1.7, 3, [2]), hf.ExponentialDecayLengthPenalty((4, 1.7), [2], 3)),
], ids=["temperature", "top-k", "top-k-keep", "top-p", "top-p-keep", "repetition", "suppress",
        "begin-suppress", "begin-suppress-later", "min-length", "min-length-reached", "no-repeat-2", "no-repeat-3",
        "forced-eos", "forced-eos-not-yet", "min-p", "min-p-keep", "typical", "typical-keep", "bad-words",
        "epsilon", "epsilon-keep", "eta", "eta-keep", "renormalize", "sequence-bias", "decay", "decay-not-yet"])
def test_processor_equals_transformers(make):
    ours, theirs = make()
    scores, input_ids = _scores()
    expected = theirs(input_ids, scores.clone())
    got = ours(input_ids, scores.clone())
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_forced_first_token_equals_transformers():
    scores, input_ids = _scores()
    for length in (1, 2):
        expected = hf.ForcedBOSTokenLogitsProcessor(5)(input_ids[:, :length], scores.clone())
        assert torch.equal(P.ForcedFirstToken(5)(input_ids[:, :length], scores.clone()), expected)


def test_forced_tokens_force_by_position():
    scores, input_ids = _scores()  # sequences of 7 tokens
    forced = P.ForcedTokens({7: 11, 9: 2})
    got = forced(input_ids, scores)
    assert got.argmax(-1).tolist() == [11] * 4 and bool(torch.isinf(got).sum(-1).eq(VOCAB - 1).all())
    assert torch.equal(forced(input_ids[:, :6], scores), scores)  # no rule at length 6


def _timestamp_sequences(begin_index, timestamp_begin, vocab, seed):
    """Generated continuations in every state the timestamp rules distinguish."""
    gen = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(0, 50, (n,), generator=gen).tolist()  # noqa: E731
    stamp = lambda i: timestamp_begin + i  # noqa: E731
    prefix = list(range(60, 60 + begin_index))
    cases = [
        [stamp(0)],                                   # lone timestamp: a timestamp or eos next
        [stamp(0), *text(2), stamp(4), stamp(4)],     # a pair: text next, timestamps from 5 on
        [stamp(2), *text(3), stamp(6)],               # open pair: close it at >= 6
        [*text(3)],                                   # no timestamp yet
        [stamp(1), stamp(1)],                         # a pair straight away
        [*text(1), stamp(3), *text(2)],
    ]
    width = max(map(len, cases))
    # Left-pad with text so all rows have the same length (the rules only look at the end and at timestamps).
    return torch.tensor([prefix + [7] * (width - len(c)) + c for c in cases])


@pytest.mark.parametrize("max_initial", [None, 3])
@pytest.mark.parametrize("first", [True, False], ids=["first-token", "later"])
def test_whisper_timestamps_equal_transformers(max_initial, first):
    ids = whisper_special_ids()
    vocab, begin_index = ids["vocab_size"], 4
    config = transformers.GenerationConfig(no_timestamps_token_id=ids["notimestamps"], eos_token_id=ids["eos"],
                                           max_initial_timestamp_index=max_initial)
    theirs = hf.WhisperTimeStampLogitsProcessor(config, begin_index=begin_index)
    from lightpipe.whisper.timestamps import WhisperTimestamps

    ours = WhisperTimestamps(ids["notimestamps"], ids["eos"], begin_index, max_initial)
    for seed in range(4):
        sequences = _timestamp_sequences(begin_index, ids["timestamp_begin"], vocab, seed)
        if first:
            sequences = sequences[:, :begin_index]
        gen = torch.Generator().manual_seed(seed)
        scores = torch.randn(sequences.shape[0], vocab, generator=gen) * 2
        scores[:, ids["timestamp_begin"]:] += 1.5 * seed - 2  # from text-dominated to timestamp-dominated
        expected = theirs(sequences, scores.clone())
        got = ours(sequences, scores.clone())
        assert torch.equal(torch.isinf(got), torch.isinf(expected)), seed
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_build_processors_orders_rules_then_extra_then_warpers():
    config = GenerationConfig(do_sample=True, temperature=0.5, top_k=3, top_p=0.9, repetition_penalty=1.2,
                              min_new_tokens=2, eos_token_id=1, suppress_tokens=[4], begin_suppress_tokens=[5],
                              forced_tokens=[(9, 3)], no_repeat_ngram_size=3, forced_bos_token_id=7,
                              forced_eos_token_id=1)
    marker = lambda ids, scores: scores  # noqa: E731
    built = P.build_processors(config, prompt_length=3, max_length=20, extra=[marker])
    kinds = [type(p).__name__ if p is not marker else "extra" for p in built]
    assert kinds == ["RepetitionPenalty", "NoRepeatNGram", "MinLength", "ForcedFirstToken", "ForcedLastToken",
                     "ForcedTokens", "SuppressTokens", "SuppressTokensAtBegin", "extra", "Temperature", "TopK", "TopP"]
    assert built[2].min_length == 5 and built[4].max_length == 20 and built[7].begin_index == 3
    # After a one-token prompt and a forced first token, the "first" generated token is the one after it.
    assert P.build_processors(config, prompt_length=1, max_length=20)[7].begin_index == 2
    greedy = P.build_processors(dataclasses.replace(config, do_sample=False), 3, 20)
    assert not any(isinstance(p, (P.Temperature, P.TopK, P.TopP)) for p in greedy)


# ----------------------------------------------------------------------------------------------
# GenerationConfig


def test_config_reads_generation_config_json_and_keeps_unknown_keys():
    raw = {"max_length": 448, "eos_token_id": [3, 4], "top_k": None, "suppress_tokens": [1, 2],
           "alignment_heads": [[1, 0], [2, 3]], "lang_to_id": {"<|en|>": 9}, "transformers_version": "5.0"}
    config = GenerationConfig.from_dict(raw)
    assert config.max_length == 448 and config.eos_token_ids == [3, 4] and config.top_k == 50
    assert config.suppress_tokens == (1, 2)
    # A model's own settings (Whisper's language table and alignment heads) are kept, read-only, in `extra`.
    assert dict(config.extra) == {"lang_to_id": {"<|en|>": 9}, "alignment_heads": ((1, 0), (2, 3))}
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_beams = 3
    with pytest.raises(TypeError):
        config.extra["new"] = 1


def test_config_names_active_options_it_cannot_honour(caplog):
    with caplog.at_level("WARNING", logger="lightpipe.generation.generate"):
        GenerationConfig.from_dict({"typical_p": 1.0, "num_beam_groups": 1})  # inactive values: silent
        assert not caplog.records
        GenerationConfig.from_dict({"guidance_scale": 1.5, "num_beam_groups": 2})
    assert "guidance_scale, num_beam_groups" in caplog.text


def test_config_from_folder_falls_back_to_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x", "eos_token_id": 2, "pad_token_id": 0,
                                                      "decoder_start_token_id": 5, "hidden_size": 8}))
    config = GenerationConfig.from_folder(tmp_path)
    assert (config.eos_token_id, config.pad_token_id, config.decoder_start_token_id) == (2, 0, 5)
    assert "hidden_size" not in config.extra
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7, "num_beams": 2}))
    config = GenerationConfig.from_folder(tmp_path)
    assert (config.eos_token_id, config.num_beams, config.pad_token_id) == (7, 2, None)
    (tmp_path / "generation_config.json").write_text(json.dumps({"num_beams": 0}))
    with pytest.raises(CheckpointError, match="generation_config.json"):
        GenerationConfig.from_folder(tmp_path)
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(CheckpointError):
        GenerationConfig.from_folder(tmp_path)


@pytest.mark.parametrize("bad", [
    dict(max_new_tokens=0), dict(max_new_tokens=2.5), dict(num_beams=0), dict(num_beams=True),
    dict(do_sample=True, temperature=0), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
    dict(repetition_penalty=0), dict(early_stopping="sometimes"), dict(num_return_sequences=2),
    dict(num_beams=2, num_return_sequences=3), dict(eos_token_id=-1), dict(suppress_tokens=["a"]),
    dict(forced_tokens=[(1,)]), dict(temperature="hot"), dict(epsilon_cutoff=1.0), dict(eta_cutoff=-0.1),
    dict(sequence_bias={}), dict(sequence_bias={(1,): "x"}), dict(sequence_bias=[[[-1], 1.0]]),
    dict(exponential_decay_length_penalty=(2,)), dict(exponential_decay_length_penalty=(2, 0.0)),
    dict(renormalize_logits="yes"),
])
def test_config_rejects_bad_values_before_any_compute(bad):
    with pytest.raises(InvalidInput):
        GenerationConfig(**bad)


def test_config_replace_validates_and_names_known_options():
    config = GenerationConfig(max_new_tokens=5)
    assert config.replace(num_beams=4).num_beams == 4 and config.num_beams == 1
    with pytest.raises(InvalidInput, match="num_beam.*known"):
        config.replace(num_beam=4)
    with pytest.raises(InvalidInput):
        config.replace(num_beams=-1)


# ----------------------------------------------------------------------------------------------
# KV cache


def test_cache_appends_in_place_and_masks_left_padding():
    cache = KVCache(1, 2, 1, 2, 6, dtype=torch.float32, device="cpu")
    cache.set_left_padding(torch.tensor([0, 2]))
    assert cache.positions(3).tolist() == [[0, 1, 2], [0, 0, 0]]
    mask, causal = cache.attention_mask(3)
    assert not causal and mask.shape == (2, 1, 3, 3)
    assert mask[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    # Row 1: slots 0 and 1 are padding; each padding slot sees only itself.
    assert mask[1, 0].tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    k = torch.arange(12.0).view(2, 1, 3, 2)
    keys, _ = cache.update(0, k, k)
    cache.advance(3)
    assert keys.data_ptr() == cache.keys[0].data_ptr() and torch.equal(keys, k)
    assert cache.positions(1).tolist() == [[3], [1]]
    cache.reorder(torch.tensor([1, 1]))
    assert torch.equal(cache.keys[0][0, :, :3], k[1]) and cache.padding.tolist() == [2, 2]
    with pytest.raises(InvalidInput):
        cache.check_room(4)


def test_cache_without_padding_uses_the_fast_paths():
    cache = KVCache(1, 3, 1, 2, 8, dtype=torch.float32, device="cpu")
    cache.set_left_padding(torch.zeros(3, dtype=torch.long))
    assert cache.padding is None
    assert cache.attention_mask(4) == (None, True)  # empty cache: SDPA's own causal rule
    cache.advance(4)
    assert cache.attention_mask(1) == (None, False)  # one new token sees everything
    mask, _ = cache.attention_mask(2)
    assert mask.shape == (1, 1, 2, 6) and mask[0, 0, 0].tolist() == [True] * 5 + [False]


# ----------------------------------------------------------------------------------------------
# The loop, on a small decoder-only model that implements the decoding protocol


class ToyLM(nn.Module):
    """One causal attention layer over token + position embeddings, with a tied output projection."""

    def __init__(self, vocab=VOCAB, dim=16, heads=2, positions=64, seed=0, kv_heads=None):
        super().__init__()
        torch.manual_seed(seed)
        self.config = type("Config", (), {"vocab_size": vocab})()
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(positions, dim)
        self.qkv = nn.Linear(dim, dim + 2 * dim * self.kv_heads // heads)  # grouped-query: fewer key/value heads
        self.out = nn.Linear(dim, dim)
        self.max_positions = positions
        self.eval().requires_grad_(False)

    def new_cache(self, rows, max_length, encoder_hidden=None, static=False):
        return KVCache(1, rows, self.kv_heads, self.embed.embedding_dim // self.heads, max_length,
                       dtype=torch.float32, device="cpu", static=static)

    def _heads(self, x):
        return x.view(x.shape[0], x.shape[1], -1, self.embed.embedding_dim // self.heads).transpose(1, 2)

    def decode_step(self, tokens, cache, positions=None, *, last_only=False):
        t = tokens.shape[1]
        positions = cache.positions(t) if positions is None else positions
        x = self.embed(tokens) + self.pos(positions)
        dim, kv_dim = x.shape[-1], x.shape[-1] * self.kv_heads // self.heads
        q, k, v = (self._heads(y) for y in self.qkv(x).split([dim, kv_dim, kv_dim], dim=-1))
        mask = cache.attention_mask(t)
        k, v = cache.update(0, k, v)
        x = x + self.out(self_attention(q, k, v, mask).transpose(1, 2).reshape(x.shape))
        cache.advance(t)
        return F.linear(x[:, -1:] if last_only else x, self.embed.weight) * 3

    def full_logits(self, tokens):
        """Uncached reference: the whole (1, T) sequence at once, logits of the last position."""
        return self.decode_step(tokens, self.new_cache(1, tokens.shape[1]))[:, -1]


def _rollout(model, prompt, steps, eos=None):
    """Greedy decoding without any cache: the whole sequence recomputed at every step."""
    tokens = list(prompt)
    for _ in range(steps):
        nxt = int(model.full_logits(torch.tensor([tokens])).argmax())
        tokens.append(nxt)
        if nxt == eos:
            break
    return tokens


def test_greedy_with_cache_equals_recomputing_everything():
    model = ToyLM()
    out = generate(model, [[3, 9, 4]], GenerationConfig(max_new_tokens=12))
    assert out.sequences.tolist() == [_rollout(model, [3, 9, 4], 12)]
    assert out.prompt_length == 3 and out.generated.shape == (1, 12)


def test_left_padded_batch_equals_each_prompt_alone():
    model = ToyLM(seed=1)
    prompts = [[5, 6, 7, 8, 9], [12], [30, 2, 2]]
    config = GenerationConfig(max_new_tokens=8, pad_token_id=0)
    batch = generate(model, prompts, config)
    for row, prompt in zip(batch.sequences.tolist(), prompts):
        alone = generate(model, [prompt], config).sequences.tolist()[0]
        assert row[5 - len(prompt):] == alone  # the batch row is left-padded with pad 0
        assert row[:5 - len(prompt)] == [0] * (5 - len(prompt))
    # The same through an explicit attention mask.
    mask = torch.tensor([[1] * 5, [0] * 4 + [1], [0, 0, 1, 1, 1]])
    explicit = generate(model, batch.sequences[:, :5], config, attention_mask=mask)
    assert torch.equal(explicit.sequences, batch.sequences)


def test_end_of_sequence_stops_rows_and_pads_them():
    model = ToyLM(seed=2)
    free = generate(model, [[1, 2], [3, 4]], GenerationConfig(max_new_tokens=10)).generated
    eos = int(free[0, 2])  # a token row 0 produces at its third step
    out = generate(model, [[1, 2], [3, 4]], GenerationConfig(max_new_tokens=10, eos_token_id=eos, pad_token_id=39))
    for row, prompt in zip(out.sequences.tolist(), ([1, 2], [3, 4])):
        expected = _rollout(model, prompt, 10, eos=eos)
        assert row[:len(expected)] == expected and set(row[len(expected):]) <= {39}
    assert out.sequences.shape[1] <= 12


@pytest.mark.parametrize("options", [dict(), dict(num_beams=3), dict(do_sample=True, top_k=4)],
                         ids=["greedy", "beam3", "sample"])
def test_static_cache_equals_dynamic_with_grouped_query_attention_and_left_padding(options):
    model = ToyLM(seed=6, heads=4, kv_heads=2)
    prompts = [[5, 6, 7, 8, 9], [12], [30, 2, 2]]
    config = GenerationConfig(max_new_tokens=9, pad_token_id=0, **options)
    dynamic = generate(model, prompts, config, generator=torch.Generator().manual_seed(3))
    static = generate(model, prompts, config.replace(cache_implementation="static"),
                      generator=torch.Generator().manual_seed(3))
    assert static.sequences.tolist() == dynamic.sequences.tolist()
    if not options:  # and each left-padded row equals its prompt decoded alone, uncached
        for row, prompt in zip(dynamic.sequences.tolist(), prompts):
            assert row[5 - len(prompt):] == _rollout(model, prompt, 9)


def test_static_cache_reads_all_slots_with_a_full_length_mask():
    cache = KVCache(2, 2, 1, 4, 8, dtype=torch.float32, device="cpu", static=True)
    cache.set_left_padding(torch.tensor([0, 2]))
    k = torch.ones(2, 1, 3, 4)
    full_k, _ = cache.update(0, k, k)
    mask, causal = cache.attention_mask(3)
    assert full_k.shape == (2, 1, 8, 4) and not causal and mask.shape == (2, 1, 3, 8)
    assert not mask[..., 3:].any()  # empty slots are never attended
    assert mask[1, 0, 2].tolist() == [False, False, True] + [False] * 5  # row 1's padding is hidden
    assert bool(torch.isfinite(full_k).all())


def test_finished_rows_leave_the_batch_without_changing_results():
    model = ToyLM(seed=2)
    prompts = [[1, 2], [3, 4], [9, 9, 9]]
    free = generate(model, prompts, GenerationConfig(max_new_tokens=10)).generated
    eos = int(free[0, 1])  # row 0 ends at its second step, the others later or never
    calls = []
    original = model.decode_step

    def counting(tokens, cache, **kwargs):
        calls.append(tokens.shape[0])
        return original(tokens, cache, **kwargs)

    model.decode_step = counting
    out = generate(model, prompts, GenerationConfig(max_new_tokens=10, eos_token_id=eos, pad_token_id=39))
    del model.decode_step
    for row, prompt in zip(out.sequences.tolist(), prompts):
        pad = 3 - len(prompt)
        expected = _rollout(model, prompt, 10, eos=eos)
        assert row[pad:pad + len(expected)] == expected and set(row[pad + len(expected):]) <= {39}
    assert calls[0] == 3 and min(calls) < 3  # the ended row was dropped from later steps


class _CharTokenizer:
    """Token i decodes to a fixed piece of text; stop strings must be found across these pieces."""

    pieces = ["ab", "c", "d", "Stop", "!", "x", " ", "S", "to", "p"] + ["z"] * (VOCAB - 10)

    def decode(self, ids, **kwargs):
        return "".join(self.pieces[i] for i in ids)


def test_stop_strings_match_across_token_boundaries():
    tokenizer = _CharTokenizer()
    model = ToyLM(seed=7)
    # Whatever the model generates, forcing tokens makes the text "S" "to" "p" = "Stop" over three tokens.
    forced = P.ForcedTokens({3: 7, 4: 8, 5: 9, 6: 4})
    config = GenerationConfig(max_new_tokens=10, stop_strings=["top"], pad_token_id=0)
    out = generate(model, [[1, 2, 3]], config, processors=[forced], tokenizer=tokenizer)
    assert tokenizer.decode(out.generated[0].tolist()) == "Stop"  # stopped on the token that completed "top"
    out = generate(model, [[1, 2, 3]], config.replace(stop_strings=["nothing", "Sto"]), processors=[forced],
                   tokenizer=tokenizer)
    assert out.generated.shape[1] == 2
    with pytest.raises(InvalidInput, match="tokenizer"):
        generate(model, [[1, 2, 3]], config)
    with pytest.raises(InvalidInput, match="stop_strings"):
        GenerationConfig(stop_strings=[""])


def test_max_time_stops_every_row():
    model = ToyLM(seed=8)
    out = generate(model, [[1, 2]], GenerationConfig(max_new_tokens=50, max_time=1e-9))
    assert out.generated.shape[1] == 1


def test_user_stopping_criteria_stop_their_rows():
    model = ToyLM(seed=9)
    free = generate(model, [[1, 2], [4, 5]], GenerationConfig(max_new_tokens=8)).generated
    stop_after_three = lambda tokens, new: torch.full_like(new, tokens.shape[1] >= 5, dtype=torch.bool)  # noqa: E731
    out = generate(model, [[1, 2], [4, 5]], GenerationConfig(max_new_tokens=8), stopping_criteria=[stop_after_three])
    assert out.generated.tolist() == free[:, :3].tolist()


def test_streaming_callback_sees_every_token_as_it_comes():
    model = ToyLM(seed=3)
    seen = []
    out = generate(model, [[1, 2], [7, 8]], GenerationConfig(max_new_tokens=6),
                   on_token=lambda tokens, running: seen.append((tokens.tolist(), running.tolist())))
    assert [tokens for tokens, _ in seen] == out.generated.t().tolist()
    assert all(running == [True, True] for _, running in seen)


def test_sampling_is_reproducible_with_a_generator_and_warpers_apply():
    model = ToyLM(seed=4)
    config = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1.5, num_return_sequences=3)
    first = generate(model, [[1, 2], [5]], config, generator=torch.Generator().manual_seed(7))
    again = generate(model, [[1, 2], [5]], config, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first.sequences, again.sequences) and first.sequences.shape == (6, 12)
    assert len({tuple(r) for r in first.generated.tolist()}) > 1  # draws differ
    greedy = generate(model, [[1, 2]], GenerationConfig(max_new_tokens=10)).sequences
    top1 = generate(model, [[1, 2]], config.replace(top_k=1, num_return_sequences=1),
                    generator=torch.Generator().manual_seed(0)).sequences
    assert torch.equal(top1, greedy)  # top-k 1 leaves one token to draw


def test_beam_search_returns_best_first_with_consistent_scores():
    model = ToyLM(seed=5)
    config = GenerationConfig(max_new_tokens=6, num_beams=4, num_return_sequences=3, output_scores=True,
                              length_penalty=1.0)
    out = generate(model, [[1, 2, 3]], config)
    assert out.sequences.shape == (3, 9) and out.beam_indices.shape == (3, 6)
    assert out.sequences_scores.tolist() == sorted(out.sequences_scores.tolist(), reverse=True)
    for row, score in zip(out.sequences, out.sequences_scores):  # score = mean log-probability of the tokens
        logprobs = [model.full_logits(row[None, :i]).log_softmax(-1)[0, row[i]] for i in range(3, 9)]
        assert float(score) == pytest.approx(float(sum(logprobs)) / 6, abs=1e-5)


@pytest.mark.parametrize("call", [
    lambda m: generate(m, [[1, 2]], GenerationConfig(max_new_tokens=100)),  # past the position table
    lambda m: generate(m, [[1, 200]], GenerationConfig(max_new_tokens=2)),  # outside the vocabulary
    lambda m: generate(m, [[]], GenerationConfig(max_new_tokens=2)),
    lambda m: generate(m, [[1.5]], GenerationConfig(max_new_tokens=2)),
    lambda m: generate(m, torch.ones(2, 2, 2, dtype=torch.long), GenerationConfig(max_new_tokens=2)),
    lambda m: generate(m, [[1, 2]], GenerationConfig(max_length=2)),  # no room
    lambda m: generate(m, [[1, 2]], {"max_new_tokens": 2}),
    lambda m: generate(m, [[1, 2], [3, 4]], GenerationConfig(max_new_tokens=2),
                       attention_mask=torch.tensor([[1, 0], [1, 1]])),  # right padding
    lambda m: generate(m, [[1, 2]], GenerationConfig(max_new_tokens=2, num_beams=2), on_token=print),
    lambda m: generate(m, [[1, 2]], GenerationConfig(max_new_tokens=2), processors=[3]),
])
def test_bad_requests_fail_cleanly_and_the_model_keeps_working(call):
    model = ToyLM()
    with pytest.raises(InvalidInput):
        call(model)
    assert generate(model, [[1, 2]], GenerationConfig(max_new_tokens=3)).sequences.shape == (1, 5)


# ----------------------------------------------------------------------------------------------
# Equal to transformers' generate() on an encoder-decoder model (tiny random Whisper, generic decoding)


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    folder = tiny_whisper(tmp_path_factory.mktemp("whisper-gen"))
    reference = transformers.WhisperForConditionalGeneration.from_pretrained(folder, attn_implementation="eager")
    ours = loading.load_model(folder, "speech-seq2seq")
    features = torch.randn(3, 16, 100, generator=torch.Generator().manual_seed(0))
    ids = whisper_special_ids()
    prompt = torch.tensor([[ids["sot"], ids["lang_to_id"]["<|en|>"], ids["transcribe"], ids["notimestamps"]]] * 3)
    return reference.eval(), ours, GenerationConfig.from_folder(folder), features, prompt


def _reference(reference, features, prompt, **options):
    with torch.no_grad():
        return GenerationMixin.generate(reference, features, decoder_input_ids=prompt, return_dict_in_generate=True,
                                        output_scores=True, **options)


@pytest.mark.parametrize("options", [
    dict(),
    dict(repetition_penalty=1.5, min_new_tokens=6),
    dict(num_beams=3),
    dict(num_beams=5, num_return_sequences=3),
    dict(num_beams=4, length_penalty=0.5, early_stopping=True, num_return_sequences=2),
    dict(num_beams=3, early_stopping="never", length_penalty=2.0),
    dict(num_beams=3, repetition_penalty=1.3, min_new_tokens=5),
    dict(no_repeat_ngram_size=2),
    dict(num_beams=3, no_repeat_ngram_size=2, forced_eos_token_id=100),
    dict(prompt_length=1, forced_bos_token_id=104, num_beams=2),
    dict(prompt_length=1, forced_bos_token_id=104, forced_eos_token_id=100),
], ids=["greedy", "greedy-penalties", "beam3", "beam5-return3", "beam4-early", "beam3-never", "beam3-penalties",
        "no-repeat", "beam3-no-repeat-forced-eos", "forced-bos-beam2", "forced-bos-eos"])
def test_generate_equals_transformers(whisper, options):
    reference, ours, config, features, prompt = whisper
    options = dict(options)
    prompt = prompt[:, :options.pop("prompt_length", prompt.shape[1])]
    expected = _reference(reference, features, prompt, max_new_tokens=14, **options)
    got = generate(ours, prompt, config.replace(max_new_tokens=14, output_scores=True, **options),
                   encoder_hidden=ours.encode(features))
    assert got.sequences.tolist() == expected.sequences.tolist()
    assert len(got.scores) == len(expected.scores)
    for mine, theirs in zip(got.scores, expected.scores):
        assert torch.equal(torch.isinf(mine), torch.isinf(theirs))
        torch.testing.assert_close(mine.nan_to_num(neginf=0), theirs.nan_to_num(neginf=0), rtol=0, atol=1e-4)
    if options.get("num_beams", 1) > 1:
        torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, rtol=0, atol=1e-4)
        assert torch.equal(got.beam_indices, expected.beam_indices.long())


def test_some_sequences_end_early(whisper):
    """The tiny model finishes some hypotheses with end-of-text, so the parity above covers eos handling."""
    reference, ours, config, features, prompt = whisper
    eos = config.eos_token_ids[0]
    greedy = generate(ours, prompt, config.replace(max_new_tokens=14), encoder_hidden=ours.encode(features))
    beams = generate(ours, prompt, config.replace(max_new_tokens=14, num_beams=3), encoder_hidden=ours.encode(features))
    for out in (greedy, beams):
        ended = [row.index(eos) for row in out.generated.tolist() if eos in row]
        assert ended and min(ended) < out.generated.shape[1] - 1


@pytest.mark.parametrize("options", [dict(), dict(num_beams=3), dict(num_beams=2, num_return_sequences=2)],
                         ids=["greedy", "beam3", "beam2-return2"])
def test_static_cache_equals_dynamic_on_whisper(whisper, options):
    reference, ours, config, features, prompt = whisper
    encoded = ours.encode(features)
    dynamic = generate(ours, prompt, config.replace(max_new_tokens=14, output_scores=True, **options),
                       encoder_hidden=encoded)
    static = generate(ours, prompt, config.replace(max_new_tokens=14, output_scores=True, cache_implementation="static",
                                                   **options), encoder_hidden=encoded)
    assert static.sequences.tolist() == dynamic.sequences.tolist()
    for a, b in zip(static.scores, dynamic.scores):
        torch.testing.assert_close(a.nan_to_num(neginf=0), b.nan_to_num(neginf=0), rtol=0, atol=1e-5)


def test_dynamic_cache_grows_keeping_its_slots_and_reorders_after_growing():
    """A dynamic cache starts small and doubles: every written slot survives each growth, attention reads exactly
    the filled slots, and beam reordering after a growth moves whole rows. A static cache is allocated whole."""
    gen = torch.Generator().manual_seed(0)
    cache = KVCache(2, 3, 2, 4, 300, dtype=torch.float32, device="cpu")
    assert cache.keys[0].shape[2] < 300
    written = []
    for t in [5] + [1] * 100 + [70]:
        k, v = torch.randn(3, 2, t, 4, generator=gen), torch.randn(3, 2, t, 4, generator=gen)
        written.append((k, v))
        for layer in range(2):
            keys, values = cache.update(layer, k, v)
            assert keys.shape == (3, 2, cache.length + t, 4)
        cache.advance(t)
    assert 175 <= cache.keys[0].shape[2] <= 300
    all_k = torch.cat([k for k, _ in written], dim=2)
    all_v = torch.cat([v for _, v in written], dim=2)
    assert torch.equal(cache.keys[1][:, :, :175], all_k) and torch.equal(cache.values[0][:, :, :175], all_v)
    cache.reorder(torch.tensor([2, 0, 0]))
    assert torch.equal(cache.keys[0][:, :, :175], all_k[[2, 0, 0]])
    assert torch.equal(cache.values[1][:, :, :175], all_v[[2, 0, 0]])
    cache.check_room(125)
    with pytest.raises(InvalidInput):
        cache.check_room(126)
    static = KVCache(1, 1, 1, 2, 300, dtype=torch.float32, device="cpu", static=True)
    assert static.keys[0].shape[2] == 300 and not static.keys[0].any()

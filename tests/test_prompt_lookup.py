"""Prompt lookup in greedy decoding (generation.lookup): guessed tokens checked in the same forward pass must leave
the tokens (and scores) of plain greedy decoding unchanged - against transformers' generate on tiny random
checkpoints of every decoder-only architecture, and against our own plain steps on a toy model whose guesses are
under the test's control."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import transformers
from causal_lm_helpers import randomize
from lightpipe.errors import InvalidInput
from lightpipe.generation import GenerationConfig, generate
from lightpipe.generation.cache import KVCache
from lightpipe.generation.lookup import PromptLookup
from lightpipe.loading import load_model
from lightpipe.models import layers

EOS, PAD = 2, 0


# ---------------------------------------------------------------------------------------------- the guesses


def test_guess_continues_the_latest_occurrence_of_the_last_ngram():
    assert PromptLookup([1, 2, 3, 1, 2], 2).guess(3) == [3, 1, 2]
    assert PromptLookup([4, 1, 2, 9, 1, 2, 8, 1, 2], 2).guess(2) == [8, 1]  # the latest, not the first
    assert PromptLookup([7, 7, 7], 2).guess(4) == [7, 7, 7, 7]  # around the period when too few tokens follow
    assert PromptLookup([5, 6, 9, 5], 2).guess(4) == [6, 9, 5, 6]  # no bigram match: the unigram's
    assert PromptLookup([5, 6, 9, 5], 1).guess(2) == [6, 9]
    assert PromptLookup([1, 2, 3], 3).guess(3) == []  # nothing repeats
    assert PromptLookup([1, 1], 2).guess(0) == []
    assert PromptLookup([], 2).guess(2) == []
    lookup = PromptLookup([3, 4], 2)
    lookup.extend([5, 3, 4])
    assert lookup.guess(2) == [5, 3]


def test_options_are_checked():
    for bad in ({"prompt_lookup_num_tokens": -1}, {"prompt_lookup_num_tokens": 2.0},
                {"max_matching_ngram_size": 0}, {"max_matching_ngram_size": True}):
        with pytest.raises(InvalidInput, match=next(iter(bad))):
            GenerationConfig(**bad)
    cache = KVCache(1, 1, 1, 1, 8, dtype=torch.float32, device="cpu")
    cache.advance(3)
    with pytest.raises(ValueError):
        cache.crop(4)
    cache.crop(1)
    assert cache.length == 1


# ---------------------------------------------------------------------------------------------- a toy model


class Successor(nn.Module):
    """A decoder whose next token is `table[token]` (logits one-hot): its greedy text is a walk through the table,
    so the test knows which guesses are right. The cache stores every fed token as its key, so a test can check that
    rejected guesses leave no trace."""

    def __init__(self, table: list[int], spare: int = 3):
        super().__init__()
        self.table = torch.tensor(table)
        self.config = SimpleNamespace(vocab_size=len(table))
        self.anchor = nn.Parameter(torch.zeros(1))  # generate() finds the device through the parameters
        self.spare, self.passes, self.fed = spare, 0, []

    def new_cache(self, rows, max_length, *, encoder_hidden=None, static=False):
        self.cache = KVCache(1, rows, 1, 1, max_length, dtype=torch.float32, device="cpu", static=static)
        return self.cache

    def decode_step(self, tokens, cache, *, last_only=False):
        t = tokens.shape[1]
        cache.check_room(t)
        cache.update(0, tokens[:, None, :, None].float(), tokens[:, None, :, None].float())
        cache.advance(t)
        self.passes += 1
        self.fed.append(t)
        logits = F.one_hot(self.table[tokens], len(self.table)).float()
        return logits[:, -1:] if last_only else logits

    def greedy_step(self, tokens, cache, *, positions=None):
        best = self.decode_step(tokens, cache).argmax(-1)
        return best[:, -1] if positions is None else best[:, -positions:]

    def spare_rows(self):
        return self.spare

    def cached_tokens(self) -> list[int]:
        return self.cache.keys[0][0, 0, :self.cache.length, 0].long().tolist()


# 3 -> 4 -> 5 -> 3 ... loops with period 3; 6 -> 7 -> 8 -> 9 -> 2 (the end token); 10 -> 10.
TABLE = [0, 1, 2, 4, 5, 3, 7, 8, 9, 2, 10, 1]


def toy_generate(prompt, spare=3, **options):
    model = Successor(TABLE, spare)
    config = GenerationConfig(**{"eos_token_id": EOS, "pad_token_id": PAD, **options})
    out = generate(model, torch.tensor([prompt]), config)
    return model, out


def test_loop_is_followed_with_fewer_passes_and_the_same_tokens():
    plain_model, plain = toy_generate([3, 4, 5, 3], max_new_tokens=20, prompt_lookup_num_tokens=0)
    model, out = toy_generate([3, 4, 5, 3], max_new_tokens=20)
    assert out.sequences.tolist() == plain.sequences.tolist()
    assert out.generated[0].tolist() == [4, 5, 3] * 6 + [4, 5]
    assert plain_model.passes == 20
    # The prefill yields one token, then every pass checks 3 right guesses and yields 4 tokens; the last pass only
    # has room for 2 guesses (the cache may never hold more than max_length tokens).
    assert model.fed == [4, 4, 4, 4, 4, 3] and model.passes == 6
    assert model.cached_tokens() == out.sequences[0].tolist()[:model.cache.length]


def test_wrong_guesses_are_dropped_from_the_cache():
    # The prefill yields 4, which began the prompt followed by 9 1 3: those are guessed, all wrong (4 -> 5). The
    # pass yields 5 and the cache forgets the three guesses; 5 never occurred, so the next pass guesses nothing;
    # then 3 guesses 4 (room for one guess only), right, and the pass yields 4 and 5.
    plain_model, plain = toy_generate([4, 9, 1, 3], max_new_tokens=5, prompt_lookup_num_tokens=0)
    model, out = toy_generate([4, 9, 1, 3], max_new_tokens=5)
    assert out.sequences.tolist() == plain.sequences.tolist() == [[4, 9, 1, 3, 4, 5, 3, 4, 5]]
    assert model.fed == [4, 4, 1, 2]
    assert model.cached_tokens() == [4, 9, 1, 3, 4, 5, 3, 4]


def test_an_accepted_end_token_stops_generation():
    # After 6 7 8 9 2 the prompt repeats 6: the guesses 7 8 9 are right, then the model says 2 (the end token).
    plain_model, plain = toy_generate([6, 7, 8, 9, 2, 10, 6], max_new_tokens=10, prompt_lookup_num_tokens=0)
    model, out = toy_generate([6, 7, 8, 9, 2, 10, 6], max_new_tokens=10)
    assert out.generated[0].tolist() == plain.generated[0].tolist() == [7, 8, 9, 2]
    assert model.passes == 2  # the prompt, then one pass that checks 7 8 9 and yields the end token after them
    _, early = toy_generate([6, 7, 8, 9, 2, 10, 6], max_new_tokens=2)
    assert early.generated[0].tolist() == [7, 8]


@pytest.mark.parametrize("count", [1, 2, 5, 9])
def test_any_guess_count_and_ngram_size_give_greedy_tokens(count):
    for prompt in ([3, 4, 5, 3], [6, 3, 4, 5, 6], [10, 3, 10], [11, 3, 4, 11, 3, 5, 4]):
        plain = toy_generate(prompt, max_new_tokens=17, prompt_lookup_num_tokens=0)[1]
        for ngram in (1, 2, 4):
            out = toy_generate(prompt, max_new_tokens=17, prompt_lookup_num_tokens=count,
                               max_matching_ngram_size=ngram)[1]
            assert out.sequences.tolist() == plain.sequences.tolist(), (prompt, ngram)


def test_streaming_scores_and_stop_criteria_see_every_token():
    seen = []
    model = Successor(TABLE)
    config = GenerationConfig(eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=9, output_scores=True,
                              repetition_penalty=1.5)
    out = generate(model, torch.tensor([[3, 4, 5, 3]]), config, on_token=lambda t, r: seen.append(int(t[0])))
    plain = generate(Successor(TABLE, 0), torch.tensor([[3, 4, 5, 3]]), config)
    assert seen == out.generated[0].tolist() == plain.generated[0].tolist()
    assert len(out.scores) == len(plain.scores) == 9
    for a, b in zip(out.scores, plain.scores):
        assert torch.equal(a, b)
    assert model.passes < 9

    calls = []

    def stop_after_three_fives(tokens, new_tokens):
        calls.append(int(new_tokens[0]))
        return torch.tensor([int((tokens[0] == 5).sum()) >= 3])

    model = Successor(TABLE)
    out = generate(model, torch.tensor([[3, 4, 5, 3]]), GenerationConfig(max_new_tokens=30),
                   stopping_criteria=[stop_after_three_fives])
    assert out.generated[0].tolist() == [4, 5, 3, 4, 5]
    assert calls == [4, 5, 3, 4, 5]


def test_batches_sampling_and_zero_keep_plain_steps():
    model = Successor(TABLE)
    config = GenerationConfig(eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=8, prompt_lookup_num_tokens=3)
    generate(model, torch.tensor([[3, 4, 5, 3], [6, 3, 4, 5]]), config)
    assert set(model.fed[1:]) == {1}
    model = Successor(TABLE)
    generate(model, torch.tensor([[3, 4, 5, 3]]), config.replace(do_sample=True, top_k=1))
    assert set(model.fed[1:]) == {1}
    model = Successor(TABLE, spare=3)
    generate(model, torch.tensor([[3, 4, 5, 3]]), config.replace(prompt_lookup_num_tokens=0))
    assert set(model.fed[1:]) == {1}
    model = Successor(TABLE, spare=0)  # nothing spare and nothing asked: plain steps
    generate(model, torch.tensor([[3, 4, 5, 3]]), config.replace(prompt_lookup_num_tokens=None))
    assert set(model.fed[1:]) == {1}


# ---------------------------------------------------------------------------------------------- real architectures


SIZES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=3, n_head=4, n_positions=96)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                                 ffn_dim=48, max_position_embeddings=96)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                                       num_key_value_heads=2, intermediate_size=48,
                                                       max_position_embeddings=96)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(hidden_size=32, num_hidden_layers=3,
                                                             num_attention_heads=4, num_key_value_heads=2,
                                                             intermediate_size=48, max_position_embeddings=96,
                                                             sliding_window=6)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                                       num_key_value_heads=2, intermediate_size=48,
                                                       max_position_embeddings=96)),
}
# Prompts that repeat themselves, so that guesses are found from the first step on.
PROMPTS = [[11, 42, 7, 19, 11, 42, 7, 19, 11, 42], [30, 31, 30, 31, 30], [9, 60, 3, 27, 9, 60, 3, 27, 9]]


def checkpoint(folder, arch, vocab, **overrides):
    config_name, model_name, sizes = SIZES[arch]
    config = getattr(transformers, config_name)(vocab_size=vocab, bos_token_id=1, eos_token_id=EOS,
                                                pad_token_id=PAD, **{**sizes, **overrides})
    torch.manual_seed(0)
    ref = randomize(getattr(transformers, model_name)(config).eval(), seed=3)
    ref.save_pretrained(str(folder))
    return ref


def greedy(ref, prompt, new_tokens, **options) -> list[list[int]]:
    """transformers' greedy tokens for one prompt."""
    with torch.inference_mode():
        return ref.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens,
                            eos_token_id=EOS, pad_token_id=PAD, **options).tolist()


class Counted:
    """Counts what prompt lookup did in a run: forward passes (each advances the cache once), passes that checked
    guesses (more than one token fed after the prompt), and passes whose guesses were rejected (the cache cropped)."""

    def __init__(self, monkeypatch):
        self.passes = self.guessed = self.crops = 0
        advance, crop = KVCache.advance, KVCache.crop

        def counted_advance(cache, t):
            self.passes += 1
            self.guessed += cache.length > 0 and t > 1
            advance(cache, t)

        def counted_crop(cache, length):
            self.crops += length < cache.length
            crop(cache, length)

        monkeypatch.setattr(KVCache, "advance", counted_advance)
        monkeypatch.setattr(KVCache, "crop", counted_crop)


@pytest.mark.parametrize("arch", list(SIZES))
@pytest.mark.parametrize("vocab", [96, 5000])
def test_lookup_equals_transformers_greedy(tmp_path, monkeypatch, arch, vocab):
    """Tokens equal transformers' plain greedy and its prompt lookup, for several guess counts; some guesses were
    accepted and some rejected, so both paths ran. With 5000 tokens the greedy head's bfloat16 screen checks
    several positions at once."""
    ref = checkpoint(tmp_path, arch, vocab)
    ours = load_model(tmp_path, "causal-lm")
    counted = Counted(monkeypatch)
    new = 0
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        want = greedy(ref, prompt, 24)
        assert want == greedy(ref, prompt, 24, prompt_lookup_num_tokens=3)
        for count, cache in ((1, "dynamic"), (3, "dynamic"), (7, "dynamic"), (3, "static")):
            options = GenerationConfig(max_new_tokens=24, eos_token_id=EOS, pad_token_id=PAD,
                                       prompt_lookup_num_tokens=count, cache_implementation=cache)
            assert generate(ours, ids, options).sequences.tolist() == want, (prompt, count, cache)
            new += len(want[0]) - len(prompt)
    assert counted.passes < new  # guesses were accepted
    assert counted.crops > 0  # and rejected
    if vocab > 1000:
        assert hasattr(ours.lm_head, "_lightpipe_screen") == layers._bf16_screen_works()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lookup_with_processors_equals_transformers(tmp_path, monkeypatch, arch):
    """Guesses checked through the full logits and the processors (repetition penalty, n-gram ban, min tokens):
    the same tokens as transformers."""
    ref = checkpoint(tmp_path, arch, 96)
    ours = load_model(tmp_path, "causal-lm")
    options = dict(repetition_penalty=1.3, no_repeat_ngram_size=4, min_new_tokens=6)
    counted = Counted(monkeypatch)
    new = 0
    for prompt in PROMPTS:
        want = greedy(ref, prompt, 20, **options)
        got = generate(ours, torch.tensor([prompt]), GenerationConfig(
            eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=20, prompt_lookup_num_tokens=3, **options))
        assert got.sequences.tolist() == want
        new += len(want[0]) - len(prompt)
    assert counted.passes < new and counted.crops > 0


def test_spare_rows_follow_the_products(tmp_path):
    """Guesses are free only where a one-row product computes four rows anyway (float32 weights, oneDNN's padding)."""
    checkpoint(tmp_path, "gpt2", 96)
    model = load_model(tmp_path, "causal-lm")
    assert model.spare_rows() == (layers._FEWEST_ROWS - 1 if layers._pads_rows(1) else 0)
    assert load_model(tmp_path, "causal-lm", dtype=torch.bfloat16).spare_rows() == 0


def test_dynamic_rope_keeps_plain_steps(tmp_path, monkeypatch):
    """"dynamic" RoPE scaling sets a pass's frequencies from its furthest position, so guesses checked in a pass
    would change the tokens: such a model decodes one token per pass even when lookup is asked for, and its tokens
    equal transformers' plain greedy ones."""
    ref = checkpoint(tmp_path, "llama", 96, max_position_embeddings=8,
                     rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    ours = load_model(tmp_path, "causal-lm")
    assert not ours.guesses_are_exact
    counted = Counted(monkeypatch)
    new = 0
    for prompt in PROMPTS:
        want = greedy(ref, prompt, 12)
        got = generate(ours, torch.tensor([prompt]), GenerationConfig(
            max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD, prompt_lookup_num_tokens=3))
        assert got.sequences.tolist() == want
        new += len(want[0]) - len(prompt)
    assert counted.passes == new  # one pass per token


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_pipeline_takes_prompt_lookup_options(tmp_path, monkeypatch, arch):
    """The text-generation pipeline passes prompt_lookup_num_tokens / max_matching_ngram_size on: texts, chats and
    streamed pieces equal transformers' pipeline with the same options, a bad value is an InvalidInput naming it,
    and the pipeline keeps answering."""
    import lightpipe
    from text_generation_helpers import reference_pipeline, tiny_generation_checkpoint

    folder = tiny_generation_checkpoint(tmp_path, arch)
    ours, ref = lightpipe.pipeline("text-generation", model=str(folder)), reference_pipeline(folder)
    text = "the cat sat on the mat and the cat sat on the"
    chat = [{"role": "user", "content": "the cat sat on the mat, the cat sat"}]
    options = dict(do_sample=False, max_new_tokens=16, prompt_lookup_num_tokens=3, max_matching_ngram_size=3)
    counted = Counted(monkeypatch)
    for prompt in (text, chat):
        want = ref(prompt, **options)
        assert ours(prompt, **options) == want
        assert ours(prompt, **{**options, "prompt_lookup_num_tokens": 0}) == want
    assert "".join(ours.stream(text, **options)) == ref(text, **options, return_full_text=False)[0]["generated_text"]
    assert counted.guessed > 0
    with pytest.raises(InvalidInput, match="prompt_lookup_num_tokens"):
        ours(text, do_sample=False, prompt_lookup_num_tokens=-2)
    with pytest.raises(InvalidInput, match="max_matching_ngram_size"):
        ours(text, do_sample=False, max_matching_ngram_size=0)
    assert ours(text, **options) == ref(text, **options)

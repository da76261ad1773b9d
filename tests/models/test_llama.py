"""Llama, Mistral and Qwen2 parity with transformers on tiny random checkpoints (weights at std 0.2, grouped-query
attention with 4 query and 2 key/value heads): logits, cached decoding, greedy / beam search / sampling against
transformers' generate(), every RoPE scaling kind, sliding windows, biases, tied and untied embeddings."""

import json

import pytest
import torch
from torch import nn

import transformers
from causal_lm_helpers import (EOS, PAD, PROMPTS, VOCAB, assert_cached_decoding_equals_forward, hf_generate,
                               lp_generate, padded, positions_of)
from helpers import STD
from lightpipe import loading
from lightpipe.errors import InvalidInput, UnsupportedModel
from lightpipe.loading import load_model
from lightpipe.models import llama

SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)
CONFIGS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}
PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
HEAD_CLASS = {"causal-lm": "ForCausalLM", "base": "Model", "sequence-classification": "ForSequenceClassification"}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}  # head_dim 8: its 4 wavelengths fall in all three bands


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Every weight redrawn with std STD (RMSNorm weights around 1), so a masking bug shows at 1e-4."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if type(module).__name__.endswith("RMSNorm"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(STD * torch.randn(p.shape, generator=gen))
    return model.eval()


def tiny_llama(folder, arch="llama", head="causal-lm", *, seed=0, **overrides):
    """Save a tiny random `arch` model with `head` into `folder`; returns the folder."""
    config = getattr(transformers, CONFIGS[arch])(**{**SIZES, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, PREFIX[arch] + HEAD_CLASS[head])(config)
    randomize(model, seed)
    model.save_pretrained(str(folder))
    return folder


def reference(folder, head="causal-lm"):
    auto = {"causal-lm": transformers.AutoModelForCausalLM, "base": transformers.AutoModel,
            "sequence-classification": transformers.AutoModelForSequenceClassification}[head]
    return auto.from_pretrained(str(folder)).eval()


def assert_logits_parity(folder, prompts=PROMPTS, alone_too=True):
    """Full-sequence logits equal transformers' at every real position, for the left-padded batch (positions from
    each row's first token, as generate() passes them) and each prompt alone."""
    ours, ref = load_model(folder, "causal-lm"), reference(folder)
    ids, mask = padded(prompts)
    real = mask.bool()
    with torch.inference_mode():
        got = ours(ids, attention_mask=mask)["logits"]
        expected = ref(input_ids=ids, attention_mask=mask, position_ids=positions_of(mask)).logits
        assert got.shape == expected.shape
        assert (got[real] - expected[real]).abs().max() <= 1e-4
        for prompt in prompts if alone_too else []:
            alone = torch.tensor([prompt])
            assert (ours(alone)["logits"] - ref(input_ids=alone).logits).abs().max() <= 1e-4


def assert_generate_parity(folder, **options):
    """generate() tokens equal transformers' generate() for the batch and for each prompt alone."""
    ours, ref = load_model(folder, "causal-lm"), reference(folder)
    for prompts in [PROMPTS] + [[p] for p in PROMPTS]:
        assert lp_generate(ours, prompts, **options) == hf_generate(ref, prompts, **options), prompts


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama"))


# ----------------------------------------------------------------------------------------------
# Logits


VARIANTS = {
    "llama": ("llama", {}),
    "llama-biases": ("llama", dict(attention_bias=True, mlp_bias=True, rms_norm_eps=1e-3)),
    "llama-head-dim": ("llama", dict(head_dim=16)),  # heads wider than hidden / heads
    "llama-no-grouping": ("llama", dict(num_key_value_heads=4, rope_parameters={"rope_type": "default",
                                                                                "rope_theta": 500.0})),
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "mistral": ("mistral", dict(sliding_window=None)),
    "mistral-window": ("mistral", dict(sliding_window=3)),
    "qwen2": ("qwen2", {}),
    "qwen2-window": ("qwen2", dict(use_sliding_window=True, sliding_window=3, max_window_layers=1)),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_equal_transformers_batched_and_alone(tmp_path, variant):
    arch, overrides = VARIANTS[variant]
    assert_logits_parity(tiny_llama(tmp_path, arch, **overrides))


def test_right_padding_leaves_real_positions_alone(llama_folder):
    ours, ref = load_model(llama_folder, "causal-lm"), reference(llama_folder)
    ids = torch.tensor([[4, 8, 15, 16, 23], [42, 9, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    with torch.inference_mode():
        got = ours(ids, attention_mask=mask)["logits"]
        expected = ref(input_ids=ids, attention_mask=mask).logits
        assert (got[mask.bool()] - expected[mask.bool()]).abs().max() <= 1e-4


def test_base_model_hidden_states(tmp_path):
    folder = tiny_llama(tmp_path, head="base")
    ours, ref = load_model(folder, "base"), reference(folder, "base")
    ids, mask = padded(PROMPTS)
    with torch.inference_mode():
        got = ours(ids, attention_mask=mask)["last_hidden_state"]
        expected = ref(input_ids=ids, attention_mask=mask, position_ids=positions_of(mask)).last_hidden_state
        assert got.shape == (3, ids.shape[1], 32)
        assert (got[mask.bool()] - expected[mask.bool()]).abs().max() <= 1e-4


def test_tied_checkpoint_has_no_head_weights_and_shares_the_embeddings(tmp_path):
    folder = tiny_llama(tmp_path, tie_word_embeddings=True)
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    model = load_model(folder, "causal-lm")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_untied_checkpoint_keeps_its_own_head(llama_folder):
    model = load_model(llama_folder, "causal-lm")
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    ref = reference(llama_folder)
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)


def test_sequence_classification_reads_the_last_real_token(tmp_path):
    folder = tiny_llama(tmp_path, head="sequence-classification", num_labels=3)
    ours, ref = load_model(folder, "sequence-classification"), reference(folder, "sequence-classification")
    left_ids, left_mask = padded(PROMPTS)
    right_ids = torch.tensor([p + [PAD] * (7 - len(p)) for p in PROMPTS])
    right_mask = (right_ids != PAD).long()
    with torch.inference_mode():
        for ids, mask in ((left_ids, left_mask), (right_ids, right_mask)):
            got = ours(ids, attention_mask=mask)["logits"]
            expected = ref(input_ids=ids, attention_mask=mask, position_ids=positions_of(mask)).logits
            assert got.shape == (3, 3)
            assert (got - expected).abs().max() <= 1e-4
        for row, prompt in enumerate(PROMPTS):
            alone = ours(torch.tensor([prompt]))["logits"]
            assert (alone - ref(input_ids=torch.tensor([prompt])).logits).abs().max() <= 1e-4


# ----------------------------------------------------------------------------------------------
# RoPE scaling


ROPE_KINDS = {
    "linear": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    "dynamic": dict(rope_parameters={"rope_type": "dynamic", "factor": 3.0, "rope_theta": 10000.0},
                    max_position_embeddings=8),  # the prompts and generations outgrow it
    "llama3": dict(rope_parameters={**LLAMA3, "rope_theta": 10000.0}),
}


@pytest.mark.parametrize("kind", ROPE_KINDS)
def test_rope_scaling_logits_and_generation_equal_transformers(tmp_path, kind):
    folder = tiny_llama(tmp_path, **ROPE_KINDS[kind])
    # Under dynamic scaling the frequencies follow the batch's longest row, so a row alone differs from its batch
    # (in transformers too): each is compared with transformers on the same input.
    assert_logits_parity(folder)
    assert_logits_parity(folder, [PROMPTS[0] * 2, PROMPTS[1], PROMPTS[2] * 3])  # 14 and 12 tokens: past 8
    assert_generate_parity(folder, max_new_tokens=12)
    assert_generate_parity(folder, max_new_tokens=8, num_beams=3)


def test_dynamic_scaling_changes_frequencies_only_past_the_trained_length():
    rope = {"rope_type": "dynamic", "factor": 3.0, "rope_theta": 10000.0}
    short = llama.inverse_frequencies(rope, 8, 16, seq_len=16)
    assert torch.equal(short, llama.inverse_frequencies({"rope_type": "default", "rope_theta": 10000.0}, 8, 16))
    long = llama.inverse_frequencies(rope, 8, 16, seq_len=40)
    assert long[0] == 1.0 and bool((long[1:] < short[1:]).all())


@pytest.mark.parametrize("kind", ["linear", "dynamic", "llama3"])
def test_rope_scaling_written_the_old_way_reads_the_same(tmp_path, kind):
    """Configs from before transformers 5 keep `rope_scaling` (with "type") and `rope_theta` beside it."""
    folder = tiny_llama(tmp_path, **ROPE_KINDS[kind])
    config = json.loads((folder / "config.json").read_text())
    new = loading.load_config(folder).rope()
    params = config.pop("rope_parameters")
    theta = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")
    (folder / "config.json").write_text(json.dumps({**config, "rope_scaling": params, "rope_theta": theta}))
    old = loading.load_config(folder).rope()
    assert {k: old[k] for k in new} == new
    assert_logits_parity(folder, alone_too=False)


def test_unsupported_rope_scaling_is_refused(tmp_path, llama_folder):
    config = json.loads((llama_folder / "config.json").read_text())
    folder = tmp_path / "yarn"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {**config, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}))
    with pytest.raises(UnsupportedModel, match="yarn"):
        loading.load_config(folder)


# ----------------------------------------------------------------------------------------------
# Cached decoding and generation


@pytest.mark.parametrize("variant", ["llama", "mistral-window", "qwen2-window"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_cached_decode_steps_equal_full_forward(tmp_path, variant, static):
    arch, overrides = VARIANTS[variant]
    assert_cached_decoding_equals_forward(tiny_llama(tmp_path, arch, **overrides), static=static)


GENERATE_OPTIONS = {
    "greedy": dict(max_new_tokens=12),
    "beams": dict(max_new_tokens=10, num_beams=3),
    "beams-returned": dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, length_penalty=0.5),
}


@pytest.mark.parametrize("options", GENERATE_OPTIONS)
def test_generate_equals_transformers(llama_folder, options):
    assert_generate_parity(llama_folder, **GENERATE_OPTIONS[options])


@pytest.mark.parametrize("variant", ["llama-tied", "mistral-window", "qwen2", "qwen2-window"])
def test_family_members_generate_like_transformers(tmp_path, variant):
    arch, overrides = VARIANTS[variant]
    folder = tiny_llama(tmp_path, arch, **overrides)
    assert_generate_parity(folder, max_new_tokens=10)
    assert_generate_parity(folder, max_new_tokens=8, num_beams=3)


def test_sampling_with_top_k_1_equals_greedy(llama_folder):
    model = load_model(llama_folder, "causal-lm")
    greedy = lp_generate(model, PROMPTS, max_new_tokens=10)
    assert lp_generate(model, PROMPTS, max_new_tokens=10, do_sample=True, top_k=1, temperature=0.7) == greedy


@pytest.mark.parametrize("variant", ["llama", "mistral-window"])
def test_static_cache_generates_like_the_dynamic_one(tmp_path, variant):
    """Greedy decoding through decode_step with a static (full-length) cache gives generate()'s tokens (which
    runs the dynamic cache), and the same logits."""
    arch, overrides = VARIANTS[variant]
    model = load_model(tiny_llama(tmp_path, arch, **overrides), "causal-lm")
    ids, mask = padded(PROMPTS)
    expected = lp_generate(model, PROMPTS, max_new_tokens=10)
    with torch.inference_mode():
        caches = [model.new_cache(ids.shape[0], ids.shape[1] + 10, static=static) for static in (False, True)]
        for cache in caches:
            cache.set_left_padding((mask == 0).sum(dim=1))
        tokens, step = ids, ids
        for _ in range(10):
            dynamic, static = (model.decode_step(step, cache, last_only=True) for cache in caches)
            assert (dynamic - static).abs().max() <= 1e-5
            step = static[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, step], dim=1)
    for row, want in zip(tokens.tolist(), expected):  # generate pads rows after their end token
        cut = next((i + 1 for i in range(ids.shape[1], len(want)) if want[i] == EOS), len(want))
        assert row[:cut] == want[:cut]


# ----------------------------------------------------------------------------------------------
# Shapes of real checkpoints, dtypes and errors


SMOLLM2_135M = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576,
                    intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                    hidden_act="silu", bos_token_id=1, eos_token_id=2)


def test_smollm2_135m_config_builds_the_checkpoint_layout():
    """A config dict of SmolLM2-135M's shape (as a GGUF reader produces it) gives transformers' parameter names and
    shapes, lm_head tied to the embeddings."""
    config = llama.Config.from_dict(dict(SMOLLM2_135M))
    assert (config.head_size, config.kv_heads, config.rope()["rope_theta"]) == (64, 3, 100000.0)
    ours = loading.build_model(config, "causal-lm")
    with torch.device("meta"):
        ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_135M))
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == shapes
    assert ours.tied_weights == {"lm_head.weight": "model.embed_tokens.weight"} and config.tie_word_embeddings


def test_rms_norm_in_half_precision_equals_transformers():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    ref = LlamaRMSNorm(32, eps=1e-5).to(torch.bfloat16)
    ours = llama.LlamaRMSNorm(32, 1e-5).to(torch.bfloat16)
    with torch.no_grad():
        ref.weight.copy_(1 + 0.1 * torch.randn(32))
        ours.weight.copy_(ref.weight)
        assert torch.equal(ours(x), ref(x))


def test_rms_norm_in_float32_equals_transformers_and_follows_its_weight():
    """float32 runs as layer_norm over [x, -x] with a doubled copy of the weight: equal to transformers' RMSNorm to
    float32 rounding, for large and tiny rows, and the copy follows an in-place change of the weight."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 48, generator=gen) * torch.tensor([1e-3, 1.0, 50.0]).view(3, 1, 1) + 0.3
    ref, ours = LlamaRMSNorm(48, eps=1e-6), llama.LlamaRMSNorm(48, 1e-6)
    with torch.no_grad():
        for _ in range(2):  # the second round after an in-place change of the weight
            ref.weight.copy_(1 + 0.2 * torch.randn(48, generator=gen))
            ours.weight.copy_(ref.weight)
            torch.testing.assert_close(ours(x), ref(x), rtol=2e-6, atol=1e-6)
            assert ours(x[:1, :1]).shape == (1, 1, 48)


def test_bfloat16_runs_close_to_float32(llama_folder):
    full, half = load_model(llama_folder, "causal-lm"), load_model(llama_folder, "causal-lm", dtype="bfloat16")
    ids, mask = padded(PROMPTS)
    with torch.inference_mode():
        low = half(ids, attention_mask=mask)["logits"]
        assert low.dtype == torch.bfloat16
        real = mask.bool()
        assert (low.float()[real] - full(ids, attention_mask=mask)["logits"][real]).abs().max() < 0.5


def test_old_checkpoints_with_saved_rotary_frequencies_load(tmp_path, llama_folder):
    from safetensors.torch import load_file, save_file

    state = load_file(str(llama_folder / "model.safetensors"))
    state.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(4) for i in range(3)})
    old = tmp_path / "old"
    old.mkdir()
    save_file(state, str(old / "model.safetensors"))
    (old / "config.json").write_text((llama_folder / "config.json").read_text())
    ids = torch.tensor(PROMPTS[:1])
    with torch.inference_mode():
        assert torch.equal(load_model(old, "causal-lm")(ids)["logits"], load_model(llama_folder, "causal-lm")(ids)["logits"])


def test_bad_inputs_and_configs_fail_with_typed_errors(tmp_path, llama_folder):
    model = load_model(llama_folder, "causal-lm")
    with pytest.raises(InvalidInput, match="64 positions"):
        lp_generate(model, PROMPTS, max_new_tokens=60)
    with pytest.raises(InvalidInput, match="vocabulary"):
        model(torch.tensor([[3, VOCAB]]))
    with pytest.raises(InvalidInput, match="holes"):
        model(torch.tensor([[3, 4, 5]]), attention_mask=torch.tensor([[1, 0, 1]]))
    with pytest.raises(InvalidInput, match="decoder-only"):
        model.new_cache(1, 8, encoder_hidden=torch.zeros(1, 4, 32))
    cache = model.new_cache(1, 4)
    with torch.inference_mode():
        model.decode_step(torch.tensor([[1, 2, 3]]), cache)
        with pytest.raises(InvalidInput, match="do not fit"):
            model.decode_step(torch.tensor([[1, 2]]), cache)
        assert model(torch.tensor([[1, 2]]))["logits"].shape == (1, 2, VOCAB)  # still usable
    config = json.loads((llama_folder / "config.json").read_text())
    for change, message in (({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
                            ({"hidden_act": "swoosh"}, "swoosh"),
                            ({"partial_rotary_factor": 0.5}, "partial_rotary_factor")):
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UnsupportedModel, match=message):
            loading.load_config(tmp_path)

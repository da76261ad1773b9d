"""OPT parity with transformers on tiny random checkpoints (weights at std 0.2): pre-norm (opt-125m style) and
post-norm with projected embeddings (opt-350m style), logits, cached decoding and generate()."""

import json

import pytest
import torch

from causal_lm_helpers import (EOS, PROMPTS, VOCAB, assert_cached_decoding_equals_forward, assert_generate_parity,
                               assert_logits_parity, lp_generate, padded, reference, tiny_checkpoint)
from lightpipe.errors import InvalidInput, UnsupportedModel
from lightpipe.loading import load_model

# opt-350m's shape, tiny: post-norm blocks, no final layer norm, 16-wide token embeddings projected to 32.
OPT_350M = {"do_layer_norm_before": False, "word_embed_proj_dim": 16}
VARIANTS = [
    {},
    OPT_350M,
    {"enable_bias": False, "layer_norm_elementwise_affine": False, "activation_function": "gelu"},
    {"_remove_final_layer_norm": True},
]


@pytest.fixture(scope="module", params=[{}, OPT_350M], ids=["opt-125m-shape", "opt-350m-shape"])
def opt(request, tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("opt"), "opt", **request.param)


@pytest.mark.parametrize("overrides", VARIANTS)
def test_logits_equal_transformers_batched_and_alone(tmp_path, overrides):
    """transformers' OPT derives positions from the attention mask itself: no position_ids are needed on its
    side for the padded batch to match each prompt alone."""
    folder = tiny_checkpoint(tmp_path, "opt", **overrides)
    got = assert_logits_parity(folder, "opt")
    ids, mask = padded(PROMPTS)
    with torch.inference_mode():
        expected = reference(folder, "opt")(input_ids=ids, attention_mask=mask).logits
    assert (got[mask.bool()] - expected[mask.bool()]).abs().max() <= 1e-4


def test_config_shapes_are_read(tmp_path):
    model = load_model(tiny_checkpoint(tmp_path, "opt", **OPT_350M), "causal-lm")
    decoder = model.model.decoder
    assert decoder.project_in.weight.shape == (32, 16) and decoder.project_out.weight.shape == (16, 32)
    assert decoder.final_layer_norm is None
    assert decoder.embed_positions.weight.shape == (64 + 2, 32)
    assert model.lm_head.weight is decoder.embed_tokens.weight
    # Matrices laid out (in, out) for one-row decode steps (layers.linear); the position table left as it is.
    assert decoder.layers[0].fc1.weight.t().is_contiguous() and model.lm_head.weight.t().is_contiguous()
    assert decoder.embed_positions.weight.is_contiguous()


def test_logits_without_padding(opt):
    ours, ref = load_model(opt, "causal-lm"), reference(opt, "opt")
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert (ours(ids)["logits"] - ref(input_ids=ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("head_checkpoint", [False, True])
def test_base_model_hidden_states(tmp_path, head_checkpoint):
    """The base model from its own checkpoint (keys under `decoder.`) or from a language model's."""
    folder = tiny_checkpoint(tmp_path, "opt", base=not head_checkpoint, **OPT_350M)
    ours = load_model(folder, "base")
    ref = reference(folder, "opt", base=not head_checkpoint)
    ref = ref.model if head_checkpoint else ref
    ids, mask = padded(PROMPTS)
    with torch.inference_mode():
        got = ours(ids, attention_mask=mask)["last_hidden_state"]
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        assert got.shape == (3, ids.shape[1], 16)
        assert (got[mask.bool()] - expected[mask.bool()]).abs().max() <= 1e-4


def test_base_checkpoint_serves_the_language_model_with_tied_head(tmp_path):
    """facebook/opt-* checkpoints hold OPTModel keys (`decoder.`) and no lm_head."""
    folder = tiny_checkpoint(tmp_path, "opt", base=True)
    ours = load_model(folder, "causal-lm")
    import transformers

    ref = transformers.OPTForCausalLM.from_pretrained(str(folder)).eval()
    ids, mask = padded(PROMPTS)
    with torch.inference_mode():
        expected = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)["logits"]
        assert (got[mask.bool()] - expected[mask.bool()]).abs().max() <= 1e-4


@pytest.mark.parametrize("static", [False, True])
def test_cached_decode_steps_equal_full_forward(opt, static):
    assert_cached_decoding_equals_forward(opt, static=static)


@pytest.mark.parametrize("options", [
    dict(max_new_tokens=12),
    dict(max_new_tokens=10, num_beams=3),
    dict(max_new_tokens=10, num_beams=3, num_return_sequences=3, early_stopping=True),
])
def test_generate_equals_transformers(opt, options):
    assert_generate_parity(opt, "opt", **options)


def test_sampling_with_top_k_1_equals_greedy(opt):
    model = load_model(opt, "causal-lm")
    greedy = lp_generate(model, PROMPTS, max_new_tokens=10)
    assert lp_generate(model, PROMPTS, max_new_tokens=10, do_sample=True, top_k=1) == greedy


def test_generate_with_rows_ending_early_equals_transformers(tmp_path):
    folder = tiny_checkpoint(tmp_path, "opt", seed=21, **OPT_350M)  # a seed found to end some prompts early
    rows = lp_generate(load_model(folder, "causal-lm"), PROMPTS, max_new_tokens=12)
    ended = [EOS in row[len(max(PROMPTS, key=len)):] for row in rows]
    assert any(ended) and not all(ended)
    for options in (dict(max_new_tokens=12), dict(max_new_tokens=12, num_beams=3)):
        assert_generate_parity(folder, "opt", **options)


def test_bad_inputs_fail_with_typed_errors(tmp_path, opt):
    model = load_model(opt, "causal-lm")
    with pytest.raises(InvalidInput, match="max_position_embeddings"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(InvalidInput, match="holes"):
        model(torch.tensor([[3, 4, 5], [6, 7, 8]]), attention_mask=torch.tensor([[1, 1, 1], [1, 0, 1]]))
    with pytest.raises(InvalidInput, match="must match"):
        model(torch.tensor([[3, 4, 5]]), attention_mask=torch.tensor([[1, 1, 1], [1, 1, 1]]))
    folder = tiny_checkpoint(tmp_path, "opt")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 5}))
    with pytest.raises(UnsupportedModel, match="multiple"):
        load_model(folder, "causal-lm")

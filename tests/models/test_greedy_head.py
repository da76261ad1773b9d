"""layers.greedy_tokens: the argmax of a large output matrix found through a bfloat16 screen must equal the argmax of
the float32 logits, ties and all; and greedy generation that uses it must equal transformers' generate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import transformers
from causal_lm_helpers import randomize
from lightpipe.generation import GenerationConfig, generate
from lightpipe.loading import load_model
from lightpipe.models import layers
from lightpipe.models.layers import by_input_rows, greedy_tokens, vocab_logits

VOCAB, WIDTH = 5000, 64


def head(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer


def random_weight(seed: int, rows: int = VOCAB) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, WIDTH, generator=gen) * 0.2


@pytest.mark.parametrize("layout", ["rows", "by_input_rows"])
def test_greedy_tokens_equal_argmax_of_float32_logits(layout):
    gen = torch.Generator().manual_seed(1)
    for trial in range(40):
        weight = random_weight(trial)
        hidden = torch.randn(1 + trial % 5, WIDTH, generator=gen) * (0.5 + trial % 7)
        if trial % 3 == 0:  # exact ties: the best row copied to later rows; argmax keeps the first
            best = int((hidden[:1] @ weight.t()).argmax())
            weight[min(best + 1, VOCAB - 1)] = weight[best]
            weight[VOCAB - 1] = weight[best]
        layer = head(by_input_rows(weight) if layout == "by_input_rows" else weight)
        with torch.inference_mode():
            expected = vocab_logits(hidden, layer).argmax(dim=-1)
            assert torch.equal(greedy_tokens(hidden, layer), expected), trial
        # The bfloat16 screen ran (it is built on first use) where the CPU has bfloat16 instructions.
        assert hasattr(layer, "_lightpipe_screen") == layers._bf16_screen_works()


def test_greedy_tokens_near_ties_and_fallbacks():
    weight = random_weight(7)
    base = weight[100].clone()
    # Rows within bfloat16 rounding of each other: the screen cannot order them, float32 must.
    for i, row in enumerate(range(200, 220)):
        weight[row] = base + (i - 10) * 1e-6
    layer = head(weight)
    hidden = torch.stack([base * 4, -base, torch.zeros(WIDTH)])
    with torch.inference_mode():
        assert torch.equal(greedy_tokens(hidden, layer), vocab_logits(hidden, layer).argmax(dim=-1))
        # Many rows equally good (all candidates): computed in float32 instead, same answer.
        flat = head(base.repeat(VOCAB, 1) + torch.randn(VOCAB, WIDTH) * 1e-7)
        assert torch.equal(greedy_tokens(hidden, flat), vocab_logits(hidden, flat).argmax(dim=-1))
        # Non-finite hidden states fall back as well (argmax of NaN logits, as plain argmax gives).
        odd = hidden.clone()
        odd[0, 3] = float("inf")
        assert torch.equal(greedy_tokens(odd, layer), vocab_logits(odd, layer).argmax(dim=-1))


def test_greedy_tokens_follow_changed_weights():
    layer = head(random_weight(3))
    hidden = torch.randn(2, WIDTH)
    with torch.inference_mode():
        first = greedy_tokens(hidden, layer)
    with torch.no_grad():
        layer.weight.mul_(-1)  # an in-place change: the screening copy must be rebuilt
    with torch.inference_mode():
        assert not torch.equal(greedy_tokens(hidden, layer), first)
        assert torch.equal(greedy_tokens(hidden, layer), vocab_logits(hidden, layer).argmax(dim=-1))


@pytest.mark.parametrize("arch", ["gpt2", "opt", "llama"])
def test_greedy_generation_with_a_large_vocabulary_equals_transformers(tmp_path, arch):
    """A vocabulary large enough for the screen (tiny models' 96 tokens take the plain path): tokens equal
    transformers', batched and unbatched, and equal our own full-logits path (output_scores keeps every logit)."""
    sizes = {
        "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
        "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                     ffn_dim=48, max_position_embeddings=64)),
        "llama": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                           num_key_value_heads=2, intermediate_size=48,
                                                           max_position_embeddings=64)),
    }[arch]
    config = getattr(transformers, sizes[0])(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                             **sizes[2])
    torch.manual_seed(0)
    ref = randomize(getattr(transformers, sizes[1])(config).eval(), seed=5)
    ref.save_pretrained(str(tmp_path))
    ours = load_model(tmp_path, "causal-lm")
    prompts = [[11, 420, 7, 1900, 60, 3, 27], [3300, 8], [70, 4012, 55, 9]]
    options = GenerationConfig(max_new_tokens=12, eos_token_id=2, pad_token_id=0)
    for batch in (1, 3):
        for start in range(0, len(prompts), batch):
            rows = prompts[start:start + batch]
            longest = max(map(len, rows))
            ids = torch.tensor([[0] * (longest - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
            got = generate(ours, ids, options, attention_mask=mask).sequences
            full = generate(ours, ids, options.replace(output_scores=True), attention_mask=mask).sequences
            with torch.inference_mode():
                want = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                                    eos_token_id=2, pad_token_id=0)
            assert got.tolist() == want.tolist()
            assert got.tolist() == full.tolist()
    # The screen really ran where the CPU multiplies bfloat16 natively (elsewhere every logit is computed).
    assert hasattr(ours.lm_head, "_lightpipe_screen") == layers._bf16_screen_works()

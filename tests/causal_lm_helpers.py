"""Tiny random decoder-only checkpoints (GPT-2, OPT) built with transformers, and the parity checks their tests
share: full-sequence logits, cached decoding, and generate() against transformers' generate()."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import transformers
from helpers import STD
from lightpipe.generation import GenerationConfig, generate
from lightpipe.loading import load_model

VOCAB = 96
EOS = 5
# Not 0: transformers' beam search fills finished hypotheses with the end token when pad_token_id is 0 (it
# tests the pad id for truth), where greedy decoding and lightpipe use the pad token.
PAD = 2

ARCH = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", "GPT2Model",
             dict(n_embd=32, n_layer=3, n_head=4, n_positions=64, vocab_size=VOCAB)),
    "opt": ("OPTConfig", "OPTForCausalLM", "OPTModel",
            dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, ffn_dim=48,
                 max_position_embeddings=64, vocab_size=VOCAB)),
}

# Prompts of different lengths (token ids); batched, they are left-padded.
PROMPTS = [[11, 42, 7, 19, 60, 3, 27], [33, 8], [70, 12, 55, 9]]


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Every weight redrawn with std STD (layer-norm weights around 1), so a masking bug shows at 1e-4."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, nn.LayerNorm) and name == "weight":
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(STD * torch.randn(p.shape, generator=gen))
    return model.eval()


def tiny_checkpoint(folder: Path, arch: str, *, base: bool = False, seed: int = 0, **overrides) -> Path:
    """Save a tiny random `arch` language model (or its base model) into `folder`; returns the folder."""
    config_name, lm_name, base_name, sizes = ARCH[arch]
    config = getattr(transformers, config_name)(
        **{**sizes, "bos_token_id": 1, "eos_token_id": EOS, "pad_token_id": PAD, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, base_name if base else lm_name)(config)
    randomize(model, seed)
    model.save_pretrained(str(folder))
    return folder


def reference(folder: Path, arch: str, *, base: bool = False) -> nn.Module:
    _, lm_name, base_name, _ = ARCH[arch]
    return getattr(transformers, base_name if base else lm_name).from_pretrained(str(folder)).eval()


def padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (B, T) input_ids and attention_mask."""
    longest = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Each row's positions counted from its first real token (what transformers' generate passes)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def assert_logits_parity(folder: Path, arch: str, prompts=PROMPTS) -> torch.Tensor:
    """Full-sequence logits equal transformers' at every real position, for the left-padded batch and each prompt
    alone. Returns lightpipe's batch logits."""
    ours, ref = load_model(folder, "causal-lm"), reference(folder, arch)
    ids, mask = padded(prompts)
    with torch.inference_mode():
        got = ours(ids, attention_mask=mask)["logits"]
        expected = ref(input_ids=ids, attention_mask=mask, position_ids=positions_of(mask)).logits
        real = mask.bool()
        assert got.shape == expected.shape
        assert (got[real] - expected[real]).abs().max() <= 1e-4
        for row, prompt in enumerate(prompts):
            alone = ours(torch.tensor([prompt]))["logits"][0]
            assert (alone - expected[row][real[row]]).abs().max() <= 1e-4
    return got


def assert_cached_decoding_equals_forward(folder: Path, *, static: bool = False) -> None:
    """Prefill part of each (left-padded) sequence, then one token per step: every step's logits equal the full
    forward pass's at that position."""
    model = load_model(folder, "causal-lm")
    ids, mask = padded(PROMPTS)
    extra = torch.randint(1, VOCAB, (ids.shape[0], 5), generator=torch.Generator().manual_seed(3))
    ids, mask = torch.cat([ids, extra], dim=1), torch.cat([mask, torch.ones_like(extra)], dim=1)
    prefill = ids.shape[1] - extra.shape[1]
    with torch.inference_mode():
        full = model(ids, attention_mask=mask)["logits"]
        cache = model.new_cache(ids.shape[0], ids.shape[1], static=static)
        cache.set_left_padding((mask == 0).sum(dim=1))
        steps = [model.decode_step(ids[:, :prefill], cache)]
        steps += [model.decode_step(ids[:, i:i + 1], cache) for i in range(prefill, ids.shape[1])]
        cached = torch.cat(steps, dim=1)
        real = mask.bool()
        assert (cached[real] - full[real]).abs().max() <= 1e-5
        # last_only: the prompt in one step, then the last token, each giving the last position's logits only.
        cache = model.new_cache(ids.shape[0], ids.shape[1], static=static)
        cache.set_left_padding((mask == 0).sum(dim=1))
        first = model.decode_step(ids[:, :-1], cache, last_only=True)
        last = model.decode_step(ids[:, -1:], cache, last_only=True)
        assert first.shape == last.shape == (ids.shape[0], 1, VOCAB)
        assert (first[:, 0] - full[:, -2]).abs().max() <= 1e-5
        assert (last[:, 0] - full[:, -1]).abs().max() <= 1e-5


def hf_generate(ref: nn.Module, prompts: list[list[int]], **options) -> list[list[int]]:
    ids, mask = padded(prompts)
    with torch.inference_mode():
        out = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=PAD, eos_token_id=EOS,
                           **options)
    return out.tolist()


def lp_generate(model: nn.Module, prompts: list[list[int]], **options) -> list[list[int]]:
    ids, mask = padded(prompts)
    config = GenerationConfig(pad_token_id=PAD, eos_token_id=EOS, **options)
    return generate(model, ids, config, attention_mask=mask).sequences.tolist()


def assert_generate_parity(folder: Path, arch: str, **options) -> None:
    """generate() tokens equal transformers' generate() for the batch and for each prompt alone."""
    ours, ref = load_model(folder, "causal-lm"), reference(folder, arch)
    for prompts in [PROMPTS] + [[p] for p in PROMPTS]:
        assert lp_generate(ours, prompts, **options) == hf_generate(ref, prompts, **options), prompts

"""Tiny random text-generation checkpoints (model + byte-level BPE tokenizer + chat template), built with
transformers and saved the way the Hub has them, for pipeline parity tests."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from helpers import BPE_CORPUS, STD

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' "
    "+ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = BPE_CORPUS + " Ünïcødé façade naïve 東京 €100 😀 🙂 " * 5

ARCHS = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=96)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48,
                                                max_position_embeddings=96, word_embed_proj_dim=32)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2,
                                                      max_position_embeddings=96, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2,
                                                      max_position_embeddings=96, tie_word_embeddings=True)),
}


def tokenizer_folder(folder: Path, *, chat_template: str | None = CHATML, pad: bool = False) -> Path:
    """A GPT-2 style byte-level BPE tokenizer (vocab.json + merges.txt + tokenizer.json) with ChatML specials."""
    from tokenizers import ByteLevelBPETokenizer

    folder.mkdir(parents=True, exist_ok=True)
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator([CORPUS], vocab_size=420, min_frequency=2, special_tokens=SPECIALS)
    trainer.save_model(str(folder))
    tok = transformers.GPT2TokenizerFast(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                                         bos_token="<|endoftext|>", eos_token="<|im_end|>", unk_token="<|endoftext|>")
    assert len(tok) > 300, "the trained vocabulary did not load"
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    if pad:
        tok.pad_token = "<|endoftext|>"
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.model_max_length = 96
    tok.save_pretrained(str(folder))
    return folder


def tiny_generation_checkpoint(folder: Path, arch: str, *, seed: int = 0, chat_template: str | None = CHATML,
                               generation: dict | None = None, pad: bool = False, **overrides) -> Path:
    """A tiny random `arch` causal LM with its tokenizer in `folder` (weights std STD)."""
    tokenizer_folder(folder, chat_template=chat_template, pad=pad)
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    config_name, lm_name, sizes = ARCHS[arch]
    ids = dict(bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.eos_token_id)
    config = getattr(transformers, config_name)(vocab_size=len(tok), **ids, **{**sizes, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, lm_name)(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                is_norm_weight = name == "weight" and ("Norm" in type(module).__name__)
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen) if is_norm_weight
                        else STD * torch.randn(p.shape, generator=gen))
    if generation is not None:
        model.generation_config = transformers.GenerationConfig(**ids, **generation)
    model.eval().save_pretrained(str(folder))
    return folder


def reference_pipeline(folder: Path):
    """transformers' text-generation pipeline on `folder`, ready to batch (left padding, a pad token)."""
    pipe = transformers.pipeline("text-generation", model=str(folder))
    if pipe.tokenizer.pad_token is None:
        pipe.tokenizer.pad_token = pipe.tokenizer.eos_token
        pipe.model.generation_config.pad_token_id = pipe.tokenizer.pad_token_id
    pipe.tokenizer.padding_side = "left"
    return pipe

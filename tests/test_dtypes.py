"""dtype "auto", float32, float16 and bfloat16 for every architecture family: each runs in bfloat16 and float16 on the
CPU close to its float32 self, and the weights are in the dtype asked for."""

from __future__ import annotations

import pytest
import torch
import transformers
from bart_helpers import tiny_bart
from clip_helpers import tiny_clip_checkpoint
from deberta_helpers import tiny_deberta
from helpers import randomize
from helpers import tiny_checkpoint as tiny_text
from layoutlm_helpers import layoutlm_checkpoint
from t5_helpers import tiny_t5
from text_generation_helpers import tiny_generation_checkpoint as tiny_lm
from vision_helpers import tiny_vision_checkpoint
from whisper_helpers import tiny_whisper

from lightpipe import loading

WAV2VEC2 = dict(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                conv_dim=(16, 16, 16), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), num_conv_pos_embeddings=16,
                num_conv_pos_embedding_groups=4)


def speech_ctc(folder, config_name, model_name):
    config = getattr(transformers, config_name)(**WAV2VEC2)
    torch.manual_seed(0)
    randomize(getattr(transformers, model_name)(config), 0).save_pretrained(str(folder))
    return folder


def tokens(model, rows=2, length=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    config = model.config
    vocab = getattr(config, "vocab_size", None) or config.text_config.vocab_size
    ids = torch.randint(3, vocab, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # one padded row
    return ids, mask


def pixels(model, seed=0):
    config = getattr(model.config, "vision_config", model.config)
    size = config.image_size
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def text_inputs(model):
    ids, mask = tokens(model)
    return {"input_ids": ids, "attention_mask": mask}


def seq2seq_inputs(model):
    ids, mask = tokens(model)
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": tokens(model, length=4, seed=1)[0]}


def causal_inputs(model):
    ids, _ = tokens(model)
    return {"input_ids": ids}


def whisper_inputs(model):
    features = torch.randn(2, model.config.num_mel_bins, 2 * model.config.max_source_positions,
                           generator=torch.Generator().manual_seed(0))
    return {"input_features": features, "decoder_input_ids": torch.tensor([[101, 105], [101, 106]])}


def layoutlm_inputs(model):
    ids, mask = tokens(model)
    boxes = torch.randint(0, 500, (2, 7, 2), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": mask, "bbox": torch.cat([boxes, boxes + 100], dim=-1)}


def clip_inputs(model):
    ids, mask = tokens(model)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels(model)}


def audio_inputs(model):
    return {"input_values": torch.randn(2, 1600, generator=torch.Generator().manual_seed(0))}


# family -> (make the checkpoint in a folder, head, inputs for the model)
FAMILIES = {
    "bert": (lambda f: tiny_text(f, "bert", "sequence-classification"), "sequence-classification", text_inputs),
    "roberta": (lambda f: tiny_text(f, "roberta", "token-classification"), "token-classification", text_inputs),
    "distilbert": (lambda f: tiny_text(f, "distilbert", "question-answering"), "question-answering", text_inputs),
    "deberta-v2": (lambda f: tiny_deberta(f), "sequence-classification", text_inputs),
    "layoutlm": (lambda f: layoutlm_checkpoint(f), "document-question-answering", layoutlm_inputs),
    "bart": (lambda f: tiny_bart(f, "seq2seq-lm"), "seq2seq-lm", seq2seq_inputs),
    "t5": (lambda f: tiny_t5(f), "seq2seq-lm", seq2seq_inputs),
    "gpt2": (lambda f: tiny_lm(f, "gpt2"), "causal-lm", causal_inputs),
    "opt": (lambda f: tiny_lm(f, "opt"), "causal-lm", causal_inputs),
    "llama": (lambda f: tiny_lm(f, "llama"), "causal-lm", causal_inputs),
    "whisper": (lambda f: tiny_whisper(f), "speech-seq2seq", whisper_inputs),
    "wav2vec2": (lambda f: speech_ctc(f, "Wav2Vec2Config", "Wav2Vec2ForCTC"), "ctc", audio_inputs),
    "hubert": (lambda f: speech_ctc(f, "HubertConfig", "HubertForCTC"), "ctc", audio_inputs),
    "vit": (lambda f: tiny_vision_checkpoint(f, "vit", "image-classification"), "image-classification",
            lambda m: {"pixel_values": pixels(m)}),
    "deit": (lambda f: tiny_vision_checkpoint(f, "deit", "image-classification"), "image-classification",
             lambda m: {"pixel_values": pixels(m)}),
    "beit": (lambda f: tiny_vision_checkpoint(f, "beit", "image-classification"), "image-classification",
             lambda m: {"pixel_values": pixels(m)}),
    "swin": (lambda f: tiny_vision_checkpoint(f, "swin", "image-classification"), "image-classification",
             lambda m: {"pixel_values": pixels(m)}),
    "convnext": (lambda f: tiny_vision_checkpoint(f, "convnext", "image-classification"), "image-classification",
                 lambda m: {"pixel_values": pixels(m)}),
    "clip": (lambda f: tiny_clip_checkpoint(f), "contrastive", clip_inputs),
}


def first_output(outputs):
    """The first floating-point tensor a model returns (logits, start logits, ...), in float32."""
    values = outputs.values() if isinstance(outputs, dict) else (outputs if isinstance(outputs, tuple) else [outputs])
    return next(v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()).float()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made = {}

    def folder(family):
        if family not in made:
            made[family] = FAMILIES[family][0](tmp_path_factory.mktemp(family))
        return made[family]

    return folder


@pytest.mark.parametrize("family", list(FAMILIES))
def test_half_precision_on_the_cpu_is_close_to_float32(family, folders):
    folder = folders(family)
    _, head, make_inputs = FAMILIES[family]
    full = loading.load_model(folder, head, dtype="float32")
    inputs = make_inputs(full)
    with torch.inference_mode():
        expected = first_output(full(**inputs))
        scale = float(expected.abs().max()) + 1e-6
        for dtype, tolerance in ((torch.bfloat16, 0.06), (torch.float16, 0.01)):
            model = loading.load_model(folder, head, dtype=dtype)
            floats = {p.dtype for p in model.state_dict().values() if p.is_floating_point()}
            assert floats == {dtype}, (family, dtype, floats)
            # Floating inputs in the model's dtype, as the pipelines give them.
            got = first_output(model(**{k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}))
            assert got.shape == expected.shape and bool(torch.isfinite(got).all())
            error = float((got - expected).abs().max()) / scale
            assert error < tolerance, (family, dtype, error)


def test_auto_takes_the_checkpoint_dtype(folders, tmp_path):
    """dtype="auto" (and None) keep what config.json names, float32 when it names nothing."""
    folder = folders("gpt2")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)
    model.save_pretrained(str(tmp_path))
    for dtype in ("auto", None):
        assert {p.dtype for p in loading.load_model(tmp_path, "causal-lm", dtype=dtype).parameters()} == {torch.bfloat16}
    assert {p.dtype for p in loading.load_model(tmp_path, "causal-lm", dtype="float32").parameters()} == {torch.float32}


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_half_precision_matrices_keep_the_plain_layout(family, folders):
    """Decoders lay float32 matrices out (in, out) for batch-1 steps; half-precision ones stay (out, in), the layout
    half-precision kernels read fastest (a float16 one-row product over an (in, out) matrix is ~40x slower)."""
    folder = folders(family)
    for dtype in (torch.bfloat16, torch.float16):
        model = loading.load_model(folder, "causal-lm", dtype=dtype)
        matrices = [p for p in model.parameters() if p.dim() == 2]
        assert matrices and all(p.is_contiguous() for p in matrices)
    full = loading.load_model(folder, "causal-lm", dtype="float32")
    assert any(not p.is_contiguous() for p in full.parameters() if p.dim() == 2)

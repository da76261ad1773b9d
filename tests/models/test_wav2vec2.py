"""Wav2Vec2 and HuBERT CTC models: parity with transformers on tiny random checkpoints (weights at std 0.2)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from helpers import randomize
from lightpipe import loading
from lightpipe.errors import CheckpointError, UnsupportedModel
from lightpipe.models import hubert, wav2vec2

TINY = dict(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            conv_dim=(16, 16, 16), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4)
STABLE = dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
VARIANTS = {
    # name: (transformers config class, transformers CTC class, config overrides)
    "wav2vec2-base": ("Wav2Vec2Config", "Wav2Vec2ForCTC", {}),
    "wav2vec2-stable": ("Wav2Vec2Config", "Wav2Vec2ForCTC", STABLE),
    "wav2vec2-mms-adapter": ("Wav2Vec2Config", "Wav2Vec2ForCTC", dict(STABLE, adapter_attn_dim=8)),
    "wav2vec2-odd-pos-kernel": ("Wav2Vec2Config", "Wav2Vec2ForCTC", dict(num_conv_pos_embeddings=15, hidden_act="gelu_new")),
    "hubert-base": ("HubertConfig", "HubertForCTC", {}),
    "hubert-stable": ("HubertConfig", "HubertForCTC", STABLE),
    "hubert-batch-norm": ("HubertConfig", "HubertForCTC", dict(feat_proj_layer_norm=False, conv_pos_batch_norm=True)),
}
LAYER_NORM_FEATURES = {"wav2vec2-stable", "wav2vec2-mms-adapter", "hubert-stable"}  # no group norm over time


def build(folder, name: str, seed: int = 0):
    config_name, model_name, overrides = VARIANTS[name]
    config = getattr(transformers, config_name)(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = randomize(getattr(transformers, model_name)(config), seed)
    if name == "hubert-batch-norm":  # running statistics are buffers, which randomize leaves at 0 and 1
        norm = model.hubert.encoder.pos_conv_embed.batch_norm
        norm.running_mean.normal_(0, 0.3)
        norm.running_var.uniform_(0.5, 2.0)
    model.save_pretrained(str(folder))
    return model.eval()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    cache = {}

    def make(name):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            ref = build(folder, name)
            cache[name] = (folder, ref, loading.load_model(folder, "ctc"))
        return cache[name]

    return make


def audio(*lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen) for n in lengths]


def padded(clips):
    longest = max(len(c) for c in clips)
    values = torch.zeros(len(clips), longest)
    mask = torch.zeros(len(clips), longest, dtype=torch.long)
    for row, clip in enumerate(clips):
        values[row, : len(clip)] = clip
        mask[row, : len(clip)] = 1
    return values, mask


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_equal_transformers(made, name):
    folder, ref, ours = made(name)
    x = torch.stack(audio(2400, 2400))
    ones = torch.ones_like(x, dtype=torch.long)
    with torch.inference_mode():
        want = ref(x).logits
        got = ours(x)["logits"]
        got_masked = ours(x, ones)["logits"]
        want_masked = ref(x, attention_mask=ones).logits
    assert got.shape == want.shape == (2, ours.output_lengths(2400), 32)
    assert want.std() > 0.5  # the random weights give logits that differ clearly between frames and ids
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_masked, want_masked, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_padded_batch_equals_singles(made, name):
    folder, ref, ours = made(name)
    clips = audio(4000, 1733, 2950, seed=1)
    values, mask = padded(clips)
    with torch.inference_mode():
        batch = ours(values, mask)["logits"]
        batch_ref = ref(values, attention_mask=mask).logits
        for row, clip in enumerate(clips):
            frames = ours.output_lengths(len(clip))
            alone = ours(clip[None])["logits"][0]
            alone_ref = ref(clip[None]).logits[0]
            assert alone.shape[0] == frames
            torch.testing.assert_close(batch[row, :frames], alone, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(alone, alone_ref, atol=1e-4, rtol=1e-4)
            if name in LAYER_NORM_FEATURES:  # transformers' padded batch is exact only without group norm
                torch.testing.assert_close(batch[row, :frames], batch_ref[row, :frames], atol=1e-4, rtol=1e-4)


def test_group_norm_padding_is_exact_where_transformers_is_not(made):
    """transformers' group norm averages the padding in; lightpipe normalises each clip over its own frames."""
    _, ref, ours = made("wav2vec2-base")
    clips = audio(4000, 1733, seed=2)
    values, mask = padded(clips)
    frames = ours.output_lengths(1733)
    with torch.inference_mode():
        alone = ref(clips[1][None]).logits[0]
        drift = (ref(values, attention_mask=mask).logits[1, :frames] - alone).abs().max()
        ours_drift = (ours(values, mask)["logits"][1, :frames] - alone).abs().max()
    assert drift > 1e-2 and ours_drift < 1e-4


def test_output_lengths_match_transformers(made):
    _, ref, ours = made("wav2vec2-base")
    lengths = torch.tensor([400, 401, 419, 420, 421, 1000, 16000, 16001])
    assert ours.output_lengths(lengths).tolist() == ref._get_feat_extract_output_lengths(lengths).tolist()
    assert [ours.output_lengths(int(n)) for n in lengths] == ours.output_lengths(lengths).tolist()
    assert ours.config.inputs_to_logits_ratio == ref.config.inputs_to_logits_ratio == 20


def test_base_head_equals_transformers_model(made):
    folder, _, _ = made("wav2vec2-stable")
    ours = loading.load_model(folder, "base")
    ref = transformers.Wav2Vec2Model.from_pretrained(str(folder)).eval()
    clips = audio(3000, 2100, seed=3)
    values, mask = padded(clips)
    frames = ours.output_lengths(2100)
    with torch.inference_mode():
        got = ours(values, mask)["last_hidden_state"]
        want = ref(values, attention_mask=mask).last_hidden_state
    assert isinstance(ours, wav2vec2.Wav2Vec2Model)
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1, :frames], want[1, :frames], atol=1e-4, rtol=1e-4)


def test_checkpoint_keys_are_sanitized(made):
    """transformers 5 saves the weight-normalised positional convolution as a parametrization and keeps the
    SpecAugment vector; both are handled at load time."""
    folder, _, ours = made("wav2vec2-base")
    keys = set(load_file(str(folder / "model.safetensors")))
    assert "wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original0" in keys
    assert "wav2vec2.masked_spec_embed" in keys
    assert "wav2vec2.encoder.pos_conv_embed.conv.weight" in ours.state_dict()
    assert not any("masked_spec_embed" in k or "parametrizations" in k for k in ours.state_dict())


def test_legacy_weight_norm_keys_load(made, tmp_path):
    """Checkpoints saved before torch's parametrizations store weight_g / weight_v."""
    folder, ref, _ = made("hubert-base")
    state = load_file(str(folder / "model.safetensors"))
    renamed = {k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1",
                                                                                    "weight_v"): v
               for k, v in state.items()}
    assert "hubert.encoder.pos_conv_embed.conv.weight_g" in renamed
    save_file(renamed, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    legacy = loading.load_model(tmp_path, "ctc")
    assert isinstance(legacy, hubert.HubertForCTC)
    x = torch.stack(audio(2000, seed=4))
    with torch.inference_mode():
        torch.testing.assert_close(legacy(x)["logits"], ref(x).logits, atol=1e-4, rtol=1e-4)


def test_missing_weight_norm_half_is_named(made, tmp_path):
    folder, _, _ = made("wav2vec2-base")
    state = load_file(str(folder / "model.safetensors"))
    del state["wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original1"]
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="pos_conv_embed.conv"):
        loading.load_model(tmp_path, "ctc")


@pytest.mark.parametrize("change, message", [
    ({"add_adapter": True}, "add_adapter"),
    ({"feat_extract_norm": "batch"}, "feat_extract_norm"),
    ({"conv_kernel": [10, 3]}, "same length"),
    ({"hidden_act": "nonsense"}, "activation"),
])
def test_unsupported_configs_fail_clearly(made, tmp_path, change, message):
    folder, _, _ = made("wav2vec2-base")
    config = {**json.loads((folder / "config.json").read_text()), **change}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match=message):
        loading.load_config(tmp_path)

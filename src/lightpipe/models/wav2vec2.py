"""Wav2Vec2: a convolutional feature encoder over raw audio, a Transformer encoder, a CTC head.

Attribute names equal the checkpoint keys of Hugging Face Wav2Vec2 checkpoints. Two layouts:

- base models (`do_stable_layer_norm=False`, feature encoder with one group norm): post-norm layers,
  a layer norm right after the positional convolution;
- large "stable layer norm" models (`feat_extract_norm="layer"`, `do_stable_layer_norm=True`):
  pre-norm layers and a final layer norm.

The positional convolution is stored weight-normalised (g and v); `sanitize` folds it into one plain
weight once, at load time. HuBERT (models/hubert.py) reuses everything here.

Padding: a batch of clips of different lengths is padded with zeros on the right and carries an
`attention_mask` over samples. It becomes a mask over feature frames (each clip has
`output_lengths(samples)` frames), padded frames are zeroed before the positional convolution and
masked in attention, as transformers does. One step further than transformers: the group norm of
base models normalises each clip over its own frames only, so a padded clip gives exactly the
logits it gives alone (transformers' group norm also averages the padding in).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..config import BaseConfig
from ..errors import UnsupportedModel
from .layers import Unpadder, activation, attention, linear, merge_heads, split_heads

GROUP_NORM_EPS = 1e-5  # torch's default, which transformers' feature-encoder norms keep
FEATURE_LAYER_NORM_EPS = 1e-5


@dataclasses.dataclass
class Wav2Vec2Config(BaseConfig):
    vocab_size: int | None = 32
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    feat_extract_norm: str = "group"
    feat_extract_activation: str = "gelu"
    conv_dim: tuple[int, ...] = (512, 512, 512, 512, 512, 512, 512)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_bias: bool = False
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    do_stable_layer_norm: bool = False
    add_adapter: bool = False
    adapter_attn_dim: int | None = None  # MMS: a small adapter after each stable-layer-norm layer
    # HuBERT's variations (wav2vec2 checkpoints never set them, so the defaults are wav2vec2's layout).
    feat_proj_layer_norm: bool = True
    conv_pos_batch_norm: bool = False
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self) -> None:
        self.conv_dim, self.conv_stride, self.conv_kernel = (
            tuple(int(v) for v in values) for values in (self.conv_dim, self.conv_stride, self.conv_kernel))
        if not len(self.conv_dim) == len(self.conv_stride) == len(self.conv_kernel):
            raise UnsupportedModel("conv_dim, conv_stride and conv_kernel in config.json must have the same length.")
        if self.feat_extract_norm not in ("group", "layer"):
            raise UnsupportedModel(f"feat_extract_norm={self.feat_extract_norm!r} is not supported; only 'group' or 'layer'.")
        if self.add_adapter:
            raise UnsupportedModel("Wav2Vec2 checkpoints with add_adapter=True (a downsampling adapter for "
                                   "speech encoder-decoders) are not supported.")
        if self.hidden_size % self.num_attention_heads:
            raise UnsupportedModel("hidden_size must be a multiple of num_attention_heads")
        activation(self.hidden_act)  # unknown names fail here, not halfway through a forward pass
        activation(self.feat_extract_activation)

    @property
    def inputs_to_logits_ratio(self) -> int:
        """Audio samples per output frame: the product of the convolution strides (320 for base models)."""
        return math.prod(self.conv_stride)


def output_lengths(config: Wav2Vec2Config, samples):
    """Samples -> feature frames through the convolution stack (ints or integer tensors).

    Each layer gives floor((length - kernel) / stride) + 1 frames; a clip shorter than the receptive
    field gives none (zero or negative)."""
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        samples = (samples - kernel) // stride + 1
    return samples


# ---------------------------------------------------------------------------------------- feature encoder
class Wav2Vec2ConvLayer(nn.Module):
    """One convolution of the feature encoder, with its norm: "group" (first layer of base models),
    "layer" (every layer of large models, over channels per frame) or none."""

    def __init__(self, config: Wav2Vec2Config, layer_id: int, norm: str | None):
        super().__init__()
        in_dim = config.conv_dim[layer_id - 1] if layer_id > 0 else 1
        out_dim = config.conv_dim[layer_id]
        self.conv = nn.Conv1d(in_dim, out_dim, config.conv_kernel[layer_id], stride=config.conv_stride[layer_id],
                              bias=config.conv_bias)
        self.norm = norm
        if norm == "group":
            self.layer_norm = nn.GroupNorm(out_dim, out_dim, eps=GROUP_NORM_EPS)
        elif norm == "layer":
            self.layer_norm = nn.LayerNorm(out_dim, eps=FEATURE_LAYER_NORM_EPS)
        self.act = activation(config.feat_extract_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, T_in) -> (B, C_out, T_out), every frame real (the group norm averages over all of them)."""
        x = self.conv(x)
        if self.norm == "group":
            x = self.layer_norm(x)
        elif self.norm == "layer":
            x = self.layer_norm(x.transpose(1, 2)).transpose(1, 2)
        return self.act(x)


class Wav2Vec2FeatureEncoder(nn.Module):
    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        n = len(config.conv_dim)
        if config.feat_extract_norm == "group":
            norms = ["group"] + [None] * (n - 1)
        else:
            norms = ["layer"] * n
        self.config = config
        self.conv_layers = nn.ModuleList(Wav2Vec2ConvLayer(config, i, norm) for i, norm in enumerate(norms))

    def forward(self, input_values: torch.Tensor, samples: torch.Tensor | None) -> torch.Tensor:
        """(B, S) audio -> (B, C, T) features. `samples` (B,): each clip's own length, None when unpadded.

        A padded batch runs clip by clip on each clip's own samples: the group norm of base models then
        normalises each clip over its own frames (transformers' also averages the padding in), so a clip gives
        in a batch exactly what it gives alone; and no convolution works on padding, which in a batch of mixed
        lengths is a good part of the model's time. Frames past a clip's end are zeros."""
        if samples is None:
            return self._convolve(input_values)
        width = output_lengths(self.config, input_values.shape[1])  # the padded batch's frames, as before
        frames = output_lengths(self.config, samples).tolist()
        if width <= 0 or max(frames) <= 0:
            return self._convolve(input_values)  # nothing to convolve alone: the caller rejects or masks the clips
        out = None
        for row, (length, count) in enumerate(zip(samples.tolist(), frames)):
            if count <= 0:  # shorter than the receptive field: no frame (the caller masks the clip)
                continue
            clip = self._convolve(input_values[row:row + 1, :length])  # (1, C, count)
            if out is None:
                out = clip.new_zeros(input_values.shape[0], clip.shape[1], width)
            out[row, :, :count] = clip[0]
        return out

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, None, :]
        for layer in self.conv_layers:
            x = layer(x)
        return x


class Wav2Vec2FeatureProjection(nn.Module):
    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        if config.feat_proj_layer_norm:
            self.layer_norm = nn.LayerNorm(config.conv_dim[-1], eps=config.layer_norm_eps)
        self.projection = nn.Linear(config.conv_dim[-1], config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_conv) -> (N, C)."""
        if hasattr(self, "layer_norm"):
            x = self.layer_norm(x)
        return linear(x, self.projection)


# ---------------------------------------------------------------------------------------- encoder
class Wav2Vec2PositionalConvEmbedding(nn.Module):
    """A wide grouped convolution over time that gives each frame its position information."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        if config.conv_pos_batch_norm:  # some HuBERT checkpoints normalise the input instead of the weight
            self.batch_norm = nn.BatchNorm1d(config.hidden_size)
        self.conv = nn.Conv1d(config.hidden_size, config.hidden_size, kernel_size=config.num_conv_pos_embeddings,
                              padding=config.num_conv_pos_embeddings // 2, groups=config.num_conv_pos_embedding_groups)
        # An even kernel with padding K//2 gives one frame too many; the last one is dropped.
        self.remove = 1 if config.num_conv_pos_embeddings % 2 == 0 else 0
        self.act = activation(config.feat_extract_activation)

    def forward(self, h: torch.Tensor, batch: Unpadder) -> torch.Tensor:
        """h: (N, C) real frames -> (B, T, C). The convolution sees zeros at padded frames, as it sees
        zeros past the ends of an unpadded clip (so padding changes nothing)."""
        if hasattr(self, "batch_norm"):
            h = self.batch_norm(h)  # per-frame affine at inference: applied to real frames only
        x = batch.pad(h).transpose(1, 2)  # (B, C, T)
        x = self.conv(x)
        if self.remove:
            x = x[:, :, : -self.remove]
        return self.act(x).transpose(1, 2)


class Wav2Vec2Attention(nn.Module):
    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, batch: Unpadder) -> torch.Tensor:
        """x: (N, C) real frames -> (N, C)."""
        q = split_heads(batch.pad(linear(x, self.q_proj)), self.num_heads)  # (B, H, T, D)
        k = split_heads(batch.pad(linear(x, self.k_proj)), self.num_heads)
        v = split_heads(batch.pad(linear(x, self.v_proj)), self.num_heads)
        return linear(batch.unpad(merge_heads(attention(q, k, v, batch.mask))), self.out_proj)


class Wav2Vec2FeedForward(nn.Module):
    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        self.intermediate_dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.output_dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = config.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(linear(x, self.intermediate_dense, self.act), self.output_dense)


class Wav2Vec2AttnAdapterLayer(nn.Module):
    """MMS language adapter: a small bottleneck added after each stable-layer-norm layer."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size)
        self.linear_1 = nn.Linear(config.hidden_size, config.adapter_attn_dim)
        self.linear_2 = nn.Linear(config.adapter_attn_dim, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(linear(self.norm(x), self.linear_1, "relu"), self.linear_2)


class Wav2Vec2EncoderLayer(nn.Module):
    """Post-norm layer of base models: x = LN(x + attn(x)); x = LN(x + ff(x))."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        self.attention = Wav2Vec2Attention(config)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = Wav2Vec2FeedForward(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, batch: Unpadder) -> torch.Tensor:
        x = self.layer_norm(x + self.attention(x, batch))
        return self.final_layer_norm(x + self.feed_forward(x))


class Wav2Vec2EncoderLayerStableLayerNorm(Wav2Vec2EncoderLayer):
    """Pre-norm layer of large models: x = x + attn(LN(x)); x = x + ff(LN(x)) (+ adapter(x) for MMS). The same
    parts as the post-norm layer, applied in the other order."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__(config)
        self.adapter_layer = Wav2Vec2AttnAdapterLayer(config) if config.adapter_attn_dim else None

    def forward(self, x: torch.Tensor, batch: Unpadder) -> torch.Tensor:
        x = x + self.attention(self.layer_norm(x), batch)
        x = x + self.feed_forward(self.final_layer_norm(x))
        if self.adapter_layer is not None:
            x = x + self.adapter_layer(x)
        return x


class Wav2Vec2Encoder(nn.Module):
    """Positional convolution + Transformer layers, post-norm or stable-layer-norm (pre-norm)."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        self.stable = config.do_stable_layer_norm
        self.pos_conv_embed = Wav2Vec2PositionalConvEmbedding(config)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        layer_cls = Wav2Vec2EncoderLayerStableLayerNorm if self.stable else Wav2Vec2EncoderLayer
        self.layers = nn.ModuleList(layer_cls(config) for _ in range(config.num_hidden_layers))

    def forward(self, h: torch.Tensor, batch: Unpadder) -> torch.Tensor:
        """h: (N, C) real frames -> (N, C)."""
        h = h + batch.unpad(self.pos_conv_embed(h, batch))
        if not self.stable:
            h = self.layer_norm(h)
        for layer in self.layers:
            h = layer(h, batch)
        return self.layer_norm(h) if self.stable else h


# ---------------------------------------------------------------------------------------- models
class Wav2Vec2Model(nn.Module):
    """The bare model: (B, S) audio -> last_hidden_state (B, T, C); padded frames are zeros."""

    config_class = Wav2Vec2Config
    base_model_prefix = "wav2vec2"

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        self.config = config
        self.feature_extractor = Wav2Vec2FeatureEncoder(config)
        self.feature_projection = Wav2Vec2FeatureProjection(config)
        self.encoder = Wav2Vec2Encoder(config)

    def output_lengths(self, samples):
        """Samples -> feature frames (ints or integer tensors); see `output_lengths`."""
        return output_lengths(self.config, samples)

    def encode(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """-> (N, C) hidden states of real frames and the Unpadder that places them in (B, T).

        As transformers, the sum of a clip's `attention_mask` is taken as its length (right padding)."""
        samples = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.long().sum(-1)
        features = self.feature_extractor(input_values, samples).transpose(1, 2)  # (B, T, C_conv)
        b, t, _ = features.shape
        frame_mask = None
        if samples is not None:
            frames = self.output_lengths(samples)
            frame_mask = (torch.arange(t, device=features.device)[None, :] < frames[:, None]).long()  # (B, T)
        batch = Unpadder(frame_mask, b, t)
        h = self.feature_projection(batch.unpad(features))  # (N, C)
        return self.encoder(h, batch), batch

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        h, batch = self.encode(input_values, attention_mask)
        return {"last_hidden_state": batch.pad(h)}


class Wav2Vec2ForCTC(nn.Module):
    """Frame-wise character logits for CTC decoding: (B, S) audio -> logits (B, T, vocab)."""

    config_class = Wav2Vec2Config
    base_model_prefix = "wav2vec2"

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        if not config.vocab_size:
            raise UnsupportedModel("a Wav2Vec2 CTC checkpoint needs vocab_size in its config.json.")
        self.config = config
        self.wav2vec2 = Wav2Vec2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)

    def output_lengths(self, samples):
        return output_lengths(self.config, samples)

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        h, batch = self.wav2vec2.encode(input_values, attention_mask)
        return {"logits": batch.pad(linear(h, self.lm_head))}  # padded frames get zeros, not logits


def _weight_norm_folded(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """weight = g * v / |v|, the norm taken over every axis but the kernel axis (weight_norm with dim=2).
    Computed and kept in float32 (the loader casts it to the model's dtype), as transformers computes it
    from upcast half-precision weights."""
    v = v.float()
    return g.float() * v / v.norm(dim=(0, 1), keepdim=True)


WEIGHT_NORM_KEYS = {  # (g, v) as torch's parametrization (transformers 4.3x+) and as the older weight_norm store them
    "parametrizations.weight.original0": "parametrizations.weight.original1",
    "weight_g": "weight_v",
}


def sanitize(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold the weight-normalised positional convolution into one weight; drop training-only tensors.
    A g without its v (or the reverse) is left alone, for the strict load to name."""
    out = {k: v for k, v in state_dict.items() if not k.endswith("masked_spec_embed")}  # SpecAugment: training only
    for key in list(out):
        for g_name, v_name in WEIGHT_NORM_KEYS.items():
            prefix = key[: -len(g_name)]
            if key.endswith("pos_conv_embed.conv." + g_name) and prefix + v_name in out:
                out[prefix + "weight"] = _weight_norm_folded(out.pop(key), out.pop(prefix + v_name))
    return out


ARCHITECTURES = {
    "Wav2Vec2Model": Wav2Vec2Model,
    "Wav2Vec2ForPreTraining": Wav2Vec2Model,
    "Wav2Vec2ForCTC": Wav2Vec2ForCTC,
}

HEADS = {
    "base": Wav2Vec2Model,
    "ctc": Wav2Vec2ForCTC,
}
Config = Wav2Vec2Config
NO_SPLIT_MODULES = ("Wav2Vec2EncoderLayer", "Wav2Vec2EncoderLayerStableLayerNorm")  # blocks a device_map places whole

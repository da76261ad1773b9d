"""ViT: a pre-norm Transformer encoder over 16x16 image patches, with a [CLS] token.

pixel_values (B, 3, H, W) -> patches (B, N, C) -> [CLS] + patches + positions -> L pre-norm layers
-> final LayerNorm -> last_hidden_state (B, 1 + N, C); the classifier reads the [CLS] token.

Attribute names equal the keys of Hugging Face ViT checkpoints (vit.encoder.layer.0.attention.
attention.query ...), so weights load with a strict `load_state_dict`. DeiT and BEiT reuse the layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BaseConfig
from ..errors import InvalidInput, UnsupportedModel
from .layers import FusedProjection, activation, attention, linear, merge_heads, split_heads


@dataclasses.dataclass
class ViTConfig(BaseConfig):
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: Any = 224  # an int, or [height, width]
    patch_size: Any = 16
    num_channels: int = 3
    qkv_bias: bool = True
    pooler_output_size: int | None = None
    pooler_act: str = "tanh"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise UnsupportedModel("hidden_size must be a multiple of num_attention_heads")
        activation(self.hidden_act)  # unknown names fail at build time
        self.pooler_output_size = self.pooler_output_size or self.hidden_size


def pair(value: Any) -> tuple[int, int]:
    """An int or a [height, width] pair from config.json -> (height, width)."""
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


class ViTPatchEmbeddings(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.image_size, self.patch_size = pair(config.image_size), pair(config.patch_size)
        self.grid = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        self.num_patches = self.grid[0] * self.grid[1]
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=self.patch_size,
                                    stride=self.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, C), patches in row-major order."""
        if pixel_values.shape[1] != self.projection.in_channels:
            raise InvalidInput(f"the model takes {self.projection.in_channels}-channel images, "
                               f"not {pixel_values.shape[1]}-channel ones.")
        height, width = pixel_values.shape[-2:]
        if height < self.patch_size[0] or width < self.patch_size[1]:
            # Reached with do_resize off: the convolution would fail with a bare RuntimeError (as
            # transformers' does).
            raise InvalidInput(f"the image is {height}x{width} pixels after preprocessing, smaller than one "
                               f"{self.patch_size[0]}x{self.patch_size[1]} patch of this model.")
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class ViTEmbeddings(nn.Module):
    """Patch embeddings behind the special tokens ([CLS]; DeiT adds a distillation token), plus positions."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.patch_embeddings = ViTPatchEmbeddings(config)
        self.cls_token = nn.Parameter(torch.empty(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(
            torch.empty(1, self.patch_embeddings.num_patches + self.num_special, config.hidden_size))

    num_special = 1  # tokens before the patches

    def special_tokens(self, batch: int) -> torch.Tensor:
        return self.cls_token.expand(batch, -1, -1)  # (B, 1, C)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """(B, 3, H, W) -> (B, special + N, C)."""
        height, width = pixel_values.shape[-2:]
        patches = self.patch_embeddings(pixel_values)
        tokens = torch.cat((self.special_tokens(patches.shape[0]).to(patches.dtype), patches), dim=1)
        return tokens + self.positions(tokens.shape[1], height, width, interpolate_pos_encoding)

    def positions(self, length: int, height: int, width: int, interpolate: bool) -> torch.Tensor:
        """(1, length, C) position embeddings for an image of height x width pixels."""
        if not interpolate:
            expected = self.patch_embeddings.image_size
            if (height, width) != expected:
                raise InvalidInput(f"the image is {height}x{width} pixels after preprocessing, but the model takes "
                                   f"{expected[0]}x{expected[1]}; check the checkpoint's preprocessor_config.json.")
            return self.position_embeddings
        return interpolated_positions(self.position_embeddings, self.num_special, length,
                                      height // self.patch_embeddings.patch_size[0],
                                      width // self.patch_embeddings.patch_size[1])


def interpolated_positions(table: torch.Tensor, num_special: int, length: int, rows: int, cols: int) -> torch.Tensor:
    """Position embeddings trained on a square grid, resampled (bicubic) to a rows x cols grid of patches.

    As in the reference, a square image with as many patches as the table is served unchanged."""
    trained = table.shape[1] - num_special
    if length - num_special == trained and rows == cols:
        return table
    side = int(math.sqrt(trained))
    special, grid = table[:, :num_special], table[:, num_special:]
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, C, side, side)
    grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
    return torch.cat((special, grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)), dim=1)


@dataclasses.dataclass
class TokenShape:
    """The (batch, tokens) layout of a flattened (batch * tokens, C) activation."""

    batch: int
    length: int


class ViTSelfAttention(nn.Module):
    """Multi-head self-attention over all tokens. BEiT (no key bias) and Swin (per-stage widths) reuse it."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, key_bias: bool | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(dim, dim, bias=qkv_bias)
        self.key = nn.Linear(dim, dim, bias=qkv_bias if key_bias is None else key_bias)
        self.value = nn.Linear(dim, dim, bias=qkv_bias)
        self._fused = FusedProjection()

    def forward(self, x: torch.Tensor, shape: TokenShape, bias: torch.Tensor | None = None,
                keep: int | None = None) -> torch.Tensor:
        """x: (B*T, C) -> (B*T, C). bias: an additive attention bias broadcastable to (B, H, T, T), or None.
        keep: answer only for the first `keep` tokens of each image -> (B*keep, C); every token is still
        attended to (see ViTEncoder)."""
        if keep is None and not torch.is_grad_enabled():  # with gradients, they must reach the three layers
            q, k, v = self.fused_heads(x, shape)
            length = shape.length
        else:
            def heads(rows: torch.Tensor, layer, length: int) -> torch.Tensor:
                return split_heads(linear(rows, layer).view(shape.batch, length, -1), self.num_heads)  # (B, H, T, D)

            queries = x if keep is None else first_tokens(x, shape, keep)
            length = shape.length if keep is None else keep
            q = heads(queries, self.query, length)
            k, v = heads(x, self.key, shape.length), heads(x, self.value, shape.length)
        return merge_heads(attention(q, k, v, bias)).view(shape.batch * length, -1)

    def fused_heads(self, x: torch.Tensor, shape: TokenShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B*T, C) -> queries, keys, values, each (B, H, T, D), from one matrix product."""
        qkv = linear(x, self._fused.refresh((self.query, self.key, self.value)))  # (B*T, 3C)
        qkv = qkv.view(shape.batch, shape.length, 3, self.num_heads, -1)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided views: SDPA reads them in place


def first_tokens(x: torch.Tensor, shape: TokenShape, keep: int) -> torch.Tensor:
    """(B*T, C) -> (B*keep, C): the first `keep` tokens of each image."""
    return x.view(shape.batch, shape.length, -1)[:, :keep].reshape(shape.batch * keep, -1)


class ViTSelfOutput(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.dense)


class ViTAttention(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.attention = ViTSelfAttention(config.hidden_size, config.num_attention_heads, config.qkv_bias)
        self.output = ViTSelfOutput(config)

    def forward(self, x: torch.Tensor, shape: TokenShape, keep: int | None = None) -> torch.Tensor:
        return self.output(self.attention(x, shape, keep=keep))


class ViTIntermediate(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = config.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.dense, self.act)


class ViTOutput(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.dense)


class ViTLayer(nn.Module):
    """Pre-norm: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.attention = ViTAttention(config)
        self.intermediate = ViTIntermediate(config)
        self.output = ViTOutput(config)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, shape: TokenShape, keep: int | None = None) -> torch.Tensor:
        """x: (B*T, C) -> (B*T, C), or (B*keep, C) for only the first `keep` tokens of each image."""
        h = self.attention(self.layernorm_before(x), shape, keep)
        x = h + (x if keep is None else first_tokens(x, shape, keep))
        return x + self.output(self.intermediate(self.layernorm_after(x)))


class ViTEncoder(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.layer = nn.ModuleList(ViTLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, keep: int | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C). The layers work on a (B*T, C) matrix: every token is real, none padded.

        keep: a head that reads only the first `keep` tokens (a classifier on [CLS]) needs the last layer's
        output for those alone; that layer then runs its queries, output projection and MLP on them only,
        skipping most of its work. -> (B, keep, C)."""
        shape = TokenShape(x.shape[0], x.shape[1])
        h = x.reshape(shape.batch * shape.length, x.shape[2])
        last = len(self.layer) - 1
        for i, layer in enumerate(self.layer):
            h = layer(h, shape, keep if i == last else None)
        return h.view(shape.batch, -1, x.shape[2])


class ViTPooler(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.pooler_output_size)
        self.act = activation(config.pooler_act)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(hidden[:, 0]))  # (B, pooler_output_size), from [CLS]


class ViTModel(nn.Module):
    """The bare encoder: last_hidden_state (B, 1 + N, C) and, with a pooler, pooler_output (B, C')."""

    config_class = ViTConfig
    base_model_prefix = "vit"
    optional_modules = ("pooler",)  # dropped when a checkpoint has no pooler weights
    embeddings_class = ViTEmbeddings

    def __init__(self, config: ViTConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = self.embeddings_class(config)
        self.encoder = ViTEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = ViTPooler(config) if add_pooling_layer else None

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False,
                keep: int | None = None) -> dict[str, torch.Tensor]:
        """keep: compute the final states of only the first `keep` tokens (see ViTEncoder)."""
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        hidden = self.layernorm(self.encoder(self.embeddings(pixel_values, interpolate_pos_encoding), keep=keep))
        out = {"last_hidden_state": hidden}
        if self.pooler is not None:
            out["pooler_output"] = self.pooler(hidden)
        return out


class ViTForImageClassification(nn.Module):
    """A linear classifier on the final [CLS] token."""

    config_class = ViTConfig
    base_model_prefix = "vit"

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.vit = ViTModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> dict[str, torch.Tensor]:
        hidden = self.vit(pixel_values, interpolate_pos_encoding, keep=1)["last_hidden_state"]  # (B, 1, C)
        return {"logits": self.classifier(hidden[:, 0])}


def sanitize(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the mask token of masked-image-modeling checkpoints: it only matters in pretraining."""
    return {k: v for k, v in state_dict.items() if not k.endswith("embeddings.mask_token")}


ARCHITECTURES = {
    "ViTModel": ViTModel,
    "ViTForImageClassification": ViTForImageClassification,
    "ViTForMaskedImageModeling": ViTModel,  # its encoder serves feature extraction; the decoder is dropped
}
HEADS = {"base": ViTModel, "image-classification": ViTForImageClassification}
TASK_OF_HEAD = {"base": "image-feature-extraction", "image-classification": "image-classification"}
Config = ViTConfig
# Checkpoint keys a head may find and safely ignore: the classifier does not use the pooler.
IGNORED_KEYS = (r"(^|\.)pooler\.",)
NO_SPLIT_MODULES = ("ViTLayer",)  # blocks a device_map places whole

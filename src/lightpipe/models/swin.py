"""Swin Transformer: attention inside local windows that shift between layers, in a pyramid of stages.

pixel_values (B, 3, H, W) -> 4x4 patches + LayerNorm -> stages; in each, blocks alternate plain and
shifted (by half a window) window attention with a relative position bias; between stages a patch
merging halves the resolution and doubles the width -> LayerNorm -> last_hidden_state (B, L, C);
pooler_output is its mean over tokens (B, C), which the classifier reads. Attribute names equal the
keys of Hugging Face Swin checkpoints (swin.encoder.layers.0.blocks.0.attention.self.query ...).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BaseConfig
from ..errors import InvalidInput, UnsupportedModel
from .layers import activation, linear
from .vit import TokenShape, ViTSelfAttention, pair

SHIFT_MASK_VALUE = -100.0  # the reference's additive mask between tokens from different shifted regions


@dataclasses.dataclass
class SwinConfig(BaseConfig):
    image_size: int = 224
    patch_size: int = 4
    num_channels: int = 3
    embed_dim: int = 96
    depths: list[int] = dataclasses.field(default_factory=lambda: [2, 2, 6, 2])
    num_heads: list[int] = dataclasses.field(default_factory=lambda: [3, 6, 12, 24])
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    hidden_act: str = "gelu"
    use_absolute_embeddings: bool = False
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if len(self.depths) != len(self.num_heads):
            raise UnsupportedModel("depths and num_heads must have one entry per stage.")
        activation(self.hidden_act)

    @property
    def hidden_size(self) -> int:
        """The width of the last stage."""
        return self.embed_dim * 2 ** (len(self.depths) - 1)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/w * W/w, w*w, C): non-overlapping windows, row-major within each image."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).transpose(2, 3)
    return x.reshape(-1, window * window, c)


def window_merge(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """The inverse of window_partition: (B * nW, w*w, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, c).transpose(2, 3)
    return x.reshape(-1, height, width, c)


@functools.lru_cache(maxsize=16)
def relative_position_index(window: int) -> torch.Tensor:
    """(w*w, w*w) indices into the bias table: one per 2-D offset between two tokens of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    offsets = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # (T, T, 2), >= 0
    return offsets[..., 0] * (2 * window - 1) + offsets[..., 1]


@functools.lru_cache(maxsize=16)
def shift_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """(nW, w*w, w*w) additive mask for shifted windows: after the cyclic shift a window can hold
    pixels from up to 3x3 regions that were not neighbours; tokens attend only within their region."""
    def regions(size: int) -> torch.Tensor:
        index = torch.arange(size)
        return (index >= size - window).long() + (index >= size - shift).long()  # 0, 1, 2 along the axis

    labels = (regions(height)[:, None] * 3 + regions(width)[None, :]).float()  # (H, W)
    windows = window_partition(labels[None, :, :, None], window).squeeze(-1)  # (nW, T)
    different = windows[:, None, :] != windows[:, :, None]  # (nW, T, T)
    return torch.zeros(different.shape).masked_fill(different, SHIFT_MASK_VALUE)


class SwinPatchEmbeddings(nn.Module):
    def __init__(self, config: SwinConfig):
        super().__init__()
        self.patch_size = pair(config.patch_size)
        image = pair(config.image_size)
        self.grid = (image[0] // self.patch_size[0], image[1] // self.patch_size[1])
        self.projection = nn.Conv2d(config.num_channels, config.embed_dim, kernel_size=self.patch_size,
                                    stride=self.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, H/p, W/p); images not a multiple of the patch size are zero-padded."""
        if pixel_values.shape[1] != self.projection.in_channels:
            raise InvalidInput(f"the model takes {self.projection.in_channels}-channel images, "
                               f"not {pixel_values.shape[1]}-channel ones.")
        height, width = pixel_values.shape[-2:]
        pad_h, pad_w = -height % self.patch_size[0], -width % self.patch_size[1]
        if pad_h or pad_w:
            pixel_values = F.pad(pixel_values, (0, pad_w, 0, pad_h))
        return self.projection(pixel_values)


class SwinEmbeddings(nn.Module):
    def __init__(self, config: SwinConfig):
        super().__init__()
        self.patch_embeddings = SwinPatchEmbeddings(config)
        grid = self.patch_embeddings.grid
        self.position_embeddings = (nn.Parameter(torch.empty(1, grid[0] * grid[1], config.embed_dim))
                                    if config.use_absolute_embeddings else None)
        self.norm = nn.LayerNorm(config.embed_dim)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """-> (B, L, C) patch tokens and the (rows, cols) of their grid."""
        patches = self.patch_embeddings(pixel_values)
        grid = tuple(patches.shape[-2:])
        tokens = self.norm(patches.flatten(2).transpose(1, 2))
        if self.position_embeddings is not None:
            if tokens.shape[1] != self.position_embeddings.shape[1]:
                raise InvalidInput(f"the image gives a {grid[0]}x{grid[1]} patch grid, but this Swin model's "
                                   "position embeddings are for its config.json image_size.")
            tokens = tokens + self.position_embeddings
        return tokens, grid


class SwinSelfAttention(ViTSelfAttention):
    """ViT's attention inside each window, plus a learned bias per 2-D offset within the window."""

    def __init__(self, config: SwinConfig, dim: int, num_heads: int):
        super().__init__(dim, num_heads, config.qkv_bias)
        self.window = config.window_size
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * self.window - 1) ** 2, num_heads))

    def position_bias(self, window: int) -> torch.Tensor:
        """-> (1, heads, w*w, w*w)."""
        if window != self.window:
            # The reference shrinks the window to the map and then fails on its bias table. Said in terms
            # of the image: the map shrinks stage by stage, so even the checkpoint's own size can be too small.
            raise InvalidInput(f"the image is too small for this Swin model: a stage's feature map is smaller "
                               f"than its {self.window}x{self.window} windows; give larger images.")
        table = self.relative_position_bias_table
        index = relative_position_index(window).to(table.device)
        t = window * window
        return table[index.view(-1)].view(t, t, -1).permute(2, 0, 1).unsqueeze(0)


class SwinSelfOutput(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.dense)


class SwinAttention(nn.Module):
    def __init__(self, config: SwinConfig, dim: int, num_heads: int):
        super().__init__()
        self.self = SwinSelfAttention(config, dim, num_heads)
        self.output = SwinSelfOutput(dim)

    def forward(self, x: torch.Tensor, shape: TokenShape, bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, shape, bias))


class SwinIntermediate(nn.Module):
    def __init__(self, config: SwinConfig, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, int(config.mlp_ratio * dim))
        self.act = config.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.dense, self.act)


class SwinOutput(nn.Module):
    def __init__(self, config: SwinConfig, dim: int):
        super().__init__()
        self.dense = nn.Linear(int(config.mlp_ratio * dim), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.dense)


class SwinLayer(nn.Module):
    """x + window attention(norm(x)), then x + mlp(norm(x)); odd blocks shift the windows by half."""

    def __init__(self, config: SwinConfig, dim: int, num_heads: int, shift: int):
        super().__init__()
        self.window, self.shift = config.window_size, shift
        self.layernorm_before = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attention = SwinAttention(config, dim, num_heads)
        self.layernorm_after = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.intermediate = SwinIntermediate(config, dim)
        self.output = SwinOutput(config, dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """x: (B, H*W, C) -> (B, H*W, C)."""
        b, length, c = x.shape
        window, shift = self.window, self.shift
        if min(height, width) <= window:  # one window covers the map: nothing to shift (as the reference does)
            window, shift = min(height, width), 0
        h = self.layernorm_before(x).view(b, height, width, c)
        h = F.pad(h, (0, 0, 0, -width % window, 0, -height % window))  # zeros up to whole windows
        padded_h, padded_w = h.shape[1:3]
        if shift:
            h = torch.roll(h, shifts=(-shift, -shift), dims=(1, 2))
        windows = window_partition(h, window)  # (B*nW, T, C)
        bias = self.attention.self.position_bias(window)  # (1, heads, T, T)
        if shift:
            mask = shift_mask(padded_h, padded_w, window, shift).to(device=x.device, dtype=bias.dtype)
            bias = bias + mask.repeat(b, 1, 1)[:, None]  # (B*nW, heads, T, T)
        shape = TokenShape(windows.shape[0], windows.shape[1])
        out = self.attention(windows.reshape(-1, c), shape, bias.to(x.dtype))
        h = window_merge(out.view(shape.batch, shape.length, c), window, padded_h, padded_w)
        if shift:
            h = torch.roll(h, shifts=(shift, shift), dims=(1, 2))
        x = x + h[:, :height, :width].reshape(b, length, c)
        flat = x.reshape(b * length, c)
        return x + self.output(self.intermediate(self.layernorm_after(flat))).view(b, length, c)


class SwinPatchMerging(nn.Module):
    """2x2 neighbouring tokens -> one: (B, H*W, C) -> (B, H/2*W/2, 2C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        b, _, c = x.shape
        x = F.pad(x.view(b, height, width, c), (0, 0, 0, width % 2, 0, height % 2))
        # Channel order of the reference: (0,0), (1,0), (0,1), (1,1) as (row, col) offsets.
        x = torch.cat([x[:, row::2, col::2] for col in range(2) for row in range(2)], dim=-1)
        return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))


class SwinStage(nn.Module):
    def __init__(self, config: SwinConfig, dim: int, depth: int, num_heads: int, downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinLayer(config, dim, num_heads, shift=0 if i % 2 == 0 else config.window_size // 2) for i in range(depth)
        )
        self.downsample = SwinPatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, int, int]:
        for block in self.blocks:
            x = block(x, height, width)
        if self.downsample is None:
            return x, height, width
        return self.downsample(x, height, width), (height + 1) // 2, (width + 1) // 2


class SwinEncoder(nn.Module):
    def __init__(self, config: SwinConfig):
        super().__init__()
        stages = len(config.depths)
        self.layers = nn.ModuleList(
            SwinStage(config, config.embed_dim * 2 ** i, config.depths[i], config.num_heads[i], downsample=i < stages - 1)
            for i in range(stages)
        )

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        height, width = grid
        for stage in self.layers:
            x, height, width = stage(x, height, width)
        return x


class SwinModel(nn.Module):
    """The bare network: last_hidden_state (B, L, C) and pooler_output, its mean over tokens (B, C)."""

    config_class = SwinConfig
    base_model_prefix = "swin"

    def __init__(self, config: SwinConfig):
        super().__init__()
        self.config = config
        self.embeddings = SwinEmbeddings(config)
        self.encoder = SwinEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        tokens, grid = self.embeddings(pixel_values)
        hidden = self.layernorm(self.encoder(tokens, grid))
        return {"last_hidden_state": hidden, "pooler_output": hidden.mean(dim=1)}


class SwinForImageClassification(nn.Module):
    config_class = SwinConfig
    base_model_prefix = "swin"

    def __init__(self, config: SwinConfig):
        super().__init__()
        self.config = config
        self.swin = SwinModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.classifier(self.swin(pixel_values)["pooler_output"])}


def sanitize(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the index buffers older checkpoints saved (recomputed here) and the pretraining mask token."""
    return {k: v for k, v in state_dict.items()
            if not k.endswith(("relative_position_index", "embeddings.mask_token"))}


ARCHITECTURES = {
    "SwinModel": SwinModel,
    "SwinForImageClassification": SwinForImageClassification,
}
HEADS = {"base": SwinModel, "image-classification": SwinForImageClassification}
TASK_OF_HEAD = {"base": "image-feature-extraction", "image-classification": "image-classification"}
Config = SwinConfig
NO_SPLIT_MODULES = ("SwinLayer",)  # blocks a device_map places whole

"""BEiT: a ViT with relative position biases, layer scale and mean pooling.

pixel_values -> [CLS] + patches (+ absolute positions, when the checkpoint has them) -> pre-norm layers
whose attention adds a learned bias per (query, key) offset, and whose branches are scaled by
lambda_1 / lambda_2 -> last_hidden_state (B, 1 + N, C). pooler_output is LayerNorm(mean of the patch
tokens) (or the [CLS] token when use_mean_pooling is off); the classifier reads it.
Attribute names equal the keys of Hugging Face BEiT checkpoints; the MLP and projections are ViT's.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import nn

from .vit import (TokenShape, ViTConfig, ViTIntermediate, ViTOutput, ViTPatchEmbeddings, ViTSelfAttention,
                  ViTSelfOutput, interpolated_positions, pair)


@dataclasses.dataclass
class BeitConfig(ViTConfig):
    use_absolute_position_embeddings: bool = False
    use_relative_position_bias: bool = False
    use_shared_relative_position_bias: bool = False
    layer_scale_init_value: float = 0.1
    use_mean_pooling: bool = True


class BeitEmbeddings(nn.Module):
    def __init__(self, config: BeitConfig):
        super().__init__()
        self.patch_embeddings = ViTPatchEmbeddings(config)
        self.cls_token = nn.Parameter(torch.empty(1, 1, config.hidden_size))
        self.position_embeddings = (
            nn.Parameter(torch.empty(1, self.patch_embeddings.num_patches + 1, config.hidden_size))
            if config.use_absolute_position_embeddings else None
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + N, C)."""
        height, width = pixel_values.shape[-2:]
        patches = self.patch_embeddings(pixel_values)
        tokens = torch.cat((self.cls_token.expand(patches.shape[0], -1, -1).to(patches.dtype), patches), dim=1)
        if self.position_embeddings is not None:
            size = self.patch_embeddings.patch_size
            tokens = tokens + interpolated_positions(self.position_embeddings, 1, tokens.shape[1],
                                                     height // size[0], width // size[1])
        return tokens


@functools.lru_cache(maxsize=8)
def relative_position_index(rows: int, cols: int) -> torch.Tensor:
    """(T, T) indices into a bias table, T = 1 + rows * cols: one entry per 2-D offset between two
    patches, then three for [CLS]->patch, patch->[CLS] and [CLS]->[CLS]."""
    coords = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")).flatten(1)  # (2, N)
    offsets = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2), each in -(n-1)..n-1
    patch_index = (offsets[..., 0] + rows - 1) * (2 * cols - 1) + (offsets[..., 1] + cols - 1)
    distances = (2 * rows - 1) * (2 * cols - 1)
    index = torch.zeros(rows * cols + 1, rows * cols + 1, dtype=torch.long)
    index[1:, 1:] = patch_index
    index[0, :] = distances
    index[:, 0] = distances + 1
    index[0, 0] = distances + 2
    return index


class BeitRelativePositionBias(nn.Module):
    def __init__(self, config: BeitConfig):
        super().__init__()
        image, patch = pair(config.image_size), pair(config.patch_size)
        self.window = (image[0] // patch[0], image[1] // patch[1])  # the patch grid the table was trained on
        entries = (2 * self.window[0] - 1) * (2 * self.window[1] - 1) + 3
        self.relative_position_bias_table = nn.Parameter(torch.empty(entries, config.num_attention_heads))

    def forward(self, rows: int, cols: int) -> torch.Tensor:
        """-> (1, heads, T, T) additive attention bias for a rows x cols grid of patches, T = 1 + rows * cols.

        A grid other than the trained one (an image processor asked for another size) gets the table's
        patch-offset part resized bilinearly to the new range of offsets, as the reference does (from MiDaS
        v3.1); the three [CLS] entries are kept. A table trained on a grid that is not square is always
        resized, even for its own grid: the reference reads its offsets with rows and columns swapped
        (see resized_bias_table), and checkpoints trained with the reference learned that layout."""
        table = self.relative_position_bias_table
        if (rows, cols) != self.window or self.window[0] != self.window[1]:
            table = resized_bias_table(table, self.window, (rows, cols))
        index = relative_position_index(rows, cols).to(table.device)
        length = rows * cols + 1
        return table[index.view(-1)].view(length, length, -1).permute(2, 0, 1).unsqueeze(0)


def resized_bias_table(table: torch.Tensor, trained: tuple[int, int], wanted: tuple[int, int]) -> torch.Tensor:
    """(entries, heads) bias table for a `trained` patch grid -> the table for a `wanted` grid.

    The offsets are stored row-major by (row offset, column offset), but transformers reshapes them as
    (column offsets, row offsets) before resizing; for a square grid the two agree, for another the
    reference's reading is the one its checkpoints match, so it is copied here."""
    old_h, old_w = 2 * trained[0] - 1, 2 * trained[1] - 1  # the range of row and column offsets
    new_h, new_w = 2 * wanted[0] - 1, 2 * wanted[1] - 1
    offsets = table[: old_h * old_w].reshape(1, old_w, old_h, -1).permute(0, 3, 1, 2)  # (1, heads, old_w, old_h)
    offsets = F.interpolate(offsets, size=(new_h, new_w), mode="bilinear", align_corners=False)
    return torch.cat((offsets.permute(0, 2, 3, 1).reshape(new_h * new_w, -1), table[old_h * old_w:]))


class BeitSelfAttention(ViTSelfAttention):
    """ViT's attention with no key bias, plus this layer's own relative position bias (when it has one)."""

    def __init__(self, config: BeitConfig):
        super().__init__(config.hidden_size, config.num_attention_heads, qkv_bias=True, key_bias=False)
        self.relative_position_bias = BeitRelativePositionBias(config) if config.use_relative_position_bias else None

    def forward(self, x: torch.Tensor, shape: TokenShape, grid: tuple[int, int],
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """grid: the (rows, cols) of patches behind the [CLS] token."""
        if self.relative_position_bias is not None:
            own = self.relative_position_bias(*grid)
            bias = own if bias is None else own + bias
        return super().forward(x, shape, bias)


class BeitAttention(nn.Module):
    def __init__(self, config: BeitConfig):
        super().__init__()
        self.attention = BeitSelfAttention(config)
        self.output = ViTSelfOutput(config)

    def forward(self, x: torch.Tensor, shape: TokenShape, grid: tuple[int, int],
                bias: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.attention(x, shape, grid, bias))


class BeitLayer(nn.Module):
    """Pre-norm with layer scale: x + lambda_1 * attention(norm(x)), then x + lambda_2 * mlp(norm(x))."""

    def __init__(self, config: BeitConfig):
        super().__init__()
        self.attention = BeitAttention(config)
        self.intermediate = ViTIntermediate(config)
        self.output = ViTOutput(config)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        scaled = config.layer_scale_init_value > 0
        self.lambda_1 = nn.Parameter(torch.empty(config.hidden_size)) if scaled else None
        self.lambda_2 = nn.Parameter(torch.empty(config.hidden_size)) if scaled else None

    def forward(self, x: torch.Tensor, shape: TokenShape, grid: tuple[int, int],
                bias: torch.Tensor | None) -> torch.Tensor:
        """x: (B*T, C) -> (B*T, C)."""
        h = self.attention(self.layernorm_before(x), shape, grid, bias)
        x = x + (h if self.lambda_1 is None else self.lambda_1 * h)
        h = self.output(self.intermediate(self.layernorm_after(x)))
        return x + (h if self.lambda_2 is None else self.lambda_2 * h)


class BeitEncoder(nn.Module):
    def __init__(self, config: BeitConfig):
        super().__init__()
        self.layer = nn.ModuleList(BeitLayer(config) for _ in range(config.num_hidden_layers))
        # One bias table shared by every layer (pretraining checkpoints), added to each layer's own.
        self.relative_position_bias = (BeitRelativePositionBias(config)
                                       if config.use_shared_relative_position_bias else None)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, T, C) -> (B, T, C), on a (B*T, C) matrix: no token is padding. grid: the (rows, cols) of
        patches, T = 1 + rows * cols."""
        shape = TokenShape(x.shape[0], x.shape[1])
        shared = None if self.relative_position_bias is None else self.relative_position_bias(*grid)
        h = x.reshape(shape.batch * shape.length, x.shape[2])
        for layer in self.layer:
            h = layer(h, shape, grid, shared)
        return h.view(x.shape)


class BeitPooler(nn.Module):
    def __init__(self, config: BeitConfig):
        super().__init__()
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.use_mean_pooling else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.layernorm is None:
            return hidden[:, 0]
        return self.layernorm(hidden[:, 1:].mean(dim=1))  # (B, C): mean of the patch tokens


class BeitModel(nn.Module):
    """The bare encoder: last_hidden_state (B, 1 + N, C) and, with a pooler, pooler_output (B, C)."""

    config_class = BeitConfig
    base_model_prefix = "beit"
    optional_modules = ("pooler",)

    def __init__(self, config: BeitConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = BeitEmbeddings(config)
        self.encoder = BeitEncoder(config)
        # With mean pooling the final LayerNorm sits in the pooler instead.
        self.layernorm = None if config.use_mean_pooling else nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = BeitPooler(config) if add_pooling_layer else None

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        patch = self.embeddings.patch_embeddings.patch_size
        grid = (pixel_values.shape[-2] // patch[0], pixel_values.shape[-1] // patch[1])
        hidden = self.encoder(self.embeddings(pixel_values), grid)
        if self.layernorm is not None:
            hidden = self.layernorm(hidden)
        out = {"last_hidden_state": hidden}
        if self.pooler is not None:
            out["pooler_output"] = self.pooler(hidden)
        return out


class BeitForImageClassification(nn.Module):
    """A linear classifier on the pooled output."""

    config_class = BeitConfig
    base_model_prefix = "beit"

    def __init__(self, config: BeitConfig):
        super().__init__()
        self.config = config
        self.beit = BeitModel(config, add_pooling_layer=True)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.classifier(self.beit(pixel_values)["pooler_output"])}


def sanitize(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop what older checkpoints saved but the model recomputes or never uses: the relative position
    index buffers and the pretraining mask token."""
    return {k: v for k, v in state_dict.items()
            if not k.endswith(("relative_position_index", "embeddings.mask_token"))}


ARCHITECTURES = {
    "BeitModel": BeitModel,
    "BeitForImageClassification": BeitForImageClassification,
}
HEADS = {"base": BeitModel, "image-classification": BeitForImageClassification}
TASK_OF_HEAD = {"base": "image-feature-extraction", "image-classification": "image-classification"}
Config = BeitConfig
NO_SPLIT_MODULES = ("BeitLayer",)  # blocks a device_map places whole

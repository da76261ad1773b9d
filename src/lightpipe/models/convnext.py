"""ConvNeXt: a pure convolutional network modernised after the vision Transformers.

pixel_values (B, 3, H, W) -> 4x4 patchify conv + LayerNorm -> stages of residual blocks (7x7 depthwise
conv, LayerNorm, 4x MLP, layer scale), each stage after the first halving the resolution ->
last_hidden_state (B, C, H/32, W/32); pooler_output = LayerNorm(global average) (B, C), which the
classifier reads. Attribute names equal the keys of Hugging Face ConvNeXt checkpoints.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import BaseConfig
from ..errors import InvalidInput, UnsupportedModel
from .layers import activation, linear

BLOCK_EPS = 1e-6  # the LayerNorms inside the network; config.layer_norm_eps is the final one's


@dataclasses.dataclass
class ConvNextConfig(BaseConfig):
    num_channels: int = 3
    patch_size: int = 4
    num_stages: int = 4
    hidden_sizes: list[int] = dataclasses.field(default_factory=lambda: [96, 192, 384, 768])
    depths: list[int] = dataclasses.field(default_factory=lambda: [3, 3, 9, 3])
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    layer_scale_init_value: float = 1e-6
    image_size: int = 224

    def __post_init__(self) -> None:
        if len(self.hidden_sizes) != self.num_stages or len(self.depths) != self.num_stages:
            raise UnsupportedModel("hidden_sizes and depths must have num_stages entries.")
        activation(self.hidden_act)


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNextEmbeddings(nn.Module):
    def __init__(self, config: ConvNextConfig):
        super().__init__()
        self.patch_embeddings = nn.Conv2d(config.num_channels, config.hidden_sizes[0], kernel_size=config.patch_size,
                                          stride=config.patch_size)
        self.layernorm = ChannelsFirstLayerNorm(config.hidden_sizes[0], eps=BLOCK_EPS)
        # The smallest side that survives the patch stem and the 2x2 downsampling of every later stage.
        self.min_side = config.patch_size * 2 ** (config.num_stages - 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[1] != self.patch_embeddings.in_channels:
            raise InvalidInput(f"the model takes {self.patch_embeddings.in_channels}-channel images, "
                               f"not {pixel_values.shape[1]}-channel ones.")
        height, width = pixel_values.shape[-2:]
        if min(height, width) < self.min_side:  # (reached with do_resize off) a convolution would fail
            raise InvalidInput(f"the image is {height}x{width} pixels after preprocessing; this ConvNeXt needs "
                               f"at least {self.min_side} pixels on each side.")
        return self.layernorm(self.patch_embeddings(pixel_values))  # (B, C, H/4, W/4)


class ConvNextLayer(nn.Module):
    """x + gamma * MLP(LayerNorm(depthwise 7x7 conv(x))); the MLP runs on (B*H*W, C) pixels."""

    def __init__(self, config: ConvNextConfig, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.layernorm = nn.LayerNorm(dim, eps=BLOCK_EPS)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.act = config.hidden_act
        self.layer_scale_parameter = nn.Parameter(torch.empty(dim)) if config.layer_scale_init_value > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.dwconv(x).permute(0, 2, 3, 1).reshape(b * h * w, c)  # (B*H*W, C)
        y = linear(linear(self.layernorm(y), self.pwconv1, self.act), self.pwconv2)
        if self.layer_scale_parameter is not None:
            y = y * self.layer_scale_parameter
        return x + y.view(b, h, w, c).permute(0, 3, 1, 2)


class ConvNextStage(nn.Module):
    """An optional downsampling (LayerNorm, 2x2 stride-2 conv), then `depth` blocks."""

    def __init__(self, config: ConvNextConfig, in_channels: int, out_channels: int, stride: int, depth: int):
        super().__init__()
        if in_channels != out_channels or stride > 1:
            self.downsampling_layer = nn.ModuleList([
                ChannelsFirstLayerNorm(in_channels, eps=BLOCK_EPS),
                nn.Conv2d(in_channels, out_channels, kernel_size=stride, stride=stride),
            ])
        else:
            self.downsampling_layer = nn.ModuleList()
        self.layers = nn.ModuleList(ConvNextLayer(config, out_channels) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.downsampling_layer:
            x = module(x)
        for layer in self.layers:
            x = layer(x)
        return x


class ConvNextEncoder(nn.Module):
    def __init__(self, config: ConvNextConfig):
        super().__init__()
        sizes = config.hidden_sizes
        self.stages = nn.ModuleList(
            ConvNextStage(config, sizes[max(i - 1, 0)], sizes[i], stride=2 if i > 0 else 1, depth=config.depths[i])
            for i in range(config.num_stages)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x


class ConvNextModel(nn.Module):
    """The bare network: last_hidden_state (B, C, h, w) and pooler_output (B, C)."""

    config_class = ConvNextConfig
    base_model_prefix = "convnext"

    def __init__(self, config: ConvNextConfig):
        super().__init__()
        self.config = config
        self.embeddings = ConvNextEmbeddings(config)
        self.encoder = ConvNextEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_sizes[-1], eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.weight.dtype)
        hidden = self.encoder(self.embeddings(pixel_values))
        return {"last_hidden_state": hidden, "pooler_output": self.layernorm(hidden.mean(dim=(-2, -1)))}


class ConvNextForImageClassification(nn.Module):
    config_class = ConvNextConfig
    base_model_prefix = "convnext"

    def __init__(self, config: ConvNextConfig):
        super().__init__()
        self.config = config
        self.convnext = ConvNextModel(config)
        self.classifier = nn.Linear(config.hidden_sizes[-1], config.num_labels)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.classifier(self.convnext(pixel_values)["pooler_output"])}


def sanitize(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ConvNeXt checkpoints load as saved."""
    return state_dict


ARCHITECTURES = {
    "ConvNextModel": ConvNextModel,
    "ConvNextForImageClassification": ConvNextForImageClassification,
}
HEADS = {"base": ConvNextModel, "image-classification": ConvNextForImageClassification}
TASK_OF_HEAD = {"base": "image-feature-extraction", "image-classification": "image-classification"}
Config = ConvNextConfig
NO_SPLIT_MODULES = ("ConvNextLayer",)  # blocks a device_map places whole

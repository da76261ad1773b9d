"""CLIP: a text encoder and a vision encoder projected into one embedding space.

Attribute names equal the checkpoint keys of Hugging Face CLIP checkpoints (`text_model.*`,
`vision_model.*`, `visual_projection`, `text_projection`, `logit_scale`), so a checkpoint loads
with a strict `load_state_dict`. Both towers share one pre-norm transformer layer; the text tower
attends causally (it was trained as a left-to-right model) and pools at its end-of-text token, the
vision tower pools its class token.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..config import BaseConfig
from ..errors import CheckpointError, InvalidInput, UnsupportedModel
from .layers import Embedding, activation, attention, linear, merge_heads, padding_mask, split_heads


@dataclasses.dataclass
class CLIPTextConfig(BaseConfig):
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | list[int] | None = 49407


@dataclasses.dataclass
class CLIPVisionConfig(BaseConfig):
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclasses.dataclass
class CLIPConfig(BaseConfig):
    text_config: Any = None  # a dict in config.json, a CLIPTextConfig after __post_init__
    vision_config: Any = None
    # Configs written before transformers 4.26 may also carry these. When present they win: the
    # tower's config is then built from them alone, every key they omit taking its default, which
    # is what transformers does (it rebuilds the full sub-config from them and overwrites).
    text_config_dict: dict | None = None
    vision_config_dict: dict | None = None
    projection_dim: int = 512

    def __post_init__(self) -> None:
        self.text_config = _sub_config(CLIPTextConfig, self.text_config, self.text_config_dict, "text_config")
        self.vision_config = _sub_config(CLIPVisionConfig, self.vision_config, self.vision_config_dict, "vision_config")
        for name, sub in (("text_config", self.text_config), ("vision_config", self.vision_config)):
            if sub.hidden_size % sub.num_attention_heads:
                raise UnsupportedModel(f"{name}: hidden_size must be a multiple of num_attention_heads.")
        if not isinstance(self.vision_config.image_size, int) or not isinstance(self.vision_config.patch_size, int):
            raise UnsupportedModel("only square CLIP images and patches (integer image_size and patch_size) are supported.")


def _sub_config(cls, value, legacy: dict | None, name: str):
    if isinstance(value, cls):
        return value
    if legacy is not None:
        value = legacy
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise CheckpointError(f"config.json: {name} must be a JSON object, not {type(value).__name__}.")
    return cls.from_dict(value)


# ----------------------------------------------------------------------------------------------
# The transformer layer both towers share


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B, T, C); mask: boolean (B, 1, T, T), True where attended, or None -> (B, T, C)."""
        q = split_heads(linear(x, self.q_proj), self.num_heads)  # (B, H, T, D)
        k = split_heads(linear(x, self.k_proj), self.num_heads)
        v = split_heads(linear(x, self.v_proj), self.num_heads)
        return linear(merge_heads(attention(q, k, v, mask)), self.out_proj)


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig):
        super().__init__()
        self.act = config.hidden_act
        activation(self.act)  # unknown names fail at build time
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(linear(x, self.fc1, self.act), self.fc2)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x


# ----------------------------------------------------------------------------------------------
# Text tower


def causal_padding_mask(attention_mask: torch.Tensor | None, length: int, device: torch.device) -> torch.Tensor:
    """(B, T) 1/0 mask (or None) -> boolean (B or 1, 1, T, T): query t sees real keys at positions <= t.

    Every query also sees itself, so that no row is empty where padding comes first: what SDPA makes
    of an empty row has varied with torch versions and kernels (NaN in older ones), and a NaN in a
    padded slot would leak into real rows through 0 * NaN in the next layer. Real tokens lose nothing
    by it: their own position is already causal and real."""
    positions = torch.arange(length, device=device)
    causal = (positions[None, :] <= positions[:, None])[None, None]  # (1, 1, T, T): key <= query
    keys = padding_mask(attention_mask)  # (B, 1, 1, T), None when nothing is padded
    if keys is None:
        return causal
    return (causal & keys) | torch.eye(length, dtype=torch.bool, device=device)


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        limit = self.position_embedding.num_embeddings
        if length > limit:
            raise InvalidInput(f"the text is {length} tokens long, more than this CLIP model's {limit}; shorten it.")
        positions = torch.arange(length, device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]  # (B, T, C)


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def end_of_text_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B,) the position whose state is the text's summary.

        Configs made before transformers PR #24773 say eos_token_id=2, which is wrong for CLIP's
        vocabulary; for them the position of the largest id is taken, as the original CLIP code does
        (its end-of-text token has the largest id). Newer configs name the real token: its first
        occurrence is taken, since the pad token may be the same token."""
        eos = self.config.eos_token_id
        ids = input_ids.to(torch.int)
        if eos == 2:
            return ids.argmax(dim=-1)
        wanted = torch.tensor([] if eos is None else eos if isinstance(eos, list) else [eos], dtype=ids.dtype,
                              device=ids.device)
        return torch.isin(ids, wanted).int().argmax(dim=-1)  # the first one; 0 when a text has none

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask: (B, T) -> last_hidden_state (B, T, C), pooler_output (B, C)."""
        x = self.embeddings(input_ids)
        x = self.encoder(x, causal_padding_mask(attention_mask, x.shape[1], x.device))
        x = self.final_layer_norm(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), self.end_of_text_positions(input_ids)]
        return {"last_hidden_state": x, "pooler_output": pooled}


# ----------------------------------------------------------------------------------------------
# Vision tower


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.image_size = config.image_size
        self.class_embedding = nn.Parameter(torch.empty(config.hidden_size))
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        num_patches = (config.image_size // config.patch_size) ** 2
        self.position_embedding = Embedding(num_patches + 1, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + patches, C): the class token, then the patches row by row."""
        b, _, h, w = pixel_values.shape
        if h != self.image_size or w != self.image_size:
            # An input error, as in ViT: the size comes from the processor settings, which a call's
            # image_processor_kwargs may have changed as well as the checkpoint's preprocessor_config.json.
            raise InvalidInput(
                f"the image is {h}x{w} pixels after preprocessing, but this CLIP model takes {self.image_size}x"
                f"{self.image_size}; check crop_size in image_processor_kwargs or in the checkpoint's "
                "preprocessor_config.json."
            )
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, C, H/p, W/p)
        patches = patches.flatten(2).transpose(1, 2)  # (B, patches, C)
        x = torch.cat([self.class_embedding.expand(b, 1, -1), patches], dim=1)
        return x + self.position_embedding.weight[None]


class CLIPVisionTransformer(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # (sic) the checkpoint key
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) -> last_hidden_state (B, 1 + patches, C), pooler_output (B, C) from the class token."""
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))
        return {"last_hidden_state": x, "pooler_output": self.post_layernorm(x[:, 0])}


# ----------------------------------------------------------------------------------------------
# The two towers together


def normalize(embeds: torch.Tensor) -> torch.Tensor:
    """Scale each row to unit length, so that dot products are cosine similarities."""
    return embeds / embeds.pow(2).sum(dim=-1, keepdim=True).sqrt()


class CLIPModel(nn.Module):
    """Text and image embeddings in one space; logits are their scaled cosine similarities."""

    config_class = CLIPConfig
    base_model_prefix = "clip"

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config.text_config)
        self.vision_model = CLIPVisionTransformer(config.vision_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.empty(()))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids and mask -> (B, projection_dim) text embeddings (not normalised)."""
        return linear(self.text_model(input_ids, attention_mask)["pooler_output"], self.text_projection)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, projection_dim) image embeddings (not normalised)."""
        return linear(self.vision_model(pixel_values)["pooler_output"], self.visual_projection)

    def similarity(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """(I, P) image and (L, P) text embeddings, normalised or not -> (I, L) logits_per_image."""
        return normalize(image_embeds) @ normalize(text_embeds).T * self.logit_scale.exp()

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Returns logits_per_image (I, L), logits_per_text (L, I) and the normalised embeddings."""
        image_features = self.get_image_features(pixel_values)  # (I, P)
        text_features = self.get_text_features(input_ids, attention_mask)  # (L, P)
        logits_per_image = self.similarity(image_features, text_features)  # (I, L)
        return {"logits_per_image": logits_per_image, "logits_per_text": logits_per_image.T,
                "image_embeds": normalize(image_features), "text_embeds": normalize(text_features)}


# ----------------------------------------------------------------------------------------------
# The vision tower alone: image embeddings and image classification


class CLIPVisionModel(nn.Module):
    """The vision tower alone: what image-feature-extraction reads from CLIP checkpoints, as transformers
    does (its AutoModel for "clip_vision_model" is CLIPVisionModel, also for a CLIPVisionModelWithProjection
    checkpoint, whose projection it leaves unused): hidden states, and the [CLS] state after
    post_layernorm as the pooled output.

    transformers keeps the tower's keys at the top level since v5 and under `vision_model.` before; both
    load (see loading._adapt_prefix)."""

    config_class = CLIPVisionConfig
    base_model_prefix = "vision_model"

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = CLIPVisionTransformer(config)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """-> last_hidden_state (B, 1 + patches, C), pooler_output (B, C)."""
        return self.vision_model(pixel_values)


class CLIPVisionOfWholeModel(CLIPVisionModel):
    """The vision tower of a whole CLIP checkpoint (transformers' image-feature-extraction pipeline fails on
    those: its CLIPModel needs text too)."""

    config_class = CLIPConfig

    def __init__(self, config: CLIPConfig):
        super().__init__(config.vision_config)
        self.config = config


class CLIPForImageClassification(nn.Module):
    """A linear classifier on the mean of the vision tower's patch states (the [CLS] state is left out)."""

    config_class = CLIPConfig
    base_model_prefix = "vision_model"

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.vision_model = CLIPVisionTransformer(config.vision_config)
        self.classifier = nn.Linear(config.vision_config.hidden_size, config.num_labels)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.vision_model(pixel_values)["last_hidden_state"]  # (B, 1 + patches, C), before post_layernorm
        return {"logits": self.classifier(hidden[:, 1:].mean(dim=1))}


def sanitize(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the position-id buffers older checkpoints saved (positions are computed here)."""
    return {k: v for k, v in state_dict.items() if not k.endswith("embeddings.position_ids")}


ARCHITECTURES = {"CLIPModel": CLIPModel, "CLIPForImageClassification": CLIPForImageClassification}
HEADS = {"contrastive": CLIPModel, "base": CLIPVisionOfWholeModel, "image-classification": CLIPForImageClassification}
TASK_OF_HEAD = {"contrastive": "zero-shot-image-classification", "base": "image-feature-extraction",
                "image-classification": "image-classification"}
# Keys of a whole CLIP checkpoint (or of a classifier) that the vision tower alone does not use.
IGNORED_KEYS = (r"^text_model\.", r"^text_projection\.", r"^visual_projection\.", r"^logit_scale$",
                r"^classifier\.")
Config = CLIPConfig
NO_SPLIT_MODULES = ("CLIPEncoderLayer",)  # blocks a device_map places whole

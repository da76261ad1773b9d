"""DeiT: ViT with a second special token, the distillation token, trained to match a CNN teacher.

pixel_values -> [CLS] + [DIST] + patches + positions -> ViT's pre-norm layers -> final LayerNorm.
A plain checkpoint classifies from [CLS]; a distilled one (DeiTForImageClassificationWithTeacher)
averages a [CLS] head and a [DIST] head. The layers are ViT's (same checkpoint keys under deit.).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .vit import ViTConfig, ViTEmbeddings, ViTModel
from .vit import sanitize as vit_sanitize

WITH_TEACHER = "DeiTForImageClassificationWithTeacher"


@dataclasses.dataclass
class DeiTConfig(ViTConfig):
    @property
    def with_teacher(self) -> bool:
        """Whether the checkpoint has the two heads of a distilled classifier."""
        return WITH_TEACHER in (self.architectures or ())


class DeiTEmbeddings(ViTEmbeddings):
    num_special = 2  # [CLS], [DIST]

    def __init__(self, config: DeiTConfig):
        super().__init__(config)
        self.distillation_token = nn.Parameter(torch.empty(1, 1, config.hidden_size))

    def special_tokens(self, batch: int) -> torch.Tensor:
        return torch.cat((self.cls_token, self.distillation_token), dim=1).expand(batch, -1, -1)  # (B, 2, C)


class DeiTModel(ViTModel):
    """The bare encoder: last_hidden_state (B, 2 + N, C) and, with a pooler, pooler_output from [CLS]."""

    config_class = DeiTConfig
    base_model_prefix = "deit"
    embeddings_class = DeiTEmbeddings


class DeiTForImageClassification(nn.Module):
    """A classifier on the final [CLS] token; for a distilled checkpoint (architectures names
    DeiTForImageClassificationWithTeacher), the mean of a [CLS] head and a distillation-token head.

    One class serves both so that the task head "image-classification" loads either checkpoint."""

    config_class = DeiTConfig
    base_model_prefix = "deit"

    def __init__(self, config: DeiTConfig):
        super().__init__()
        self.config = config
        self.deit = DeiTModel(config, add_pooling_layer=False)
        if config.with_teacher:
            self.cls_classifier = nn.Linear(config.hidden_size, config.num_labels)
            self.distillation_classifier = nn.Linear(config.hidden_size, config.num_labels)
        else:
            self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> dict[str, torch.Tensor]:
        # Only [CLS] (and [DIST]) are read: the last layer computes nothing else (see ViTEncoder).
        hidden = self.deit(pixel_values, interpolate_pos_encoding, keep=2 if self.config.with_teacher else 1)
        hidden = hidden["last_hidden_state"]
        if not self.config.with_teacher:
            return {"logits": self.classifier(hidden[:, 0])}
        cls_logits = self.cls_classifier(hidden[:, 0])
        distillation_logits = self.distillation_classifier(hidden[:, 1])
        return {"logits": (cls_logits + distillation_logits) / 2, "cls_logits": cls_logits,
                "distillation_logits": distillation_logits}


sanitize = vit_sanitize

ARCHITECTURES = {
    "DeiTModel": DeiTModel,
    "DeiTForImageClassification": DeiTForImageClassification,
    WITH_TEACHER: DeiTForImageClassification,
    "DeiTForMaskedImageModeling": DeiTModel,
}
HEADS = {"base": DeiTModel, "image-classification": DeiTForImageClassification}
TASK_OF_HEAD = {"base": "image-feature-extraction", "image-classification": "image-classification"}
Config = DeiTConfig
IGNORED_KEYS = (r"(^|\.)pooler\.",)
NO_SPLIT_MODULES = ("ViTLayer",)  # blocks a device_map places whole

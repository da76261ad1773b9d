"""CLIP's vision tower saved on its own (model_type "clip_vision_model"): CLIPVisionModel and
CLIPVisionModelWithProjection checkpoints, whose config.json is the vision config itself.

The model is clip.CLIPVisionModel (a projection's weights are left unused, as transformers leaves them);
this module only registers the model type.
"""

from __future__ import annotations

from .clip import IGNORED_KEYS, CLIPVisionConfig, CLIPVisionModel, sanitize  # noqa: F401  (the module contract)

ARCHITECTURES = {"CLIPVisionModel": CLIPVisionModel, "CLIPVisionModelWithProjection": CLIPVisionModel}
HEADS = {"base": CLIPVisionModel}
TASK_OF_HEAD = {"base": "image-feature-extraction"}
Config = CLIPVisionConfig
NO_SPLIT_MODULES = ("CLIPEncoderLayer",)  # blocks a device_map places whole

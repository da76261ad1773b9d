"""Registry: model_type -> architecture module; task head -> model class.

Each architecture module defines a `Config` dataclass, model classes, `sanitize(state_dict)` and
`HEADS`, a mapping from head kind ("base", "sequence-classification", ...) to the class that
implements it. Modules are imported only when a checkpoint asks for them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import UnsupportedModel

# model_type (as written in config.json) -> module in this package.
MODEL_TYPES: dict[str, str] = {
    "bert": "bert",
    "roberta": "roberta",
    "xlm-roberta": "roberta",
    "camembert": "roberta",
    "distilbert": "distilbert",
    "wav2vec2": "wav2vec2",
    "hubert": "hubert",
    "layoutlm": "layoutlm",
    "clip": "clip",
    "clip_vision_model": "clip_vision",
    "vit": "vit",
    "deit": "deit",
    "convnext": "convnext",
    "beit": "beit",
    "swin": "swin",
    "whisper": "whisper",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gpt2": "gpt2",
    "opt": "opt",
    "bart": "bart",
    "t5": "t5",
    "deberta-v2": "deberta_v2",
}

# Head kinds a task can ask for.
BASE = "base"
SEQUENCE_CLASSIFICATION = "sequence-classification"
TOKEN_CLASSIFICATION = "token-classification"
QUESTION_ANSWERING = "question-answering"
MASKED_LM = "masked-lm"
CAUSAL_LM = "causal-lm"
SEQ2SEQ_LM = "seq2seq-lm"  # text-to-text encoder-decoder with a language-model head (BART, T5)


def architecture_module(model_type: str) -> ModuleType:
    name = MODEL_TYPES.get(model_type)
    if name is None:
        raise UnsupportedModel(
            f"model_type {model_type!r} is not supported; supported model types: {', '.join(sorted(MODEL_TYPES))}."
        )
    return importlib.import_module(f"{__name__}.{name}")


def head_class(model_type: str, head: str):
    module = architecture_module(model_type)
    try:
        return module.HEADS[head]
    except KeyError:
        raise UnsupportedModel(
            f"{model_type} has no {head} head in lightpipe; its heads: {', '.join(sorted(module.HEADS))}."
        ) from None


def head_of_architecture(model_type: str, architecture: str) -> str | None:
    """The head kind a config's `architectures` entry stands for, or None if unknown."""
    module = architecture_module(model_type)
    cls = module.ARCHITECTURES.get(architecture)
    for head, head_cls in module.HEADS.items():
        if head_cls is cls:
            return head
    return None

"""config.json -> a dataclass that keeps the keys it knows; and the one reader of a checkpoint's JSON files.

Each architecture declares its own `Config` subclass with the fields it reads; keys a
checkpoint has but the dataclass does not declare are dropped. Nothing is ever guessed
from a model's name or path.

Every JSON settings file of a checkpoint (config.json, generation_config.json, preprocessor_config.json,
tokenizer_config.json ...) is read by `read_json_object`, with one rule: an absent file is None, a file
that is unreadable, not JSON or not a JSON object is a `CheckpointError` naming it. `known_keys` keeps
the entries a reader knows.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import CheckpointError


@dataclasses.dataclass
class BaseConfig:
    """The keys every checkpoint may carry, whatever its architecture."""

    model_type: str = ""
    architectures: list[str] | None = None
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    problem_type: str | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = True
    dtype: str | None = None  # the dtype the checkpoint was saved in ("torch_dtype" before transformers 5)
    num_labels_hint: int | None = None  # "num_labels" when given without id2label

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "BaseConfig":
        values = known_keys(raw, (f.name for f in dataclasses.fields(cls)))
        if "dtype" not in raw and "torch_dtype" in raw:
            values["dtype"] = raw["torch_dtype"]
        if "num_labels" in raw and "id2label" not in raw:
            values["num_labels_hint"] = int(raw["num_labels"])
        for name, value in cls.renamed_keys().items():
            if name in raw and value not in raw:
                values[value] = raw[name]
        config = cls(**values)
        config._normalise_labels()
        return config

    @classmethod
    def renamed_keys(cls) -> dict[str, str]:
        """Old key -> field name, for checkpoints written by older libraries."""
        return {}

    def _normalise_labels(self) -> None:
        if self.id2label:
            # Values stay as config.json gives them (a number stays a number), as transformers returns them.
            self.id2label = {int(k): v for k, v in self.id2label.items()}
        else:
            n = self.num_labels_hint or 2
            self.id2label = {i: f"LABEL_{i}" for i in range(n)}
        if not self.label2id:
            self.label2id = {v: k for k, v in self.id2label.items()}

    @property
    def num_labels(self) -> int:
        return len(self.id2label or {})


def read_json_object(path: str | Path) -> dict[str, Any] | None:
    """The JSON object a checkpoint file holds; None when there is no such file.

    A file that cannot be read, is not valid JSON or holds something else than an object (a list, a
    string) is a CheckpointError naming it: a settings file that says nothing usable is never taken as empty.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(raw).__name__}.")
    return raw


def known_keys(raw: Mapping[str, Any], fields: Iterable[str], *, skip_none: bool = False) -> dict[str, Any]:
    """The entries of `raw` whose key is one of `fields` (with skip_none, not those whose value is null)."""
    fields = set(fields)
    return {k: v for k, v in raw.items() if k in fields and not (skip_none and v is None)}


def read_config_json(folder: Path) -> dict[str, Any]:
    """A checkpoint folder's config.json, which every Hugging Face checkpoint has."""
    raw = read_json_object(Path(folder) / "config.json")
    if raw is None:
        raise CheckpointError(
            f"{folder} has no config.json: a checkpoint folder needs config.json beside its weights "
            "(model.safetensors or pytorch_model.bin)."
        )
    return raw

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import tiny_checkpoint  # noqa: E402

ARCHS = ("bert", "roberta", "distilbert", "xlm-roberta")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(arch, head, **overrides) -> folder of a tiny random checkpoint, built once per session."""
    made: dict = {}

    def make(arch: str, head: str, **overrides) -> Path:
        key = (arch, head, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp(f"{arch}-{head}")
            made[key] = tiny_checkpoint(folder, arch, head, **overrides)
        return made[key]

    return make

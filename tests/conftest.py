import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each xdist worker gets its share of the cores: torch's default of one thread per core in every worker
    # oversubscribes the machine, and spinning OpenMP threads then nearly double the suite's time.
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

from helpers import left_padded_copy, tiny_checkpoint  # noqa: E402

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


@pytest.fixture(scope="session")
def left_checkpoint(checkpoint, tmp_path_factory):
    """left_checkpoint(arch, head, **overrides) -> the checkpoint(...) folder copied with a tokenizer that pads on
    the left."""
    made: dict = {}

    def make(arch: str, head: str, **overrides) -> Path:
        folder = checkpoint(arch, head, **overrides)
        if folder not in made:
            made[folder] = left_padded_copy(folder, tmp_path_factory.mktemp(f"{arch}-{head}-left") / "model")
        return made[folder]

    return make

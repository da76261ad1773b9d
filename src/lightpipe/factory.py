"""pipeline(): task + model -> loaded parts -> the task's Pipeline. The one place that wires."""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import dispatch, hub, loading, models, quantize
from .formats import gguf
from .config import BaseConfig
from .errors import InvalidInput, RemoteCodeNotSupported, UnsupportedModel, UnsupportedTask
from .tasks import TASK_OF_HEAD, TaskSpec, get_task

# Pipeline component -> "module:Class" under lightpipe, each with from_folder(folder).
COMPONENTS = {
    "tokenizer": "processing.text:Tokenizer",
    "feature_extractor": "processing.audio:FeatureExtractor",
    "image_processor": "processing.image:ImageProcessor",
    "generation_config": "generation:GenerationConfig",
}

logger = logging.getLogger(__name__)
_FALLBACK_NOTICES: set[tuple[str, str]] = set()  # (task, fallback model) pairs already announced


@loading.one_load()
def pipeline(task: str | None = None, model: str | nn.Module | None = None, *, config=None, tokenizer=None,
             feature_extractor=None, image_processor=None, revision: str | None = None, token=None, device=None,
             device_map=None, dtype=None, model_kwargs: dict | None = None, batch_size: int | None = None,
             num_workers: int | None = None, trust_remote_code: bool = False, **task_params):
    """Build a ready pipeline for `task` from `model` (a Hub id, a local folder, or a loaded lightpipe model).

    Mirrors transformers.pipeline(): parameters not named here go to the task as its defaults.
    """
    if trust_remote_code:
        raise RemoteCodeNotSupported(
            "trust_remote_code=True is not supported: lightpipe runs only its own model code. "
            "Use a checkpoint whose architecture lightpipe implements (see `lightpipe tasks`)."
        )
    _old_spellings(task_params)
    torch_dtype = task_params.pop("torch_dtype", None)
    if torch_dtype is not None:
        if dtype is not None:
            raise InvalidInput("give dtype or torch_dtype (its old name), not both.")
        dtype = torch_dtype
    model_kwargs = dict(model_kwargs or {})
    for key in ("dtype", "torch_dtype"):
        if key in model_kwargs:
            if dtype is not None:
                raise InvalidInput(f"dtype was given twice: as an argument and as model_kwargs[{key!r}].")
            dtype = model_kwargs.pop(key)
    device_map, max_memory, offload_folder = _placement(device_map, model_kwargs, task_params)
    quantization = quantize.pop_request(model_kwargs, task_params)  # load_in_8bit / load_in_4bit / quantization_config
    if model_kwargs:
        raise InvalidInput(f"model_kwargs {sorted(model_kwargs)} are not supported; supported: dtype, device_map, "
                           "max_memory, offload_folder, load_in_8bit, load_in_4bit, quantization_config.")
    target = _device(device, device_map)
    request = dispatch.Request.from_args(device_map, max_memory, offload_folder) if device_map is not None else None
    spec = get_task(task) if task is not None else None

    if isinstance(model, nn.Module):
        if not hasattr(model, "config"):
            raise UnsupportedModel("model must be a lightpipe model (loaded by lightpipe), a Hub id or a folder.")
        loaded, folder = model, Path(getattr(model, "name_or_path", "")) if getattr(model, "name_or_path", "") else None
        spec = spec or _task_from_model(loaded)
        heads = models.architecture_module(loaded.config.model_type).HEADS
        needed = [heads[h] for h in spec.heads if h in heads]
        if not any(type(loaded) is cls for cls in needed):
            names = " or ".join(cls.__name__ for cls in needed) or f"a model lightpipe runs for {spec.name}"
            raise UnsupportedModel(f"{spec.name} needs {names}, but the model given is a "
                                   f"{type(loaded).__name__}; load it for this task, or pass its folder.")
        if quantization is not None:
            raise InvalidInput("quantisation applies while lightpipe loads a model: pass the model's folder or id "
                               "with load_in_8bit / load_in_4bit, not a loaded model.")
        if getattr(loaded, "hf_device_map", None) is not None and (device is not None or dtype not in (None, "auto")):
            raise InvalidInput("this model is placed by a device_map (see model.hf_device_map): it is never moved "
                               "or cast as a whole; load it again with the device or dtype wanted.")
        if dtype not in (None, "auto"):
            loaded = loaded.to(loading.resolve_dtype(dtype, loaded.config))
        if request is not None:
            loaded = dispatch.dispatch_loaded(loaded, request)
        elif device is not None:
            loaded = loaded.to(target)
    else:
        if model is None:
            if spec is None:
                raise UnsupportedTask("give a task, a model, or both: pipeline(task='text-classification').")
            folder = _default_model_folder(spec)
        else:
            folder = hub.resolve(os.fspath(model) if isinstance(model, os.PathLike) else model,
                                 revision=revision, token=token, gguf_file=task_params.pop("gguf_file", None))
        model_config = _config(config, folder, revision, token)
        if spec is None:
            spec = _task_from_config(model_config, folder)
        head = _head_for(spec, model_config)
        if quantization is not None:  # loaded on the CPU, quantised layer by layer onto the device (bitsandbytes' way)
            dtype = quantize.model_dtype(quantization, dtype, target)
        loaded = loading.load_model(folder, head, dtype=dtype, device=None if request else target if quantization is None
                                    else torch.device("cpu"), config=model_config,
                                    device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
        if quantization is not None:
            loaded = quantize.quantize_model(loaded, quantization, None if request else target)
            if request is None and target.type != "cpu":
                loaded = loaded.to(target)

    cls = spec.pipeline_class()
    given = {"tokenizer": tokenizer, "feature_extractor": feature_extractor, "image_processor": image_processor,
             "generation_config": task_params.pop("generation_config", None)}
    parts = {name: _component(name, given[name], folder, revision, token) for name in cls.components}
    if getattr(loaded, "hf_device_map", None) is not None:
        target = dispatch.main_device(loaded)  # inputs go where the first blocks run
    _name_model(loaded, model, spec, folder)
    return cls(loaded, **parts, device=target if (device is not None or device_map is not None) else None,
               batch_size=batch_size, num_workers=num_workers, folder=folder, **task_params)


def _old_spellings(task_params: dict) -> None:
    """Arguments transformers' pipeline() took: framework="pt" (lightpipe is PyTorch only; "tf" / "flax" are refused)
    and use_fast (lightpipe always uses the fast tokenizer: use_fast=False is ignored with a warning)."""
    if "framework" in task_params:
        framework = task_params.pop("framework")
        if framework not in (None, "pt"):
            raise InvalidInput(f"framework={framework!r} is not supported: lightpipe runs PyTorch models only "
                               "(framework='pt', or leave it out).")
        if framework is not None:
            warnings.warn("framework is deprecated and not needed: lightpipe runs PyTorch only.", FutureWarning,
                          stacklevel=4)
    if "use_fast" in task_params:
        use_fast = task_params.pop("use_fast")
        if not use_fast:
            warnings.warn("use_fast=False is ignored: lightpipe always uses the fast (Rust) tokenizer.",
                          FutureWarning, stacklevel=4)


def _name_model(loaded: nn.Module, given, spec: TaskSpec, folder: Path | None) -> None:
    """model.config.name_or_path: the string the model was given as (a Hub id or a folder), as transformers keeps it;
    the default model's id when none was named; a model object's own (its folder) otherwise."""
    if isinstance(given, (str, os.PathLike)):
        name = os.fspath(given)
    elif given is None:
        fallback = hub.package_folder(spec.fallback_model) if spec.fallback_model else None
        name = spec.fallback_model if fallback is not None and folder == fallback else spec.default_model
    else:
        name = getattr(loaded.config, "name_or_path", None) or getattr(loaded, "name_or_path", "")
    try:
        loaded.config.name_or_path = name
    except AttributeError:  # a config that takes no new attributes
        pass


def _head_for(spec: TaskSpec, config: BaseConfig) -> str:
    """The head to load for `spec`: the one config.json's architectures name, else the first the model has."""
    module = models.architecture_module(config.model_type)
    for architecture in config.architectures or ():
        head = models.head_of_architecture(config.model_type, architecture)
        if head in spec.heads:
            return head
    for head in spec.heads:
        if head in module.HEADS:
            return head
    raise UnsupportedModel(
        f"{config.model_type} models cannot run {spec.name} in lightpipe (it needs one of the heads "
        f"{', '.join(spec.heads)}; {config.model_type} has {', '.join(sorted(module.HEADS))})."
    )


def _placement(device_map, model_kwargs: dict, task_params: dict) -> tuple:
    """device_map, max_memory and offload_folder from the arguments or model_kwargs (as transformers takes them),
    each given once; model_kwargs' other loading switches that change nothing here are accepted."""
    found = {"device_map": device_map, "max_memory": None, "offload_folder": None}
    for key in ("max_memory", "offload_folder"):
        found[key] = task_params.pop(key, None)
    for key in found:
        if key in model_kwargs:
            if found[key] is not None:
                raise InvalidInput(f"{key} was given twice: as an argument and as model_kwargs[{key!r}].")
            found[key] = model_kwargs.pop(key)
    # Loading always builds on the meta device and streams the weights: these ask for what happens anyway.
    for key in ("low_cpu_mem_usage", "offload_state_dict"):
        model_kwargs.pop(key, None)
    if found["device_map"] is None and (found["max_memory"] is not None or found["offload_folder"] is not None):
        raise InvalidInput("max_memory and offload_folder apply to a device_map: pass device_map='auto' with them.")
    return found["device_map"], found["max_memory"], found["offload_folder"]


def _device(device, device_map) -> torch.device | None:
    """The one device of the whole model (None when a device_map places it)."""
    if device is not None and device_map is not None:
        raise InvalidInput("give device or device_map, not both: they would place the model twice.")
    if device_map is not None:
        return None
    target = loading.resolve_device(device)
    loading.check_device_available(target)
    return target


def _default_model_folder(spec: TaskSpec) -> Path:
    if hub.is_cached(spec.default_model):
        return hub.resolve(spec.default_model)
    if spec.fallback_model and hub.package_folder(spec.fallback_model) is not None:
        if (spec.name, spec.fallback_model) not in _FALLBACK_NOTICES:  # once per process, not once per pipeline
            _FALLBACK_NOTICES.add((spec.name, spec.fallback_model))
            logger.warning("%s: the default model %s is not cached; using the installed %s instead.",
                           spec.name, spec.default_model, spec.fallback_model)
        return hub.package_folder(spec.fallback_model)
    return hub.resolve(spec.default_model, revision=None)


def _config(config, folder: Path, revision, token) -> BaseConfig:
    if config is None:
        return loading.load_config(folder)
    if isinstance(config, BaseConfig):
        return config
    if isinstance(config, (str, Path)):
        return loading.load_config(hub.resolve(str(config), revision=revision, token=token))
    raise InvalidInput(f"config must be a folder, a Hub id or a lightpipe config, not {type(config).__name__}.")


def _task_of_head(model_type: str, head: str | None) -> str | None:
    own = getattr(models.architecture_module(model_type), "TASK_OF_HEAD", {})
    return own.get(head) or TASK_OF_HEAD.get(head)


def _task_from_config(config: BaseConfig, folder: Path) -> TaskSpec:
    for architecture in config.architectures or ():
        task = _task_of_head(config.model_type, models.head_of_architecture(config.model_type, architecture))
        if task:
            return get_task(task)
    raise UnsupportedTask(
        f"no task given, and the architectures {config.architectures} in {folder}/config.json imply none that "
        "lightpipe knows; name the task: pipeline(task=..., model=...)."
    )


def _task_from_model(model: nn.Module) -> TaskSpec:
    for head, cls in models.architecture_module(model.config.model_type).HEADS.items():
        task = _task_of_head(model.config.model_type, head) if type(model) is cls else None
        if task:
            return get_task(task)
    raise UnsupportedTask(f"no task given, and {type(model).__name__} implies none; name the task.")


def _component(name: str, given, folder: Path | None, revision, token):
    """A pipeline part (tokenizer, feature_extractor, image_processor): as given, from a folder or Hub id, or
    from the model's own folder."""
    module_name, class_name = COMPONENTS[name].split(":")
    cls = getattr(importlib.import_module(f"lightpipe.{module_name}"), class_name)
    if isinstance(given, cls):
        return given
    if isinstance(given, (str, os.PathLike)):
        folder = hub.resolve(os.fspath(given), revision=revision, token=token)
    elif given is not None:
        raise InvalidInput(f"{name} must be a folder, a Hub id or a lightpipe {class_name}, not {type(given).__name__}.")
    if folder is None:
        raise InvalidInput(f"the model was passed as an object without a folder to read its {name} from; pass {name}=.")
    if gguf.is_gguf_path(folder):  # a GGUF file carries its tokenizer and generation settings as metadata
        return gguf.load_component(name, folder)
    return cls.from_folder(folder)

"""lightpipe: fast, from-scratch inference pipelines with transformers' API.

    from lightpipe import pipeline
    classify = pipeline("text-classification", model="path/or/hub-id")
    classify("I love this!")

Nothing heavy happens at import: torch and the models load on the first pipeline() call.
"""

from __future__ import annotations

from .errors import (
    CheckpointError,
    InvalidInput,
    LightpipeError,
    MissingDependency,
    ModelNotFound,
    RemoteCodeNotSupported,
    UnsupportedModel,
    UnsupportedTask,
)

__version__ = "0.1.0"

__all__ = [
    "pipeline", "Pipeline", "KeyDataset", "LightpipeError", "InvalidInput", "UnsupportedTask", "UnsupportedModel",
    "CheckpointError", "ModelNotFound", "RemoteCodeNotSupported", "MissingDependency", "__version__",
]


def pipeline(*args, **kwargs):
    """Build a pipeline; see lightpipe.factory.pipeline for the parameters."""
    from .factory import pipeline as build

    return build(*args, **kwargs)


def __getattr__(name):  # lazy public names: importing lightpipe stays cheap
    if name in ("Pipeline", "KeyDataset"):
        from .tasks import base

        return getattr(base, name)
    if name == "demo":  # the Gradio web demo: lightpipe.demo(pipe); gradio itself loads when a demo is built
        import importlib

        return importlib.import_module(".demo", __name__)  # a callable module: lightpipe.demo(pipe) builds the app
    if name == "subtitles":
        import importlib

        return importlib.import_module(".subtitles", __name__)
    raise AttributeError(f"module 'lightpipe' has no attribute {name!r}")

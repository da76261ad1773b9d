"""The one small hierarchy of errors lightpipe raises.

Every error a user can provoke is a `LightpipeError`; each subclass also derives from the
builtin exception a caller would naturally catch (ValueError, FileNotFoundError, ImportError),
so code written against transformers' behaviour keeps working.
"""

from __future__ import annotations


class LightpipeError(Exception):
    """Base class of every error lightpipe raises on purpose."""


class InvalidInput(LightpipeError, ValueError):
    """The input or a parameter of a call cannot be processed; the pipeline stays usable."""


class UnsupportedTask(LightpipeError, ValueError):
    """The task name is not one lightpipe implements."""


class UnsupportedModel(LightpipeError, ValueError):
    """The checkpoint's architecture or model_type is not implemented, or does not fit the task."""


class CheckpointError(LightpipeError, ValueError):
    """A checkpoint's files are missing, unreadable or do not match the architecture."""


class ModelNotFound(CheckpointError, FileNotFoundError):
    """The model id is neither a local folder, an installed weight package, nor reachable on the Hub."""


class RemoteCodeNotSupported(LightpipeError, ValueError):
    """trust_remote_code=True was asked for: lightpipe never runs code shipped with a checkpoint."""


class MissingDependency(LightpipeError, ImportError):
    """An optional package needed for this feature is not installed."""

"""Audio utilities beside the pipelines: voice activity detection.

    from lightpipe.audio import speech_regions
    speech_regions("meeting.wav")     # [{'start': 0.93, 'end': 4.286}, ...] in seconds

Importing this module is light; torch and the Silero VAD weights load on the first call.
See `lightpipe.vad` for the parameters.
"""

from __future__ import annotations

from typing import Any

__all__ = ["speech_regions", "speech_probabilities", "vad_options"]


def speech_regions(audio: Any, sampling_rate: int = 16000, **parameters: Any) -> list[dict[str, float]]:
    """The spans of `audio` that hold speech, [{"start": s, "end": s}]: `lightpipe.vad.speech_regions`."""
    from .errors import InvalidInput
    from .vad import SPEECH_REGION_DEFAULTS, speech_regions as regions

    unknown = sorted(set(parameters) - set(SPEECH_REGION_DEFAULTS))
    if unknown:
        raise InvalidInput(f"speech_regions got unknown parameter{'s' if len(unknown) > 1 else ''} "
                           f"{', '.join(unknown)}; the accepted ones are {', '.join(SPEECH_REGION_DEFAULTS)}.")
    return regions(audio, sampling_rate, **parameters)


def speech_probabilities(audio: Any, sampling_rate: int = 16000):
    """Per-32-ms-window speech probabilities and the window length: `lightpipe.vad.speech_probabilities`."""
    from .vad import speech_probabilities as probabilities

    return probabilities(audio, sampling_rate)


def vad_options(vad_parameters: Any = None) -> dict[str, Any]:
    """A `vad_parameters` dict checked and completed with the Whisper VAD defaults: `lightpipe.vad.vad_options`."""
    from .vad import vad_options as options

    return options(vad_parameters)

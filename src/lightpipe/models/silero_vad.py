"""Silero VAD (v5/v6): a speech probability for every 32 ms window of 16 kHz (or 8 kHz) audio.

The network, for 16 kHz (8 kHz halves every length: 256-sample windows, 32 of context, a 128-tap STFT):

    window (B, 64 + 512)         the 512 new samples, after the last 64 samples of the previous window
    -> reflect pad 64 on the right, STFT as a conv1d with the stored basis (256 taps, hop 128: 4 frames)
    -> magnitude sqrt(re^2 + im^2)                                     (B, 129, 4)
    -> conv 129->128 k3 s1, relu -> conv 128->64 k3 s2, relu
    -> conv 64->64 k3 s2, relu   -> conv 64->128 k3 s1, relu            (B, 128, 1)
    -> LSTM cell 128 (state carried from window to window)
    -> relu -> conv 128->1 k1 -> sigmoid                                (B,) speech probability

Everything before the LSTM sees one window alone, so `encode` runs it on every window of a signal at
once; the LSTM is sequential over windows and runs as one `torch.lstm` call over the whole sequence
(an LSTM cell's weights are those of a one-layer LSTM).

Weights. The `silero-vad` package (MIT) ships its current network (v6) as TorchScript, `silero_vad.jit`,
holding both the 16 kHz and the 8 kHz networks; that is the model its `load_silero_vad()` and
`get_speech_timestamps` use. `load()` takes only the tensors of that file (torch.jit.load, then
state_dict(); the scripted model is never called) and builds this module around them. The package's
`silero_vad_16k.safetensors` holds an older 16 kHz network (its tensors differ from the TorchScript
one's), so it is the fallback only when the TorchScript file is missing; `from_file` reads either format.

`load(rate)` keeps one model per rate per process (built once under a lock; inference keeps no state in
the module, so threads share it).
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import CheckpointError, MissingDependency

HIDDEN = 128
TORCHSCRIPT_FILE = "silero_vad.jit"
SAFETENSORS_FILE = "silero_vad_16k.safetensors"
INSTALL_HINT = "pip install 'lightpipe[vad]'"

# Windows encoded per block: bounds the memory of the batched encoder on long audio (4096 windows ~ 2 min).
ENCODE_BLOCK = 4096


@dataclasses.dataclass(frozen=True)
class VadShape:
    """The lengths of one rate's network, in samples."""

    sampling_rate: int
    window: int  # new samples per window (32 ms)
    context: int  # samples of the previous window put before each window (4 ms)
    n_fft: int  # STFT taps; hop = n_fft // 2, right reflect padding = context

    @property
    def n_bins(self) -> int:
        return self.n_fft // 2 + 1


SHAPES = {16000: VadShape(16000, 512, 64, 256), 8000: VadShape(8000, 256, 32, 128)}


class SileroVAD(nn.Module):
    """One rate's Silero VAD network. Parameter names are those of the package's safetensors file."""

    def __init__(self, sampling_rate: int = 16000):
        super().__init__()
        self.shape = s = SHAPES[sampling_rate]
        self.register_buffer("stft_basis", torch.zeros(2 * s.n_bins, 1, s.n_fft), persistent=False)
        self.conv1 = nn.Conv1d(s.n_bins, 128, 3, padding=1)
        self.conv2 = nn.Conv1d(128, 64, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, 3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(64, HIDDEN, 3, padding=1)
        self.lstm = nn.LSTM(HIDDEN, HIDDEN, batch_first=True)
        self.final_conv = nn.Conv1d(HIDDEN, 1, 1)

    @property
    def sampling_rate(self) -> int:
        return self.shape.sampling_rate

    # -- one window alone ------------------------------------------------------------------------

    def encode(self, windows: torch.Tensor) -> torch.Tensor:
        """(N, context + window) samples -> (N, HIDDEN) features, every window independently."""
        s = self.shape
        x = F.pad(windows.unsqueeze(1), (0, s.context), mode="reflect")
        spec = F.conv1d(x, self.stft_basis, stride=s.n_fft // 2)  # (N, 2 * bins, 4): real parts, then imaginary
        x = torch.sqrt(spec[:, :s.n_bins] ** 2 + spec[:, s.n_bins:] ** 2)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))  # (N, 128, 1)
        return x.squeeze(-1)

    # -- windows in order --------------------------------------------------------------------------

    def decode(self, features: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(B, T, HIDDEN) features of T consecutive windows -> ((B, T) probabilities, (h, c) after the last).

        state: (h, c), each (1, B, HIDDEN), from the windows before; None starts from zeros.
        """
        hidden, state = self.lstm(features, state)
        logits = self.final_conv(F.relu(hidden).transpose(1, 2))  # (B, 1, T)
        return torch.sigmoid(logits[:, 0]), state

    def forward(self, windows: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(B, T, context + window) windows -> ((B, T) probabilities, state): encode all, then the LSTM."""
        b, t, n = windows.shape
        features = self.encode(windows.reshape(b * t, n)).reshape(b, t, HIDDEN)
        return self.decode(features, state)

    # -- a whole signal ----------------------------------------------------------------------------

    @torch.inference_mode()
    def speech_probabilities(self, audio: torch.Tensor) -> torch.Tensor:
        """(samples,) or (B, samples) float audio at this network's rate -> (n_windows,) or (B, n_windows).

        Window i covers samples [window * i, window * (i + 1)); the last is zero-padded and the first gets
        zeros for context, as the reference's get_speech_timestamps frames a signal. Batched signals are
        zero-padded at the end to the longest (the LSTM is causal: a signal's own windows are unaffected).
        """
        s = self.shape
        single = audio.dim() == 1
        audio = audio.reshape(1, -1) if single else audio
        audio = audio.to(device=self.stft_basis.device, dtype=self.stft_basis.dtype)
        n_windows = -(-audio.shape[1] // s.window)
        padded = F.pad(audio, (s.context, n_windows * s.window - audio.shape[1]))
        windows = padded.unfold(1, s.context + s.window, s.window)  # (B, n_windows, context + window), a view
        out, state = [], None
        for start in range(0, n_windows, ENCODE_BLOCK):
            probs, state = self(windows[:, start:start + ENCODE_BLOCK], state)
            out.append(probs)
        probs = torch.cat(out, dim=1) if out else audio.new_zeros(audio.shape[0], 0)
        return probs[0] if single else probs


# -------------------------------------------------------------------------------------------------
# Weights
# -------------------------------------------------------------------------------------------------

# TorchScript names (after the "_model." / "_model_8k." prefix) -> the safetensors file's names.
_TORCHSCRIPT_NAMES = {
    "stft.forward_basis_buffer": "stft_conv.weight",
    "encoder.0.reparam_conv": "conv1", "encoder.1.reparam_conv": "conv2",
    "encoder.2.reparam_conv": "conv3", "encoder.3.reparam_conv": "conv4",
    "decoder.rnn": "lstm_cell", "decoder.decoder.2": "final_conv",
}
_PREFIXES = {16000: "_model.", 8000: "_model_8k."}


def from_torchscript_state(state: dict[str, torch.Tensor], sampling_rate: int) -> dict[str, torch.Tensor]:
    """The TorchScript file's tensors of one rate's network, under the safetensors file's names."""
    prefix, out = _PREFIXES[sampling_rate], {}
    for name, tensor in state.items():
        if not name.startswith(prefix):
            continue
        name = name[len(prefix):]
        for old, new in _TORCHSCRIPT_NAMES.items():
            if name == old or name.startswith(old + "."):
                out[new + name[len(old):]] = tensor
                break
    return out


def sanitize(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The safetensors file's names -> this module's: the LSTM cell is layer 0 of an LSTM, the basis a buffer."""
    out = {}
    for name, tensor in state.items():
        if name.startswith("lstm_cell."):
            name = "lstm." + name[len("lstm_cell."):] + "_l0"
        elif name == "stft_conv.weight":
            name = "stft_basis"
        out[name] = tensor
    return out


def build(state: dict[str, torch.Tensor], sampling_rate: int = 16000, *, source: str = "the weights") -> SileroVAD:
    """A SileroVAD (eval mode, CPU) from tensors under the safetensors file's names."""
    model = SileroVAD(sampling_rate)
    state = sanitize(state)
    basis = state.pop("stft_basis", None)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if basis is None or missing or unexpected:
            raise CheckpointError(
                f"{source} are not a {sampling_rate} Hz Silero VAD network: missing "
                f"{missing + (['stft_conv.weight'] if basis is None else [])}, unexpected {unexpected}.")
        model.stft_basis.copy_(basis)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise CheckpointError(f"cannot load {source} as a {sampling_rate} Hz Silero VAD network: {e}") from e
    return model.eval().requires_grad_(False)


def from_file(path: str | Path, sampling_rate: int = 16000) -> SileroVAD:
    """A SileroVAD from the package's TorchScript file (16 or 8 kHz) or a 16 kHz safetensors file."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            if sampling_rate != 16000:
                raise CheckpointError(f"{path} holds the 16 kHz network only, not the {sampling_rate} Hz one.")
            state = load_file(str(path))
        else:
            with warnings.catch_warnings():  # torch.jit.load is deprecated in favour of torch.export (not for reading)
                warnings.simplefilter("ignore", DeprecationWarning)
                scripted = torch.jit.load(str(path), map_location="cpu")
            state = from_torchscript_state(scripted.state_dict(), sampling_rate)
    except (RuntimeError, OSError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"cannot read Silero VAD weights from {path}: {e}") from e
    return build(state, sampling_rate, source=f"the tensors of {path}")


def weights_path() -> Path:
    """The installed `silero-vad` package's TorchScript file, or its safetensors file when that is all it has."""
    # The package is found, not imported: importing `silero_vad` runs torch.set_num_threads(1) for the whole process.
    from importlib.util import find_spec

    spec = find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency(f"voice activity detection needs the `silero-vad` package: {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        for name in (TORCHSCRIPT_FILE, SAFETENSORS_FILE):
            path = Path(location) / "data" / name
            if path.is_file():
                return path
    raise CheckpointError(f"the installed silero-vad package has neither {TORCHSCRIPT_FILE} nor {SAFETENSORS_FILE} "
                          f"(version 5 or later has them): {INSTALL_HINT}")


def native_rates() -> tuple[int, ...]:
    """The rates the installed weights have a network for: (16000, 8000), or (16000,) from safetensors alone."""
    return (16000,) if weights_path().suffix == ".safetensors" else (16000, 8000)


_models: dict[int, SileroVAD] = {}
_lock = threading.Lock()


def load(sampling_rate: int = 16000) -> SileroVAD:
    """The process's Silero VAD network for 16000 or 8000 Hz, loaded on first use (thread-safe)."""
    model = _models.get(sampling_rate)
    if model is None:
        with _lock:
            model = _models.get(sampling_rate)
            if model is None:
                model = _models[sampling_rate] = from_file(weights_path(), sampling_rate)
    return model

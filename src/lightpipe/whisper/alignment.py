"""Word timing: which audio frame each generated token was heard at, from the decoder's cross-attention.

Whisper's alignment heads (generation_config.json's `alignment_heads`: [layer, head] pairs) attend to the audio
frame being transcribed. Their attention rows over the generated tokens, normalised and smoothed, are aligned with
the frames by dynamic time warping (`dtw`); a token's time is the first frame of its row on the path.

The weights come from the decoding itself: `AlignmentRecorder` wraps the model for `generate()` and keeps the
alignment heads' cross-attention of every decode step (the model's `decode_step(..., alignment_heads=)`), so
generation/ needs to know nothing about it. `recorded_weights` lines the steps up along each returned sequence
(with beam search, along the beams each token came from).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import InvalidInput

TIME_PRECISION = 0.02  # seconds per encoder position: a 30 s window over 1500 positions
MEDIAN_FILTER_WIDTH = 7  # frames; Whisper's default smoothing of cross-attention before DTW


class AlignmentRecorder:
    """A Whisper model as `generate()` sees it (the decoding contract), keeping the cross-attention probabilities of
    the alignment heads at every decode step.

    Each `new_cache` starts a new recording: the steps kept are those of the decoding that cache belongs to.
    """

    def __init__(self, model, alignment_heads: Sequence[Sequence[int]]):
        config = model.config
        heads = [(int(layer), int(head)) for layer, head in alignment_heads]
        for layer, head in heads:
            if not (0 <= layer < config.decoder_layers and 0 <= head < config.decoder_attention_heads):
                raise InvalidInput(f"alignment head ({layer}, {head}) does not exist in a decoder of "
                                   f"{config.decoder_layers} layers with {config.decoder_attention_heads} heads; "
                                   "check alignment_heads in generation_config.json.")
        if not heads:
            raise InvalidInput("word timestamps need at least one alignment head (alignment_heads in "
                               "generation_config.json).")
        self.model = model
        self.alignment_heads = heads
        self.steps: list[torch.Tensor] = []  # per decode step, (rows, len(heads), t, S)

    @property
    def config(self):
        return self.model.config

    @property
    def max_positions(self) -> int:
        return self.model.max_positions

    def parameters(self, *args, **kwargs):
        return self.model.parameters(*args, **kwargs)

    def new_cache(self, rows: int, max_length: int, *, encoder_hidden=None, static: bool = False):
        self.steps = []
        return self.model.new_cache(rows, max_length, encoder_hidden=encoder_hidden, static=static)

    def decode_step(self, tokens: torch.Tensor, cache, *, last_only: bool = False) -> torch.Tensor:
        logits, weights = self.model.decode_step(tokens, cache, alignment_heads=self.alignment_heads,
                                                 last_only=last_only)
        self.steps.append(weights)
        return logits


def recorded_weights(steps: Sequence[torch.Tensor], beam_indices: torch.Tensor | None) -> torch.Tensor:
    """Per-step (rows, h, t, S) weights of one decoding -> (N, h, T - 1, S) along each returned sequence: every
    decoder input position (the prompt, then each generated token but the last, which is never fed back).

    Without beams the rows are the sequences. With beam search, step s ran the row beam_indices[:, s] for the
    sequence's token s, and the prompt positions come from the first step; past a sequence's end the index is -1
    and row 0 stands in (those positions are not part of it)."""
    if beam_indices is None:
        return torch.cat(list(steps), dim=2)
    rows = beam_indices.clamp(min=0)
    return torch.cat([steps[s].index_select(0, rows[:, s]) for s in range(beam_indices.shape[1])], dim=2)


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cheapest monotonic path through cost (tokens, frames) -> (token index, frame index) per step.

    Steps go diagonally, down (next token, same frame) or right (same token, next frame). When neither
    the diagonal nor the down step is strictly cheapest the path goes right, even where right costs
    more (diagonal == down < right): the reference does so, and equal paths need equal tie rules.
    Costs accumulate in float32 as in the reference.
    Cells on one anti-diagonal do not depend on each other: each diagonal is filled at once."""
    cost = np.asarray(cost, dtype=np.float64)
    n, m = cost.shape
    total = np.full((n + 1, m + 1), np.inf, dtype=np.float32)
    trace = np.full((n + 1, m + 1), -1, dtype=np.int8)
    total[0, 0] = 0
    for d in range(2, n + m + 1):  # d = i + j over the (n+1, m+1) grid, cells with i, j >= 1
        i = np.arange(max(1, d - m), min(n, d - 1) + 1)
        j = d - i
        diag, down, right = total[i - 1, j - 1], total[i - 1, j], total[i, j - 1]
        take_diag = (diag < down) & (diag < right)
        take_down = ~take_diag & (down < diag) & (down < right)
        step = np.where(take_diag, 0, np.where(take_down, 1, 2))
        best = np.where(take_diag, diag, np.where(take_down, down, right))
        total[i, j] = cost[i - 1, j - 1] + best.astype(np.float64)
        trace[i, j] = step
    trace[0, :] = 2  # along the top edge only "right" is possible, along the left edge only "down"
    trace[:, 0] = 1
    i, j = n, m
    tokens, frames = [], []
    while i > 0 or j > 0:
        tokens.append(i - 1)
        frames.append(j - 1)
        step = trace[i, j]
        if step == 0:
            i, j = i - 1, j - 1
        elif step == 1:
            i -= 1
        else:
            j -= 1
    return np.array(tokens[::-1]), np.array(frames[::-1])


def median_filter(x: torch.Tensor, width: int) -> torch.Tensor:
    """Median over a sliding window of odd `width` along the last axis, edges reflected."""
    if width <= 0 or width % 2 != 1:
        raise InvalidInput(f"the median filter width must be a positive odd number, not {width}.")
    half = width // 2
    if x.shape[-1] <= half:  # too short to reflect: left as is
        return x
    shape = x.shape
    flat = x.reshape(-1, 1, shape[-1])  # reflect padding wants (N, C, L)
    padded = torch.nn.functional.pad(flat, (half, half), mode="reflect")
    return padded.unfold(-1, width, 1).sort(dim=-1).values[..., half].reshape(shape)


def alignment_weights(cross_attentions: Sequence[torch.Tensor], alignment_heads: Sequence[Sequence[int]]) -> torch.Tensor:
    """Per decoder layer (B, heads, T, frames) cross-attention -> (B, len(alignment_heads), T, frames),
    the heads that follow the audio (generation_config.json's alignment_heads: [layer, head] pairs)."""
    return torch.stack([cross_attentions[layer][:, head] for layer, head in alignment_heads], dim=1)


def token_timestamps(weights: torch.Tensor, *, num_input_ids: int, time_precision: float = TIME_PRECISION,
                     num_frames: int | Sequence[int] | torch.Tensor | None = None,
                     median_filter_width: int = MEDIAN_FILTER_WIDTH) -> torch.Tensor:
    """Cross-attention of the alignment heads -> the time in seconds at which each token starts.

    weights: (B, heads, R, frames) or (heads, R, frames): the attention rows of the R tokens fed to the
        decoder (the `num_input_ids` prompt tokens, then each generated token but the last), over the
        encoder's frames (1500 for 30 s).
    num_frames: mel frames of real audio (one int, or one per sequence); attention beyond
        num_frames // 2 encoder frames is padding and is cut off. Given per sequence, the attention is cut
        twice, once for the batch (when all counts agree) and once per sequence, as the reference does: the
        same cut for a count >= 0, but a negative count (a window that starts past the audio's end) cuts
        from the end each time, and a cut that leaves nothing puts every token one step before the window.
    Returns (B, R + 1) or (R + 1,) float32: 0 for the prompt tokens, the DTW time of each generated
    token, and the last generated token (no attention row of its own) repeats the time before it.
    Rows are normalised per head over tokens, smoothed by a median over frames, averaged over heads,
    then aligned by `dtw` of their negation; a token's time is the frame where its path row starts.
    Equals transformers' WhisperGenerationMixin._extract_token_timestamps without beam indices."""
    single = weights.dim() == 3
    if single:
        weights = weights.unsqueeze(0)
    if weights.dim() != 4:
        raise InvalidInput(f"weights must have shape (B, heads, tokens, frames), not {tuple(weights.shape)}.")
    batch, rows = weights.shape[0], weights.shape[2]
    times = torch.zeros(batch, rows + 1, dtype=torch.float32)
    frames_each = None  # audio frames per sequence, when given as a sequence
    if isinstance(num_frames, int):
        weights = weights[..., : num_frames // 2]  # two mel frames per encoder frame
    elif num_frames is not None:
        frames_each = [int(f) for f in (num_frames.tolist() if isinstance(num_frames, torch.Tensor) else num_frames)]
        if len(set(frames_each)) == 1:
            weights = weights[..., : frames_each[0] // 2]
        # with several sequences per audio (num_return_sequences), each audio's count repeats
        frames_each = [f for f in frames_each for _ in range(max(1, batch // len(frames_each)))]
    weights = weights[:, :, num_input_ids:]  # the prompt is not aligned: its tokens are at 0 s
    if weights.shape[2] == 0:  # one generated token: nothing to align
        return times[0] if single else times
    if frames_each is None:
        weights = _normalise_and_smooth(weights, median_filter_width).mean(dim=1)  # (B, tokens, frames)
    for b in range(batch):
        if frames_each is None:
            matrix = weights[b]
        else:  # each sequence cut to its own audio, then normalised alone
            matrix = _normalise_and_smooth(weights[b, ..., : frames_each[b] // 2], median_filter_width).mean(dim=0)
        token_index, frame_index = dtw(-matrix.cpu().double().numpy())
        starts = np.diff(token_index, prepend=-1).astype(bool)  # first step on each token's row
        start_times = frame_index[starts] * time_precision
        times[b] = torch.from_numpy(np.concatenate([np.zeros(num_input_ids), start_times, start_times[-1:]]))
    return times[0] if single else times


def _normalise_and_smooth(matrix: torch.Tensor, width: int) -> torch.Tensor:
    """(..., heads, tokens, frames): each head standardised over tokens, then median-filtered over frames."""
    if matrix.shape[-1] == 0:  # cut to no frames at all: nothing to normalise (torch would warn about it)
        return matrix
    std = torch.std(matrix, dim=-2, keepdim=True, unbiased=False)
    mean = torch.mean(matrix, dim=-2, keepdim=True)
    return median_filter((matrix - mean) / std, width)

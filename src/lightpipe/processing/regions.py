"""Speech regions packed into model windows, and times mapped back from a window to the original audio.

Voice activity detection gives the stretches of an audio that hold speech. Decoding only those is the robust way to
transcribe real recordings (silence, noise and music make Whisper invent text), and the fast one: the regions are
concatenated, the silence between them dropped, and cut into windows of at most `max_samples` (30 s for Whisper),
each window holding whole regions where they fit (faster-whisper's `collect_chunks`, WhisperX's `merge_chunks`). The
windows are independent model items, so they are decoded in batches.

A window's timeline is the concatenation of its pieces; `PackedWindow.to_original` maps a time on it (a segment's
or a word's start or end, in seconds from the window's start) back to the original audio, piece by piece, so that
every timestamp lands inside the speech it was heard in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Piece:
    """One stretch of the original audio inside a packed window, in samples: it starts `offset` samples into the
    window and `start` samples into the original audio, and runs for `length` samples."""

    offset: int
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclasses.dataclass(frozen=True)
class PackedWindow:
    """A model window made of pieces of the original audio, back to back. No pieces: an audio without speech,
    which is one model item that decodes to nothing."""

    pieces: tuple[Piece, ...]

    @property
    def samples(self) -> int:
        return sum(p.length for p in self.pieces)

    @property
    def start(self) -> int:
        """The first original sample the window holds (0 without pieces)."""
        return self.pieces[0].start if self.pieces else 0

    @property
    def end(self) -> int:
        """One past the last original sample the window holds (0 without pieces)."""
        return self.pieces[-1].end if self.pieces else 0

    def gather(self, audio: np.ndarray) -> np.ndarray:
        """The window's samples: its pieces of `audio` (1-D) concatenated."""
        if not self.pieces:
            return audio[:0]
        return np.concatenate([audio[p.start: p.end] for p in self.pieces])

    def to_original(self, seconds: float, rate: int, is_end: bool = False) -> float:
        """A time on the window's timeline (seconds from its start) -> seconds from the original audio's start.

        A time on the border of two pieces belongs to the piece it starts (`is_end=False`) or ends (`is_end=True`);
        a time past the window's audio (Whisper pads windows to 30 s) is clamped to its end."""
        if not self.pieces:
            return 0.0
        sample = max(0.0, float(seconds) * rate)
        chosen = self.pieces[-1]
        for piece in self.pieces:
            piece_end = piece.offset + piece.length
            if sample < piece_end or (is_end and sample == piece_end):
                chosen = piece
                break
        within = min(max(sample - chosen.offset, 0.0), chosen.length)
        return round((chosen.start + within) / rate, 3)


    def segment_to_original(self, start: float, end: float, rate: int,
                            snap: float = 2.0) -> tuple[float, float]:
        """A segment (start, end) on the window's timeline -> on the original audio's.

        Two regions are back to back in the window, so a model cannot hear the pause between them, and it often puts
        the border of two sentences a little before or after the border of their regions (Whisper's segments follow
        each other without gaps, so a sentence often starts where the one before ended, in the padding at the end
        of the region before). A segment that crosses a border at its start (or end) by less than `snap` seconds,
        and by less than what lies on the other side, is moved to begin (or end) there, in the region that holds
        the rest of it."""
        for border in (p.offset / rate for p in self.pieces[1:]):
            if not start < border < end:
                continue
            before, after = border - start, end - border
            if before < after and before < snap:
                start = border
            elif after < before and after < snap:
                end = border
        return self.to_original(start, rate), self.to_original(end, rate, is_end=True)


    def word_to_original(self, start: float, end: float, rate: int) -> tuple[float, float]:
        """A word (start, end) on the window's timeline -> on the original audio's: a word that crosses the border of
        two regions is put in the one that holds the most of it."""
        for border in (p.offset / rate for p in self.pieces[1:]):
            if start < border < end:
                if border - start >= end - border:
                    end = border
                else:
                    start = border
        return self.to_original(start, rate), self.to_original(end, rate, is_end=True)


def merge_regions(regions: Iterable[tuple[int, int]], total: int) -> list[tuple[int, int]]:
    """(start, end) sample ranges -> sorted, clipped to [0, total), empty ones dropped, overlapping ones merged."""
    merged: list[list[int]] = []
    for start, end in sorted((max(0, int(s)), min(total, int(e))) for s, e in regions):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def pack_regions(regions: Sequence[tuple[int, int]], max_samples: int, total: int | None = None) -> list[PackedWindow]:
    """Speech regions (start, end) in samples -> windows of at most `max_samples`, in order.

    Regions are taken in order and added to the current window while it has room; a region that does not fit
    starts the next window, and one longer than a window is cut into window-long pieces. `total` (the audio's
    length) clips the regions."""
    if max_samples < 1:
        raise ValueError(f"max_samples must be positive, not {max_samples}")
    regions = merge_regions(regions, total if total is not None else max((e for _, e in regions), default=0))
    windows: list[PackedWindow] = []
    current: list[Piece] = []
    filled = 0
    for start, end in regions:
        while start < end:
            length = min(end - start, max_samples)
            if filled + length > max_samples:
                windows.append(PackedWindow(tuple(current)))
                current, filled = [], 0
            current.append(Piece(filled, start, length))
            filled += length
            start += length
    if current:
        windows.append(PackedWindow(tuple(current)))
    return windows

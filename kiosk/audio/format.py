"""The internal audio format and the pure helpers around it.

One format inside the kiosk: 16 kHz, mono, signed 16-bit, 10 ms frames of 160 samples. Devices and
files at other rates or block sizes are converted at the edge with the helpers here: ``Rechunker``
turns arbitrary blocks into exact frames (preallocated, no allocation per block), ``to_float`` /
``to_int16`` convert sample formats, and ``resample`` converts whole recordings (offline only).
"""

from __future__ import annotations

import logging
from math import gcd
from typing import Any

import numpy as np
import numpy.typing as npt

_LOGGER = logging.getLogger(__name__)

RATE_HZ = 16000
FRAME_MS = 10
FRAME_SAMPLES = RATE_HZ * FRAME_MS // 1000  # 160
FRAME_BYTES = FRAME_SAMPLES * 2

Pcm = npt.NDArray[np.int16]
Float = npt.NDArray[np.float32]

_INT16_SCALE = 32768.0


def to_float(pcm: Pcm) -> Float:
    """int16 samples to float32 in [-1, 1)."""
    return pcm.astype(np.float32) * np.float32(1.0 / _INT16_SCALE)


def to_int16(audio: npt.NDArray[Any], out: Pcm | None = None) -> Pcm:
    """Float samples in [-1, 1] to int16, rounded and clipped (written into ``out`` if given)."""
    if out is None:
        out = np.empty(audio.shape, dtype=np.int16)
    scaled = np.multiply(audio, _INT16_SCALE)
    np.rint(scaled, out=scaled)
    np.clip(scaled, -32768, 32767, out=scaled)
    out[...] = scaled
    return out


def resample(audio: Float, rate_hz: int, target_hz: int = RATE_HZ) -> Float:
    """Resample a whole recording with a polyphase filter (offline use: it allocates)."""
    if rate_hz <= 0 or target_hz <= 0:
        raise ValueError(f"sample rates must be positive, got {rate_hz} -> {target_hz}")
    if rate_hz == target_hz:
        return np.asarray(audio, dtype=np.float32)
    from scipy.signal import resample_poly

    g = gcd(rate_hz, target_hz)
    return np.asarray(resample_poly(audio, target_hz // g, rate_hz // g), dtype=np.float32)


def frames(audio: Pcm, frame_samples: int = FRAME_SAMPLES) -> npt.NDArray[np.int16]:
    """A recording cut into whole frames, shape (n, frame_samples); a partial last frame is zero-filled.

    Zero-fill: the tail is shorter than one frame; silence keeps the frame count honest for offline files.
    """
    count = -(-len(audio) // frame_samples)
    padded = np.zeros(count * frame_samples, dtype=np.int16)
    padded[: len(audio)] = audio
    return padded.reshape(count, frame_samples)


class Rechunker:
    """Arbitrary blocks in, exact fixed-size frames out; pure and preallocated.

    ``push(block)`` stores samples; ``pop()`` returns the next full frame (a view into a reused buffer,
    valid until the next ``pop``) or ``None``. Capacity is bounded: if more than ``capacity_samples``
    are waiting, the oldest are dropped and counted in ``dropped_samples``.
    """

    def __init__(self, frame_samples: int = FRAME_SAMPLES, capacity_samples: int = 16 * FRAME_SAMPLES,
                 dtype: npt.DTypeLike = np.int16) -> None:
        if frame_samples <= 0 or capacity_samples < frame_samples:
            raise ValueError("need frame_samples > 0 and capacity_samples >= frame_samples")
        self.frame_samples = frame_samples
        self._buffer: npt.NDArray[np.generic] = np.zeros(capacity_samples, dtype=dtype)
        self._frame: npt.NDArray[np.generic] = np.zeros(frame_samples, dtype=dtype)
        self._start = 0
        self._count = 0
        self.dropped_samples = 0

    @property
    def pending_samples(self) -> int:
        """Samples stored and not yet returned."""
        return self._count

    def push(self, block: npt.NDArray[np.generic]) -> None:
        """Append samples; the oldest drop if the buffer would overflow (counted, never raised)."""
        capacity = len(self._buffer)
        n = len(block)
        if n >= capacity:
            # Drop-oldest: a block larger than the whole buffer keeps only its newest part.
            self.dropped_samples += self._count + n - capacity
            block = block[n - capacity:]
            n = capacity
            self._start = 0
            self._count = 0
        overflow = self._count + n - capacity
        if overflow > 0:
            # Drop-oldest: the consumer fell behind; the newest audio matters more than the oldest.
            self.dropped_samples += overflow
            self._start = (self._start + overflow) % capacity
            self._count -= overflow
        end = (self._start + self._count) % capacity
        first = min(n, capacity - end)
        self._buffer[end:end + first] = block[:first]
        if first < n:
            self._buffer[: n - first] = block[first:]
        self._count += n

    def pop(self) -> npt.NDArray[np.generic] | None:
        """The next full frame (a reused buffer), or None if fewer than one frame is stored."""
        size = self.frame_samples
        if self._count < size:
            return None
        capacity = len(self._buffer)
        first = min(size, capacity - self._start)
        self._frame[:first] = self._buffer[self._start:self._start + first]
        if first < size:
            self._frame[first:] = self._buffer[: size - first]
        self._start = (self._start + size) % capacity
        self._count -= size
        return self._frame

    def clear(self) -> None:
        """Forget stored samples (device restart, route change)."""
        self._start = 0
        self._count = 0

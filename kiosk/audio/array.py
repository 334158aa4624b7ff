"""Microphone-array front end: a fixed beamformer toward the visitor's side, before the echo canceller.

A USB array (ReSpeaker-style: four microphones on a 32 mm circle) captures every channel; with
``audio.channel = "beam"`` the ``FixedBeamformer`` turns them into the chain's one channel with a
filter-and-sum beamformer whose filters are designed once, when the device opens, for a look direction (the
kiosk's front, where a visitor stands): superdirective (MVDR against a diffuse noise field) with diagonal
loading, so that the white-noise gain stays bounded at low frequencies where a 64 mm aperture cannot be
directive. The filters are fixed, so the echo path through them is as linear and time-invariant as a single
microphone's, and one echo canceller after the beamformer suffices (per-channel cancellation would cost one
canceller per microphone, and measured worse: docs/aec.md, "Rooms it was never tuned on").

It runs at the device's rate on the interleaved capture blocks (``kiosk.audio.io``), before the resampler and
the rechunker, on blocks of any length. Per block the work is, per channel, a copy of a (samples x taps)
sliding window of a preallocated history into a preallocated matrix and one matrix-vector product: nothing
is allocated per block (a plain ``np.dot`` on the strided window would copy it into a new array each time).

Geometry (``ArrayGeometry``, from ``audio.array_*``): ``array_channels`` microphones evenly on a circle of
``array_radius_mm``, the first at half a spacing counter-clockwise from the kiosk's front axis (for four
microphones: 45, 135, 225 and 315 degrees, the corners of a square), read from consecutive capture channels
starting at ``array_first_channel``; the beam looks toward ``beam_azimuth_deg`` (0: straight ahead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from kiosk.audio.format import FRAME_SAMPLES, RATE_HZ, Pcm

if TYPE_CHECKING:
    from kiosk.settings import AudioSettings

C_SOUND_M_PER_S = 343.0
DEFAULT_TAPS_16K = 64  # 4 ms of filter at 16 kHz; other rates get the same duration
DEFAULT_LOADING = 0.05


def circular_array(channels: int = 4, radius_m: float = 0.032) -> npt.NDArray[np.float64]:
    """Microphone positions (M, 3) in metres: evenly on a circle, x along the kiosk's front axis.

    Microphone k sits at ``(k + 0.5) * 360 / M`` degrees (counter-clockwise seen from above).
    """
    angles = np.radians((np.arange(channels) + 0.5) * 360.0 / channels)
    return np.stack([radius_m * np.cos(angles), radius_m * np.sin(angles), np.zeros(channels)], axis=1)


def steering_delays(mics: npt.NDArray[np.float64], azimuth_deg: float, elevation_deg: float = 0.0
                    ) -> npt.NDArray[np.float64]:
    """Arrival time of a plane wave from (azimuth, elevation) at each microphone, relative to the centre (s)."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    u = np.array([math.cos(az) * math.cos(el), math.sin(az) * math.cos(el), math.sin(el)])
    centred = mics - mics.mean(axis=0)
    delays: npt.NDArray[np.float64] = -(centred @ u) / C_SOUND_M_PER_S
    return delays


def taps_for(rate_hz: int) -> int:
    """Filter length at ``rate_hz`` for the same duration as 64 taps at 16 kHz (even)."""
    return max(8, 2 * round(DEFAULT_TAPS_16K * rate_hz / RATE_HZ / 2))


def design_superdirective(mics: npt.NDArray[np.float64], azimuth_deg: float, *, elevation_deg: float = 0.0,
                          taps: int = DEFAULT_TAPS_16K, loading: float = DEFAULT_LOADING, rate_hz: int = RATE_HZ
                          ) -> npt.NDArray[np.float64]:
    """FIR filters (M, taps) of a superdirective beamformer (diffuse-noise MVDR, loaded) toward a direction.

    ``loading`` is added to the diffuse coherence matrix's diagonal: 0 is the fully superdirective (and
    noise-sensitive) design, large values tend to delay-and-sum. The filters have a bulk latency of
    ``taps // 2`` samples.
    """
    m = len(mics)
    n_fft = 4 * taps
    freqs = np.fft.rfftfreq(n_fft, 1.0 / rate_hz)
    tau = steering_delays(mics, azimuth_deg, elevation_deg)
    dist = np.linalg.norm(mics[:, None, :] - mics[None, :, :], axis=2)
    weights = np.zeros((m, len(freqs)), dtype=np.complex128)
    eye = np.eye(m)
    for i, f in enumerate(freqs):
        gamma = np.sinc(2.0 * f * dist / C_SOUND_M_PER_S) + loading * eye
        d = np.exp(-2j * np.pi * f * tau)
        g = np.linalg.solve(gamma, d)
        weights[:, i] = g / np.vdot(d, g)
    # y(f) = sum_m conj(w_m) x_m(f); the impulse response of conj(w_m), centred and windowed.
    h = np.fft.irfft(np.conj(weights), n_fft, axis=1)
    filters: npt.NDArray[np.float64] = (np.roll(h, taps // 2, axis=1)[:, :taps]
                                        * np.hanning(taps + 2)[1:-1][None, :])
    return filters


class FixedBeamformer:
    """Filter-and-sum of M channels with fixed FIR filters, streaming, on blocks of any length.

    ``process(channels)`` takes an (M, n) int16 array with n up to ``max_block_samples`` (any strides: a
    transposed view of an interleaved capture block will do) and returns the beam's n samples as int16 (a
    reused buffer, valid until the next call). Inside, blocks go through ``chunk_samples`` at a time.
    """

    def __init__(self, filters: npt.NDArray[np.float64], max_block_samples: int = FRAME_SAMPLES,
                 chunk_samples: int | None = None) -> None:
        if filters.ndim != 2 or filters.shape[1] < 2 or max_block_samples <= 0:
            raise ValueError("filters must be (channels, taps >= 2) and max_block_samples positive")
        self.channels, self.taps = (int(n) for n in filters.shape)
        self.max_block_samples = max_block_samples
        # Blocks go through in pieces of at most this many samples (bounds the window matrix's size).
        self.chunk_samples = min(max_block_samples, FRAME_SAMPLES if chunk_samples is None else chunk_samples)
        keep = self.taps - 1
        self._keep = keep
        # Reversed filters, so that a sliding window dotted with them is a convolution.
        self._h = np.ascontiguousarray(filters[:, ::-1], dtype=np.float32)
        # History: the last ``keep`` samples of every channel, then room for the new block. When a block would
        # run past the end, the newest ``keep`` samples move back to the start (never overlapping: the buffer
        # holds at least twice ``keep`` before the block).
        chunk = self.chunk_samples
        self._capacity = 2 * keep + chunk
        self._hist = np.zeros((self.channels, self._capacity), dtype=np.float32)
        self._pos = keep  # where the next sample goes
        stride = self._hist.strides[1]
        windows = self._capacity - self.taps + 1
        self._views = [np.lib.stride_tricks.as_strided(self._hist[c], shape=(windows, self.taps),
                                                       strides=(stride, stride), writeable=False)
                       for c in range(self.channels)]
        self._matrix = np.zeros((chunk, self.taps), dtype=np.float32)
        self._acc = np.zeros(chunk, dtype=np.float32)
        self._tmp = np.zeros(chunk, dtype=np.float32)
        self._out: Pcm = np.zeros(max_block_samples, dtype=np.int16)
        self.latency_samples = self.taps // 2

    @classmethod
    def toward(cls, azimuth_deg: float = 0.0, *, mics: npt.NDArray[np.float64] | None = None,
               taps: int | None = None, loading: float = DEFAULT_LOADING, elevation_deg: float = 0.0,
               rate_hz: int = RATE_HZ, max_block_samples: int = FRAME_SAMPLES) -> FixedBeamformer:
        """A superdirective beamformer for ``mics`` (default: four on a 32 mm circle) toward an azimuth.

        Designed for capture at ``rate_hz``; ``process`` takes blocks of up to ``max_block_samples`` and works
        through them 10 ms at a time.
        """
        geometry = circular_array() if mics is None else mics
        return cls(design_superdirective(geometry, azimuth_deg, elevation_deg=elevation_deg,
                                         taps=taps_for(rate_hz) if taps is None else taps, loading=loading,
                                         rate_hz=rate_hz), max_block_samples, rate_hz // 100)

    def reset(self) -> None:
        """Forget the filter history (device restart)."""
        self._hist.fill(0.0)
        self._pos = self._keep

    def process(self, channels: npt.NDArray[np.int16]) -> Pcm:
        """Every channel's next samples (M, n) in, the beam's n samples out (int16, a reused buffer)."""
        if channels.ndim != 2 or channels.shape[0] != self.channels:
            raise ValueError(f"expected ({self.channels}, n) samples, got shape {channels.shape}")
        n = channels.shape[1]
        if n > self.max_block_samples:
            raise ValueError(f"a block of {n} samples is longer than max_block_samples ({self.max_block_samples})")
        size = self.chunk_samples
        for start in range(0, n, size):
            end = min(n, start + size)
            self._chunk(channels[:, start:end], self._out[start:end])
        return self._out[:n]

    def _chunk(self, channels: npt.NDArray[np.int16], out: Pcm) -> None:
        n = channels.shape[1]
        keep = self._keep
        hist = self._hist
        if self._pos + n > self._capacity:
            hist[:, :keep] = hist[:, self._pos - keep:self._pos]
            self._pos = keep
        pos = self._pos
        np.copyto(hist[:, pos:pos + n], channels, casting="unsafe")
        first = pos - keep
        matrix, acc, tmp = self._matrix[:n], self._acc[:n], self._tmp[:n]
        for c in range(self.channels):
            np.copyto(matrix, self._views[c][first:first + n])
            np.dot(matrix, self._h[c], out=tmp if c else acc)
            if c:
                acc += tmp
        self._pos = pos + n
        np.rint(acc, out=acc)
        np.clip(acc, -32768, 32767, out=acc)
        np.copyto(out, acc, casting="unsafe")

    def apply_offline(self, channels: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
        """The same filters over whole recordings (M, N), in float64 (the benchmark's clean SDR target)."""
        from scipy.signal import lfilter

        h = self._h[:, ::-1].astype(np.float64)
        out: npt.NDArray[np.float64] = np.sum(
            [lfilter(h[c], [1.0], channels[c].astype(np.float64)) for c in range(self.channels)], axis=0)
        return out


@dataclass(frozen=True)
class ArrayGeometry:
    """Where the array's microphones are and which capture channels carry them (``audio.array_*``)."""

    channels: int = 4
    radius_m: float = 0.032
    first_channel: int = 0
    look_azimuth_deg: float = 0.0

    @classmethod
    def from_settings(cls, settings: AudioSettings) -> ArrayGeometry:
        """The configured geometry."""
        return cls(channels=settings.array_channels, radius_m=settings.array_radius_mm / 1000.0,
                   first_channel=settings.array_first_channel, look_azimuth_deg=settings.beam_azimuth_deg)

    @property
    def last_channel(self) -> int:
        """The capture channel of the last microphone (0-based)."""
        return self.first_channel + self.channels - 1

    def positions(self) -> npt.NDArray[np.float64]:
        """Microphone positions (M, 3) in metres."""
        return circular_array(self.channels, self.radius_m)

    def beamformer(self, rate_hz: int = RATE_HZ, max_block_samples: int = FRAME_SAMPLES) -> FixedBeamformer:
        """The beamformer toward ``look_azimuth_deg`` for capture at ``rate_hz``."""
        return FixedBeamformer.toward(self.look_azimuth_deg, mics=self.positions(), rate_hz=rate_hz,
                                      max_block_samples=max_block_samples)

    def select(self, interleaved: npt.NDArray[np.int16], capture_channels: int) -> npt.NDArray[np.int16]:
        """The array's channels of an interleaved block, as an (M, n) view (no copy)."""
        frames = interleaved.reshape(-1, capture_channels)
        view: npt.NDArray[np.int16] = frames[:, self.first_channel:self.first_channel + self.channels].T
        return view

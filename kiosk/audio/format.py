"""The internal audio format and the pure helpers around it: the one home of rate, frame, ``Pcm`` and WAV I/O.

One format inside the kiosk: 16 kHz, mono, signed 16-bit, 10 ms frames of 160 samples. Devices and
files at other rates or block sizes are converted at the edge with the helpers here: ``Rechunker``
turns arbitrary blocks into exact frames (preallocated, no allocation per block), ``to_float`` /
``to_int16`` convert sample formats, ``resample`` converts whole recordings (offline only), and
``decode_wav`` / ``encode_wav`` (``read_wav`` / ``write_wav`` for files) are the only WAV reader and
writer: cues, the message spool, ``kiosk audio process`` and the development tools all use them.
"""

from __future__ import annotations

import io
import logging
import warnings
import wave
from dataclasses import dataclass
from math import gcd
from pathlib import Path
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


# ------------------------------------------------------------------------------------------------ WAV
class WavError(ValueError):
    """Bytes that are not a WAV file the kiosk can read; the message says what is wrong with them."""


@dataclass(frozen=True)
class WavAudio:
    """A decoded WAV file: samples as float64 in [-1, 1], shape (frames, channels)."""

    samples: npt.NDArray[np.float64]
    rate_hz: int
    sample_bits: int  # 8, 16, 24 or 32 for integer PCM; 32 or 64 for float
    is_float: bool
    truncated: bool  # the data ended before the length the header gives (a cut-off write)

    @property
    def channels(self) -> int:
        """Number of channels."""
        return int(self.samples.shape[1])

    @property
    def seconds(self) -> float:
        """Duration."""
        return len(self.samples) / self.rate_hz

    def mono_pcm(self) -> Pcm:
        """Channel 0 as int16 (exact for a 16-bit file)."""
        return to_int16(self.samples[:, 0])


NO_WAV_HEADER = "no RIFF/WAVE header"
_PCM_SCALE = {1: 128.0, 2: 32768.0, 3: 8388608.0, 4: 2147483648.0}


def decode_wav(data: bytes) -> WavAudio:
    """Decode integer PCM (8/16/24/32-bit) or float (32/64-bit) WAV bytes; ``WavError`` says why not."""
    if data[:4] not in (b"RIFF", b"RIFX", b"RF64") or data[8:12] != b"WAVE":
        raise WavError(NO_WAV_HEADER)
    try:
        return _decode_wav(data)
    except WavError:
        raise
    except Exception as error:
        # The bytes come from outside (an operator's cue, a recording, the card): on malformed headers the
        # standard module and scipy raise RuntimeError, struct.error, even UnboundLocalError. Each of them
        # means the same thing here: not a WAV file the kiosk can read (tests/unit/test_fuzz_inputs.py).
        raise WavError(f"malformed ({type(error).__name__}{': ' + str(error) if str(error) else ''})") from None


def _decode_wav(data: bytes) -> WavAudio:
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            rate, channels, width, nframes = wav.getframerate(), wav.getnchannels(), wav.getsampwidth(), \
                wav.getnframes()
            raw = wav.readframes(nframes)
    except wave.Error as error:
        if "unknown format" not in str(error):
            raise WavError(str(error)) from None
        return _decode_float_wav(data)
    except (EOFError, ValueError) as error:
        raise WavError(str(error) or type(error).__name__) from None
    if rate <= 0 or channels <= 0:
        raise WavError(f"the header says {rate} Hz and {channels} channel(s)")
    if width not in _PCM_SCALE:
        raise WavError(f"{8 * width}-bit samples are not supported")
    truncated = len(raw) < nframes * channels * width
    usable = len(raw) - len(raw) % (channels * width)
    raw = raw[:usable]
    if width == 1:
        ints = np.frombuffer(raw, dtype=np.uint8).astype(np.float64) - 128.0
    elif width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        ints = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8).astype(np.float64)
    else:
        ints = np.frombuffer(raw, dtype="<i2" if width == 2 else "<i4").astype(np.float64)
    return WavAudio((ints / _PCM_SCALE[width]).reshape(-1, channels), rate, 8 * width, False, truncated)


def _decode_float_wav(data: bytes) -> WavAudio:
    """Float and extensible WAVs (the standard module reads integer PCM only)."""
    from scipy.io import wavfile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # chunks it skips: the result (or the error) says what matters
        rate, array = wavfile.read(io.BytesIO(data))
    array = np.asarray(array)
    if array.ndim == 1:
        array = array[:, None]
    if int(rate) <= 0 or array.ndim != 2 or array.shape[1] == 0:
        raise WavError(f"the header says {rate} Hz and shape {array.shape}")
    if array.dtype.kind == "f":
        return WavAudio(array.astype(np.float64), int(rate), 8 * array.dtype.itemsize, True, False)
    if array.dtype.kind in "iu":
        info = np.iinfo(array.dtype)
        offset = info.max + 1 if array.dtype.kind == "u" else 0
        return WavAudio((array.astype(np.float64) - offset) / (info.max + 1), int(rate), 8 * array.dtype.itemsize,
                        False, False)
    raise WavError(f"unsupported sample type {array.dtype}")


def read_wav(path: Path, max_bytes: int | None = None) -> WavAudio:
    """``decode_wav`` of a file (``OSError`` if it cannot be read; ``WavError`` if it is over ``max_bytes``)."""
    if max_bytes is not None:
        size = path.stat().st_size
        if size > max_bytes:
            raise WavError(f"{size / 1e6:.0f} MB, more than the {max_bytes / 1e6:.0f} MB allowed")
    return decode_wav(path.read_bytes())


def encode_wav(pcm: Pcm, rate_hz: int = RATE_HZ) -> bytes:
    """int16 samples as the bytes of a 16-bit PCM WAV file: mono (n,) or several channels (n, channels)."""
    samples = np.ascontiguousarray(pcm, dtype="<i2")
    if samples.ndim not in (1, 2):
        raise ValueError(f"samples must be (n,) or (n, channels), got shape {samples.shape}")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1 if samples.ndim == 1 else samples.shape[1])
        wav.setsampwidth(2)
        wav.setframerate(rate_hz)
        wav.writeframes(samples.tobytes())
    return buffer.getvalue()


def write_wav(path: Path, pcm: Pcm, rate_hz: int = RATE_HZ) -> None:
    """Write int16 samples, mono (n,) or (n, channels), as a 16-bit PCM WAV (creating the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_wav(pcm, rate_hz))

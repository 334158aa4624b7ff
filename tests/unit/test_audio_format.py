from __future__ import annotations

import numpy as np
import pytest

from kiosk.audio.format import FRAME_MS, FRAME_SAMPLES, RATE_HZ, Rechunker, frames, resample, to_float, to_int16


def test_constants() -> None:
    assert (RATE_HZ, FRAME_SAMPLES, FRAME_MS) == (16000, 160, 10)


def test_int16_float_round_trip_is_exact() -> None:
    pcm = np.arange(-32768, 32768, 7, dtype=np.int16)
    back = to_int16(to_float(pcm))
    assert np.array_equal(back, pcm)


def test_to_int16_clips_and_writes_into_out() -> None:
    out = np.zeros(3, dtype=np.int16)
    result = to_int16(np.array([2.0, -2.0, 0.5], dtype=np.float32), out=out)
    assert result is out
    assert out.tolist() == [32767, -32768, 16384]


def test_rechunker_reassembles_exact_frames_from_ragged_blocks() -> None:
    rng = np.random.default_rng(1)
    signal = rng.integers(-32768, 32767, 16000, dtype=np.int16)
    chunker = Rechunker(capacity_samples=4096)
    got = []
    pos = 0
    while pos < len(signal):
        n = int(rng.integers(1, 700))
        chunker.push(signal[pos:pos + n])
        pos += n
        while (frame := chunker.pop()) is not None:
            assert len(frame) == FRAME_SAMPLES
            got.append(frame.copy())
    joined = np.concatenate(got)
    assert len(joined) == (len(signal) // FRAME_SAMPLES) * FRAME_SAMPLES
    assert np.array_equal(joined, signal[: len(joined)])
    assert chunker.pending_samples == len(signal) - len(joined)
    assert chunker.dropped_samples == 0


def test_rechunker_drops_oldest_when_full() -> None:
    chunker = Rechunker(capacity_samples=320)
    chunker.push(np.arange(0, 300, dtype=np.int16))
    chunker.push(np.arange(300, 400, dtype=np.int16))  # 80 too many: 0..79 go
    assert chunker.dropped_samples == 80
    first = chunker.pop()
    assert first is not None and first[0] == 80 and first[-1] == 239
    chunker.push(np.arange(1000, 2000, dtype=np.int16))  # larger than the buffer: keeps the newest 320
    frame = chunker.pop()
    assert frame is not None and frame[0] == 1680


def test_rechunker_reuses_its_frame_buffer() -> None:
    chunker = Rechunker()
    chunker.push(np.ones(480, dtype=np.int16))
    a = chunker.pop()
    b = chunker.pop()
    assert a is b


def test_frames_zero_fills_the_tail() -> None:
    out = frames(np.ones(170, dtype=np.int16))
    assert out.shape == (2, FRAME_SAMPLES)
    assert out[1, :10].tolist() == [1] * 10 and not out[1, 10:].any()


@pytest.mark.parametrize("rate_hz", [8000, 44100, 48000])
def test_resample_keeps_a_tone(rate_hz: int) -> None:
    t = np.arange(rate_hz) / rate_hz
    tone = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    out = resample(tone, rate_hz)
    assert len(out) == RATE_HZ
    spectrum = np.abs(np.fft.rfft(out[1000:-1000]))
    peak_hz = np.argmax(spectrum) * RATE_HZ / len(out[1000:-1000])
    assert abs(peak_hz - 1000) < 2
    assert abs(np.std(out[1000:-1000]) - np.std(tone)) < 0.01

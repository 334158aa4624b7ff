from __future__ import annotations

import numpy as np
import pytest

from kiosk.audio.buffers import BoundedRing, DropOldestRing
from kiosk.audio.devices import DeviceInfo, match_device, present
from kiosk.errors import DeviceError


def ramp(start: int, n: int) -> np.ndarray:
    return (np.arange(start, start + n) % 30000).astype(np.int16)


def test_drop_oldest_ring_keeps_order_across_wraparound() -> None:
    ring = DropOldestRing(100)
    out = np.zeros(100, dtype=np.int16)
    got: list[np.ndarray] = []
    pos = 0
    for size in (30, 50, 70, 10, 90, 33):
        ring.write(ramp(pos, size))
        pos += size
        n = ring.read(out)
        got.append(out[:n].copy())
    assert np.array_equal(np.concatenate(got), ramp(0, pos))
    assert ring.dropped_samples == 0


def test_drop_oldest_ring_drops_oldest_and_counts() -> None:
    ring = DropOldestRing(100)
    ring.write(ramp(0, 80))
    ring.write(ramp(80, 80))  # 160 written, ring holds 100
    out = np.zeros(200, dtype=np.int16)
    n = ring.read(out)
    assert n == 100
    assert np.array_equal(out[:n], ramp(60, 100))  # the newest 100
    assert ring.dropped_samples == 60


def test_drop_oldest_ring_keeps_whole_device_frames() -> None:
    ring = DropOldestRing(101, align=4)  # rounded up to whole 4-channel frames
    assert ring.capacity % 4 == 0
    ring.write(ramp(0, 4 * 30))
    out = np.zeros(4 * 7 + 2, dtype=np.int16)
    n = ring.read(out)
    assert n % 4 == 0
    assert np.array_equal(out[:n], ramp(ring.dropped_samples, n))
    assert ring.dropped_samples % 4 == 0


def test_bounded_ring_never_overwrites_and_zero_fills() -> None:
    ring = BoundedRing(100)
    assert ring.write(ramp(0, 150)) == 100  # the rest waits with the producer
    assert ring.free == 0
    out = np.full(60, 7, dtype=np.int16)
    assert ring.read(out) == 60
    assert np.array_equal(out, ramp(0, 60))
    assert ring.write(ramp(100, 50)) == 50
    out = np.full(120, 7, dtype=np.int16)
    assert ring.read(out) == 90
    assert np.array_equal(out[:90], np.concatenate([ramp(60, 40), ramp(100, 50)]))
    assert not out[90:].any()  # zero-filled, never stale samples


def test_bounded_ring_clear_drops_queued_audio() -> None:
    ring = BoundedRing(1000)
    ring.write(ramp(0, 500))
    ring.clear()
    assert ring.queued == 0
    assert ring.free == 1000
    ring.write(ramp(500, 10))
    out = np.zeros(20, dtype=np.int16)
    assert ring.read(out) == 10
    assert np.array_equal(out[:10], ramp(500, 10))


DEVICES = [
    DeviceInfo(0, "USB Audio Device: - (hw:1,0)", "ALSA", 2, 2, 48000),
    DeviceInfo(1, "ReSpeaker 4 Mic Array (UAC1.0): USB Audio (hw:2,0)", "ALSA", 6, 2, 16000),
    DeviceInfo(2, "kiosk_headset", "ALSA", 1, 1, 48000),
    DeviceInfo(3, "kiosk_headset_out", "ALSA", 0, 1, 48000),
    DeviceInfo(4, "HDMI 0", "ALSA", 0, 8, 48000),
]


def test_match_device_by_substring_case_insensitive() -> None:
    assert match_device("respeaker", "capture", DEVICES).index == 1
    assert match_device("hdmi", "playback", DEVICES).index == 4


def test_match_device_exact_name_beats_substrings() -> None:
    assert match_device("KIOSK_HEADSET", "playback", DEVICES).index == 2


def test_match_device_errors_list_candidates() -> None:
    with pytest.raises(DeviceError) as missing:
        match_device("jabra", "capture", DEVICES)
    assert missing.value.code == "device_missing"
    assert "ReSpeaker" in missing.value.message and "audio.capture_device" in missing.value.message
    with pytest.raises(DeviceError) as ambiguous:
        match_device("usb audio", "capture", DEVICES)
    assert ambiguous.value.code == "device_ambiguous"
    assert "USB Audio Device" in ambiguous.value.message
    with pytest.raises(DeviceError):
        match_device("hdmi", "capture", DEVICES)  # playback only
    assert not present(None, "capture", DEVICES)
    assert present("respeaker", "capture", DEVICES)


def test_duplex_callback_keeps_padded_input_blocks_on_the_shared_clock() -> None:
    # A duplex block flagged paInputUnderflow holds zeros PortAudio padded in. It stays in the microphone
    # timeline (dropping it moved the echo earlier than its reference, which no canceller can follow), so
    # microphone and reference keep the same sample count; the padding is counted.
    from kiosk.audio.buffers import DropOldestRing
    from kiosk.audio.io import AudioIO
    from kiosk.settings import AudioSettings

    io = AudioIO(AudioSettings())
    io._mic = DropOldestRing(4096)
    io._ref = DropOldestRing(4096)
    speech = np.arange(1, 65, dtype=np.int16).tobytes()
    for data, status in ((speech, 0), (bytes(128), 0x1), (speech, 0)):
        out, _ = io._duplex_callback(data, 64, None, status)
        assert len(out) == 128
    counters = io.counters
    assert counters.input_underflow_samples == 64 and counters.input_xruns == 1
    assert counters.captured_samples == counters.played_samples == 192
    assert io._mic.available == io._ref.available == 192

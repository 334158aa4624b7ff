from __future__ import annotations

import time

import numpy as np
import pytest

from kiosk.audio.io import AudioIO
from kiosk.settings import AudioSettings
from kiosk_dev.pulse import ARRAY_DEVICE, MIC_DEVICE, SPEAKER_DEVICE, PulseServer
from kiosk_dev.virtual_room import VirtualRoom

# One rerun: through the sound server's two streams the echo path can step in the middle of a burst, and the
# pulse ALSA plugin occasionally stops a duplex stream with a poll error (both measured, docs/audio-io.md);
# a second failure in a row is a real one.
pytestmark = [pytest.mark.pulse, pytest.mark.slow, pytest.mark.flaky(reruns=1)]


def noise_bursts(seconds: int, seed: int = 1) -> np.ndarray:
    """0.2 s of noise at the start of every second: easy to find again in the microphone."""
    rng = np.random.default_rng(seed)
    out = np.zeros(seconds * 16000, dtype=np.int16)
    for k in range(seconds):
        out[k * 16000:k * 16000 + 3200] = (rng.standard_normal(3200) * 4000).astype(np.int16)
    return out


def run_io(io: AudioIO, seconds: float, playout: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    io.open()
    mics, refs = [], []
    offset = 0
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if playout is not None and offset < len(playout):
                offset += io.queue_playout(playout[offset:])
            io.pump()
            while (pair := io.pull()) is not None:
                mics.append(pair[0].copy())
                refs.append(pair[1].copy())
            time.sleep(0.01)
    finally:
        io.close()
    return np.concatenate(mics).astype(np.float64), np.concatenate(refs).astype(np.float64)


def burst_echoes(mic: np.ndarray, ref: np.ndarray) -> list[tuple[float, int]]:
    """For each noise burst in the reference: the best normalised match in the next second of microphone."""
    level = np.convolve(np.abs(ref), np.ones(160) / 160, mode="same")
    active = level > 500
    starts = np.flatnonzero(active[1:] & ~active[:-1]) + 1
    found = []
    for start in starts:
        segment = ref[start:start + 1600]
        window = mic[start:start + 16000 + len(segment)]
        if len(segment) < 1600 or len(window) < 16000:
            continue
        corr = np.correlate(window, segment, mode="valid")
        energy = np.sqrt(np.convolve(window ** 2, np.ones(len(segment)), mode="valid") * np.dot(segment, segment))
        score = np.abs(corr) / (energy + 1e-9)
        lag = int(np.argmax(score))
        found.append((float(score[lag]), lag))
    return found


@pytest.mark.parametrize(("capture", "playback", "rate"), [
    (ARRAY_DEVICE, ARRAY_DEVICE, None),
    (MIC_DEVICE, SPEAKER_DEVICE, None),
    (ARRAY_DEVICE, ARRAY_DEVICE, 48000),
])
def test_played_signal_comes_back_through_the_room(pulse_devices: PulseServer, capture: str, playback: str,
                                                   rate: int | None) -> None:
    settings = AudioSettings(capture_device=capture, playback_device=playback, device_rate_hz=rate, channel=1)
    io = AudioIO(settings)
    # A plain delay for a room: this checks the plumbing (device, rings, resampling, pairing), not the room.
    with VirtualRoom(pulse_devices, echo_gain_db=-6.0, rir=np.ones(1, dtype=np.float32)):
        mic, ref = run_io(io, 6.0, noise_bursts(6))
    assert io.layout is not None
    assert io.layout.duplex == (capture == playback)
    assert io.layout.capture_channels == 2  # the room is stereo; channel 1 was asked for
    assert len(mic) >= 16000, "the device delivered less than a second of audio in six"
    assert io.counters.callbacks > 0 and io.counters.played_samples > 0
    assert np.abs(ref).max() > 1000, "the reference does not carry what was played"
    echoes = burst_echoes(mic, ref)
    assert len(echoes) >= 2, "fewer than two bursts were played and captured"
    good = [lag for score, lag in echoes if score > 0.4]
    # Bursts come back nearly intact (band-limited by the sound server's resampling: about 0.8); a delay step
    # of the sound server in the middle of a burst, or a padded input block kept in the timeline, splits it
    # into two shifted parts (measured about 0.5 at 48 kHz), still far above an unrelated signal (under 0.1).
    # Half the bursts is the bar.
    assert len(good) >= max(1, len(echoes) // 2), f"echoes (score, lag): {echoes}"


@pytest.mark.parametrize("rate", [None, 48000])
def test_the_beam_over_the_rooms_two_channels_brings_the_played_signal_back(pulse_devices: PulseServer,
                                                                           rate: int | None) -> None:
    # The room's two channels as a two-microphone array (one on each side of the front axis): the sound
    # server writes the same signal to both, which is a wave from straight ahead, the beam's look direction.
    settings = AudioSettings(capture_device=ARRAY_DEVICE, playback_device=ARRAY_DEVICE, device_rate_hz=rate,
                             channel="beam", array_channels=2)
    io = AudioIO(settings)
    with VirtualRoom(pulse_devices, echo_gain_db=-6.0, rir=np.ones(1, dtype=np.float32)):
        mic, ref = run_io(io, 6.0, noise_bursts(6))
    assert io.layout is not None and io.layout.beam is not None
    assert io.layout.capture_channels == 2
    assert "beam over channels 0-1" in io.layout.describe()
    echoes = burst_echoes(mic, ref)
    assert len(echoes) >= 2, "fewer than two bursts were played and captured"
    good = [lag for score, lag in echoes if score > 0.4]
    assert len(good) >= max(1, len(echoes) // 2), f"echoes (score, lag): {echoes}"


def test_silence_in_silence_out(pulse_devices: PulseServer) -> None:
    io = AudioIO(AudioSettings(capture_device=ARRAY_DEVICE, playback_device=ARRAY_DEVICE, channel="mix"))
    with VirtualRoom(pulse_devices):
        mic, ref = run_io(io, 2.0)
    assert len(mic) > 0
    assert np.abs(ref).max() == 0  # nothing queued: the device got zeros, and so did the reference
    assert np.abs(mic).max() < 50

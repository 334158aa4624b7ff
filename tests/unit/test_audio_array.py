"""The fixed beamformer: streaming equals the offline filter on any blocks, allocation-free, unity toward the front;
and where it runs: the capture converter (``audio.channel = "beam"``) and the settings."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from kiosk.audio.array import ArrayGeometry, FixedBeamformer, circular_array, steering_delays
from kiosk.audio.io import _Converter
from kiosk.errors import ConfigError
from kiosk.settings import AudioSettings, Settings, load_settings


def _plane_wave(azimuth_deg: float, freq_hz: float, samples: int, rate_hz: int = 16000) -> np.ndarray:
    tau = steering_delays(circular_array(), azimuth_deg)
    t = np.arange(samples) / rate_hz
    return np.stack([np.sin(2 * np.pi * freq_hz * (t - d)) for d in tau]) * 8000.0


def _noise(channels: int = 4, samples: int = 1600, seed: int = 0) -> np.ndarray:
    return np.rint(np.random.default_rng(seed).standard_normal((channels, samples)) * 3000).astype(np.int16)


def test_microphones_sit_on_the_corners_of_a_square() -> None:
    mics = circular_array(4, 0.032)
    angles = np.degrees(np.arctan2(mics[:, 1], mics[:, 0])) % 360
    assert np.allclose(angles, [45, 135, 225, 315])
    assert np.allclose(np.linalg.norm(mics, axis=1), 0.032)


def test_frames_match_the_offline_filter() -> None:
    channels = _noise()
    bf = FixedBeamformer.toward(0.0)
    online = np.concatenate([bf.process(channels[:, k:k + 160]).astype(np.float64) for k in range(0, 1600, 160)])
    offline = FixedBeamformer.toward(0.0).apply_offline(channels)
    assert np.max(np.abs(online - offline)) <= 1.0  # rounding to int16


def test_any_block_sizes_give_the_same_samples_as_10_ms_frames() -> None:
    channels = _noise(samples=8000, seed=1)
    frames = FixedBeamformer.toward(0.0)
    expected = np.concatenate([frames.process(channels[:, k:k + 160]).copy() for k in range(0, 8000, 160)])
    blocks = FixedBeamformer.toward(0.0, max_block_samples=1000)
    rng = np.random.default_rng(2)
    parts, start = [], 0
    while start < 8000:
        size = int(rng.integers(1, 1000))
        parts.append(blocks.process(channels[:, start:start + size]).copy())
        start += size
    assert np.array_equal(np.concatenate(parts), expected)


def test_nothing_is_allocated_per_block() -> None:
    # A plain np.dot on the sliding window copies it (160 x 64 float32, 40 kB) into a new array every frame.
    interleaved = np.ascontiguousarray(_noise(samples=16000, seed=3).T).reshape(-1)
    geometry = ArrayGeometry()
    bf = geometry.beamformer()
    bf.process(geometry.select(interleaved[:640], 4))
    tracemalloc.start()
    try:
        for k in range(1, 100):
            bf.process(geometry.select(interleaved[k * 640:(k + 1) * 640], 4))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4096, f"{peak} bytes allocated while processing blocks"


@pytest.mark.parametrize("rate_hz", [16000, 48000])
def test_unity_toward_the_front_and_less_from_behind(rate_hz: int) -> None:
    bf = FixedBeamformer.toward(0.0, rate_hz=rate_hz)
    assert bf.taps == 64 * rate_hz // 16000
    skip = bf.taps * 4
    front = bf.apply_offline(_plane_wave(0.0, 1000.0, rate_hz // 4, rate_hz))[skip:]
    back = bf.apply_offline(_plane_wave(180.0, 1000.0, rate_hz // 4, rate_hz))[skip:]
    level = 20 * np.log10(np.std(front) / (8000.0 / np.sqrt(2)))
    assert abs(level) < 0.5
    assert 20 * np.log10(np.std(back) / np.std(front)) < -4.0


def test_a_block_longer_than_prepared_is_refused() -> None:
    with pytest.raises(ValueError, match="longer than max_block_samples"):
        FixedBeamformer.toward(0.0).process(np.zeros((4, 161), dtype=np.int16))


def test_the_capture_converter_beams_the_arrays_channels_of_interleaved_blocks() -> None:
    # Six capture channels, the microphones on 1-4 (firmware that puts a processed channel first).
    mics = _noise(samples=4800, seed=4)
    capture = np.zeros((4800, 6), dtype=np.int16)
    capture[:, 1:5] = mics.T
    capture[:, 0] = 12345  # must not reach the beam
    capture[:, 5] = -12345
    geometry = ArrayGeometry(first_channel=1)
    converter = _Converter(16000, 6, None, geometry)
    blocks = [capture[a:b].reshape(-1) for a, b in ((0, 1000), (1000, 1003), (1003, 3700), (3700, 4800))]
    out = np.concatenate([converter.convert(block).copy() for block in blocks])
    frames = geometry.beamformer()
    expected = np.concatenate([frames.process(mics[:, k:k + 160]).copy() for k in range(0, 4800, 160)])
    assert np.array_equal(out, expected)


def test_the_capture_converter_beams_before_resampling() -> None:
    wave = np.rint(_plane_wave(0.0, 500.0, 48000, 48000)).astype(np.int16)
    converter = _Converter(48000, 4, None, ArrayGeometry())
    out = np.concatenate([converter.convert(np.ascontiguousarray(wave[:, k:k + 480].T).reshape(-1)).copy()
                          for k in range(0, 48000, 480)]).astype(np.float64)
    assert abs(len(out) - 16000) <= 64
    level = 20 * np.log10(np.std(out[2000:]) / (8000.0 / np.sqrt(2)))
    assert abs(level) < 0.5  # the beam passes the front unchanged, at the device's rate


def test_geometry_from_settings() -> None:
    audio = AudioSettings(channel="beam", array_channels=6, array_radius_mm=46.0, array_first_channel=1,
                          beam_azimuth_deg=-20.0)
    geometry = ArrayGeometry.from_settings(audio)
    assert geometry == ArrayGeometry(channels=6, radius_m=0.046, first_channel=1, look_azimuth_deg=-20.0)
    assert geometry.last_channel == 6
    assert Settings().audio.channel == 0  # the beam is a configuration, not the default


def test_a_beam_over_more_channels_than_opened_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "kiosk.toml"
    config.write_text('[audio]\nchannel = "beam"\ncapture_channels = 4\narray_first_channel = 1\n')
    with pytest.raises(ConfigError) as raised:
        load_settings(config)
    assert "audio.capture_channels" in str(raised.value) and "5 or more" in str(raised.value)

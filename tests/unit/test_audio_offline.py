from __future__ import annotations

import json
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from scipy.io import wavfile

from kiosk.audio.array import ArrayGeometry, circular_array, steering_delays
from kiosk.audio.format import RATE_HZ, resample, to_int16, write_wav
from kiosk.audio.io import _Converter
from kiosk.audio.offline import read_input
from kiosk_dev import roomsim

VISITOR = (3.0, 6.0)


def _kiosk(tmp_path: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "kiosk.toml"
    if not config.exists():
        # The default backend, written out so a machine's own /etc/kiosk/kiosk.toml cannot change the test.
        config.write_text('[aec]\nbackend = "webrtc"\n')
    return subprocess.run([sys.executable, "-m", "kiosk", "--config", str(config), "audio", "process",
                           *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def scenario() -> roomsim.Scenario:
    return roomsim.make_scenario(3, seconds=9, visitor_spans=[VISITOR], delay_ms=60.0)


def _write_pair(tmp_path: Path, scenario: roomsim.Scenario, *, mic_rate_hz: int = RATE_HZ) -> tuple[Path, Path]:
    mic, ref = tmp_path / "mic.wav", tmp_path / "ref.wav"
    write_wav(mic, to_int16(resample(scenario.mic, RATE_HZ, mic_rate_hz)), mic_rate_hz)
    write_wav(ref, to_int16(scenario.far))
    return mic, ref


def _read(path: Path) -> tuple[np.ndarray, int, int]:
    with wave.open(str(path), "rb") as wav:
        data = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
        return data, wav.getframerate(), wav.getnchannels()


@pytest.mark.parametrize("mic_rate_hz", [16000, 48000])
def test_process_end_to_end(tmp_path: Path, scenario: roomsim.Scenario, mic_rate_hz: int) -> None:
    mic, ref = _write_pair(tmp_path, scenario, mic_rate_hz=mic_rate_hz)
    out, vad = tmp_path / "out" / "clean.wav", tmp_path / "out" / "speech.json"
    result = _kiosk(tmp_path, "--mic", mic, "--ref", ref, "--out", out, "--vad", vad)
    assert result.returncode == 0, result.stderr
    cleaned, rate, channels = _read(out)
    assert (rate, channels) == (RATE_HZ, 1)
    assert abs(len(cleaned) - len(scenario.mic)) <= 2  # resampled back to 16 kHz, same duration
    # The echo is gone from the far-only part (first 3 s, after a second of convergence) ...
    far_only = slice(RATE_HZ, int(VISITOR[0] * RATE_HZ))
    mic_level = roomsim.rms_dbfs(scenario.mic[far_only])
    out_level = roomsim.rms_dbfs(cleaned[far_only].astype(np.float32) / 32768)
    assert mic_level - out_level >= 20.0
    # ... and the visitor is found where they spoke, once.
    speech = json.loads(vad.read_text())["speech"]
    assert len(speech) == 1
    start, end = speech[0]
    assert VISITOR[0] <= start <= VISITOR[0] + 0.5
    assert VISITOR[1] - 0.5 <= end <= VISITOR[1] + 0.7
    assert "1 speech segment" in result.stdout


def test_stereo_needs_a_channel(tmp_path: Path, scenario: roomsim.Scenario) -> None:
    _, ref = _write_pair(tmp_path, scenario)
    stereo = tmp_path / "stereo.wav"
    pcm = to_int16(scenario.mic)
    with wave.open(str(stereo), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(RATE_HZ)
        wav.writeframes(np.stack([pcm, np.zeros_like(pcm)], axis=1).astype("<i2").tobytes())
    out = tmp_path / "out.wav"
    refused = _kiosk(tmp_path, "--mic", stereo, "--ref", ref, "--out", out)
    assert refused.returncode == 2
    assert "has 2 channels" in refused.stderr and "--mic-channel" in refused.stderr
    assert not out.exists()
    chosen = _kiosk(tmp_path, "--mic", stereo, "--ref", ref, "--out", out, "--mic-channel", "0")
    assert chosen.returncode == 0, chosen.stderr
    assert out.exists()


def test_mismatched_lengths(tmp_path: Path, scenario: roomsim.Scenario) -> None:
    mic, _ = _write_pair(tmp_path, scenario)
    short = tmp_path / "short.wav"
    write_wav(short, to_int16(scenario.far[: 5 * RATE_HZ]))
    result = _kiosk(tmp_path, "--mic", mic, "--ref", short, "--out", tmp_path / "out.wav")
    assert result.returncode == 2
    assert "lasts 9.000 s" in result.stderr and "lasts 5.000 s" in result.stderr
    assert "record both at once" in result.stderr


def test_unreadable_and_missing_files(tmp_path: Path, scenario: roomsim.Scenario) -> None:
    mic, ref = _write_pair(tmp_path, scenario)
    text = tmp_path / "notes.wav"
    text.write_text("not audio at all\n")
    result = _kiosk(tmp_path, "--mic", mic, "--ref", text, "--out", tmp_path / "out.wav")
    assert result.returncode == 2
    assert "ref file" in result.stderr and "is not a WAV file" in result.stderr
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(mic.read_bytes()[:30])
    result = _kiosk(tmp_path, "--mic", truncated, "--ref", ref, "--out", tmp_path / "out.wav")
    assert result.returncode == 2 and "mic file" in result.stderr
    result = _kiosk(tmp_path, "--mic", tmp_path / "absent.wav", "--ref", ref, "--out", tmp_path / "out.wav")
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_float_wav_is_accepted(tmp_path: Path, scenario: roomsim.Scenario) -> None:
    _, ref = _write_pair(tmp_path, scenario)
    mic = tmp_path / "float.wav"
    wavfile.write(str(mic), RATE_HZ, scenario.mic.astype(np.float32))
    result = _kiosk(tmp_path, "--mic", mic, "--ref", ref, "--out", tmp_path / "out.wav")
    assert result.returncode == 0, result.stderr


def _array_recording(scenario: roomsim.Scenario) -> np.ndarray:
    """The scenario's microphone as a 4-microphone array hears it, everything arriving from the kiosk's front."""
    delays = steering_delays(circular_array(), 0.0) * RATE_HZ
    positions = np.arange(len(scenario.mic), dtype=np.float64)
    return np.stack([to_int16(roomsim.fractional_read(scenario.mic, positions - d)) for d in delays], axis=1)


def test_a_multi_channel_array_file_through_the_beam(tmp_path: Path, scenario: roomsim.Scenario) -> None:
    _, ref = _write_pair(tmp_path, scenario)
    array = tmp_path / "array.wav"
    write_wav(array, _array_recording(scenario))
    out, vad = tmp_path / "clean.wav", tmp_path / "speech.json"
    result = _kiosk(tmp_path, "--mic", array, "--ref", ref, "--out", out, "--vad", vad, "--mic-channel", "beam")
    assert result.returncode == 0, result.stderr
    cleaned, rate, channels = _read(out)
    assert (rate, channels) == (RATE_HZ, 1) and abs(len(cleaned) - len(scenario.mic)) <= 2
    far_only = slice(RATE_HZ, int(VISITOR[0] * RATE_HZ))
    assert roomsim.rms_dbfs(scenario.mic[far_only]) - roomsim.rms_dbfs(cleaned[far_only] / 32768) >= 20.0
    assert len(json.loads(vad.read_text())["speech"]) == 1


def test_the_offline_beam_is_the_live_one(tmp_path: Path, scenario: roomsim.Scenario) -> None:
    recording = _array_recording(scenario)[: 3 * RATE_HZ]
    path = tmp_path / "array.wav"
    write_wav(path, recording)
    offline, rate = read_input(path, role="mic", channel="beam")
    converter = _Converter(RATE_HZ, 4, None, ArrayGeometry())
    live = np.concatenate([converter.convert(recording[k:k + 441].reshape(-1)).copy()
                           for k in range(0, len(recording), 441)])
    assert rate == RATE_HZ
    assert np.array_equal(to_int16(offline), live)


def test_the_beam_needs_the_arrays_channels(tmp_path: Path, scenario: roomsim.Scenario) -> None:
    mic, ref = _write_pair(tmp_path, scenario)
    stereo = tmp_path / "stereo.wav"
    pcm = to_int16(scenario.mic)
    write_wav(stereo, np.stack([pcm, pcm], axis=1))
    refused = _kiosk(tmp_path, "--mic", stereo, "--ref", ref, "--out", tmp_path / "out.wav", "--mic-channel", "beam")
    assert refused.returncode == 2
    assert "has 2 channel(s) but the beam reads channels 0 to 3" in refused.stderr
    assert "audio.array_channels" in refused.stderr
    refused = _kiosk(tmp_path, "--mic", mic, "--ref", stereo, "--out", tmp_path / "out.wav", "--ref-channel", "beam")
    assert refused.returncode == 2 and "--ref-channel N or mix" in refused.stderr
    assert "Traceback" not in refused.stderr

from __future__ import annotations

import logging
import wave
from pathlib import Path

import numpy as np
import pytest

from kiosk.audio.cues import (
    CUE_NAMES,
    SPOKEN_NAMES,
    TONES,
    CueError,
    check_directory,
    load_cue,
    read_cue_file,
    shipped_directory,
    tone,
)
from kiosk_dev.cues import SPOKEN


def write(path: Path, samples: np.ndarray, rate_hz: int, width: int = 2, channels: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(width)
        wav.setframerate(rate_hz)
        wav.writeframes(samples.tobytes())
    return path


def test_every_language_has_every_spoken_cue() -> None:
    for language, texts in SPOKEN.items():
        assert set(texts) == set(SPOKEN_NAMES), language
        assert (shipped_directory() / language).is_dir(), f"render {language} with scripts/render-cues"


@pytest.mark.parametrize("language", sorted(SPOKEN))
@pytest.mark.parametrize("name", CUE_NAMES)
def test_shipped_cues_load_as_16k_mono_speech(name: str, language: str) -> None:
    if name not in TONES:
        with wave.open(str(shipped_directory() / language / f"{name}.wav"), "rb") as wav:
            assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
    pcm = load_cue(name, language)
    assert pcm.dtype == np.int16 and pcm.ndim == 1
    seconds = len(pcm) / 16000
    assert 0.15 <= seconds <= 10.0
    rms_dbfs = 20 * np.log10(np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) / 32768)
    assert -35.0 < rms_dbfs < -6.0  # audible, not clipped
    assert not pcm.flags.writeable


def test_tones_have_their_pitch() -> None:
    pcm = tone([(880.0, 300)])
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64)))
    assert np.argmax(spectrum) * 16000 / len(pcm) == pytest.approx(880.0, abs=5)
    start = load_cue("session_start")
    end = load_cue("session_end")
    assert len(start) == len(end) and not np.array_equal(start, end)


def test_operator_override_is_used_and_resampled(tmp_path: Path) -> None:
    t = np.arange(44100) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t)] * 2, axis=1) * 8000
    write(tmp_path / "en" / "offline.wav", stereo.astype("<i2"), 44100, channels=2)
    pcm = load_cue("offline", "en", tmp_path)
    assert len(pcm) == 16000
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64)))
    assert np.argmax(spectrum) == pytest.approx(440, abs=2)
    assert not np.array_equal(pcm, load_cue("offline", "en"))
    assert check_directory(tmp_path) == []


@pytest.mark.parametrize("case", ["8bit", "garbage", "float", "too_long"])
def test_bad_override_falls_back_to_shipped_with_a_clear_message(
        tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "en" / "maintenance.wav"
    if case == "8bit":
        write(path, np.full(8000, 128, dtype=np.uint8), 8000, width=1)
    elif case == "garbage":
        path.parent.mkdir(parents=True)
        path.write_bytes(b"this is not audio at all" * 10)
    elif case == "float":
        write(path, np.zeros(16000, dtype="<f4"), 16000, width=4)
    else:
        write(path, np.zeros(16000 * 61, dtype="<i2"), 16000)
    with caplog.at_level(logging.WARNING, logger="kiosk.audio.cues"):
        pcm = load_cue("maintenance", "en", tmp_path)
    assert np.array_equal(pcm, load_cue("maintenance", "en"))
    assert str(path) in caplog.text and "shipped cue instead" in caplog.text
    with pytest.raises(CueError) as caught:
        read_cue_file(path)
    assert str(path) in caught.value.message
    assert len(check_directory(tmp_path)) == 1


def test_unknown_language_falls_back_to_english(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        pcm = load_cue("error", "xx")
    assert np.array_equal(pcm, load_cue("error", "en"))
    assert "xx" in caplog.text


def test_unknown_cue_is_an_error() -> None:
    with pytest.raises(CueError) as caught:
        load_cue("fanfare")
    assert caught.value.code == "cue_unknown" and "offline" in caught.value.message


def test_every_cue_the_state_machine_asks_for_exists() -> None:
    from kiosk.effects import Cue

    assert {c.value for c in Cue} == set(CUE_NAMES)
    assert set(TONES) <= set(CUE_NAMES)

"""kiosk selftest voice: the judgement over a recording, with the real capture chain (offline).

The live part (playing through the devices) is the doctor's loopback recording (``play_and_record``); here the
recordings are made from the shipped spoken cue, a delay, a gain and noise, and the configured chain decides.
"""

from __future__ import annotations

import numpy as np
import pytest

from kiosk.audio.cues import load_cue
from kiosk.audio.format import RATE_HZ
from kiosk.audio.selftest import CUE, LEAD_SECONDS, MIN_HEARD_SECONDS, judge, voice_check
from kiosk.checks import Verdict
from kiosk.settings import load_settings

LEAD = int(LEAD_SECONDS * RATE_HZ)


def _recording(gain: float, delay_seconds: float, *, tail_seconds: float = 1.0, seed: int = 1) -> tuple[
        np.ndarray, int]:
    cue = load_cue(CUE.value, "en")
    total = LEAD + len(cue) + int((delay_seconds + tail_seconds) * RATE_HZ)
    rng = np.random.default_rng(seed)
    mic = rng.standard_normal(total) * 30.0  # a quiet room, about -60 dBFS
    start = LEAD + int(delay_seconds * RATE_HZ)
    mic[start:start + len(cue)] += gain * cue.astype(np.float64)
    return np.clip(np.rint(mic), -32768, 32767).astype(np.int16), len(cue)


@pytest.mark.parametrize(("gain", "delay", "heard"), [
    (0.5, 0.05, True),  # the speaker heard at the microphone, 50 ms echo delay
    (0.5, 0.35, True),  # a late echo, still within aec.max_delay_ms (400)
    (0.1, 0.05, True),  # quieter, still speech
    (0.01, 0.05, False),  # too quiet: below the detector's level floor
    (0.0, 0.0, False),  # nothing played back (speaker off)
])
def test_the_chain_hears_the_cue(gain: float, delay: float, heard: bool) -> None:
    settings = load_settings(None)
    mic, cue_samples = _recording(gain, delay)
    turn = judge(settings, mic, LEAD, cue_samples)
    assert turn.heard is heard, turn
    if heard:
        assert turn.heard_seconds >= MIN_HEARD_SECONDS and turn.first_speech_ms is not None
        assert turn.first_speech_ms >= delay * 1000 - 100
    print(f"gain {gain} delay {delay}: {turn}")


def test_speech_outside_the_window_does_not_count() -> None:
    """Someone talking after the cue's window (a bystander) is not the kiosk's own voice coming back."""
    settings = load_settings(None)
    cue = load_cue(CUE.value, "en")
    window_end = LEAD + len(cue) + int(settings.aec.max_delay_ms / 1000 * RATE_HZ)
    mic = (np.random.default_rng(2).standard_normal(window_end + len(cue) + 2 * RATE_HZ) * 30.0)
    mic[window_end + RATE_HZ // 2: window_end + RATE_HZ // 2 + len(cue)] += 0.5 * cue
    turn = judge(settings, np.clip(np.rint(mic), -32768, 32767).astype(np.int16), LEAD, len(cue))
    assert not turn.heard and turn.heard_seconds == 0.0


def test_report_lines() -> None:
    settings = load_settings(None)
    mic, cue_samples = _recording(0.5, 0.05)
    good = voice_check(judge(settings, mic, LEAD, cue_samples))
    assert good.status is Verdict.OK and "heard the spoken cue" in good.summary
    quiet, cue_samples = _recording(0.0, 0.0)
    bad = voice_check(judge(settings, quiet, LEAD, cue_samples))
    assert bad.status is Verdict.FAIL and bad.fix and "speaker" in bad.fix
    # Figures only: no samples of the recording travel in the report.
    assert all(not isinstance(v, (list, np.ndarray)) for v in bad.figures.values())
    broken = voice_check(None, "no device named 'kiosk_array'")
    assert broken.status is Verdict.FAIL and "kiosk_array" in broken.summary

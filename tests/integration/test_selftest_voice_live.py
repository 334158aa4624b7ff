"""kiosk selftest voice through real sound devices: the private PulseAudio server and the live virtual room.

"kiosk_array" plays into the speaker sink and records the room's monitor (as in tests/integration/
test_doctor.py); the virtual room returns the speaker's output with a bulk delay, so the spoken cue comes back
into the microphone, or (echo muted) does not.
"""

from __future__ import annotations

from typing import Any

import pytest

from kiosk.audio.selftest import run_voice_turn, voice_check
from kiosk.checks import Verdict
from kiosk.settings import Settings

PULSE_AUDIO = {"capture_device": "kiosk_array", "playback_device": "kiosk_array"}


def _turn(server: Any, **room: Any) -> Any:
    from kiosk_dev.virtual_room import VirtualRoom

    with VirtualRoom(server, seed=5, delay_ms=40.0, **room):
        turn = run_voice_turn(Settings(audio=PULSE_AUDIO))
    print(turn)
    return turn


@pytest.mark.pulse
@pytest.mark.slow
@pytest.mark.flaky(reruns=1)  # a delay step of the sound server under load can spoil one recording
def test_the_spoken_cue_is_heard_through_the_room(pulse_devices: Any) -> None:
    turn = _turn(pulse_devices, echo_gain_db=-6.0)
    assert turn.heard and turn.layout == "duplex", turn
    assert voice_check(turn).status is Verdict.OK


@pytest.mark.pulse
@pytest.mark.slow
def test_without_an_echo_path_the_cue_is_not_heard(pulse_devices: Any) -> None:
    turn = _turn(pulse_devices, echo_gain_db=-120.0)
    assert not turn.heard, turn
    check = voice_check(turn)
    assert check.status is Verdict.FAIL and check.fix

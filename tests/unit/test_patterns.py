"""LED patterns: one pattern per state, distinct, and brightness over time as the data says."""

from __future__ import annotations

import pytest

from kiosk.effects import OfflineReason
from kiosk.errors import KioskError
from kiosk.panel.patterns import PATTERNS, Blink, Off, Pattern, Pulse, Solid, pattern_for, pattern_named
from kiosk.state import KioskState, Phase, pattern_key


def test_every_state_has_a_pattern_and_they_differ() -> None:
    keys = {pattern_key(KioskState(phase=p)) for p in Phase}
    keys |= {pattern_key(KioskState(phase=Phase.OFFLINE, online=False, offline_reason=r)) for r in OfflineReason}
    keys |= {pattern_key(KioskState(phase=Phase.LISTENING, consent_playing=True))}
    keys |= {pattern_key(KioskState(phase=Phase.THINKING, tool_running=True))}
    keys |= {pattern_key(KioskState(phase=Phase.IDLE, staff_called=True))}
    assert keys == set(PATTERNS)
    looks = {(p.colour, p.brightness) for p in PATTERNS.values()}
    assert len(looks) == len(PATTERNS), "two states look the same on an RGB LED"


def test_required_looks() -> None:
    assert isinstance(pattern_for(KioskState(phase=Phase.IDLE)).brightness, Pulse)  # breathing
    assert pattern_for(KioskState(phase=Phase.LISTENING)).brightness == Solid(1.0)
    assert isinstance(pattern_for(KioskState(phase=Phase.THINKING)).brightness, Pulse)
    assert pattern_for(KioskState(phase=Phase.RECORDING_MESSAGE)).colour == (1.0, 0.0, 0.0)
    offline = KioskState(phase=Phase.OFFLINE, online=False, offline_reason=OfflineReason.BUDGET_CAP)
    assert pattern_for(offline).name == "budget_cap"


def test_single_colour_leds_can_tell_the_conversation_states_apart() -> None:
    names = ["idle", "connecting", "listening", "thinking", "speaking", "error"]
    assert len({PATTERNS[n].brightness for n in names}) == len(names)


@pytest.mark.parametrize(("brightness", "samples"), [
    (Solid(0.5), {0.0: 0.5, 7.3: 0.5}),
    (Off(), {0.0: 0.0, 1.0: 0.0}),
    (Blink(0.2, 0.3), {0.0: 1.0, 0.19: 1.0, 0.21: 0.0, 0.49: 0.0, 0.5: 1.0}),
    (Pulse(1.0, 3.0), {0.0: 0.0, 0.5: 0.5, 1.0: 1.0, 2.5: 0.5, 4.0: 0.0, 4.5: 0.5}),
])
def test_level_over_time(brightness: Solid | Off | Blink | Pulse, samples: dict[float, float]) -> None:
    pattern = Pattern("x", (1.0, 0.5, 0.0), brightness, "")
    for t, level in samples.items():
        assert pattern.level_at(t) == pytest.approx(level)
        assert pattern.rgb_at(t) == pytest.approx((level, 0.5 * level, 0.0))


def test_unknown_pattern_names_the_known_ones() -> None:
    with pytest.raises(KioskError, match="listening"):
        pattern_named("disco")


def test_hw_readme_documents_every_pattern() -> None:
    from pathlib import Path

    text = (Path(__file__).parents[2] / "hw" / "README.md").read_text()
    assert "## Wiring" in text
    for name in PATTERNS:
        assert f"| `{name}` |" in text, f"hw/README.md has no row for the LED pattern {name}"


def test_tool_and_staff_patterns_never_hide_the_live_microphone() -> None:
    live = KioskState(phase=Phase.LISTENING, publishing=True, tool_running=True, staff_called=True)
    assert pattern_key(live) == "listening"
    assert pattern_key(KioskState(phase=Phase.SPEAKING, tool_running=True, staff_called=True)) == "tool"
    assert pattern_key(KioskState(phase=Phase.RECORDING_MESSAGE, staff_called=True)) == "recording_message"

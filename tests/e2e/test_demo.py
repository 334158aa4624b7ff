"""The README's main job, scripted: the whole local stack, the virtual room and the kiosk app together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.livekit, pytest.mark.pulse, pytest.mark.slow]


def test_scripted_demo_answers_every_question_through_the_real_devices(tmp_path: Path) -> None:
    config = tmp_path / "kiosk.toml"
    config.write_text("")  # defaults only: nothing from the machine's /etc/kiosk
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KIOSK_", "PULSE_"))}
    env["KIOSK_CONFIG"] = str(config)
    result = subprocess.run([sys.executable, "-m", "kiosk", "demo", "--scripted", "--json"], env=env,
                            capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["answered"] == len(report["exchanges"]) == 2
    for exchange in report["exchanges"]:
        # The visitor's speech went through the capture chain and the agent's answer came out of the speaker.
        assert exchange["voice_started"] and exchange["answer_played"]
        # Manual turns: the agent answers only after the button comes up, never while it is held.
        assert exchange["answer_started_after_release_s"] > 0, exchange
    states = [entry["state"] for entry in report["timeline"]]
    for state in ("idle", "connecting", "listening", "thinking", "speaking"):
        assert state in states
    assert report["speaker_heard_by_room"]
    assert report["latency"]["capture_path"]["n"] > 100
    assert report["metrics"]["agent_audio_seconds"] > 1.0
    assert 0 < report["metrics"]["streamed_fraction"] < 1
    assert any(c["speaker"] == "agent" for c in report["captions"])

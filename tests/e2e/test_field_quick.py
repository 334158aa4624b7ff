"""``kiosk bench field --quick`` as a test: the whole rig for a few minutes, with its invariants and no timing.

The run is the command a person types (its own private network, stack, sound server, supervised kiosk process,
CPU hog and fault injector). What must hold however loaded the machine is: no message a visitor was told was
saved is lost or stored twice, the kiosk comes back after every fault, it never ends except when the bench
kills it, and a last question is answered. The timing figures are the benchmark's to report (docs/field.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kiosk_dev.bench.field import QUICK_FAULTS

pytestmark = [pytest.mark.livekit, pytest.mark.pulse, pytest.mark.slow, pytest.mark.timeout(1200)]


# The run loads both cores on purpose, beside the suite's own servers: one rerun, as for the sound-server tests.
@pytest.mark.flaky(reruns=1)
def test_quick_field_run_loses_nothing_and_gets_stuck_nowhere(tmp_path: Path) -> None:
    config = tmp_path / "kiosk.toml"
    config.write_text("")  # defaults only: nothing from the machine's /etc/kiosk
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KIOSK_", "PULSE_"))}
    env["KIOSK_CONFIG"] = str(config)
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "kiosk", "bench", "field", "--quick", "--json", "--keep",
                             str(run_dir)], env=env, capture_output=True, text=True, timeout=1100,
                            stdin=subprocess.DEVNULL)
    log = (run_dir / "kiosk.log").read_text(errors="replace") if (run_dir / "kiosk.log").exists() else ""
    assert result.stdout, result.stderr[-3000:]
    report = json.loads(result.stdout)
    summary = report["summary"]
    invariants = summary["invariants"]
    context = json.dumps({"invariants": invariants, "faults": summary["faults"], "messages": summary["messages"],
                          "restarts": summary["restarts"]}, indent=1, default=str) + "\n" + log[-3000:]
    # Nothing lost: every message confirmed to a visitor reached the endpoint exactly once.
    assert invariants["messages_lost"] == 0 and invariants["messages_duplicated"] == 0, context
    # Nothing stuck: usable again after every fault (the bench's own check after each one).
    assert invariants["faults_stuck"] == [], context
    # Whether the last question was answered is printed, not asserted: under the run's CPU hogs the stand-in agent
    # can miss a question, and until the rig's sound server asked for 30 ms of buffering its path into the kiosk's
    # microphone fell seconds behind (docs/field.md, "Findings", item 9 of the second run). That measures the rig.
    print(f"\nfinal question answered: {invariants['final_exchange_completed']}")
    # No crash: the kiosk process ended only when the bench killed it, and never hit the start limit.
    assert invariants["unplanned_exits"] == 0 and not invariants["unit_failed"], context
    assert "Traceback (most recent call last)" not in log, context
    # The run did what it says: every quick fault fired, visitors talked to the kiosk.
    assert set(summary["faults"]) == set(QUICK_FAULTS), context
    assert summary["exchanges"]["attempted"] >= len(QUICK_FAULTS), context
    # The bench's exit status is its invariants: 1 for an unanswered last question alone is the rig (above).
    assert result.returncode == (0 if invariants["final_exchange_completed"] else 1), result.stderr[-3000:]
    print("\n" + json.dumps({k: summary[k] for k in ("exchanges", "sessions", "messages")}, default=str))

"""kiosk.update.gate and kiosk.update.check: the commit/roll-back decision and the gate run end to end.

The decision is a pure function, tested over every combination (boot kind x kiosk up x doctor x voice). The
integration tests run the gate's command (``python -m kiosk.update.gate run``) as a process against a scratch
root with a fake tryboot state (autoboot.txt, the backend's state, the firmware's device-tree cells), with
stand-ins for what cannot run here: ``systemctl`` (it logs, and "starting" the check unit runs the real
``kiosk update check`` with a stand-in ``kiosk`` whose doctor or self-test fails, passes or hangs) and ``rauc``
(its ``status mark-good|mark-bad`` calls the real tryboot backend with ``set-state <booted> good|bad``, as RAUC
does).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.tryboot import IMAGE_AUTOBOOT, scratch_root
from kiosk.update.check import doctor_part, voice_part
from kiosk.update.gate import (
    Action,
    BootKind,
    Outcome,
    ResultError,
    classify,
    decide,
    parse_result,
    read_result,
)
from kiosk.update.status import read_status
from kiosk.update.tryboot import STATE, Autoboot, Firmware, SlotState, parse_autoboot


# ------------------------------------------------------------------------------------------ the decision
@pytest.mark.parametrize(("boot", "ready", "doctor", "voice"),
                         list(itertools.product(BootKind, (True, False), Outcome, Outcome)))
def test_decision_table(boot: BootKind, ready: bool, doctor: Outcome, voice: Outcome) -> None:
    decision = decide(boot, ready, doctor, voice)
    if boot is BootKind.NORMAL:
        expected = Action.NOTHING
    elif boot is BootKind.STRAY:
        expected = Action.RETURN
    elif ready and doctor is Outcome.PASS and voice is Outcome.PASS:
        expected = Action.COMMIT
    else:
        expected = Action.ROLL_BACK
    assert decision.action is expected
    if expected is Action.ROLL_BACK:
        text = " ".join(decision.reasons)
        assert ("did not come up" in text) == (not ready)
        for name, outcome in (("kiosk doctor", doctor), ("the voice self-test", voice)):
            assert (name in text) == (outcome is not Outcome.PASS)
        assert ("in time" in text) == (Outcome.TIMEOUT in (doctor, voice))


@pytest.mark.parametrize(("partition", "pending", "bad", "kind"), [
    (2, None, (), BootKind.NORMAL),  # the committed slot
    (2, "B", (), BootKind.NORMAL),  # an installation waits, but this boot is not its trial
    (None, "B", (), BootKind.NORMAL),  # not a Pi (no device tree)
    (3, "B", (), BootKind.TRIAL),
    (3, None, (), BootKind.STRAY),  # reboot "0 tryboot" by hand: the previous image
    (3, "B", ("B",), BootKind.STRAY),
])
def test_classify(partition: int | None, pending: str | None, bad: tuple[str, ...], kind: BootKind) -> None:
    firmware = Firmware(partition=partition, tryboot=partition == 3)
    assert classify(firmware, Autoboot(2, 3), SlotState(pending, frozenset(bad))) is kind


# ------------------------------------------------------------------------------------ the check's result
def _result(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {"version": 1, "boot_id": "b", "started_monotonic": 10.0,
                               "doctor": {"outcome": "pass", "summary": "", "failed": []},
                               "voice": {"outcome": "fail", "summary": "not heard", "failed": ["audio: voice turn"]}}
    data.update(overrides)
    return data


def test_result_parses_and_stale_ones_are_ignored(tmp_path: Path) -> None:
    result = parse_result(json.dumps(_result()).encode())
    assert result.doctor.outcome is Outcome.PASS and result.voice.outcome is Outcome.FAIL
    path = tmp_path / "result.json"
    path.write_text(json.dumps(_result()))
    assert read_result(path, "b", 5.0) is not None
    assert read_result(path, "b", 11.0) is None  # written before this gate run started
    assert read_result(path, "other boot", 5.0) is None
    assert read_result(tmp_path / "missing.json", "b", 5.0) is None
    path.write_text("{")
    assert read_result(path, "b", 5.0) is None


@pytest.mark.parametrize("bad", [
    _result(version=2), _result(boot_id=3), _result(started_monotonic=True), _result(doctor=[]),
    _result(voice={"outcome": "maybe"}), _result(doctor={"outcome": "pass", "failed": "x"}),
])
def test_result_parser_refuses_other_shapes(bad: dict[str, object]) -> None:
    with pytest.raises(ResultError):
        parse_result(json.dumps(bad).encode())


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.one_of(st.binary(max_size=400),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                              lambda inner: st.lists(inner, max_size=4)
                              | st.dictionaries(st.sampled_from(["version", "boot_id", "started_monotonic",
                                                                 "doctor", "voice", "outcome", "summary",
                                                                 "failed"]), inner, max_size=6),
                              max_leaves=20).map(lambda v: json.dumps(v).encode())))
def test_result_parser_fuzz_only_raises_its_own_error(data: bytes) -> None:
    with contextlib.suppress(ResultError):
        parse_result(data)


def test_doctor_and_voice_parts_from_their_output() -> None:
    report = {"exit_status": 1, "checks": [{"area": "audio", "name": "loopback", "status": "fail"},
                                           {"area": "disk", "name": "spool", "status": "ok"}]}
    part = doctor_part(subprocess.CompletedProcess([], 1, json.dumps(report), ""))
    assert part == {"outcome": "fail", "summary": "1 check(s) failed", "failed": ["audio: loopback"]}
    assert doctor_part(subprocess.CompletedProcess([], 0, "", ""))["outcome"] == "pass"
    assert doctor_part(subprocess.CompletedProcess([], 124, "", "timed out after 5 s"))["outcome"] == "timeout"
    broken = doctor_part(subprocess.CompletedProcess([], 2, "not json", "kiosk: audio.x: bad"))
    assert broken["outcome"] == "fail" and "bad" in broken["summary"]
    voice = voice_part(subprocess.CompletedProcess([], 1, json.dumps({"summary": "did not hear"}), ""))
    assert voice == {"outcome": "fail", "summary": "did not hear", "failed": ["audio: voice turn"]}


# ---------------------------------------------------------------------------------- the gate, end to end
STANDIN_KIOSK = """\
#!/bin/sh
# A stand-in for the kiosk executable: the doctor and the voice self-test as the test asks.
echo "kiosk $*" >>"$GATE_LOG"
case "$1" in
  doctor)
    case "$DOCTOR" in
      pass) echo '{"exit_status": 0, "checks": [{"area": "audio", "name": "loopback", "status": "ok"}]}'; exit 0 ;;
      hang) sleep 30 ;;
      *) echo '{"exit_status": 1, "checks": [{"area": "audio", "name": "loopback", "status": "fail"}]}'; exit 1 ;;
    esac ;;
  selftest)
    case "$VOICE" in
      pass) echo '{"heard": true, "summary": "heard the cue"}'; exit 0 ;;
      hang) sleep 30 ;;
      *) echo '{"heard": false, "summary": "did not hear the cue"}'; exit 1 ;;
    esac ;;
esac
exit 3
"""

STANDIN_SYSTEMCTL = """\
#!/bin/sh
# A stand-in for systemctl: logs; "start kiosk-update-check.service" runs the real `kiosk update check`.
echo "systemctl $*" >>"$GATE_LOG"
case "$*" in
  "is-active --quiet kiosk.service") [ "$KIOSK_ACTIVE" = yes ]; exit $? ;;
  "start kiosk-update-check.service")
    exec "$PYTHON" -m kiosk update check --kiosk "$STANDIN_DIR/kiosk" --out "$RESULT" \\
      --doctor-timeout 1 --voice-timeout 1 >/dev/null ;;
esac
exit 0
"""

STANDIN_RAUC = """\
#!/bin/sh
# A stand-in for rauc's D-Bus client: `status mark-good|mark-bad booted` does what RAUC does with the custom
# backend (set-state <booted> good|bad), through the real backend.
echo "rauc $*" >>"$GATE_LOG"
backend() { "$PYTHON" -m kiosk.update.tryboot --root "$FAKE_ROOT" "$@"; }
case "$1 $2 $3" in
  "status mark-good booted") slot=$(backend get-current) && backend set-state "$slot" good ;;
  "status mark-bad booted") slot=$(backend get-current) && backend set-state "$slot" bad ;;
  *) exit 1 ;;
esac
"""


def _standins(tmp_path: Path) -> Path:
    directory = tmp_path / "bin"
    directory.mkdir()
    for name, text in (("kiosk", STANDIN_KIOSK), ("systemctl", STANDIN_SYSTEMCTL), ("rauc", STANDIN_RAUC)):
        (directory / name).write_text(text)
        (directory / name).chmod(0o755)
    return directory


def _gate(tmp_path: Path, command: str, *, doctor: str = "pass", voice: str = "pass",
          kiosk_active: str = "yes", partition: int = 3,
          pending: str | None = "B") -> tuple[subprocess.CompletedProcess[str], Path, list[str]]:
    root = scratch_root(tmp_path, partition=partition, tryboot=partition == 3)
    if pending is not None:
        (root / STATE).parent.mkdir(parents=True, exist_ok=True)
        (root / STATE).write_text(json.dumps({"version": 1, "pending": pending, "bad": []}))
    (root / "usr/share/kiosk").mkdir(parents=True)
    (root / "usr/share/kiosk/image-version").write_text("2025.3.1\n")
    standins = _standins(tmp_path)
    log = tmp_path / "gate.log"
    log.touch()
    result_path = tmp_path / "run" / "result.json"
    env = {**os.environ, "PATH": f"{standins}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(sys.path), "PYTHON": sys.executable, "GATE_LOG": str(log),
           "STANDIN_DIR": str(standins), "RESULT": str(result_path), "FAKE_ROOT": str(root),
           "DOCTOR": doctor, "VOICE": voice, "KIOSK_ACTIVE": kiosk_active}
    result = subprocess.run([sys.executable, "-m", "kiosk.update.gate", "--root", str(root), "--result",
                             str(result_path), command], capture_output=True, text=True, timeout=120, env=env,
                            check=False)
    return result, root, log.read_text().splitlines()


def test_a_failing_doctor_marks_bad_and_reboots(tmp_path: Path) -> None:
    result, root, calls = _gate(tmp_path, "run", doctor="fail")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["action"] == "roll_back"
    assert "rauc status mark-bad booted" in calls and calls[-1] == "systemctl reboot"
    assert "rauc status mark-good booted" not in calls
    assert not any("start --no-block kiosk.service" in c for c in calls)
    # The checks ran in order, the doctor first, with the kiosk stopped by the check unit's Conflicts=.
    assert calls.index("systemctl start kiosk-update-check.service") < calls.index(
        "kiosk doctor audio network disk watchdog --json") < calls.index("kiosk selftest voice --json")
    # The firmware's next boot is the committed slot: autoboot.txt is untouched, B is bad, nothing waits.
    assert (root / "bootfs/autoboot.txt").read_bytes() == IMAGE_AUTOBOOT
    status = read_status(root)
    assert status.bad_slots == ["B"] and status.pending_slot is None and status.last_rolled_back is True
    assert status.last_trial is not None and status.last_trial["image_version"] == "2025.3.1"
    reasons = " ".join(status.last_trial["reasons"])
    assert "kiosk doctor failed" in reasons and "audio: loopback" in reasons
    assert status.last_trial["marked"] is True and status.last_trial["voice"]["outcome"] == "pass"


def test_all_passing_commits_and_starts_the_kiosk(tmp_path: Path) -> None:
    result, root, calls = _gate(tmp_path, "run")
    assert json.loads(result.stdout)["action"] == "commit", result.stderr
    assert "rauc status mark-good booted" in calls and calls[-1] == "systemctl start --no-block kiosk.service"
    assert "systemctl reboot" not in calls and "rauc status mark-bad booted" not in calls
    assert parse_autoboot((root / "bootfs/autoboot.txt").read_bytes()) == Autoboot(committed=3, trial=2)
    status = read_status(root)
    assert status.committed_slot == "B" and status.slot == "B" and not status.trial
    assert status.pending_slot is None and status.last_rolled_back is False


@pytest.mark.parametrize(("doctor", "voice", "active", "reason"), [
    ("pass", "fail", "yes", "the voice self-test failed"),
    ("pass", "hang", "yes", "the voice self-test did not finish in time"),
    ("hang", "pass", "yes", "kiosk doctor did not finish in time"),
    ("pass", "pass", "no", "kiosk.service did not come up"),
])
def test_every_other_failure_rolls_back(tmp_path: Path, doctor: str, voice: str, active: str, reason: str) -> None:
    result, root, calls = _gate(tmp_path, "run", doctor=doctor, voice=voice, kiosk_active=active)
    decision = json.loads(result.stdout)
    assert decision["action"] == "roll_back" and any(r.startswith(reason) for r in decision["reasons"]), decision
    assert calls[-2:] == ["rauc status mark-bad booted", "systemctl reboot"]
    assert (root / "bootfs/autoboot.txt").read_bytes() == IMAGE_AUTOBOOT


def test_a_normal_boot_does_nothing(tmp_path: Path) -> None:
    condition, _, calls = _gate(tmp_path, "is-trial", partition=2)
    assert condition.returncode == 1 and calls == []
    result, root, calls = _gate(tmp_path / "run", "run", partition=2, doctor="fail")
    assert json.loads(result.stdout)["action"] == "nothing" and calls == []
    assert read_status(root).last_trial is None


def test_a_trial_boot_is_a_trial(tmp_path: Path) -> None:
    condition, _, calls = _gate(tmp_path, "is-trial")
    assert condition.returncode == 0 and calls == []


def test_a_stray_tryboot_returns_without_marking(tmp_path: Path) -> None:
    result, root, calls = _gate(tmp_path, "run", pending=None)
    assert json.loads(result.stdout)["action"] == "return"
    assert calls == ["systemctl reboot"]
    assert (root / "bootfs/autoboot.txt").read_bytes() == IMAGE_AUTOBOOT
    assert read_status(root).last_rolled_back is True


def test_a_broken_autoboot_fails_the_gate(tmp_path: Path) -> None:
    """The unit then fails, and its FailureAction=reboot returns to the committed slot."""
    root = scratch_root(tmp_path, partition=3, autoboot=b"[all]\nboot_partition=2\n")
    result = subprocess.run([sys.executable, "-m", "kiosk.update.gate", "--root", str(root), "run"],
                            capture_output=True, text=True, timeout=60, check=False,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 1 and "tryboot_a_b" in result.stderr
    condition = subprocess.run([sys.executable, "-m", "kiosk.update.gate", "--root", str(root), "is-trial"],
                               capture_output=True, text=True, timeout=60, check=False,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert condition.returncode == 1, "no A/B configuration: never a trial (no reboot loop)"


def test_update_status_command(tmp_path: Path) -> None:
    _gate(tmp_path, "run", voice="fail")
    root = tmp_path / "root"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    shown = subprocess.run([sys.executable, "-m", "kiosk", "update", "status", "--root", str(root)],
                           capture_output=True, text=True, timeout=60, env=env, check=False)
    assert shown.returncode == 0, shown.stderr
    assert textwrap.dedent("""\
        slot: B (committed: A, THIS BOOT IS A TRIAL)
        image version: 2025.3.1
        marked bad: B
        last trial: slot B (image 2025.3.1): roll_back""") in shown.stdout
    data = json.loads(subprocess.run([sys.executable, "-m", "kiosk", "update", "status", "--json", "--root",
                                      str(root)], capture_output=True, text=True, timeout=60, env=env,
                                     check=True).stdout)
    assert data["last_rolled_back"] is True and data["slot"] == "B" and data["image_version"] == "2025.3.1"


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.binary(max_size=600))
def test_the_gate_record_and_the_checks_output_are_read_safely(tmp_path_factory: pytest.TempPathFactory,
                                                               data: bytes) -> None:
    """The record (a file) and the doctor's and self-test's output (another process) never crash their readers."""
    from kiosk.update.status import read_record

    path = tmp_path_factory.mktemp("record") / "kiosk-gate.json"
    path.write_bytes(data)
    record = read_record(path)
    assert record is None or set(record) >= {"slot", "action", "reasons"}
    text = data.decode("utf-8", errors="replace")
    for code in (0, 1, 124):
        completed = subprocess.CompletedProcess([], code, text, text)
        assert doctor_part(completed)["outcome"] in ("pass", "fail", "timeout")
        assert voice_part(completed)["outcome"] in ("pass", "fail", "timeout")

"""The health gate: on a trial boot, commit the new slot only when the kiosk proves itself; else go back.

``kiosk-update-gate.service`` (root, ordered after ``kiosk.service``) runs ``python -I -m kiosk.update.gate run``
on every boot; its ``ExecCondition=`` (``... gate is-trial``) skips it unless the firmware booted a slot other than
the committed one. Then:

1. was ``kiosk.service`` active (it reached ``READY=1`` on the new slot)?
2. ``systemctl start kiosk-update-check.service``: as the kiosk user, in the kiosk's own sandbox, ``kiosk doctor
   audio network disk watchdog`` and one loopback voice turn (``kiosk selftest voice``), each within a time bound;
   that unit conflicts with ``kiosk.service``, so the kiosk stops first and the devices are free;
3. ``decide``: all passed -> ``rauc status mark-good booted`` (the tryboot backend swaps ``autoboot.txt``: the
   slot is committed) and the kiosk starts again; anything failed or timed out -> ``rauc status mark-bad booted``
   and a plain reboot, which the firmware serves from the committed slot (the tryboot flag lasts one boot).

A tryboot of a slot that no installation is waiting for (``reboot "0 tryboot"`` typed by hand, which would boot the
*previous* image) is sent back with a reboot and nothing marked. Whatever happens is recorded in
``/persistent/rauc/kiosk-gate.json`` (``kiosk.update.status`` reads it). The unit's ``FailureAction=reboot`` covers
a gate that crashes or overruns its ``TimeoutStartSec=`` on a trial boot: the reboot returns to the committed slot.

Runs as root; standard library only. The decision is the pure ``decide``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from kiosk.update.tryboot import (
    STATE_DIR,
    Autoboot,
    Firmware,
    SlotState,
    TrybootError,
    effective,
    read_autoboot,
    read_firmware,
    read_state,
)

_LOGGER = logging.getLogger("kiosk.update.gate")

RECORD = "persistent/rauc/kiosk-gate.json"  # under the root; slot-shared (the persistent partition)
CHECK_RESULT = Path("/run/kiosk-update-check/result.json")  # written by kiosk-update-check.service (kiosk user)
CHECK_UNIT = "kiosk-update-check.service"
KIOSK_UNIT = "kiosk.service"
# The check unit's own TimeoutStartSec= is 8 minutes; the gate waits a little longer for systemctl to report.
CHECK_TIMEOUT_SECONDS = 9 * 60.0
COMMAND_TIMEOUT_SECONDS = 120.0
MAX_RESULT_BYTES = 64 * 1024
RECORD_MODE = 0o644  # no personal data: slot names, versions, check names, times


class BootKind(StrEnum):
    """What kind of boot this is, for the gate."""

    NORMAL = "normal"  # the committed slot: nothing to decide
    TRIAL = "trial"  # the slot an installation is waiting on, booted once on trial
    STRAY = "stray"  # the other slot, but no installation waits for it (a tryboot by hand)


class Outcome(StrEnum):
    """How one health check ended."""

    PASS = "pass"
    FAIL = "fail"
    TIMEOUT = "timeout"  # it did not finish within its bound
    NOT_RUN = "not_run"  # no result (the check unit did not start, crashed, or wrote nothing readable)


class Action(StrEnum):
    """What the gate does."""

    NOTHING = "nothing"  # a normal boot
    COMMIT = "commit"  # mark-good: autoboot.txt makes this slot the committed one; start the kiosk again
    ROLL_BACK = "roll_back"  # mark-bad, reboot: the firmware boots the committed slot
    RETURN = "return"  # reboot into the committed slot, nothing marked (a stray tryboot)


@dataclass(frozen=True)
class Decision:
    """The gate's decision and why (each reason one line a person can act on)."""

    action: Action
    reasons: tuple[str, ...] = ()


def classify(firmware: Firmware, autoboot: Autoboot, state: SlotState) -> BootKind:
    """Normal (the committed slot booted), trial (the slot waiting for it) or stray (the other, not waiting)."""
    booted = firmware.booted
    if booted is None or booted == autoboot.committed_slot:
        return BootKind.NORMAL
    pending = effective(state, autoboot).pending
    return BootKind.TRIAL if pending == booted and booted not in state.bad else BootKind.STRAY


def decide(boot: BootKind, kiosk_ready: bool, doctor: Outcome, voice: Outcome) -> Decision:
    """Commit only a trial boot on which the kiosk came up and both checks passed; roll back any other trial.

    A normal boot does nothing whatever the checks say (they are not run then); a stray tryboot returns to the
    committed slot without marking anything.
    """
    if boot is BootKind.NORMAL:
        return Decision(Action.NOTHING)
    if boot is BootKind.STRAY:
        return Decision(Action.RETURN, ("a tryboot of a slot no installation is waiting for (reboot \"0 tryboot\" "
                                        "by hand boots the previous image): back to the committed slot",))
    reasons: list[str] = []
    if not kiosk_ready:
        reasons.append("kiosk.service did not come up (no READY=1) on the new slot: see its journal")
    for name, outcome in (("kiosk doctor", doctor), ("the voice self-test", voice)):
        if outcome is Outcome.FAIL:
            reasons.append(f"{name} failed")
        elif outcome is Outcome.TIMEOUT:
            reasons.append(f"{name} did not finish in time")
        elif outcome is Outcome.NOT_RUN:
            reasons.append(f"{name} gave no result")
    if reasons:
        return Decision(Action.ROLL_BACK, tuple(reasons))
    return Decision(Action.COMMIT, ("kiosk.service came up, kiosk doctor and the voice self-test passed",))


# ------------------------------------------------------------------------------------- the check's result
@dataclass(frozen=True)
class CheckPart:
    """One check's part of the result file."""

    outcome: Outcome
    summary: str = ""
    failed: tuple[str, ...] = ()


@dataclass(frozen=True)
class CheckResult:
    """What ``kiosk update check`` wrote: when it started (this boot, monotonic clock) and the two outcomes."""

    boot_id: str
    started_monotonic: float
    doctor: CheckPart
    voice: CheckPart


class ResultError(ValueError):
    """The check's result file is not one ``kiosk update check`` wrote."""


def _part(raw: object, name: str) -> CheckPart:
    if not isinstance(raw, dict):
        raise ResultError(f"{name}: not an object")
    try:
        outcome = Outcome(str(raw.get("outcome")))
    except ValueError:
        raise ResultError(f"{name}: unknown outcome {raw.get('outcome')!r}") from None
    summary = raw.get("summary", "")
    failed = raw.get("failed", [])
    if not isinstance(summary, str) or not isinstance(failed, list) or not all(isinstance(f, str) for f in failed):
        raise ResultError(f"{name}: summary must be text and failed a list of names")
    return CheckPart(outcome, summary[:500], tuple(f[:200] for f in failed[:50]))


def parse_result(data: bytes) -> CheckResult:
    """Parse the check's result file strictly; ``ResultError`` names what is wrong."""
    if len(data) > MAX_RESULT_BYTES:
        raise ResultError(f"larger than {MAX_RESULT_BYTES} bytes")
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise ResultError(f"not JSON ({error})") from None
    if not isinstance(raw, dict) or raw.get("version") != 1:
        raise ResultError("not version 1")
    boot_id, started = raw.get("boot_id"), raw.get("started_monotonic")
    if not isinstance(boot_id, str) or isinstance(started, bool) or not isinstance(started, (int, float)):
        raise ResultError("boot_id must be text and started_monotonic a number")
    return CheckResult(boot_id, float(started), _part(raw.get("doctor"), "doctor"), _part(raw.get("voice"), "voice"))


def read_result(path: Path, boot_id: str, not_before_monotonic: float) -> CheckResult | None:
    """The check's result if it was written in this boot after ``not_before_monotonic``; None otherwise."""
    try:
        with path.open("rb") as handle:
            result = parse_result(handle.read(MAX_RESULT_BYTES + 1))
    except FileNotFoundError:
        return None
    except (OSError, ResultError) as error:
        _LOGGER.error("the check's result %s cannot be used: %s", path, error)
        return None
    if result.boot_id != boot_id or result.started_monotonic < not_before_monotonic:
        _LOGGER.error("the check's result %s is from an earlier run: ignored", path)
        return None
    return result


# ----------------------------------------------------------------------------------------------- the run
Runner = Callable[[Sequence[str], float], "subprocess.CompletedProcess[str]"]


def _run(argv: Sequence[str], timeout_seconds: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_seconds, check=False)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(list(argv), 124, "", f"timed out after {timeout_seconds:g} s")
    except OSError as error:
        return subprocess.CompletedProcess(list(argv), 127, "", str(error))


def boot_id() -> str:
    """The kernel's random id of this boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def image_version(root: Path) -> str | None:
    """The running slot's image version (``/usr/share/kiosk/image-version``, written by the image build)."""
    from kiosk.update.status import read_image_version

    return read_image_version(root)


@dataclass
class GateRecord:
    """``/persistent/rauc/kiosk-gate.json``: the last trial and how it ended (read by ``kiosk update status``)."""

    slot: str
    image_version: str | None
    boot_id: str
    started_unix: float
    tryboot_flag: bool | None
    action: str = "deciding"  # then an Action value
    reasons: list[str] = field(default_factory=list)
    kiosk_ready: bool | None = None
    doctor: dict[str, Any] = field(default_factory=dict)
    voice: dict[str, Any] = field(default_factory=dict)
    finished_unix: float | None = None
    marked: bool | None = None  # rauc accepted mark-good / mark-bad

    def write(self, root: Path) -> None:
        """Write durably; a failure is logged, never stops the gate (the decision matters more)."""
        from kiosk.provision import write_durably

        data = {"version": 1, **asdict(self)}
        try:
            (root / STATE_DIR).mkdir(parents=True, exist_ok=True)
            write_durably(root / RECORD, (json.dumps(data, indent=2) + "\n").encode(), RECORD_MODE)
        except OSError as error:
            _LOGGER.error("cannot write %s: %s", root / RECORD, error)


def run_gate(root: Path = Path("/"), runner: Runner = _run, *, result_path: Path = CHECK_RESULT,
             check_timeout_seconds: float = CHECK_TIMEOUT_SECONDS,
             clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> Decision:
    """What ``kiosk-update-gate.service`` does; returns the decision it carried out."""
    firmware = read_firmware(root)
    autoboot = read_autoboot(root)
    state = read_state(root)
    boot = classify(firmware, autoboot, state)
    if boot is BootKind.NORMAL:
        _LOGGER.info("normal boot of the committed slot %s: nothing to decide", autoboot.committed_slot)
        return Decision(Action.NOTHING)
    slot = firmware.booted or "?"
    record = GateRecord(slot=slot, image_version=image_version(root), boot_id=boot_id(), started_unix=wall(),
                        tryboot_flag=firmware.tryboot)
    if boot is BootKind.STRAY:
        decision = decide(boot, False, Outcome.NOT_RUN, Outcome.NOT_RUN)
        return _finish(root, runner, record, decision, wall)
    record.write(root)
    _LOGGER.info("trial boot of slot %s (committed: %s): checking before committing", slot, autoboot.committed_slot)

    kiosk_ready = runner(["systemctl", "is-active", "--quiet", KIOSK_UNIT], COMMAND_TIMEOUT_SECONDS).returncode == 0
    started = clock()
    # The check unit conflicts with kiosk.service: systemd stops the kiosk first, so the devices are free.
    started_check = runner(["systemctl", "start", CHECK_UNIT], check_timeout_seconds)
    result = read_result(result_path, record.boot_id, started)
    if result is None:
        timed_out = started_check.returncode == 124
        missing = Outcome.TIMEOUT if timed_out else Outcome.NOT_RUN
        doctor = voice = CheckPart(missing, started_check.stderr.strip()[-300:])
    else:
        doctor, voice = result.doctor, result.voice
    record.kiosk_ready = kiosk_ready
    record.doctor = {"outcome": doctor.outcome.value, "summary": doctor.summary, "failed": list(doctor.failed)}
    record.voice = {"outcome": voice.outcome.value, "summary": voice.summary, "failed": list(voice.failed)}
    decision = decide(boot, kiosk_ready, doctor.outcome, voice.outcome)
    if decision.action is Action.ROLL_BACK:
        details = [f"doctor: {', '.join(doctor.failed)}" if doctor.failed else "",
                   f"voice: {voice.summary}" if voice.outcome is not Outcome.PASS and voice.summary else ""]
        decision = Decision(decision.action, decision.reasons + tuple(d for d in details if d))
    return _finish(root, runner, record, decision, wall)


def _finish(root: Path, runner: Runner, record: GateRecord, decision: Decision,
            wall: Callable[[], float]) -> Decision:
    """Carry out the decision: mark (through RAUC), record, then start the kiosk or reboot."""
    if decision.action is Action.COMMIT:
        marked = runner(["rauc", "status", "mark-good", "booted"], COMMAND_TIMEOUT_SECONDS)
        record.marked = marked.returncode == 0
        if not record.marked:
            # Not committed: the slot must not stay in use by accident. Back to the committed slot.
            decision = Decision(Action.ROLL_BACK, (f"rauc status mark-good failed ({marked.stderr.strip()[-300:]}); "
                                                   "the slot was not committed",))
            runner(["rauc", "status", "mark-bad", "booted"], COMMAND_TIMEOUT_SECONDS)
    elif decision.action is Action.ROLL_BACK:
        # Even if RAUC refuses, the plain reboot below returns to the committed slot (the tryboot flag is gone).
        record.marked = runner(["rauc", "status", "mark-bad", "booted"], COMMAND_TIMEOUT_SECONDS).returncode == 0
    record.action = decision.action.value
    record.reasons = list(decision.reasons)
    record.finished_unix = wall()
    record.write(root)
    if decision.action is Action.COMMIT:
        _LOGGER.info("slot %s committed: %s", record.slot, "; ".join(decision.reasons))
        runner(["systemctl", "start", "--no-block", KIOSK_UNIT], COMMAND_TIMEOUT_SECONDS)
    else:
        _LOGGER.error("slot %s not committed (%s): rebooting into the committed slot", record.slot,
                      "; ".join(decision.reasons))
        runner(["systemctl", "reboot"], COMMAND_TIMEOUT_SECONDS)
    return decision


def is_trial(root: Path = Path("/")) -> bool:
    """True when the firmware booted a slot other than the committed one (``ExecCondition=``)."""
    try:
        autoboot = read_autoboot(root)
    except TrybootError as error:
        _LOGGER.info("no A/B boot configuration here (%s): no trial", error.message)
        return False
    return read_firmware(root).booted not in (None, autoboot.committed_slot)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -I -m kiosk.update.gate [--root DIR] is-trial|run``."""
    from kiosk.logs import setup_logging

    parser = argparse.ArgumentParser(prog="kiosk.update.gate", description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--root", type=Path, default=Path("/"), help="work under this root (tests)")
    parser.add_argument("--result", type=Path, default=CHECK_RESULT, help="the check's result file (tests)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("is-trial", help="exit 0 on a trial boot, 1 otherwise (ExecCondition=)")
    sub.add_parser("run", help="decide and act (on a trial boot: check, then commit or roll back)")
    args = parser.parse_args(argv)
    setup_logging("INFO")
    if args.command == "is-trial":
        return 0 if is_trial(args.root) else 1
    try:
        decision = run_gate(args.root, result_path=args.result)
    except TrybootError as error:
        # On a trial boot this fails the unit, and FailureAction=reboot returns to the committed slot.
        _LOGGER.error("%s", error.message)
        return 1
    print(json.dumps({"action": decision.action.value, "reasons": list(decision.reasons)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

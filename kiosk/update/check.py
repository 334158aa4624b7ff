"""``kiosk update check``: the health check an update's trial boot must pass (as the kiosk user).

Run by ``kiosk-update-check.service`` (the kiosk user, in the kiosk's own sandbox, with ``kiosk.service`` stopped
by its ``Conflicts=``), which ``kiosk-update-gate.service`` starts on a trial boot. Two checks, each a separate
``kiosk`` process with a time bound, so a device that hangs in its driver cannot hold the gate:

- ``kiosk doctor audio network disk watchdog --json`` (``DOCTOR_AREAS``): passes when no check fails (warnings
  allowed, as the doctor's own exit status says). The audio area plays the loopback sweep; the network area opens
  a session and joins the room, so the new image's link (the rtc SDK's native code) is proven end to end; the disk
  area writes to the spool; the watchdog area checks the unit and the hardware watchdog. The GPIO area is not
  gated: kiosk.service reaching ``READY=1`` already opened the panel, and a stuck button is no reason to undo a
  software update.
- ``kiosk selftest voice --json``: a spoken cue through the speaker, heard as speech by the capture chain.

The result goes to ``--out`` as JSON (``kiosk.update.gate.parse_result`` reads it): this boot's id, when the check
started (monotonic clock), and per check the outcome (pass, fail, timeout, not_run), a summary and the names of
the failed doctor checks. No audio and no words: figures and check names only. Exit status 0 when both passed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kiosk.update.gate import Outcome, boot_id

DOCTOR_AREAS = ("audio", "network", "disk", "watchdog")
DOCTOR_TIMEOUT_SECONDS = 300.0  # the loopback measurement (~12 s), a session and a room join, the disk probe
VOICE_TIMEOUT_SECONDS = 60.0  # a 2 s cue and the recording's tail
EXIT_TIMEOUT = 124

Runner = Callable[[Sequence[str], float], "subprocess.CompletedProcess[str]"]


def _run(argv: Sequence[str], timeout_seconds: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_seconds, check=False)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(list(argv), EXIT_TIMEOUT, "", f"timed out after {timeout_seconds:g} s")
    except OSError as error:
        return subprocess.CompletedProcess(list(argv), 127, "", str(error))


def default_kiosk() -> str:
    """The ``kiosk`` executable beside this Python (the virtual environment's), else the one on PATH."""
    beside = Path(sys.executable).parent / "kiosk"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("kiosk") or "kiosk"


def _json(stdout: str) -> dict[str, Any]:
    try:
        data = json.loads(stdout)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _outcome(result: subprocess.CompletedProcess[str]) -> Outcome:
    if result.returncode == 0:
        return Outcome.PASS
    if result.returncode == EXIT_TIMEOUT:
        return Outcome.TIMEOUT
    return Outcome.FAIL


def doctor_part(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The doctor's outcome and the names of its failed checks, from its exit status and ``--json`` report."""
    report = _json(result.stdout)
    checks = report.get("checks") if isinstance(report.get("checks"), list) else []
    failed = [f"{c.get('area')}: {c.get('name')}" for c in checks or []
              if isinstance(c, dict) and c.get("status") == "fail"]
    outcome = _outcome(result)
    if outcome is Outcome.PASS:
        summary = "no check failed"
    elif outcome is Outcome.TIMEOUT:
        summary = result.stderr.strip()[-200:]
    elif failed:
        summary = f"{len(failed)} check(s) failed"
    else:
        summary = f"exit status {result.returncode}: {(result.stderr or result.stdout).strip()[-200:]}"
    return {"outcome": outcome.value, "summary": summary, "failed": failed[:50]}


def voice_part(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The voice self-test's outcome and its one-line summary."""
    report = _json(result.stdout)
    outcome = _outcome(result)
    summary = report.get("summary") if isinstance(report.get("summary"), str) else None
    if summary is None:
        summary = (result.stderr or result.stdout).strip()[-200:] or f"exit status {result.returncode}"
    return {"outcome": outcome.value, "summary": summary[:500], "failed": [] if outcome is Outcome.PASS
            else ["audio: voice turn"]}


def run_check(out: Path, kiosk: str | None = None, runner: Runner = _run, *,
              doctor_timeout_seconds: float = DOCTOR_TIMEOUT_SECONDS,
              voice_timeout_seconds: float = VOICE_TIMEOUT_SECONDS,
              clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """Run the doctor and the voice self-test, write the result to ``out`` (0644: the gate reads it), return it."""
    exe = kiosk or default_kiosk()
    started = clock()
    doctor = doctor_part(runner([exe, "doctor", *DOCTOR_AREAS, "--json"], doctor_timeout_seconds))
    voice = voice_part(runner([exe, "selftest", "voice", "--json"], voice_timeout_seconds))
    result = {"version": 1, "boot_id": boot_id(), "started_monotonic": started,
              "finished_monotonic": clock(), "doctor": doctor, "voice": voice}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    return result

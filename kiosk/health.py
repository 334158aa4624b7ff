"""Service health: sd_notify (READY, STATUS, WATCHDOG, STOPPING), a watchdog fed only while healthy, and its check.

``Notifier`` speaks the sd_notify protocol by hand: one datagram per message on the unix socket named
by ``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace). Without that variable (a
terminal, the tests, the demo) every call is a no-op.

``HealthWatchdog`` pings ``WATCHDOG=1`` only while every health check passes. A check is a callable
returning ``(ok, why)``; ``progress_check`` builds the usual ones from a counter that must keep moving
(capture frames processed, controller loop ticks). Pinging from a timer that does not look at the
audio path would keep a kiosk alive whose PortAudio thread is stuck in ALSA error handling after a
USB device was power-cycled: deaf, but "healthy". Instead, systemd restarts it.

How the app wires it (``kiosk.app``)::

    notifier = Notifier.from_environment()
    watchdog = HealthWatchdog(notifier, [
        progress_check("capture", lambda: engine.frames_captured, max_stall_seconds=2.0, now=loop.time),
        progress_check("controller", lambda: controller.ticks, max_stall_seconds=2.0, now=loop.time),
    ])
    ...  # devices open, first link attempt made
    notifier.ready("idle")
    task = asyncio.create_task(watchdog.run())  # systemd arms WatchdogSec= once READY=1 arrives
    ...
    notifier.stopping()
    await watchdog.aclose()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kiosk.checks import Check, Figures, Verdict

_LOGGER = logging.getLogger(__name__)

# (ok, why): why says what is wrong when ok is False, and may describe the good state otherwise.
CheckResult = tuple[bool, str]
HealthCheck = Callable[[], CheckResult]

# Without a systemd watchdog, still evaluate the checks this often (for STATUS and the logs).
DEFAULT_INTERVAL_SECONDS = 5.0


def _socket_address(value: str) -> str | bytes:
    """``$NOTIFY_SOCKET`` as a ``sendto`` address: ``@name`` is an abstract socket (leading NUL byte)."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


class Notifier:
    """Send sd_notify messages to the service manager; a no-op when not started by systemd."""

    def __init__(self, socket_path: str | None, watchdog_usec: int | None = None) -> None:
        self._address = _socket_address(socket_path) if socket_path else None
        self._watchdog_usec = watchdog_usec
        self._socket: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Read ``$NOTIFY_SOCKET`` and ``$WATCHDOG_USEC`` (honouring ``$WATCHDOG_PID``, as sd_watchdog_enabled)."""
        env = os.environ if environ is None else environ
        usec: int | None = None
        raw = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if raw.isdigit() and int(raw) > 0 and (not pid or pid == str(os.getpid())):
            usec = int(raw)
        return cls(env.get("NOTIFY_SOCKET") or None, usec)

    @property
    def enabled(self) -> bool:
        """True when there is a service manager to talk to."""
        return self._address is not None

    @property
    def watchdog_seconds(self) -> float | None:
        """The unit's ``WatchdogSec=`` in seconds, or None when no watchdog is armed for this process."""
        return None if self._watchdog_usec is None else self._watchdog_usec / 1e6

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines in one datagram; True if it was sent (False: disabled or failed).

        Failures are logged once and never raised: losing a status line must not take the kiosk down
        (a lost WATCHDOG=1 shows up as a restart, which is the right outcome for a broken socket).
        """
        if self._address is None:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value).replace("\n", " ")  # a newline would start a new (bogus) assignment
            lines.append(f"{key}={text}")
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            self._socket.sendto("\n".join(lines).encode(), self._address)
        except OSError as error:
            if not self._failed:
                _LOGGER.warning("cannot notify the service manager (%s): status and watchdog pings are lost", error)
                self._failed = True
            return False
        self._failed = False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: devices are open and the first link attempt was made."""
        return self.notify(READY=1, **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        """``STATUS=...``: one line shown by ``systemctl status kiosk``."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: only ``HealthWatchdog`` should call this, and only while healthy."""
        return self.notify(WATCHDOG=1)

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC``: ask for more start-up (or stop) time, e.g. while a device settles."""
        return self.notify(EXTEND_TIMEOUT_USEC=int(seconds * 1e6))

    def stopping(self) -> bool:
        """``STOPPING=1``: shutting down on purpose."""
        return self.notify(STOPPING=1)

    def close(self) -> None:
        """Close the socket (the notifier reopens it if used again)."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


@dataclass
class _Progress:
    value: object = None
    changed_at: float | None = None


def progress_check(
    name: str,
    counter: Callable[[], object],
    max_stall_seconds: float,
    now: Callable[[], float],
    excused: Callable[[], bool] | None = None,
) -> HealthCheck:
    """A check that fails once ``counter()`` has not changed for more than ``max_stall_seconds``.

    ``counter`` reads something the watched part advances anyway (frames processed, loop ticks), so the
    hot path does no extra work for the watchdog. The first reading starts the clock. While ``excused()``
    is True the counter is not expected to move (a state the kiosk knows and handles, such as a lost device
    it shows and keeps reopening): the check passes and the clock starts again.
    """
    state = _Progress()

    def check() -> CheckResult:
        t = now()
        value = counter()
        if excused is not None and excused():
            state.value, state.changed_at = value, t
            return True, f"{name} not expected (excused)"
        if state.changed_at is None or value != state.value:
            state.value, state.changed_at = value, t
            return True, f"{name} ok"
        stalled = t - state.changed_at
        if stalled > max_stall_seconds:
            return False, f"{name} stalled for {stalled:.1f} s (limit {max_stall_seconds:g} s)"
        return True, f"{name} ok"

    return check


@dataclass
class HealthReport:
    """The outcome of one round of checks."""

    ok: bool
    problems: list[str] = field(default_factory=list)


class HealthWatchdog:
    """Evaluate the health checks periodically; ping ``WATCHDOG=1`` only when all of them pass."""

    def __init__(
        self,
        notifier: Notifier,
        checks: Sequence[HealthCheck],
        interval_seconds: float | None = None,
    ) -> None:
        """``interval_seconds`` defaults to half the unit's ``WatchdogSec=`` (as sd_watchdog_enabled advises)."""
        self._notifier = notifier
        self._checks = list(checks)
        if interval_seconds is None:
            wd = notifier.watchdog_seconds
            interval_seconds = wd / 2 if wd is not None else DEFAULT_INTERVAL_SECONDS
        if interval_seconds <= 0:
            raise ValueError("interval_seconds must be positive")
        self.interval_seconds = interval_seconds
        self._stop = asyncio.Event()
        self.last: HealthReport | None = None
        self.pings = 0

    def evaluate(self) -> HealthReport:
        """Run every check once (a check that raises counts as failed, with the error as the reason)."""
        problems: list[str] = []
        for check in self._checks:
            try:
                ok, why = check()
            except Exception as error:  # a broken check must read as unhealthy, not kill the watchdog
                ok, why = False, f"health check {getattr(check, '__name__', check)!r} raised {error!r}"
            if not ok:
                problems.append(why)
        return HealthReport(ok=not problems, problems=problems)

    def step(self) -> HealthReport:
        """One round: evaluate, ping if healthy, report changes in STATUS and the log."""
        report = self.evaluate()
        was_ok = self.last.ok if self.last is not None else True
        if report.ok:
            if self._notifier.watchdog():
                self.pings += 1
            if not was_ok:
                _LOGGER.info("healthy again; watchdog pings resumed")
                self._notifier.status("healthy")
        elif self.last is None or report.problems != self.last.problems:
            # Not pinging is the point: systemd restarts the kiosk after WatchdogSec= unless it recovers.
            _LOGGER.error("unhealthy, watchdog pings withheld: %s", "; ".join(report.problems))
            self._notifier.status("unhealthy: " + "; ".join(report.problems))
        self.last = report
        return report

    async def run(self) -> None:
        """Step every ``interval_seconds`` until ``aclose()``."""
        while not self._stop.is_set():
            self.step()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.interval_seconds)

    async def aclose(self) -> None:
        """Stop the loop in ``run()`` (no more pings)."""
        self._stop.set()


# ---------------------------------------------------------------------------------- kiosk doctor watchdog
# The Pi's hardware watchdog tops out near 15 s; longer values fail to arm it.
MAX_HW_WATCHDOG_SECONDS = 15.0
Runner = Callable[[Sequence[str]], str | None]


def _systemctl(args: Sequence[str]) -> str | None:
    """``systemctl ...`` output, or None when systemd is not running here."""
    if not Path("/run/systemd/system").is_dir() or shutil.which("systemctl") is None:
        return None
    try:
        result = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _usec(value: str | None) -> float | None:
    """A systemd time value (``WatchdogUSec``: microseconds, or "infinity") in seconds."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text in ("infinity", "0"):
        return 0.0 if text == "0" else float("inf")
    if text.isdigit():
        return int(text) / 1e6
    # systemctl show may print "10s", "1min 30s", "100ms".
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}
    total = 0.0
    for part in text.split():
        number = part.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = part[len(number):]
        if not number or unit not in units:
            return None
        total += float(number) * units[unit]
    return total


def check_watchdog(
    environ: dict[str, str] | None = None,
    run: Runner = _systemctl,
    sys_root: Path = Path("/"),
) -> list[Check]:
    """The unit watchdog (``WatchdogSec=``) and the hardware watchdog (``RuntimeWatchdogSec=``, the device)."""
    env = dict(os.environ) if environ is None else environ
    checks: list[Check] = []

    # The unit's watchdog: from our own environment when running inside the service, else systemctl.
    unit_seconds: float | None = None
    if env.get("WATCHDOG_USEC", "").isdigit():
        unit_seconds = int(env["WATCHDOG_USEC"]) / 1e6
    else:
        unit_seconds = _usec(run(["show", "kiosk.service", "--property=WatchdogUSec", "--value"]))
    if unit_seconds is None:
        checks.append(Check("watchdog", "service watchdog", Verdict.SKIP,
                            "systemd is not running here: cannot read kiosk.service's WatchdogSec="))
    elif unit_seconds == 0 or unit_seconds == float("inf"):
        checks.append(Check("watchdog", "service watchdog", Verdict.WARN, "kiosk.service has no WatchdogSec=",
                            "install systemd/kiosk.service (WatchdogSec=10s) and `systemctl daemon-reload`"))
    else:
        checks.append(Check("watchdog", "service watchdog", Verdict.OK,
                            f"WatchdogSec={unit_seconds:g}s; pings only while capture and controller are alive",
                            None, {"watchdog_seconds": unit_seconds}))

    # The hardware watchdog systemd feeds: configured value, and what the kernel device says.
    runtime = _usec(run(["show", "--property=RuntimeWatchdogUSec", "--value"]))
    device = sys_root / "sys/class/watchdog/watchdog0"
    state = _read(device / "state")
    timeout = _read(device / "timeout")
    figures: Figures = {
        "runtime_watchdog_seconds": runtime, "device_state": state,
        "device_timeout_seconds": int(timeout) if timeout and timeout.isdigit() else None}
    if not device.exists():
        checks.append(Check("watchdog", "hardware watchdog", Verdict.SKIP if runtime is None else Verdict.WARN,
                            "no watchdog device (/sys/class/watchdog/watchdog0)",
                            "on a Pi: dtparam=watchdog=on (hw/config.txt.snippet)", figures))
    elif runtime is not None and (runtime == 0 or runtime == float("inf")):
        checks.append(Check("watchdog", "hardware watchdog", Verdict.WARN,
                            "systemd does not feed the hardware watchdog (RuntimeWatchdogSec= unset)",
                            "install systemd/system-watchdog.conf as /etc/systemd/system.conf.d/kiosk-watchdog.conf",
                            figures))
    elif runtime is not None and runtime > MAX_HW_WATCHDOG_SECONDS:
        checks.append(Check("watchdog", "hardware watchdog", Verdict.FAIL,
                            f"RuntimeWatchdogSec={runtime:g}s: the Pi's watchdog tops out near 15 s, so it is "
                            "not armed",
                            "set RuntimeWatchdogSec=15s or less", figures))
    elif state != "active":
        checks.append(Check("watchdog", "hardware watchdog", Verdict.WARN,
                            f"watchdog device is {state or 'in an unknown state'}, not active",
                            "with an initramfs add watchdog_disarm=0 to cmdline.txt; check RuntimeWatchdogSec=",
                            figures))
    else:
        checks.append(Check("watchdog", "hardware watchdog", Verdict.OK,
                            f"active, timeout {timeout} s" + (f", fed every {runtime / 2:g} s" if runtime else ""),
                            None, figures))
    return checks


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None

"""Run a command as systemd runs a service, with the settings read from the unit file (systemd/kiosk.service).

The field bench (``kiosk_dev.bench.field``) kills the kiosk and needs it back exactly as the appliance would
have it back, on a machine without systemd as process 1. ``ServiceUnit.from_file`` reads what decides that
from the unit, and ``Supervisor`` acts on it:

- ``Type=notify``: ``$NOTIFY_SOCKET`` is a datagram socket of the supervisor; the start counts once
  ``READY=1`` arrives, within ``TimeoutStartSec=`` (else SIGTERM, SIGKILL after ``TimeoutStopSec=``, and a
  failed start);
- ``WatchdogSec=``: ``$WATCHDOG_USEC`` is set and the watchdog armed at ``READY=1``; a ping (``WATCHDOG=1``)
  missing for that long sends SIGABRT (systemd's watchdog signal), then SIGKILL after ``TimeoutStopSec=``;
- ``Restart=`` (always, on-failure, on-abnormal, no) and ``RestartSec=``;
- ``StartLimitIntervalSec=`` / ``StartLimitBurst=``: more starts than the burst within the interval and the
  unit fails: no more starts (systemd would run ``OnFailure=``; the supervisor reports it instead);
- ``Environment=`` (``%t`` is the supervisor's runtime directory) and ``Nice=``, applied relative to the
  supervisor's own niceness (``nice(1)``), so a bench started with ``nice`` stays polite to the machine;
- stopping: SIGTERM, then SIGKILL after ``TimeoutStopSec=``.

Not modelled: the sandbox, ``User=``, credentials (the caller passes ``$CREDENTIALS_DIRECTORY``), cgroup
weights. Every start is an ``Incarnation`` (pid, start, ready, end, why it ended), so the bench can tell its
own SIGKILLs from crashes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kiosk.errors import KioskError

_LOGGER = logging.getLogger(__name__)

_SPAN_UNITS = {"us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3, "s": 1.0, "sec": 1.0, "second": 1.0,
               "seconds": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0, "h": 3600.0, "hr": 3600.0,
               "hour": 3600.0, "hours": 3600.0, "d": 86400.0, "day": 86400.0, "days": 86400.0}
_SPAN_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")
_WATCHDOG_CHECK_SECONDS = 0.25


class UnitError(KioskError):
    """The unit file cannot be read as the supervisor needs it."""

    def __init__(self, message: str) -> None:
        super().__init__("unit_invalid", message)


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as section -> key -> values (keys may repeat, as in systemd; empty resets the list)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        if current is None or not sep:
            raise UnitError(f"line {number}: {raw!r} is not 'Key=value' inside a [Section]")
        values = current.setdefault(key.strip(), [])
        if value.strip():
            values.append(value.strip())
        else:
            values.clear()
    return sections


def parse_timespan(value: str) -> float:
    """A systemd time span in seconds: ``3s``, ``10min``, ``1min 30s``, ``500ms``, ``90`` (seconds)."""
    text = value.strip().lower()
    if text in ("infinity", ""):
        return float("inf")
    total = 0.0
    position = 0
    for match in _SPAN_PART.finditer(text):
        if text[position:match.start()].strip():
            break
        unit = match.group(2) or "s"
        if unit not in _SPAN_UNITS:
            raise UnitError(f"time span {value!r}: unknown unit {unit!r}; use s, ms, min, h")
        total += float(match.group(1)) * _SPAN_UNITS[unit]
        position = match.end()
    if text[position:].strip() or position == 0:
        raise UnitError(f"time span {value!r} is not a systemd time span such as 3s or 10min")
    return total


@dataclass(frozen=True)
class ServiceUnit:
    """What decides how a service is started, watched and restarted."""

    notify: bool = False
    restart: str = "no"
    restart_seconds: float = 0.1
    start_limit_interval_seconds: float = 10.0
    start_limit_burst: int = 5
    timeout_start_seconds: float = 90.0
    timeout_stop_seconds: float = 90.0
    watchdog_seconds: float | None = None
    nice: int = 0
    environment: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: Path, *, runtime_dir: Path | None = None) -> ServiceUnit:
        """Read a ``.service`` file (``runtime_dir`` stands in for ``%t``)."""
        return cls.from_text(path.read_text(), runtime_dir=runtime_dir)

    @classmethod
    def from_text(cls, text: str, *, runtime_dir: Path | None = None) -> ServiceUnit:
        """Parse the unit's text (systemd's defaults for what it leaves out)."""
        sections = parse_unit(text)
        unit, service = sections.get("Unit", {}), sections.get("Service", {})

        def last(section: dict[str, list[str]], key: str) -> str | None:
            values = section.get(key)
            return values[-1] if values else None

        def span(section: dict[str, list[str]], key: str, default: float) -> float:
            value = last(section, key)
            return parse_timespan(value) if value is not None else default

        environment: dict[str, str] = {}
        for entry in service.get("Environment", []):
            for item in shlex.split(entry):
                key, sep, value = item.partition("=")
                if not sep:
                    raise UnitError(f"Environment={entry!r}: {item!r} is not NAME=value")
                if runtime_dir is not None:
                    value = value.replace("%t", str(runtime_dir))
                if "%" not in value:  # other specifiers (%h, %n, ...) have no meaning off systemd
                    environment[key] = value
        restart = last(service, "Restart") or "no"
        if restart not in ("no", "always", "on-failure", "on-abnormal", "on-abort", "on-watchdog", "on-success"):
            raise UnitError(f"Restart={restart} is not a restart policy")
        watchdog = span(service, "WatchdogSec", 0.0)
        timeout = span(service, "TimeoutSec", 90.0)
        burst = last(unit, "StartLimitBurst")
        try:
            nice = int(last(service, "Nice") or 0)
            burst_count = int(burst) if burst is not None else 5
        except ValueError as error:
            raise UnitError(f"Nice= and StartLimitBurst= take whole numbers: {error}") from None
        return cls(
            notify=(last(service, "Type") or "simple") == "notify",
            restart=restart,
            restart_seconds=span(service, "RestartSec", 0.1),
            start_limit_interval_seconds=span(unit, "StartLimitIntervalSec", 10.0),
            start_limit_burst=burst_count,
            timeout_start_seconds=span(service, "TimeoutStartSec", timeout),
            timeout_stop_seconds=span(service, "TimeoutStopSec", timeout),
            watchdog_seconds=watchdog if watchdog > 0 else None,
            nice=nice,
            environment=environment,
        )

    def describe(self) -> dict[str, Any]:
        """The settings as plain data, named as in the unit (the bench's report says what it ran with)."""
        return {"Type": "notify" if self.notify else "simple", "Restart": self.restart,
                "RestartSec": self.restart_seconds, "StartLimitIntervalSec": self.start_limit_interval_seconds,
                "StartLimitBurst": self.start_limit_burst, "TimeoutStartSec": self.timeout_start_seconds,
                "TimeoutStopSec": self.timeout_stop_seconds, "WatchdogSec": self.watchdog_seconds, "Nice": self.nice}

    def restarts_after(self, cause: str) -> bool:
        """Whether ``Restart=`` restarts after an end of this kind (clean, exit-code, signal, watchdog, timeout)."""
        if self.restart == "always":
            return True
        if self.restart == "no":
            return False
        return {
            "on-failure": cause in ("exit-code", "signal", "watchdog", "timeout"),
            "on-abnormal": cause in ("signal", "watchdog", "timeout"),
            "on-abort": cause == "signal",
            "on-watchdog": cause == "watchdog",
            "on-success": cause == "clean",
        }[self.restart]


@dataclass
class Incarnation:
    """One start of the service."""

    number: int
    pid: int
    started: float  # time.monotonic()
    ready: float | None = None
    ended: float | None = None
    returncode: int | None = None
    cause: str = ""  # clean, exit-code, signal, watchdog, timeout (systemd's result names)
    planned: bool = False  # ended by the caller on purpose (a fault it injected, or the final stop)
    status: str = ""  # the last STATUS= it sent

    @property
    def describe(self) -> str:
        """How it ended, in words."""
        if self.ended is None:
            return "running"
        code = self.returncode
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit status {code}"
        return f"{self.cause} ({how}){', planned' if self.planned else ''}"


@dataclass
class Spawn:
    """What one start adds to the command's environment and which file descriptors it inherits."""

    env: dict[str, str] = field(default_factory=dict)
    pass_fds: Sequence[int] = ()


class Supervisor:
    """Runs ``argv`` as ``unit`` says (see the module docstring); ``await start()``, then ``await stop()``."""

    def __init__(self, unit: ServiceUnit, argv: Sequence[str], *, env: dict[str, str], runtime_dir: Path,
                 log: IO[bytes], before_start: Callable[[], Spawn] | None = None,
                 on_start: Callable[[Incarnation], None] | None = None,
                 on_exit: Callable[[Incarnation], None] | None = None) -> None:
        self.unit = unit
        self._argv = list(argv)
        self._env = env
        self._runtime_dir = runtime_dir
        self._log = log
        self._before_start = before_start
        self._on_start = on_start
        self._on_exit = on_exit
        self.incarnations: list[Incarnation] = []
        self.failed = False  # the start limit was hit: the unit stays failed
        self._process: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._planned_pid: int | None = None
        self._watchdog_deadline: float | None = None
        self._ready = asyncio.Event()
        self._gave_up = asyncio.Event()  # no more starts: the unit failed, or Restart= says no
        self._notify: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._starts: list[float] = []

    # ------------------------------------------------------------------ state
    @property
    def current(self) -> Incarnation | None:
        """The running incarnation, if any."""
        if self.incarnations and self.incarnations[-1].ended is None:
            return self.incarnations[-1]
        return None

    @property
    def pid(self) -> int | None:
        """The main process id while one runs."""
        current = self.current
        return current.pid if current is not None else None

    @property
    def ready(self) -> bool:
        """Whether the running incarnation has said READY=1 (or is not Type=notify)."""
        current = self.current
        return current is not None and current.ready is not None

    async def wait_ready(self, timeout_seconds: float) -> bool:
        """Wait until an incarnation is ready (False on timeout, or once the unit gave up)."""
        waiters = [asyncio.ensure_future(self._ready.wait()), asyncio.ensure_future(self._gave_up.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout_seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        return self.ready

    # ------------------------------------------------------------------ control
    async def start(self) -> None:
        """Bind the notify socket and start the service (restarts follow by themselves)."""
        self._runtime_dir.mkdir(parents=True, exist_ok=True)
        path = self._runtime_dir / "notify"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        sock.setblocking(False)
        self._notify = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_notify)
        self._task = asyncio.create_task(self._run(), name="supervisor")

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> int | None:
        """Send ``sig`` to the running service as a planned fault (its end is not a crash); returns the pid."""
        process = self._process
        if process is None or process.returncode is not None:
            return None
        self._planned_pid = process.pid
        process.send_signal(sig)
        return process.pid

    def signal(self, sig: signal.Signals) -> bool:
        """Send ``sig`` (e.g. SIGSTOP/SIGCONT) without planning an end; False if nothing runs."""
        process = self._process
        if process is None or process.returncode is not None:
            return False
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
            return True
        return False

    async def stop(self) -> None:
        """Stop as ``systemctl stop`` would: SIGTERM, SIGKILL after TimeoutStopSec; no more restarts."""
        self._stopping = True
        process = self._process
        if process is not None and process.returncode is None:
            self._planned_pid = process.pid
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), self.unit.timeout_stop_seconds)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._notify is not None:
            asyncio.get_running_loop().remove_reader(self._notify.fileno())
            self._notify.close()
            self._notify = None

    # ------------------------------------------------------------------ internals
    def _on_notify(self) -> None:
        assert self._notify is not None
        while True:
            try:
                data = self._notify.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            current = self.current
            if current is None:
                continue
            for line in data.decode(errors="replace").splitlines():
                key, _, value = line.partition("=")
                if key == "READY" and value == "1" and current.ready is None:
                    current.ready = time.monotonic()
                    self._ready.set()
                    if self.unit.watchdog_seconds is not None:
                        self._watchdog_deadline = current.ready + self.unit.watchdog_seconds
                elif key == "WATCHDOG" and value == "1" and self._watchdog_deadline is not None:
                    assert self.unit.watchdog_seconds is not None
                    self._watchdog_deadline = time.monotonic() + self.unit.watchdog_seconds
                elif key == "STATUS":
                    current.status = value

    def _start_allowed(self, now: float) -> bool:
        window = self.unit.start_limit_interval_seconds
        self._starts = [t for t in self._starts if now - t < window]
        return len(self._starts) < self.unit.start_limit_burst

    async def _run(self) -> None:
        try:
            await self._serve()
        finally:
            self._gave_up.set()

    async def _serve(self) -> None:
        while not self._stopping:
            now = time.monotonic()
            if not self._start_allowed(now):
                self.failed = True
                _LOGGER.error("supervisor: start limit hit (%d starts within %.0f s): the unit failed",
                              self.unit.start_limit_burst, self.unit.start_limit_interval_seconds)
                return
            self._starts.append(now)
            incarnation = await self._spawn(len(self.incarnations) + 1)
            cause = await self._watch(incarnation)
            if self._stopping:
                return
            if not self.unit.restarts_after(cause):
                return
            await asyncio.sleep(self.unit.restart_seconds)

    async def _spawn(self, number: int) -> Incarnation:
        extra = self._before_start() if self._before_start is not None else Spawn()
        env = {**self._env, **self.unit.environment, **extra.env}
        assert self._notify is not None
        env["NOTIFY_SOCKET"] = str(self._runtime_dir / "notify")
        if self.unit.watchdog_seconds is not None:
            env["WATCHDOG_USEC"] = str(int(self.unit.watchdog_seconds * 1_000_000))
        argv = ["nice", "-n", str(self.unit.nice), *self._argv] if self.unit.nice else self._argv
        self._log.write(f"-- supervisor: start {number}: {shlex.join(self._argv)}\n".encode())
        self._log.flush()
        process = await asyncio.create_subprocess_exec(*argv, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                       stdout=self._log, stderr=self._log,
                                                       pass_fds=tuple(extra.pass_fds), start_new_session=True)
        self._process = process
        self._ready.clear()
        self._watchdog_deadline = None
        incarnation = Incarnation(number, process.pid, time.monotonic())
        if not self.unit.notify:
            incarnation.ready = incarnation.started
            self._ready.set()
        self.incarnations.append(incarnation)
        if self._on_start is not None:
            self._on_start(incarnation)
        return incarnation

    async def _watch(self, incarnation: Incarnation) -> str:
        """Until the process ends: the start timeout and the watchdog. Returns the systemd result name."""
        process = self._process
        assert process is not None
        cause = ""
        deadline_kill: float | None = None
        # One waiter for the whole life of the process, polled with asyncio.wait: wait_for() on Python 3.11 can
        # swallow a cancellation that races with the inner future, and this loop would then never end.
        exited = asyncio.ensure_future(process.wait())
        try:
            while not exited.done():
                await asyncio.wait({exited}, timeout=_WATCHDOG_CHECK_SECONDS)
                if exited.done():
                    break
                now = time.monotonic()
                if deadline_kill is not None:
                    if now >= deadline_kill:
                        with contextlib.suppress(ProcessLookupError):
                            process.kill()
                    continue
                if incarnation.ready is None and now - incarnation.started > self.unit.timeout_start_seconds:
                    cause = "timeout"
                    _LOGGER.warning("supervisor: no READY=1 within %.0f s: stopping pid %d",
                                    self.unit.timeout_start_seconds, process.pid)
                    with contextlib.suppress(ProcessLookupError):
                        process.terminate()
                    deadline_kill = now + self.unit.timeout_stop_seconds
                elif self._watchdog_deadline is not None and now > self._watchdog_deadline:
                    cause = "watchdog"
                    _LOGGER.warning("supervisor: watchdog timeout (%.0f s without WATCHDOG=1): SIGABRT to pid %d",
                                    self.unit.watchdog_seconds or 0, process.pid)
                    with contextlib.suppress(ProcessLookupError):
                        process.send_signal(signal.SIGABRT)
                    self._watchdog_deadline = None
                    deadline_kill = now + self.unit.timeout_stop_seconds
        except asyncio.CancelledError:
            # Cancelled without stop(): leave no service running behind the supervisor.
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            raise
        finally:
            exited.cancel()
        code = process.returncode
        incarnation.ended = time.monotonic()
        incarnation.returncode = code
        incarnation.planned = self._planned_pid == process.pid
        if not cause:
            cause = "clean" if code == 0 else "signal" if code is not None and code < 0 else "exit-code"
        incarnation.cause = cause
        self._process = None
        self._log.write(f"-- supervisor: pid {incarnation.pid} ended: {incarnation.describe}\n".encode())
        self._log.flush()
        if self._on_exit is not None:
            self._on_exit(incarnation)
        return cause


def service_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for the service: ``base`` (default: this process's) without the terminal's journal hints."""
    env = dict(os.environ if base is None else base)
    env.pop("JOURNAL_STREAM", None)
    return env

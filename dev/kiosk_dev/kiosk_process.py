"""The kiosk in a process of its own, reachable from outside: ``python -m kiosk_dev.kiosk_process``.

The field bench (``kiosk_dev.bench.field``) needs a kiosk it can SIGKILL and have restarted as systemd would
(``kiosk_dev.supervisor``), and a scripted visitor who presses its buttons and sees its LEDs. So this runs
what ``kiosk run`` runs (``kiosk.app.Kiosk`` with the settings from ``$KIOSK_CONFIG`` and ``KIOSK_*``, sd_notify
over ``$NOTIFY_SOCKET``, SIGTERM to stop, a programming error ending the process) with two additions:

- the virtual panel (gpiozero's mock pins) in place of GPIO, served on a unix socket
  (``$KIOSK_PANEL_SOCKET``): ``POST /press/{button}``, ``POST /release/{button}``, ``GET /panel`` (the
  LED pattern and values read back from the pins). ``PanelClient`` is the other end;
- a trace on a file descriptor (``$KIOSK_TRACE_FD``): one JSON line per controller step (the event's
  type and its plain fields, the phase before and after, the effects), the event loop's lag every
  ``LAG_REPORT_SECONDS``, the audio engine's counters every ``STATS_REPORT_SECONDS``, and every loop callback
  that used ``SLOW_CALLBACK_CPU_MS`` or more of the loop thread's own CPU time (``slow``: what ran, by function
  name). Lag is what a visitor feels, CPU time per callback is the kiosk's own part of it: a busy machine makes
  the first long, never the second. Times are
  ``time.monotonic()``, the clock the bench reads too. No visitor's words or audio ever go into it: events
  carry none (captions stay in the link).

The trace is written without blocking the loop: a full pipe keeps the lines until the reader catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import logging
import os
import signal
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from kiosk.effects import Effect
from kiosk.events import Button, Event
from kiosk.settings import Settings

_LOGGER = logging.getLogger(__name__)

PANEL_SOCKET_ENV = "KIOSK_PANEL_SOCKET"
TRACE_FD_ENV = "KIOSK_TRACE_FD"
LAG_INTERVAL_SECONDS = 0.1  # how often the loop's lag is sampled (a sleep that should last this long)
LAG_REPORT_SECONDS = 5.0
STATS_REPORT_SECONDS = 10.0
SLOW_CALLBACK_CPU_MS = 10.0  # a loop callback that used this much of the thread's CPU time is reported
_MAX_FIELD_CHARS = 240


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, bool | int | float) or value is None:
        return value
    text = str(value)
    return text if len(text) <= _MAX_FIELD_CHARS else text[:_MAX_FIELD_CHARS] + "..."


def event_record(event: Event | Effect) -> dict[str, Any]:
    """An event or effect as plain data: its type and its fields (enums by value, long text cut)."""
    fields = {f.name: _plain(getattr(event, f.name)) for f in dataclasses.fields(event)} \
        if dataclasses.is_dataclass(event) else {}
    return {"type": type(event).__name__, **fields}


class Trace:
    """JSON lines on a non-blocking file descriptor; what the pipe cannot take now waits in memory."""

    def __init__(self, fd: int | None, loop: asyncio.AbstractEventLoop) -> None:
        self._fd = fd
        self._loop = loop
        self._pending: deque[bytes] = deque()
        self._writing = False
        if fd is not None:
            os.set_blocking(fd, False)

    def write(self, kind: str, **fields: Any) -> None:
        """One line ``{"t": monotonic, "kind": kind, ...}``."""
        if self._fd is None:
            return
        line = json.dumps({"t": time.monotonic(), "kind": kind, **fields}, default=str) + "\n"
        self._pending.append(line.encode())
        self._flush()

    def _flush(self) -> None:
        assert self._fd is not None
        while self._pending:
            data = self._pending[0]
            try:
                written = os.write(self._fd, data)
            except BlockingIOError:
                break
            except OSError:  # the reader went away (the bench stopped): nothing to trace to
                self._pending.clear()
                self._fd = None
                return
            if written < len(data):
                self._pending[0] = data[written:]
            else:
                self._pending.popleft()
        if self._pending and not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._writable)
        elif not self._pending and self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)

    def _writable(self) -> None:
        self._flush()

    def step(self, old: Any, event: Event, transition: Any) -> None:
        """Controller listener: one line per step."""
        self.write("step", event=event_record(event), old=old.phase.value, new=transition.state.phase.value,
                   effects=[event_record(e) for e in transition.effects])


class PanelServer:
    """The virtual panel on a unix socket (aiohttp)."""

    def __init__(self, panel: Any, path: Path) -> None:
        self._panel = panel
        self._path = path
        self._runner: Any = None

    async def start(self) -> None:
        """Listen on the socket (a stale one from a killed process is replaced)."""
        from aiohttp import web

        async def press(request: web.Request) -> web.Response:
            self._panel.press(Button(request.match_info["button"]))
            return web.json_response({"ok": True})

        async def release(request: web.Request) -> web.Response:
            self._panel.release(Button(request.match_info["button"]))
            return web.json_response({"ok": True})

        async def panel(request: web.Request) -> web.Response:
            gpio = self._panel.gpio
            return web.json_response({"pattern": gpio.pattern.name if gpio.pattern is not None else None,
                                      "leds": [list(v) for v in gpio.readback()],
                                      "talk": self._panel.is_pressed(Button.TALK)})

        app = web.Application()
        app.router.add_post("/press/{button}", press)
        app.router.add_post("/release/{button}", release)
        app.router.add_get("/panel", panel)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()
        await web.UnixSite(self._runner, str(self._path)).start()

    async def aclose(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def _sample_lag(trace: Trace) -> None:
    """The loop's lag: how late a sleep of LAG_INTERVAL_SECONDS wakes, reported in batches (ms)."""
    loop = asyncio.get_running_loop()
    samples: list[float] = []
    reported = loop.time()
    while True:
        before = loop.time()
        await asyncio.sleep(LAG_INTERVAL_SECONDS)
        now = loop.time()
        samples.append(round(max(0.0, now - before - LAG_INTERVAL_SECONDS) * 1000, 2))
        if now - reported >= LAG_REPORT_SECONDS:
            trace.write("lag", ms=samples)
            samples = []
            reported = now


def _callback_name(handle: asyncio.Handle) -> str:
    """What a loop callback ran: a task's coroutine and where it now waits, else the callback's name."""
    callback = getattr(handle, "_callback", None)
    task = getattr(callback, "__self__", None)
    if isinstance(task, asyncio.Task):
        coro: Any = task.get_coro()
        name = getattr(coro, "__qualname__", type(coro).__name__)
        frame = None
        while coro is not None and getattr(coro, "cr_frame", None) is not None:
            if "asyncio" not in coro.cr_frame.f_code.co_filename:
                frame = coro.cr_frame  # the deepest of the kiosk's own coroutines in the chain of awaits
            coro = getattr(coro, "cr_await", None)
        return f"{name} (then waiting in {frame.f_code.co_qualname}:{frame.f_lineno})" if frame is not None else name
    return getattr(callback, "__qualname__", repr(callback))


@contextlib.contextmanager
def _timed_callbacks(trace: Trace) -> Any:
    """Report every loop callback that used ``SLOW_CALLBACK_CPU_MS`` of the thread's CPU (``time.thread_time``)."""
    handle_class: Any = asyncio.Handle
    original = handle_class._run

    def timed(handle: asyncio.Handle) -> None:
        started = time.thread_time()
        try:
            original(handle)
        finally:
            spent_ms = (time.thread_time() - started) * 1000.0
            if spent_ms >= SLOW_CALLBACK_CPU_MS:
                trace.write("slow", ms=round(spent_ms, 1), what=_callback_name(handle))

    handle_class._run = timed
    try:
        yield
    finally:
        handle_class._run = original


async def _report_stats(trace: Trace, kiosk: Any) -> None:
    while True:
        await asyncio.sleep(STATS_REPORT_SECONDS)
        stats = kiosk.engine.stats()
        trace.write("stats", route=kiosk.route.route.value, device_losses=stats["device_losses"],
                    stream={k: v for k, v in (stats["stream"] or {}).items() if isinstance(v, int | float)},
                    dropped_playout_samples=stats["dropped_playout_samples"])


async def run(settings: Settings, *, panel_socket: Path, trace_fd: int | None) -> int:
    """Run the kiosk with the virtual panel served on ``panel_socket`` until SIGTERM (as ``kiosk run``)."""
    from kiosk.app import Kiosk
    from kiosk_dev.terminal import VirtualPanel

    loop = asyncio.get_running_loop()
    trace = Trace(trace_fd, loop)
    kiosk = Kiosk(settings)
    panel = VirtualPanel(settings.panel, settings.interaction, kiosk.bus.post, loop=loop)
    kiosk.panel = panel
    kiosk.listeners.append(trace.step)
    server = PanelServer(panel, panel_socket)
    await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    helpers: list[asyncio.Task[None]] = []
    timing = contextlib.ExitStack()
    timing.enter_context(_timed_callbacks(trace))
    try:
        await kiosk.start()
        trace.write("started", pid=os.getpid(), route=kiosk.route.route.value)
        helpers = [asyncio.create_task(_sample_lag(trace)), asyncio.create_task(_report_stats(trace, kiosk))]
        controller_task = kiosk.controller.start() if kiosk.controller is not None else None
        # As ``kiosk run``: a memory restart (kiosk.recycle) ends the process cleanly; the supervisor restarts it.
        waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(stop.wait()),
                                              asyncio.ensure_future(kiosk.restart_requested.wait())]
        if controller_task is not None:
            waiters.append(controller_task)
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if controller_task is not None and controller_task.done() and not stop.is_set():
            controller_task.result()  # a programming error: exit non-zero, the supervisor restarts us
    finally:
        for task in helpers:
            task.cancel()
        await kiosk.aclose()
        await server.aclose()
        timing.close()
        trace.write("stopped")
    return 0


def main() -> int:
    """Entry point (the supervisor's command)."""
    from kiosk.errors import ConfigError
    from kiosk.logs import setup_logging
    from kiosk.settings import load_settings

    try:
        settings = load_settings()
    except ConfigError as error:
        print(f"kiosk: {error.message}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    socket_path = os.environ.get(PANEL_SOCKET_ENV)
    if not socket_path:
        print(f"kiosk_process: set {PANEL_SOCKET_ENV} to the unix socket the panel is served on", file=sys.stderr)
        return 2
    trace_fd = int(os.environ[TRACE_FD_ENV]) if os.environ.get(TRACE_FD_ENV) else None
    status = asyncio.run(run(settings, panel_socket=Path(socket_path), trace_fd=trace_fd))
    # The rtc SDK's native threads can still call back while the interpreter finalises, which aborts the
    # process; everything is closed by now, so leave without finalising (as the stack's backend does).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


class PanelClient:
    """The bench's end of ``PanelServer``: press and release buttons, read the LEDs (aiohttp over the socket)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._session: Any = None

    async def _client(self) -> Any:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self._path)),
                                                  timeout=aiohttp.ClientTimeout(total=3.0))
        return self._session

    async def _call(self, method: str, path: str) -> dict[str, Any] | None:
        """The JSON answer, or None when the kiosk is not there (killed, restarting)."""
        import aiohttp

        session = await self._client()
        try:
            async with session.request(method, f"http://kiosk{path}") as reply:
                if reply.status != 200:
                    return None
                data: dict[str, Any] = await reply.json()
                return data
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None

    async def press(self, button: Button = Button.TALK) -> bool:
        """Press a button; False if the kiosk could not be reached."""
        return await self._call("POST", f"/press/{button.value}") is not None

    async def release(self, button: Button = Button.TALK) -> bool:
        """Release a button; False if the kiosk could not be reached."""
        return await self._call("POST", f"/release/{button.value}") is not None

    async def panel(self) -> dict[str, Any] | None:
        """The LED pattern and values, or None."""
        return await self._call("GET", "/panel")

    async def aclose(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None


if __name__ == "__main__":
    sys.exit(main())

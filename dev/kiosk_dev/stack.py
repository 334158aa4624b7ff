"""The whole local stack: private network, LiveKit server, stand-in session API and stand-in agent.

``LocalStack`` (a context manager) moves this process into the kiosk-side private network
(``kiosk_dev.netns``), starts the real livekit-server and, in the server-side namespace, one process that
serves the stand-in session API and dispatches a stand-in agent into each new room
(``python -m kiosk_dev.stack serve``). The kiosk side reaches everything at 10.213.0.1 across the veth
pair, so ``network.set_link(False)`` is a real outage for it.

The tests reach it through their pytest plugin (tests/fixtures/stack.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import select
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np
from pydantic import SecretStr

from kiosk.errors import KioskError
from kiosk.events import AgentState, AgentStateChanged, ApiRefused, Event, LinkLost, SessionOpened
from kiosk.link.livekit import SILENCE_PEAK
from kiosk.ports import FrameSink, Pcm, ToolHandler
from kiosk.settings import SessionSettings
from kiosk_dev.livekit_server import LiveKitServer
from kiosk_dev.netns import PrivateNetwork, enter_private_network
from kiosk_dev.speech import Signal

_LOGGER = logging.getLogger(__name__)

API_PORT = 8080
DEV_CREDENTIAL_BYTES = 24


@dataclass
class LocalStack:
    """The running stack; ``with LocalStack() as stack:`` (``start()``/``stop()`` also work)."""

    api_port: int = API_PORT
    credential: str = field(default_factory=lambda: secrets.token_urlsafe(DEV_CREDENTIAL_BYTES))
    agent_options: dict[str, Any] = field(default_factory=dict)
    network: PrivateNetwork | None = None
    server: LiveKitServer | None = None
    _backend: subprocess.Popen[bytes] | None = None

    @property
    def api_url(self) -> str:
        """The stand-in session API's base URL (as the kiosk sees it)."""
        assert self.network is not None, "start the stack first"
        return f"http://{self.network.server_ip}:{self.api_port}"

    @property
    def livekit_url(self) -> str:
        """The LiveKit server's URL."""
        assert self.server is not None, "start the stack first"
        return self.server.url

    @property
    def backend_pid(self) -> int:
        """The process id of the stand-in session API and agents (the field bench pauses it with SIGSTOP)."""
        assert self._backend is not None, "start the stack first"
        return self._backend.pid

    def session_settings(self, **overrides: Any) -> SessionSettings:
        """Session settings pointing the kiosk at this stack."""
        fields: dict[str, Any] = {"api_url": self.api_url, "credential": SecretStr(self.credential)}
        fields.update(overrides)
        return SessionSettings.model_validate(fields)

    def start(self) -> LocalStack:
        """Enter the private network, start the server and the backend; raise ``KioskError`` on failure."""
        self.network = enter_private_network()
        self.server = LiveKitServer(network=self.network).start()
        argv = [sys.executable, "-m", "kiosk_dev.stack", "serve", "--livekit-url", self.server.url,
                "--api-key", self.server.api_key, "--host", self.network.server_ip, "--port", str(self.api_port),
                "--agent-options", json.dumps(self.agent_options)]
        env = {**os.environ, "KIOSK_STACK_API_SECRET": self.server.api_secret,
               "KIOSK_STACK_CREDENTIAL": self.credential}
        self._backend = subprocess.Popen(self.network.server_command(argv), stdout=subprocess.PIPE, env=env,
                                         stdin=subprocess.DEVNULL)
        assert self._backend.stdout is not None
        # Startup only, before the caller's loop runs: a bounded blocking wait for the READY line.
        ready, _, _ = select.select([self._backend.stdout], [], [], 30.0)
        line = self._backend.stdout.readline().decode(errors="replace").strip() if ready else ""
        if line != "READY":
            self.stop()
            raise KioskError("stack_failed", f"the stand-in session API and agent did not start (got {line!r}); "
                             "run `python -m kiosk_dev.stack serve --help` to check the backend")
        _LOGGER.info("local stack: LiveKit %s, session API %s", self.livekit_url, self.api_url)
        return self

    def stop(self) -> None:
        """Stop the backend and the server."""
        if self._backend is not None:
            if self._backend.poll() is None:
                self._backend.send_signal(signal.SIGTERM)
                try:
                    self._backend.wait(timeout=8)
                except subprocess.TimeoutExpired:
                    self._backend.kill()
                    self._backend.wait(timeout=5)
            self._backend = None
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.network is not None:
            self.network.set_link(True)

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------------ control (blocking, small, local)
    def _admin(self, method: str, path: str, body: dict[str, Any] | None = None, timeout_seconds: float = 5.0) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.api_url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout_seconds) as reply:
            return json.loads(reply.read())

    def fail(self, mode: str, times: int | None = None, retry_after_seconds: float = 1.0) -> None:
        """Make the stand-in API fail (``kiosk_dev.session_stub.FailMode`` values)."""
        self._admin("POST", "/_stub/fail", {"mode": mode, "times": times,
                                            "retry_after_seconds": retry_after_seconds})

    def set_model_status(self, model_id: str, status: str) -> None:
        """Set a catalog entry's status."""
        self._admin("POST", f"/_stub/models/{model_id}", {"status": status})

    def agents_leave(self) -> int:
        """Make every stand-in agent in a room leave it now (as an agent that crashed); returns how many left."""
        left: dict[str, Any] = self._admin("POST", "/_stub/agents/leave", {})
        return int(left["left"])

    def restart_livekit(self, down_seconds: float = 0.0) -> None:
        """Kill the LiveKit server (SIGKILL), leave it down a while, start it again with the same keys (blocks)."""
        assert self.server is not None, "start the stack first"
        self.server.kill()
        time.sleep(down_seconds)
        self.server.start()

    def agent_reports(self) -> dict[str, Any]:
        """What each room's stand-in agent heard and did."""
        reports: dict[str, Any] = self._admin("GET", "/_stub/agents")
        return reports

    def sessions(self) -> list[dict[str, Any]]:
        """The sessions handed out so far."""
        sessions: list[dict[str, Any]] = self._admin("GET", "/_stub/sessions")
        return sessions

    def agent_report(self, session_id: str) -> dict[str, Any]:
        """What the stand-in agent of one session heard and did (``kiosk_dev.agent.AgentReport`` as data).

        ``session_id`` is the API's session id, or the room's name (a token endpoint session's id).
        """
        report: dict[str, Any] = self.agent_reports()[self.room_of(session_id)]
        return report

    def room_of(self, session_id: str) -> str:
        """The room of a session (the API's session id, or a token endpoint session's room name)."""
        rooms = {str(s["session_id"]): str(s["room"]) for s in self.sessions()}
        return rooms.get(session_id, session_id)

    def agent_call_tool(self, session_id: str, tool: str, payload: str = "") -> dict[str, Any]:
        """Make the session's stand-in agent call a kiosk tool now; the call (``kiosk_dev.agent.ToolCall``)."""
        # The agent waits up to 8 s for the kiosk's answer (its RPC timeout).
        call: dict[str, Any] = self._admin("POST", f"/_stub/agents/{self.room_of(session_id)}/tool",
                                           {"tool": tool, "payload": payload}, timeout_seconds=15.0)
        return call

    def agent_plan_tool(self, session_id: str, tool: str, payload: str = "") -> None:
        """Make the session's stand-in agent call a kiosk tool in the middle of its next answer."""
        self._admin("POST", f"/_stub/agents/{self.room_of(session_id)}/plan", {"tool": tool, "payload": payload})

    def set_agent_options(self, **options: Any) -> None:
        """Options for the stand-in agents dispatched from now on (e.g. ``manual_turns=False``); none: defaults."""
        self._admin("POST", "/_stub/agent_options", options)


# ---------------------------------------------------------------------------------------- kiosk-side helpers
class MemoryPlayout:
    """A ``PlayoutSink`` that keeps what it is given (with the loop time), for tests and benchmarks."""

    def __init__(self) -> None:
        self.frames: list[tuple[float, Pcm]] = []
        self.clears: list[float] = []
        self._written = asyncio.Event()

    async def write(self, pcm: Pcm) -> None:
        """Keep the frame."""
        self.frames.append((asyncio.get_running_loop().time(), pcm))
        self._written.set()

    async def wait_voiced(self, seconds: float, since: float, within_seconds: float) -> float:
        """Wait until ``seconds`` of non-silent audio arrived after ``since`` (or the time is up); returns it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_seconds
        while (got := self.voiced_seconds(since)) < seconds and loop.time() < deadline:
            self._written.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._written.wait(), max(0.0, deadline - loop.time()))
        return got

    def clear(self) -> None:
        """Note the clear (the frames stay for inspection)."""
        self.clears.append(asyncio.get_running_loop().time())

    def voiced_seconds(self, since: float = 0.0) -> float:
        """Seconds of non-silent audio received after loop time ``since``."""
        voiced = (p.size for t, p in self.frames if t >= since and int(np.abs(p).max(initial=0)) > SILENCE_PEAK)
        return sum(voiced) / 16000

    def audio(self, since: float = 0.0) -> Pcm:
        """The received audio after ``since``, concatenated."""
        chunks = [p for t, p in self.frames if t >= since]
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)


class EventLog:
    """An ``EventSink`` that keeps events and lets a test wait for one."""

    def __init__(self) -> None:
        self.events: list[tuple[float, Event]] = []
        self._changed = asyncio.Event()

    def __call__(self, event: Event) -> None:
        """Keep one event."""
        self.events.append((asyncio.get_running_loop().time(), event))
        self._changed.set()

    def of(self, kind: type[Event]) -> list[Event]:
        """The events of one type, in order."""
        return [e for _, e in self.events if isinstance(e, kind)]

    async def wait_for(self, predicate: Callable[[Event], bool], timeout_seconds: float, start: int = 0) -> Event:
        """The first event (from index ``start``) that matches; raises TimeoutError naming what was seen."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_seconds
        while True:
            for _, event in self.events[start:]:
                if predicate(event):
                    return event
            remaining = deadline - loop.time()
            if remaining <= 0:
                seen = ", ".join(type(e).__name__ for _, e in self.events[start:])
                raise TimeoutError(f"event not seen within {timeout_seconds} s; seen: {seen}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)


async def feed(sink: FrameSink, audio: Signal, *, level: float = 1.0) -> int:
    """Push 16 kHz float audio into ``sink`` as 10 ms int16 frames at real-time pace; returns frames pushed."""
    loop = asyncio.get_running_loop()
    pcm = (np.clip(audio * level, -1, 1) * 32767).astype(np.int16)
    frames = int(pcm.size) // 160
    start = loop.time()
    for i in range(frames):
        sink.push_frame(pcm[i * 160:(i + 1) * 160])
        delay = start + (i + 1) * 0.01 - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
    return frames


class LinkHarness:
    """A kiosk-side room link on in-memory audio against a ``LocalStack`` (tests, benchmarks, experiments)."""

    def __init__(self, stack: LocalStack, *, settings: dict[str, Any] | None = None,
                 tools: Callable[[LinkHarness], ToolHandler] | None = None, **session_overrides: Any) -> None:
        """``settings``: more settings sections; ``tools``: makes the kiosk's tool handler (given this harness)."""
        from kiosk.link.livekit import LiveKitRoomLink
        from kiosk.metrics import Metrics, Status
        from kiosk.settings import Settings

        self.stack = stack
        self.settings = Settings(session=stack.session_settings(**session_overrides),
                                 security={"allow_insecure_transport": True},  # the stack's private network
                                 **(settings or {}))
        self.events = EventLog()
        self.playout = MemoryPlayout()
        self.metrics = Metrics()
        self.status = Status()
        self.link = LiveKitRoomLink(self.settings, self.events, self.playout, metrics=self.metrics,
                                    status=self.status, tools=tools(self) if tools is not None else None)

    async def open(self, within_seconds: float = 15.0) -> SessionOpened:
        """Open a session; fails (AssertionError naming the event) unless it opens."""
        start = len(self.events.events)
        await self.link.open()
        event = await self.events.wait_for(lambda e: isinstance(e, SessionOpened | ApiRefused | LinkLost),
                                           within_seconds, start)
        assert isinstance(event, SessionOpened), event
        return event

    async def ask(self, question: Signal, level: float = 0.5, tail_seconds: float = 0.5) -> float:
        """Speak ``question`` with the gate open, then silence; returns the loop time the visitor stopped."""
        self.link.set_publishing(True)
        await feed(self.link, question, level=level)
        stopped = asyncio.get_running_loop().time()
        self.link.note_visitor_stopped(stopped)
        await feed(self.link, np.zeros(int(16000 * tail_seconds), dtype=np.float32))
        self.link.set_publishing(False)
        return stopped

    async def wait_state(self, state: AgentState, start: int = 0, within_seconds: float = 20.0) -> int:
        """Index of the first ``AgentStateChanged(state)`` at or after ``start``, waiting for it."""
        def matches(e: Event) -> bool:
            return isinstance(e, AgentStateChanged) and e.state is state

        await self.events.wait_for(matches, within_seconds, start)
        return next(i for i, (_, e) in enumerate(self.events.events) if i >= start and matches(e))

    def agent_report(self) -> dict[str, Any]:
        """The stand-in agent's report for the open session."""
        return self.stack.agent_report(self.link.session_id)


# ---------------------------------------------------------------------------------------- backend
async def _serve(args: argparse.Namespace) -> None:
    from aiohttp import web

    from kiosk_dev.agent import AgentPool
    from kiosk_dev.session_stub import SessionStub

    pool = AgentPool(**json.loads(args.agent_options))
    stub = SessionStub(args.livekit_url, args.api_key, os.environ["KIOSK_STACK_API_SECRET"],
                       credential=os.environ["KIOSK_STACK_CREDENTIAL"], dispatcher=pool.dispatch)

    async def agents(request: web.Request) -> web.Response:
        return web.json_response(pool.reports())

    async def call_tool(request: web.Request) -> web.Response:
        body = await request.json()
        try:
            call = await pool.call_tool(request.match_info["room"], str(body["tool"]), str(body.get("payload", "")))
        except KeyError:
            return web.json_response({"error": "no agent in that room"}, status=404)
        return web.json_response(call)

    async def plan_tool(request: web.Request) -> web.Response:
        body = await request.json()
        try:
            pool.plan_tool(request.match_info["room"], str(body["tool"]), str(body.get("payload", "")))
        except KeyError:
            return web.json_response({"error": "no agent in that room"}, status=404)
        return web.json_response({"ok": True})

    async def agent_options(request: web.Request) -> web.Response:
        pool.overrides = dict(await request.json())
        return web.json_response({"ok": True})

    stub.extra_routes.append(("GET", "/_stub/agents", agents))
    stub.extra_routes.append(("POST", "/_stub/agents/{room}/tool", call_tool))
    stub.extra_routes.append(("POST", "/_stub/agents/{room}/plan", plan_tool))
    stub.extra_routes.append(("POST", "/_stub/agent_options", agent_options))
    async def agents_leave(request: web.Request) -> web.Response:
        return web.json_response({"left": pool.leave_all()})

    stub.extra_routes.append(("POST", "/_stub/agents/leave", agents_leave))
    await stub.start(args.host, args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("READY", flush=True)
    await stop.wait()
    await pool.aclose()
    await stub.aclose()


def main(argv: list[str] | None = None) -> int:
    """``python -m kiosk_dev.stack serve ...``: the stand-in session API plus agents (server side)."""
    parser = argparse.ArgumentParser(prog="python -m kiosk_dev.stack")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the stand-in session API and dispatch stand-in agents")
    serve.add_argument("--livekit-url", required=True)
    serve.add_argument("--api-key", required=True)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=API_PORT)
    serve.add_argument("--agent-options", default="{}", help="JSON keyword arguments for StandInAgent")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="stack-backend %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(args))
    # The rtc SDK's native threads can still call back while the interpreter finalises, which aborts the
    # process; every room is closed by now, so leave without finalising.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())

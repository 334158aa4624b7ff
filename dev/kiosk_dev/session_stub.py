"""A stand-in voice-session API (aiohttp) that mints real room-scoped LiveKit tokens with livekit-api.

Serves the contract ``kiosk.link.session_api`` speaks (catalog, ``POST /v1/voice/sessions``, and LiveKit's
standard token endpoint at ``POST /token``): a fresh room per session, the agent dispatch in the token, a
short TTL, and a repeat of a session request with the same ``Idempotency-Key`` answered with the first one's
session. It can be told to fail in each way the kiosk must handle, in process (``stub.fail(...)``) or over
HTTP from another process (``POST /_stub/fail {"mode": ..., "times": n, "retry_after_seconds": s}``,
``POST /_stub/models/{id} {"status": ...}``). Each session can call a dispatcher (the stand-in agent).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from aiohttp import web
from livekit import api

_LOGGER = logging.getLogger(__name__)

DEFAULT_AGENT_NAME = "kiosk-agent"
IDEMPOTENCY_KEYS = 1024  # session replies kept for repeats

# Called with (livekit_url, room_name, agent_token) for each new session.
Dispatcher = Callable[[str, str, str], Coroutine[Any, Any, None]]


class FailMode(StrEnum):
    """How the stand-in API misbehaves on session and token requests."""

    NONE = "none"
    UNAUTHORISED = "unauthorised"  # 401
    FORBIDDEN = "forbidden"  # 403
    CREDITS_EXHAUSTED = "credits_exhausted"  # 402
    RATE_LIMITED = "rate_limited"  # 429 with Retry-After
    SERVER_ERROR = "server_error"  # 503
    UNAVAILABLE = "unavailable"  # 503 with Retry-After
    TIMEOUT = "timeout"  # never answers (until the stub closes)
    REPLY_LOST = "reply_lost"  # makes the session, then never answers (a reply lost on the way back)
    MALFORMED = "malformed"  # 201 with a reply missing the token
    NOT_JSON = "not_json"  # 201 with an HTML body


@dataclass
class _Failure:
    mode: FailMode = FailMode.NONE
    times: int | None = None  # None: until told otherwise
    retry_after_seconds: float = 1.0


@dataclass
class StubSession:
    """A session the stub handed out."""

    session_id: str
    room: str
    identity: str
    body: dict[str, Any]


@dataclass
class SessionStub:
    """The stand-in API; ``app()`` builds the aiohttp application, ``start()`` serves it."""

    livekit_url: str
    api_key: str
    api_secret: str
    credential: str = "dev-device-credential"
    agent_name: str = DEFAULT_AGENT_NAME
    token_ttl: timedelta = timedelta(minutes=10)
    dispatcher: Dispatcher | None = None
    models: dict[str, str] = field(default_factory=lambda: {"gpt-realtime": "available",
                                                            "gpt-4o-mini-chained": "available"})
    sessions: list[StubSession] = field(default_factory=list)
    requests: int = 0
    _failure: _Failure = field(default_factory=_Failure)
    _closing: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    port: int = 0
    # Idempotency-Key -> (the request's body, the session reply), the newest IDEMPOTENCY_KEYS kept.
    _by_key: OrderedDict[str, tuple[Any, dict[str, Any]]] = field(default_factory=OrderedDict)
    # More routes (method, path, handler), e.g. the stack's agent reports.
    extra_routes: list[tuple[str, str, Callable[[web.Request], Coroutine[Any, Any, web.StreamResponse]]]] = field(
        default_factory=list)

    # ------------------------------------------------------------------ control
    def fail(self, mode: FailMode | str, times: int | None = None, retry_after_seconds: float = 1.0) -> None:
        """Fail session/token requests in ``mode`` (``times`` requests, or until changed)."""
        self._failure = _Failure(FailMode(mode), times, retry_after_seconds)

    def set_model_status(self, model_id: str, status: str) -> None:
        """Set a catalog entry's status (``available``, ``maintenance``, ...)."""
        self.models[model_id] = status

    # ------------------------------------------------------------------ tokens
    def _token(self, identity: str, room: str, *, agent: bool = False) -> str:
        grants = api.VideoGrants(room_join=True, room=room, can_publish=True, can_subscribe=True,
                                 can_publish_data=True, can_update_own_metadata=True)
        token = (api.AccessToken(self.api_key, self.api_secret).with_identity(identity).with_name(identity)
                 .with_ttl(self.token_ttl).with_grants(grants))
        if agent:
            token = token.with_kind("agent")
        else:
            config = api.RoomConfiguration(agents=[api.RoomAgentDispatch(agent_name=self.agent_name)])
            token = token.with_room_config(config)
        return token.to_jwt()

    @staticmethod
    def agent_identity(room: str) -> str:
        """The stand-in agent's participant identity in ``room``."""
        return f"agent-{room}"

    def agent_token(self, room: str) -> str:
        """A token for the stand-in agent to join ``room`` (participant kind AGENT)."""
        return self._token(self.agent_identity(room), room, agent=True)

    # ------------------------------------------------------------------ routes
    def _authorised(self, request: web.Request) -> bool:
        return request.headers.get("Authorization", "") == f"Bearer {self.credential}"

    async def _maybe_fail(self) -> web.Response | None:
        failure = self._failure
        if failure.mode is FailMode.NONE:
            return None
        if failure.times is not None:
            failure.times -= 1
            if failure.times <= 0:
                self._failure = _Failure()
        mode = failure.mode
        if mode is FailMode.UNAUTHORISED:
            return web.json_response({"error": "invalid credential"}, status=401)
        if mode is FailMode.FORBIDDEN:
            return web.json_response({"error": "device disabled"}, status=403)
        if mode is FailMode.CREDITS_EXHAUSTED:
            return web.json_response({"error": "insufficient credits"}, status=402)
        if mode is FailMode.RATE_LIMITED:
            return web.json_response({"error": "slow down"}, status=429,
                                     headers={"Retry-After": f"{failure.retry_after_seconds:g}"})
        if mode is FailMode.SERVER_ERROR:
            return web.json_response({"error": "upstream unavailable"}, status=503)
        if mode is FailMode.UNAVAILABLE:
            return web.json_response({"error": "overloaded"}, status=503,
                                     headers={"Retry-After": f"{failure.retry_after_seconds:g}"})
        if mode is FailMode.TIMEOUT:
            return await self._hang()
        if mode is FailMode.REPLY_LOST:
            return None  # the request is served; its route loses the reply
        if mode is FailMode.MALFORMED:
            return web.json_response({"session_id": "x", "livekit_url": self.livekit_url}, status=201)
        return web.Response(text="<html>gateway</html>", status=201, content_type="text/html")

    async def _hang(self) -> web.Response:
        """Hang like a dead backend; the stub's close releases it so shutdown stays quick."""
        await self._closing.wait()
        return web.json_response({"error": "closing"}, status=503)

    async def _model(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model_id"]
        if model_id not in self.models:
            return web.json_response({"error": f"unknown model {model_id}"}, status=404)
        return web.json_response({"id": model_id, "status": self.models[model_id]})

    async def _new_session(self, request: web.Request) -> web.Response:
        self.requests += 1
        if not self._authorised(request):
            return web.json_response({"error": "missing or invalid bearer credential"}, status=401)
        lose_reply = self._failure.mode is FailMode.REPLY_LOST
        failed = await self._maybe_fail()
        if failed is not None:
            return failed
        body = await request.json()
        key = request.headers.get("Idempotency-Key")
        if key is not None and key in self._by_key:
            first_body, reply = self._by_key[key]
            if first_body != body:
                return web.json_response({"error": "Idempotency-Key reused for another request"}, status=422)
            return web.json_response(reply, status=201)  # the session made for the first try
        model = body.get("llm_model")
        if self.models.get(model) != "available":
            return web.json_response({"error": f"model {model} is not available"}, status=409)
        reply = await self._open(body, identity=f"kiosk-{uuid.uuid4().hex[:8]}")
        if key is not None:
            self._by_key[key] = (body, reply)
            while len(self._by_key) > IDEMPOTENCY_KEYS:
                self._by_key.popitem(last=False)
        if lose_reply:
            return await self._hang()
        return web.json_response(reply, status=201)

    async def _open(self, body: dict[str, Any], identity: str, room: str | None = None) -> dict[str, Any]:
        session_id = uuid.uuid4().hex[:16]
        room = room or f"voice-{session_id}"
        token = self._token(identity, room)
        self.sessions.append(StubSession(session_id, room, identity, body))
        if self.dispatcher is not None:
            task = asyncio.create_task(self.dispatcher(self.livekit_url, room, self.agent_token(room)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        expires = datetime.now(UTC) + self.token_ttl
        # The agent's identity (agent_token's): the kiosk trusts only that participant in the room.
        return {"session_id": session_id, "livekit_url": self.livekit_url, "token": token,
                "expires_at": expires.isoformat(), "agent_identity": self.agent_identity(room)}

    async def _token_endpoint(self, request: web.Request) -> web.Response:
        self.requests += 1
        lose_reply = self._failure.mode is FailMode.REPLY_LOST
        failed = await self._maybe_fail()
        if failed is not None:
            return failed
        body = await request.json()
        room = body.get("room_name") or f"voice-{uuid.uuid4().hex[:12]}"
        identity = body.get("participant_identity") or f"kiosk-{uuid.uuid4().hex[:8]}"
        opened = await self._open(body, identity=identity, room=room)
        if lose_reply:
            return await self._hang()
        return web.json_response({"server_url": opened["livekit_url"], "participant_token": opened["token"]},
                                 status=201)

    async def _admin_fail(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.fail(body.get("mode", "none"), body.get("times"), float(body.get("retry_after_seconds", 1.0)))
        return web.json_response({"ok": True})

    async def _admin_model(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.set_model_status(request.match_info["model_id"], str(body["status"]))
        return web.json_response({"ok": True})

    async def _admin_sessions(self, request: web.Request) -> web.Response:
        return web.json_response([{"session_id": s.session_id, "room": s.room, "identity": s.identity,
                                   "request": s.body} for s in self.sessions])

    def app(self) -> web.Application:
        """The aiohttp application."""
        app = web.Application()
        app.router.add_get("/v1/models/{model_id}", self._model)
        app.router.add_post("/v1/voice/sessions", self._new_session)
        app.router.add_post("/token", self._token_endpoint)
        app.router.add_post("/_stub/fail", self._admin_fail)
        app.router.add_post("/_stub/models/{model_id}", self._admin_model)
        app.router.add_get("/_stub/sessions", self._admin_sessions)
        for method, path, handler in self.extra_routes:
            app.router.add_route(method, path, handler)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (0: any free port); returns the base URL."""
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else port
        return f"http://{host}:{self.port}"

    async def aclose(self) -> None:
        """Stop serving (releases hanging requests first)."""
        self._closing.set()
        for task in list(self._tasks):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

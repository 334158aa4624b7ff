"""Hostile and broken replies to the session API client, the token endpoint client and the message uploader.

Every server here is real (aiohttp on loopback, or a raw TCP server for replies that are not HTTP at all).
Whatever a server sends, the session API client raises only ``SessionRefused`` (a reply problem is
``malformed_reply``) and the uploader only returns an unacknowledged ``UploadResult``: nothing ends the
process, no body is read whole, no redirect is followed, and no ``Retry-After`` keeps the kiosk away for long.
The property-based tests (Hypothesis, fixed budget) draw replies at random against the same servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
import numpy as np
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from kiosk.events import RefusalReason
from kiosk.fallback.delivery import Uploader, UploadResult
from kiosk.fallback.spool import Message, Spool
from kiosk.link.replies import (
    MAX_JSON_DEPTH,
    MAX_REPLY_BYTES,
    RETRY_AFTER_MAX_SECONDS,
    client_session,
    parse_retry_after,
)
from kiosk.link.server_probe import ServerAnswer, probe, probe_url
from kiosk.link.session_api import SessionApi, SessionGrant, SessionRefused
from kiosk.settings import SessionSettings, SessionSource
from kiosk.transport import InsecureTransport, check_secure

if TYPE_CHECKING:
    from fixtures.fallback import OperatorKeys

CREDENTIAL = "hostile-test-credential"
IDENTITY = "kiosk-test"
LIVEKIT_URL = "wss://livekit.example.test"
MIB = 1024 * 1024
CHUNK = b"x" * MIB
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Hostile:
    """A real aiohttp server on loopback that answers every request with ``reply`` (the test sets it)."""

    def __init__(self) -> None:
        self.reply: Reply = self._ok
        self.requests: list[tuple[str, str, dict[str, Any] | None]] = []
        self.streamed_bytes = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _ok(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        parsed = None
        with contextlib.suppress(ValueError):
            parsed = json.loads(body) if body else None
        self.requests.append((request.method, request.path_qs, parsed if isinstance(parsed, dict) else None))
        return await self.reply(request)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        return self.url

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # ---------------------------------------------------------------- replies
    def json(self, data: Any, status: int = 201, headers: dict[str, str] | None = None) -> None:
        async def reply(request: web.Request) -> web.StreamResponse:
            return web.json_response(data, status=status, headers=headers)
        self.reply = reply

    def raw(self, body: bytes, status: int = 201, headers: dict[str, str] | None = None) -> None:
        async def reply(request: web.Request) -> web.StreamResponse:
            merged = {"Content-Type": "application/json", **(headers or {})}
            return web.Response(body=body, status=status, headers=merged)
        self.reply = reply

    def stream(self, total_bytes: int, status: int = 201, *, declare: bool = False) -> None:
        """A body of ``total_bytes`` written 1 MiB at a time (chunked, or with its Content-Length)."""
        async def reply(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(status=status)
            if declare:
                response.content_length = total_bytes
            await response.prepare(request)
            self.streamed_bytes = 0
            try:
                while self.streamed_bytes < total_bytes:
                    await response.write(CHUNK)
                    self.streamed_bytes += len(CHUNK)
            except (ConnectionError, OSError):
                pass  # the client stopped reading and closed: what this test wants
            return response
        self.reply = reply


@pytest.fixture
async def hostile() -> AsyncIterator[Hostile]:
    server = Hostile()
    await server.start()
    yield server
    await server.aclose()


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def client(url: str, *, token_endpoint: bool = False, clock: Callable[[], float] | None = None,
           **overrides: Any) -> SessionApi:
    fields: dict[str, Any] = {"api_url": url, "credential": SecretStr(CREDENTIAL), "check_catalog": False,
                              "retry_attempts": 1, "request_timeout_seconds": 5.0}
    if token_endpoint:
        fields.update(source=SessionSource.TOKEN_ENDPOINT, token_endpoint_url=url + "/token")
    fields.update(overrides)
    return SessionApi(SessionSettings.model_validate(fields), rng=random.Random(3), sleep=Sleeps(), clock=clock,
                      identity=IDENTITY)


def token(claims: dict[str, Any] | None = None, **changes: Any) -> str:
    base: dict[str, Any] = {"sub": IDENTITY, "exp": int(time.time()) + 600,
                            "video": {"room": "voice-room-1", "roomJoin": True}}
    base.update(claims or {})
    base.update(changes)
    return jwt.encode({k: v for k, v in base.items() if v is not None}, "k" * 32, algorithm="HS256")


def session_reply(**changes: Any) -> dict[str, Any]:
    reply: dict[str, Any] = {"session_id": "s-1", "livekit_url": LIVEKIT_URL, "token": token(),
                             "expires_at": (datetime.now(UTC) + timedelta(minutes=10)).isoformat(),
                             "agent_identity": "agent-voice-room-1"}
    reply.update(changes)
    return reply


async def refusal(api: SessionApi) -> SessionRefused:
    try:
        with pytest.raises(SessionRefused) as caught:
            await api.open_session()
    finally:
        await api.aclose()
    return caught.value


# ---------------------------------------------------------------------------------------- session API
async def test_a_good_reply_still_opens_a_session(hostile: Hostile) -> None:
    hostile.json(session_reply())
    api = client(hostile.url)
    grant = await api.open_session()
    await api.aclose()
    assert grant.session_id == "s-1" and grant.agent_identity == "agent-voice-room-1"


async def test_redirect_loop_is_a_malformed_reply(hostile: Hostile) -> None:
    async def loop_back(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(request.path)
    hostile.reply = loop_back
    refused = await refusal(client(hostile.url))
    assert refused.reason is RefusalReason.MALFORMED_REPLY and "redirect" in refused.message
    assert len(hostile.requests) == 1  # not followed, not even once


async def test_redirect_elsewhere_is_not_followed(hostile: Hostile) -> None:
    elsewhere = Hostile()
    await elsewhere.start()
    elsewhere.json(session_reply())
    try:
        async def away(request: web.Request) -> web.StreamResponse:
            raise web.HTTPTemporaryRedirect(elsewhere.url + "/v1/voice/sessions?token=leak")
        hostile.reply = away
        refused = await refusal(client(hostile.url))
    finally:
        await elsewhere.aclose()
    assert refused.reason is RefusalReason.MALFORMED_REPLY and elsewhere.requests == []
    assert "leak" not in refused.message and "token=***" in refused.message


@pytest.mark.parametrize("declare", [False, True], ids=["chunked", "content_length"])
async def test_a_400_mb_body_is_not_read(hostile: Hostile, declare: bool) -> None:
    hostile.stream(400 * MIB, declare=declare)
    tracemalloc.start()
    started = time.monotonic()
    try:
        refused = await refusal(client(hostile.url))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.reason is RefusalReason.MALFORMED_REPLY and str(MAX_REPLY_BYTES) in refused.message
    assert peak < 16 * MIB, f"peak {peak / MIB:.1f} MiB while refusing the reply"
    print(f"\n400 MB reply ({'declared' if declare else 'chunked'}): refused in {time.monotonic() - started:.3f} s, "
          f"peak traced memory {peak / MIB:.2f} MiB, {hostile.streamed_bytes / MIB:.0f} MiB written by the server")


async def test_a_400_mb_error_body_is_not_read(hostile: Hostile) -> None:
    hostile.stream(400 * MIB, status=503)
    tracemalloc.start()
    try:
        refused = await refusal(client(hostile.url))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.reason is RefusalReason.SERVER_ERROR and peak < 16 * MIB


@pytest.mark.parametrize("headers", [{"X-Huge": "a" * 100_000}, {f"X-Many-{i}": "v" for i in range(2000)}],
                         ids=["one_huge", "thousands"])
async def test_oversized_headers_are_a_malformed_reply(hostile: Hostile, headers: dict[str, str]) -> None:
    hostile.json(session_reply(), headers=headers)
    refused = await refusal(client(hostile.url))
    assert refused.reason is RefusalReason.MALFORMED_REPLY and "broken HTTP reply" in refused.message


@pytest.mark.parametrize("depth", [100_000, 30_000, MAX_JSON_DEPTH + 8])
async def test_deeply_nested_json_is_a_malformed_reply(hostile: Hostile, depth: int) -> None:
    # 100k deep is also larger than MAX_REPLY_BYTES; 30k deep fits and reaches the parser.
    expected = "nests deeper" if 2 * depth <= MAX_REPLY_BYTES else str(MAX_REPLY_BYTES)
    hostile.raw(b"[" * depth + b"]" * depth)
    refused = await refusal(client(hostile.url))
    assert refused.reason is RefusalReason.MALFORMED_REPLY and expected in refused.message
    hostile.raw(b'{"session_id": ' + b"[" * depth + b"]" * depth + b"}")
    refused = await refusal(client(hostile.url))
    assert refused.reason is RefusalReason.MALFORMED_REPLY


async def test_undecodable_bodies(hostile: Hostile) -> None:
    hostile.raw(b"\xff\xfe\xfa{", status=201)
    assert (await refusal(client(hostile.url))).reason is RefusalReason.MALFORMED_REPLY
    hostile.raw(b"\xff\xfe\xfa", status=503, headers={"Content-Type": "text/plain; charset=utf-8"})
    assert (await refusal(client(hostile.url))).reason is RefusalReason.SERVER_ERROR
    hostile.raw(b"\xff\xfe\xfa", status=418, headers={"Content-Type": "text/plain; charset=no-such-charset"})
    assert (await refusal(client(hostile.url))).reason is RefusalReason.MALFORMED_REPLY


def _bad_claims() -> list[tuple[str, str]]:
    now = int(time.time())
    return [
        ("not_a_jwt", "not-a-jwt-at-all"),
        ("three_garbage_parts", "a.b.c"),
        ("payload_not_an_object", jwt.api_jws.encode(b"[1, 2]", "k" * 32, algorithm="HS256")),
        ("video_is_a_list", token(video=[1, 2])),
        ("video_missing", token(video=None)),
        ("room_join_false", token(video={"room": "voice-room-1", "roomJoin": False})),
        ("room_join_truthy_int", token(video={"room": "voice-room-1", "roomJoin": 1})),
        ("exp_missing", token(exp=None)),
        ("exp_string", token(exp="soon")),
        ("exp_bool", token(exp=True)),
        ("exp_1e300", token(exp=1e300)),
        ("exp_huge_int", token(exp=10**30)),
        ("expired", token(exp=now - 3600)),
        ("sub_missing", token(sub=None)),
    ]


@pytest.mark.parametrize(("name", "bad"), _bad_claims(), ids=[n for n, _ in _bad_claims()])
async def test_bad_token_claims_from_the_session_api(hostile: Hostile, name: str, bad: str) -> None:
    hostile.json(session_reply(token=bad))
    refused = await refusal(client(hostile.url))
    assert refused.reason is RefusalReason.MALFORMED_REPLY, refused.message
    assert bad not in refused.message


def _token_endpoint(hostile: Hostile, make: Callable[[str], str], server_url: str = LIVEKIT_URL) -> None:
    async def reply(request: web.Request) -> web.StreamResponse:
        room = (await request.json())["room_name"]
        return web.json_response({"server_url": server_url, "participant_token": make(room)}, status=201)
    hostile.reply = reply


async def test_token_endpoint_good_token(hostile: Hostile) -> None:
    _token_endpoint(hostile, lambda room: token(video={"room": room, "roomJoin": True}))
    api = client(hostile.url, token_endpoint=True)
    grant = await api.open_session()
    await api.aclose()
    assert grant.session_id.startswith("kiosk-") and grant.expires_at > datetime.now(UTC)


@pytest.mark.parametrize(("name", "bad"), _bad_claims(), ids=[n for n, _ in _bad_claims()])
async def test_bad_token_claims_from_the_token_endpoint(hostile: Hostile, name: str, bad: str) -> None:
    _token_endpoint(hostile, lambda room: bad)
    refused = await refusal(client(hostile.url, token_endpoint=True))
    assert refused.reason is RefusalReason.MALFORMED_REPLY, refused.message


@pytest.mark.parametrize(("name", "make"), [
    ("another_room", lambda room: token(video={"room": "someone-elses-room", "roomJoin": True})),
    ("another_identity", lambda room: token(sub="somebody-else", video={"room": room, "roomJoin": True})),
])
async def test_foreign_token_from_the_token_endpoint(hostile: Hostile, name: str,
                                                     make: Callable[[str], str]) -> None:
    _token_endpoint(hostile, make)
    refused = await refusal(client(hostile.url, token_endpoint=True))
    assert refused.reason is RefusalReason.MALFORMED_REPLY and "another" in refused.message


@pytest.mark.parametrize("server_url", ["ws://203.0.113.7:7880", "http://lk.example.test", "ftp://x", "wss:"])
async def test_token_endpoint_server_url_must_be_secure(hostile: Hostile, server_url: str) -> None:
    _token_endpoint(hostile, lambda room: token(video={"room": room, "roomJoin": True}), server_url)
    refused = await refusal(client(hostile.url, token_endpoint=True))
    assert refused.reason is RefusalReason.MALFORMED_REPLY


@pytest.mark.parametrize(("field", "value"), [("agent_identity", "agent\nforged log line"), ("agent_identity", ""),
                                              ("session_id", "s 1\r\nX: y"), ("livekit_url", "wss://" + "a" * 5000)])
async def test_unusable_session_fields(hostile: Hostile, field: str, value: str) -> None:
    hostile.json(session_reply(**{field: value}))
    assert (await refusal(client(hostile.url))).reason is RefusalReason.MALFORMED_REPLY


@pytest.mark.parametrize(("header", "expected_wait_s"), [
    ("99999999999", RETRY_AFTER_MAX_SECONDS),
    ("Fri, 31 Dec 9999 23:59:59 GMT", RETRY_AFTER_MAX_SECONDS),
    ("1e12", None), ("-5", None), ("NaN", None), ("inf", None), ("soon", None),
])
async def test_retry_after_cannot_keep_the_kiosk_away(hostile: Hostile, header: str,
                                                      expected_wait_s: float | None) -> None:
    hostile.json({"error": "slow down"}, status=429, headers={"Retry-After": header})
    now = [1000.0]
    api = client(hostile.url, clock=lambda: now[0], retry_max_seconds=4.0)
    with pytest.raises(SessionRefused) as caught:
        await api.open_session()
    wait_s = caught.value.retry_after_seconds
    assert caught.value.reason is RefusalReason.RATE_LIMITED and wait_s is not None
    if expected_wait_s is None:
        assert 0 <= wait_s <= 4.0  # unreadable: the client's own backoff
    else:
        assert wait_s == expected_wait_s
    # Asked again once the (clamped) wait has passed, and the API answers.
    hostile.json(session_reply())
    now[0] += RETRY_AFTER_MAX_SECONDS + 1
    grant = await api.open_session()
    await api.aclose()
    assert grant.session_id == "s-1"


# ---------------------------------------------------------------------------------------- uploader
@pytest.fixture
def stored(tmp_path: Path, operator_keys: OperatorKeys) -> Iterator[tuple[Message, bytes]]:
    with Spool(tmp_path / "spool", recipient_public_key=operator_keys.public) as spool:
        message_id = spool.store((np.sin(np.arange(8000) / 5) * 3000).astype(np.int16))
        message = spool.get(message_id)
        yield message, spool.read(message)


async def upload(url: str, message: Message, wav: bytes) -> UploadResult:
    uploader = Uploader(url + "/messages", "device-secret", timeout_seconds=5.0)
    try:
        return await uploader.upload(message, wav)
    finally:
        await uploader.aclose()


async def test_uploader_follows_no_redirect(hostile: Hostile, stored: tuple[Message, bytes]) -> None:
    elsewhere = Hostile()
    await elsewhere.start()
    elsewhere.json({"id": "x"}, status=201)
    try:
        async def away(request: web.Request) -> web.StreamResponse:
            raise web.HTTPTemporaryRedirect(elsewhere.url + "/messages")  # 307 would re-send the voice there
        hostile.reply = away
        result = await upload(hostile.url, *stored)
    finally:
        await elsewhere.aclose()
    assert not result.acknowledged and result.status == 307 and "redirect" in result.error
    assert elsewhere.requests == [], "the visitor's message went to another host"


async def test_uploader_redirect_loop(hostile: Hostile, stored: tuple[Message, bytes]) -> None:
    async def loop_back(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(request.path)
    hostile.reply = loop_back
    result = await upload(hostile.url, *stored)
    assert not result.acknowledged and len(hostile.requests) == 1


@pytest.mark.parametrize("status", [201, 500])
async def test_uploader_does_not_read_a_400_mb_reply(hostile: Hostile, stored: tuple[Message, bytes],
                                                     status: int) -> None:
    hostile.stream(400 * MIB, status=status)
    tracemalloc.start()
    try:
        result = await upload(hostile.url, *stored)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.acknowledged is (status == 201) and result.status == status
    assert peak < 16 * MIB, f"peak {peak / MIB:.1f} MiB"


async def test_uploader_oversized_headers_and_retry_after(hostile: Hostile, stored: tuple[Message, bytes]) -> None:
    hostile.json({}, status=201, headers={"X-Huge": "a" * 100_000})
    result = await upload(hostile.url, *stored)
    assert not result.acknowledged and result.status is None and "Got more than" in result.error
    for header, expected in [("99999999999", RETRY_AFTER_MAX_SECONDS), ("1e12", None), ("NaN", None),
                             ("-5", None), ("Fri, 31 Dec 9999 23:59:59 GMT", RETRY_AFTER_MAX_SECONDS)]:
        hostile.json({}, status=503, headers={"Retry-After": header})
        result = await upload(hostile.url, *stored)
        assert not result.acknowledged and result.retry_after_seconds == expected, header


async def test_uploader_errors_redact_the_url(stored: tuple[Message, bytes]) -> None:
    uploader = Uploader("http://127.0.0.1:9/messages?token=hunter2", "device-secret", timeout_seconds=2.0)
    result = await uploader.upload(*stored)
    await uploader.aclose()
    assert not result.acknowledged and "hunter2" not in result.error


def test_uploader_knows_the_transport_rule() -> None:
    with pytest.raises(InsecureTransport):
        Uploader("http://203.0.113.9/messages", "device-secret")
    Uploader("http://203.0.113.9/messages", "device-secret", allow_insecure_transport=True)
    Uploader("http://127.0.0.1:8099/messages", "device-secret")


def test_error_descriptions_carry_no_secrets_and_fit_a_line() -> None:
    from aiohttp import ClientResponseError, RequestInfo
    from multidict import CIMultiDict, CIMultiDictProxy
    from yarl import URL

    from kiosk.link.replies import MAX_DESCRIPTION_CHARS, describe_error

    sdk = RuntimeError("signal failure connecting to wss://lk.test/rtc?access_token=eyJ.room.token&auto=1\nnext")
    text = describe_error(sdk)
    assert "eyJ" not in text and "access_token=***" in text and "\n" not in text
    url = URL("https://api.test/v1?token=hunter2")
    info = RequestInfo(url, "GET", CIMultiDictProxy(CIMultiDict()), url)
    text = describe_error(ClientResponseError(info, (), status=400, message="Got more than 8190 bytes"))
    assert "hunter2" not in text and "400 Got more than 8190 bytes" in text
    assert len(describe_error(ValueError("x" * 10_000))) <= MAX_DESCRIPTION_CHARS


# ---------------------------------------------------------------------------------------- property-based
@given(st.one_of(st.text(max_size=60), st.from_regex(r"\A[0-9eE.+-]{1,20}\Z"),
                 st.datetimes(timezones=st.just(UTC)).map(lambda d: d.strftime("%a, %d %b %Y %H:%M:%S GMT"))))
@FUZZ
def test_fuzz_parse_retry_after(value: str) -> None:
    seconds = parse_retry_after(value)
    assert seconds is None or 0.0 <= seconds <= RETRY_AFTER_MAX_SECONDS


# ---------------------------------------------------------------------------------------- server probe
@pytest.mark.parametrize(("livekit_url", "expected"), [
    ("ws://10.213.0.1:7880", "http://10.213.0.1:7880/"),
    ("wss://lk.example.test", "https://lk.example.test/"),
    ("wss://user:pw@lk.example.test:8443/rtc?access_token=secret", "https://lk.example.test:8443/"),
    ("ws://[::1]:7880/x", "http://[::1]:7880/"),
])
def test_probe_url_is_the_server_root_without_credentials(livekit_url: str, expected: str) -> None:
    assert probe_url(livekit_url) == expected


async def _probe(url: str) -> ServerAnswer:
    async with client_session(2.0) as http:
        return await probe(http, url)


def _expected(status: int) -> ServerAnswer:
    if 200 <= status < 300:
        return ServerAnswer.UP
    return ServerAnswer.DOWN if status in (502, 503, 504) else ServerAnswer.UNKNOWN


async def test_probe_tells_a_server_that_is_down_from_one_that_answers(hostile: Hostile) -> None:
    with socket.socket() as closed:  # a port nobody listens on: refused, as by a host whose server is down
        closed.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{closed.getsockname()[1]}/"
        assert await _probe(refused) is ServerAnswer.DOWN
    assert await _probe(hostile.url + "/") is ServerAnswer.UP
    for status in (502, 503, 404, 302, 401):
        hostile.raw(b"", status=status, headers={"Location": "/"})
        assert await _probe(hostile.url + "/") is _expected(status)
    # A name that does not resolve says nothing about the server.
    assert await _probe("http://no-such-host.invalid/") is ServerAnswer.UNKNOWN


class Loop:
    """One event loop for a module's property-based tests, with the servers it serves on."""

    def __init__(self) -> None:
        self.runner = asyncio.Runner()
        self.server = Hostile()
        self.runner.run(self.server.start())
        self.raw_reply = b""
        self.raw_port = 0
        self.raw_server = self.runner.run(asyncio.start_server(self._raw, "127.0.0.1", 0))
        self.raw_port = self.raw_server.sockets[0].getsockname()[1]

    async def _raw(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer whatever came with ``raw_reply`` (bytes that may not be HTTP at all), then close."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 1.0)
            writer.write(self.raw_reply)
            await writer.drain()
        writer.close()

    def run(self, coro: Awaitable[Any]) -> Any:
        return self.runner.run(coro)  # type: ignore[arg-type]

    def close(self) -> None:
        self.raw_server.close()
        self.runner.run(self.server.aclose())
        self.runner.close()


@pytest.fixture(scope="module")
def loop() -> Iterator[Loop]:
    running = Loop()
    yield running
    running.close()


@pytest.fixture(scope="module")
def stored_once(tmp_path_factory: pytest.TempPathFactory,
                operator_keys: OperatorKeys) -> Iterator[tuple[Message, bytes]]:
    with Spool(tmp_path_factory.mktemp("spool"), recipient_public_key=operator_keys.public) as spool:
        message_id = spool.store((np.sin(np.arange(4000) / 5) * 3000).astype(np.int16))
        message = spool.get(message_id)
        yield message, spool.read(message)


STATUSES = st.one_of(st.sampled_from([200, 201, 204, 301, 302, 307, 308, 400, 401, 402, 403, 404, 409, 429, 500,
                                      502, 503]), st.integers(200, 599))
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
HEADERS = st.dictionaries(st.sampled_from(["Retry-After", "Location", "Content-Type", "X-Other"]), HEADER_TEXT,
                          max_size=3)
JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30))
JSON = st.recursive(JSON_LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                    max_leaves=20)
CLAIM_VALUES = st.one_of(JSON_LEAVES, st.lists(JSON_LEAVES, max_size=2), st.just(int(time.time()) + 600),
                         st.floats(min_value=-1e20, max_value=1e300))
VIDEO = st.one_of(CLAIM_VALUES, st.fixed_dictionaries({}, optional={
    "room": st.one_of(st.just("voice-room-1"), CLAIM_VALUES), "roomJoin": st.one_of(st.booleans(), CLAIM_VALUES)}))
CLAIMS = st.fixed_dictionaries({}, optional={"sub": st.one_of(st.just(IDENTITY), CLAIM_VALUES), "exp": CLAIM_VALUES,
                                             "video": VIDEO, "nbf": CLAIM_VALUES})
TOKENS = st.one_of(CLAIMS.map(lambda claims: jwt.encode(claims, "k" * 32, algorithm="HS256")),
                   st.text(max_size=60), st.just(token()))
URLS = st.one_of(st.sampled_from([LIVEKIT_URL, "ws://127.0.0.1:7880", "ws://203.0.113.7:7880", "https://lk.test",
                                  "http://10.0.0.1", "wss://user:pw@lk.test/?access_token=x"]), st.text(max_size=40))
SESSION_REPLIES = st.fixed_dictionaries({}, optional={
    "session_id": st.one_of(st.just("s-1"), JSON_LEAVES), "livekit_url": URLS, "token": TOKENS,
    "expires_at": st.one_of(st.just("2030-01-01T00:00:00Z"), JSON_LEAVES, st.datetimes().map(str)),
    "agent_identity": st.one_of(st.just("agent-1"), JSON_LEAVES)})
BODIES = st.one_of(st.binary(max_size=300), JSON.map(lambda v: json.dumps(v).encode()),
                   SESSION_REPLIES.map(lambda v: json.dumps(v).encode()),
                   st.fixed_dictionaries({}, optional={"server_url": URLS, "participant_token": TOKENS, "id": JSON,
                                                       "status": JSON_LEAVES}).map(lambda v: json.dumps(v).encode()))


def _reply(status: int, headers: dict[str, str], body: bytes) -> Reply:
    async def reply(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers=headers, body=body)
    return reply


def _check_grant(grant: SessionGrant) -> None:
    """A grant the client returns is usable: a secure URL and a token for a room."""
    check_secure(grant.livekit_url, "livekit_url", allow_insecure=False)
    assert grant.token.get_secret_value().count(".") == 2 and grant.expires_at.tzinfo is not None


async def _open(api: SessionApi) -> SessionGrant | SessionRefused:
    try:
        return await api.open_session()
    except SessionRefused as error:
        return error
    finally:
        await api.aclose()


@given(status=STATUSES, headers=HEADERS, body=BODIES, check_catalog=st.booleans(), token_endpoint=st.booleans())
@FUZZ
def test_fuzz_session_api_and_token_endpoint_replies(loop: Loop, status: int, headers: dict[str, str], body: bytes,
                                                     check_catalog: bool, token_endpoint: bool) -> None:
    loop.server.reply = _reply(status, headers, body)
    outcome = loop.run(_open(client(loop.server.url, token_endpoint=token_endpoint, check_catalog=check_catalog,
                                    request_timeout_seconds=2.0)))
    if isinstance(outcome, SessionGrant):
        _check_grant(outcome)
    else:
        assert isinstance(outcome, SessionRefused) and outcome.message
        assert outcome.retry_after_seconds is None or 0 <= outcome.retry_after_seconds <= RETRY_AFTER_MAX_SECONDS


RAW_REPLIES = st.one_of(
    st.binary(max_size=400),
    st.builds(lambda status, reason, headers, body: b"HTTP/1.1 " + status + b" " + reason + b"\r\n" + headers
              + b"\r\n" + body,
              st.sampled_from([b"200", b"201", b"302", b"429", b"503", b"999", b"-1", b"20x", b""]),
              st.binary(max_size=20),
              st.lists(st.sampled_from([b"Content-Length: 5\r\n", b"Content-Length: -1\r\n",
                                        b"Content-Length: 99999999999\r\n", b"Transfer-Encoding: chunked\r\n",
                                        b"Content-Encoding: gzip\r\n", b"Retry-After: 1e12\r\n",
                                        b"Location: /again\r\n", b"X-\x00: \xff\r\n", b"NoColon\r\n",
                                        b" folded\r\n", b"Content-Type: application/json; charset=nope\r\n"]),
                       max_size=5).map(b"".join),
              st.one_of(st.binary(max_size=100), st.just(b'{"session_id": "s"}'), st.just(b"5\r\n{}\r\n0\r\n\r\n"))),
)


@given(raw=RAW_REPLIES, token_endpoint=st.booleans())
@FUZZ
def test_fuzz_replies_that_are_not_http(loop: Loop, stored_once: tuple[Message, bytes], raw: bytes,
                                        token_endpoint: bool) -> None:
    loop.raw_reply = raw
    url = f"http://127.0.0.1:{loop.raw_port}"
    outcome = loop.run(_open(client(url, token_endpoint=token_endpoint, check_catalog=False,
                                    request_timeout_seconds=2.0)))
    assert isinstance(outcome, SessionRefused)
    result = loop.run(upload(url, *stored_once))
    assert isinstance(result, UploadResult)
    assert not result.acknowledged or (result.status is not None and 200 <= result.status < 300)
    answer = loop.run(_probe(url + "/"))
    assert isinstance(answer, ServerAnswer)
    assert answer is not ServerAnswer.UP or raw.startswith(b"HTTP/1.1 2")


@given(status=STATUSES, headers=HEADERS, body=BODIES)
@FUZZ
def test_fuzz_server_probe_replies(loop: Loop, status: int, headers: dict[str, str], body: bytes) -> None:
    loop.server.reply = _reply(status, headers, body)
    assert loop.run(_probe(loop.server.url + "/")) is _expected(status)


@given(status=STATUSES, headers=HEADERS, body=st.binary(max_size=300))
@FUZZ
def test_fuzz_uploader_replies(loop: Loop, stored_once: tuple[Message, bytes], status: int,
                               headers: dict[str, str], body: bytes) -> None:
    loop.server.reply = _reply(status, headers, body)
    result = loop.run(upload(loop.server.url, *stored_once))
    assert result.acknowledged is (200 <= status < 300) and result.status == status
    assert result.retry_after_seconds is None or 0 <= result.retry_after_seconds <= RETRY_AFTER_MAX_SECONDS
    assert all(ch.isprintable() for ch in result.error)

"""The voice-session API client: check the model catalog, then ask for a LiveKit URL and a room token.

Contract (documented in docs/livekit.md):

- ``GET {api_url}/v1/models/{model_id}`` -> ``200 {"id": ..., "status": "available" | "maintenance" | ...}``;
  anything but ``available`` skips that profile (the next configured one is tried, then the offline path).
- ``POST {api_url}/v1/voice/sessions`` with ``{"llm_model", "voice", "stt_model"?, "tts_model"?}`` ->
  ``201 {"session_id", "livekit_url", "token", "expires_at", "agent_identity"?}`` (``expires_at`` RFC 3339;
  ``agent_identity``, where given, is the only participant the room link trusts as the agent).
- The second source, LiveKit's standard token endpoint: ``POST {token_endpoint_url}`` with
  ``{"room_name", "participant_identity", "participant_name", "room_config"}`` -> ``201 {"server_url",
  "participant_token"}``.

The device credential goes as ``Authorization: Bearer ...`` and is never logged. Failures raise
``SessionRefused`` with a ``RefusalReason`` (the room link turns it into an ``ApiRefused`` event):
401/403 unauthorised, 402 credits exhausted, 429 rate limited (``Retry-After`` honoured up to a clamp), 5xx
server error, timeout and a dropped connection (retried with exponential backoff and full jitter), malformed
reply, unreachable. Every request is safe to repeat: the catalog is a GET, each session POST carries an
``Idempotency-Key`` (a UUID for that one request, the same on its retries, so an API that already made the
session for a request whose reply was lost hands back that session instead of a second one), and the token
endpoint's room is the kiosk's own choice.

The API is reached across a shared network, so every reply is treated as untrusted (``kiosk.link.replies``):
redirects are not followed, bodies are read up to ``MAX_REPLY_BYTES``, JSON nesting is limited, the room
token's claims are checked (a room to join, not expired, for the kiosk's own room and identity where the
kiosk chose them), and the LiveKit URL handed back must pass ``kiosk.transport.check_secure``. Any reply
problem is a ``malformed_reply`` refusal; URLs in messages are redacted.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

import aiohttp
import jwt
from pydantic import BaseModel, ConfigDict, Field, SecretStr, StrictBool, ValidationError, field_validator

from kiosk.errors import KioskError
from kiosk.events import RefusalReason
from kiosk.link.backoff import Backoff
from kiosk.link.replies import (
    MAX_REPLY_BYTES,
    BadReply,
    client_session,
    describe_error,
    excerpt,
    parse_json,
    parse_retry_after,
    printable,
    read_capped,
)
from kiosk.settings import SessionProfile, SessionSettings, SessionSource
from kiosk.transport import InsecureTransport, check_secure, redact_url

if TYPE_CHECKING:
    from kiosk.settings import Settings

__all__ = ["SessionApi", "SessionGrant", "SessionRefused", "parse_retry_after"]

_LOGGER = logging.getLogger(__name__)

SESSIONS_PATH = "/v1/voice/sessions"
MODELS_PATH = "/v1/models/"
STATUS_AVAILABLE = "available"
STATUS_MAINTENANCE = "maintenance"
# Printable ASCII without spaces: ids that reach log lines cannot carry control characters or new lines.
_PRINTABLE_ID = r"^[\x21-\x7e]+$"
# A token that expired longer ago than this (the kiosk's clock may be a little off) is refused.
TOKEN_EXPIRY_LEEWAY_SECONDS = 60.0
# exp claims beyond the year 9999 cannot be a date.
_MAX_EXP = 253402300799.0


class SessionRefused(KioskError):
    """The session API (or the catalog) refused, or could not be used; ``reason`` says why."""

    def __init__(self, reason: RefusalReason, message: str, retry_after_seconds: float | None = None,
                 http_status: int | None = None) -> None:
        super().__init__(f"session_{reason.value}", message)
        self.reason = reason
        self.retry_after_seconds = retry_after_seconds
        self.http_status = http_status


def _malformed(message: str, http_status: int | None = None) -> SessionRefused:
    return SessionRefused(RefusalReason.MALFORMED_REPLY, message, http_status=http_status)


def _times(count: int) -> str:
    return "once" if count == 1 else f"{count} times"


def _ws_url(value: str) -> str:
    if not value.startswith(("ws://", "wss://", "http://", "https://")):
        raise ValueError(f"'{value}' is not a LiveKit URL (ws://, wss://, http:// or https://)")
    return value


class VoiceSessionReply(BaseModel):
    """The reply of ``POST /v1/voice/sessions``."""

    model_config = ConfigDict(extra="ignore")

    session_id: str = Field(min_length=1, max_length=256, pattern=_PRINTABLE_ID)
    livekit_url: str = Field(max_length=2048)
    token: SecretStr
    expires_at: datetime
    # The agent's participant identity, where the API names it: only that participant is trusted in the room.
    agent_identity: str | None = Field(None, min_length=1, max_length=256, pattern=_PRINTABLE_ID)

    _url = field_validator("livekit_url")(_ws_url)

    @field_validator("token")
    @classmethod
    def _token(cls, value: SecretStr) -> SecretStr:
        if value.get_secret_value().count(".") != 2:
            raise ValueError("token is not a JWT (header.payload.signature)")
        return value

    @field_validator("expires_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class TokenEndpointReply(BaseModel):
    """The reply of LiveKit's standard token endpoint."""

    model_config = ConfigDict(extra="ignore")

    server_url: str = Field(max_length=2048)
    participant_token: SecretStr

    _url = field_validator("server_url")(_ws_url)


class CatalogEntry(BaseModel):
    """One model in the catalog."""

    model_config = ConfigDict(extra="ignore")

    id: str
    status: str = Field(min_length=1, max_length=64, pattern=_PRINTABLE_ID)


class _VideoGrant(BaseModel):
    model_config = ConfigDict(extra="ignore")

    room: str = Field(min_length=1, max_length=256)
    roomJoin: StrictBool = False  # noqa: N815 - the claim's own name


class RoomTokenClaims(BaseModel):
    """The claims of a LiveKit room token the kiosk relies on (read, not verified: the server verifies)."""

    model_config = ConfigDict(extra="ignore")

    exp: Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, lt=_MAX_EXP)]
    sub: str = Field(min_length=1, max_length=256)
    video: _VideoGrant


class SessionGrant(BaseModel):
    """What a session needs: where to connect, the room token, and when it expires."""

    model_config = ConfigDict(frozen=True)

    session_id: str
    livekit_url: str
    token: SecretStr
    expires_at: datetime
    profile: SessionProfile | None = None
    agent_identity: str | None = None  # the only participant trusted as the agent, where the API names it


def room_token_claims(token: str, *, room: str | None = None, identity: str | None = None,
                      now: datetime | None = None) -> RoomTokenClaims:
    """The checked claims of a room token; ``SessionRefused(MALFORMED_REPLY)`` naming what is wrong.

    The token must grant joining a room and must not have expired; where the kiosk chose the room and its
    identity (the token endpoint), the token must be for exactly those (a foreign token is refused).
    """
    try:
        raw = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as error:
        raise _malformed(f"the room token cannot be read ({describe_error(error)}); check the API's "
                         "implementation") from None
    try:
        claims = RoomTokenClaims.model_validate(raw)
    except ValidationError as error:
        fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in error.errors())
        raise _malformed(f"the room token's claims are not usable (bad: {printable(fields)}); check the API's "
                         "implementation") from None
    if not claims.video.roomJoin:
        raise _malformed("the room token does not grant joining its room (video.roomJoin); check the API")
    reference = (now or datetime.now(UTC)).timestamp()
    if claims.exp < reference - TOKEN_EXPIRY_LEEWAY_SECONDS:
        raise _malformed("the room token has already expired (exp); check the API's clock, or the kiosk's")
    if room is not None and claims.video.room != room:
        raise _malformed(f"the room token is for another room ({printable(claims.video.room, 80)}, not "
                         f"{room}); check the token endpoint")
    if identity is not None and claims.sub != identity:
        raise _malformed(f"the room token is for another participant ({printable(claims.sub, 80)}, not "
                         f"{identity}); check the token endpoint")
    return claims


class SessionApi:
    """Client of the voice-session API or of a standard LiveKit token endpoint (``settings.source``)."""

    def __init__(
        self,
        settings: SessionSettings,
        *,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] | None = None,
        identity: str | None = None,
        allow_insecure_transport: bool = False,
    ) -> None:
        """``allow_insecure_transport`` is ``security.allow_insecure_transport`` (see ``from_settings``)."""
        self._settings = settings
        self._allow_insecure = allow_insecure_transport
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._clock = clock
        self._identity = identity or f"kiosk-{socket.gethostname()}"
        self._http: aiohttp.ClientSession | None = None
        # Loop time before which the API is not asked again (its Retry-After), and the refusal meanwhile.
        self._not_before = 0.0
        self._held_back = RefusalReason.RATE_LIMITED

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> SessionApi:
        """The client for ``settings.session`` under ``settings.security`` (``options`` as for the constructor)."""
        return cls(settings.session, allow_insecure_transport=settings.security.allow_insecure_transport,
                   **options)

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = client_session(self._settings.request_timeout_seconds)
        return self._http

    def _livekit_url(self, url: str, what: str) -> str:
        """``url`` if it may carry the conversation (TLS, or loopback, or a development stack)."""
        try:
            check_secure(url, what, allow_insecure=self._allow_insecure)
        except InsecureTransport as error:
            raise _malformed(f"{error.message} (the API must hand out wss:// URLs)") from None
        return url

    def _headers(self) -> dict[str, str]:
        credential = self._settings.credential
        if credential is None:
            return {}
        return {"Authorization": f"Bearer {credential.get_secret_value()}"}

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _request(self, method: str, url: str, body: dict[str, Any] | None = None, *,
                       idempotency_key: str | None = None) -> Any:
        """One logical request, retried on 5xx, a timeout, a dropped connection and a short Retry-After.

        Every request the kiosk makes is safe to repeat (the module's docstring says why); ``idempotency_key``
        goes with every try of it. Returns the parsed JSON of a 2xx reply; refusals raise ``SessionRefused``.
        Only programming errors escape as anything else: every reply problem (a redirect, oversized headers or
        body, not JSON, nested too deeply, a broken HTTP message) is ``MALFORMED_REPLY``.
        """
        shown = f"{method} {redact_url(url)}"
        if "@" in urlsplit(url).netloc and self._settings.credential is not None:
            # aiohttp refuses both (a ValueError): say which setting to fix instead.
            raise SessionRefused(RefusalReason.UNAUTHORISED, f"{shown} carries user:password@ and a device "
                                 "credential is set: remove the user info from the URL (the credential is the "
                                 "bearer token)")
        if self._now() < self._not_before:
            wait_s = self._not_before - self._now()
            raise SessionRefused(self._held_back, f"the API asked to wait {wait_s:.1f} s more before the next "
                                 f"request ({self._held_back.value}); not asked", retry_after_seconds=wait_s)
        backoff = Backoff(self._settings.retry_base_seconds, self._settings.retry_max_seconds, rng=self._rng)
        attempts = self._settings.retry_attempts
        headers = self._headers()
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        for attempt in range(1, attempts + 1):
            last = attempt == attempts
            status = 0
            try:
                async with self._session().request(method, url, json=body, headers=headers,
                                                   allow_redirects=False) as response:
                    status = response.status
                    retry_after = parse_retry_after(response.headers.get("Retry-After"))
                    if 200 <= status < 300:
                        return parse_json(await read_capped(response, MAX_REPLY_BYTES))
                    if 300 <= status < 400:
                        location = printable(response.headers.get("Location", "nowhere"), 200)
                        raise _malformed(f"{shown} answered {status}, a redirect to {location}; the kiosk follows "
                                         "no redirects: set the API's final address in the settings", status)
                    text = excerpt(await read_capped(response, 4 * 1024, truncate=True))
            except TimeoutError:
                # A lossy link: the request or its reply may be lost, or the API slow. A fresh try on a fresh
                # connection often gets through, and it cannot make a second session (see above).
                if not last:
                    await self._retry(backoff, attempt, attempts, "took longer than "
                                      f"{self._settings.request_timeout_seconds} s")
                    continue
                raise SessionRefused(RefusalReason.TIMEOUT, f"{shown} took longer than "
                                     f"{self._settings.request_timeout_seconds} s {_times(attempts)}; check the "
                                     "network or raise session.request_timeout_seconds") from None
            except aiohttp.ClientConnectionError as error:
                # Refused or no route: the network or the address is wrong, and the visitor hears it at once.
                # A connection lost in the middle of the request is a lossy link, like a timeout.
                if not last and not isinstance(error, aiohttp.ClientConnectorError):
                    await self._retry(backoff, attempt, attempts, f"lost the connection ({describe_error(error)})")
                    continue
                raise SessionRefused(RefusalReason.UNREACHABLE, f"{shown} failed: {describe_error(error)}; check "
                                     "the network and session.api_url") from None
            except BadReply as error:
                raise _malformed(f"{shown} answered {status} with a reply the kiosk does not use: {error}; check "
                                 "the API", status) from None
            except aiohttp.ClientError as error:  # a broken HTTP message: oversized headers, a bad body, ...
                raise _malformed(f"{shown} answered with a broken HTTP reply ({describe_error(error)}); check the "
                                 "API and anything between it and the kiosk") from None
            if status in (401, 403):
                raise SessionRefused(RefusalReason.UNAUTHORISED, f"{shown} answered {status}: the device "
                                     "credential was refused; provision a valid 'device-credential'",
                                     http_status=status)
            if status == 402:
                raise SessionRefused(RefusalReason.CREDITS_EXHAUSTED, f"{shown} answered 402: the account "
                                     "has no credits left; top it up", http_status=status)
            if status == 429 or (status >= 500 and retry_after is not None):
                # The API says when to come back (a 503's Retry-After too): a short wait is waited out, a longer
                # one refuses and holds back every request until then, the offline probe's included, so an API
                # under strain can slow the whole fleet.
                reason = RefusalReason.RATE_LIMITED if status == 429 else RefusalReason.SERVER_ERROR
                wait_s = retry_after if retry_after is not None else backoff.next_delay_seconds()
                if not last and wait_s <= self._settings.rate_limit_wait_max_seconds:
                    _LOGGER.info("session API answered %d; waiting %.2f s as asked", status, wait_s)
                    await self._sleep(wait_s)
                    continue
                self._not_before, self._held_back = self._now() + wait_s, reason
                raise SessionRefused(reason, f"{shown} answered {status} ({reason.value}); asked to wait "
                                     f"{wait_s:.1f} s", retry_after_seconds=wait_s, http_status=status)
            if status >= 500:
                if not last:
                    await self._retry(backoff, attempt, attempts, f"answered {status}")
                    continue
                raise SessionRefused(RefusalReason.SERVER_ERROR, f"{shown} answered {status} {_times(attempts)} "
                                     f"({text!r}); the service is failing, try later", http_status=status)
            raise _malformed(f"{shown} answered {status} ({text!r}); the kiosk and the API disagree on the "
                             "contract", status)
        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover

    async def _retry(self, backoff: Backoff, attempt: int, attempts: int, what: str) -> None:
        delay_s = backoff.next_delay_seconds()
        _LOGGER.warning("session API %s; retry %d/%d in %.2f s", what, attempt, attempts - 1, delay_s)
        await self._sleep(delay_s)

    async def model_status(self, model_id: str) -> str:
        """The catalog status of a model (``available``, ``maintenance``, ...); ``unknown`` if not listed."""
        url = self._settings.api_url.rstrip("/") + MODELS_PATH + model_id
        try:
            data = await self._request("GET", url)
        except SessionRefused as error:
            if error.reason is RefusalReason.MALFORMED_REPLY and error.http_status == 404:
                return "unknown"
            raise
        try:
            return CatalogEntry.model_validate(data).status
        except ValidationError as error:
            raise _malformed(f"catalog entry for {model_id} does not match the schema: {error.error_count()} "
                             "error(s); check the API version") from None

    async def open_session(self) -> SessionGrant:
        """Choose the first available profile and get a session for it; raises ``SessionRefused``."""
        if self._settings.source is SessionSource.TOKEN_ENDPOINT:
            return await self._from_token_endpoint()
        if self._settings.credential is None:
            raise SessionRefused(RefusalReason.UNAUTHORISED, "no device credential: provision the systemd "
                                 "credential 'device-credential' or set KIOSK_SESSION__CREDENTIAL")
        skipped: list[str] = []
        for profile in self._settings.profiles:
            if self._settings.check_catalog:
                status = await self.model_status(profile.llm_model)
                if status != STATUS_AVAILABLE:
                    _LOGGER.warning("model %s is %s; trying the next profile", profile.llm_model, status)
                    skipped.append(f"{profile.llm_model}: {status}")
                    continue
            return await self._voice_session(profile)
        raise SessionRefused(RefusalReason.MAINTENANCE, "no configured profile is available ("
                             + "; ".join(skipped) + "); the kiosk goes offline until one is")

    async def _voice_session(self, profile: SessionProfile) -> SessionGrant:
        url = self._settings.api_url.rstrip("/") + SESSIONS_PATH
        body: dict[str, Any] = {"llm_model": profile.llm_model, "voice": profile.voice}
        if profile.stt_model:
            body["stt_model"] = profile.stt_model
        if profile.tts_model:
            body["tts_model"] = profile.tts_model
        data = await self._request("POST", url, body, idempotency_key=str(uuid.uuid4()))
        try:
            reply = VoiceSessionReply.model_validate(data)
        except ValidationError as error:
            fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in error.errors())
            raise _malformed(f"session reply does not match the schema (bad: {printable(fields)}); check the API "
                             "version") from None
        livekit_url = self._livekit_url(reply.livekit_url, "the session API's livekit_url")
        room_token_claims(reply.token.get_secret_value())
        _LOGGER.info("session %s for %s/%s, expires %s", reply.session_id, profile.llm_model, profile.voice,
                     reply.expires_at.isoformat())
        return SessionGrant(session_id=reply.session_id, livekit_url=livekit_url, token=reply.token,
                            expires_at=reply.expires_at, profile=profile, agent_identity=reply.agent_identity)

    async def _from_token_endpoint(self) -> SessionGrant:
        url = self._settings.token_endpoint_url
        if url is None:  # settings validation forbids this; keep mypy and a broken override honest
            raise SessionRefused(RefusalReason.UNREACHABLE, "session.token_endpoint_url is unset: set it")
        room = f"kiosk-{uuid.uuid4().hex[:12]}"
        body = {
            "room_name": room,
            "participant_identity": self._identity,
            "participant_name": "kiosk",
            "room_config": {"agents": [{"agent_name": self._settings.agent_name}]},
        }
        data = await self._request("POST", url, body)
        try:
            reply = TokenEndpointReply.model_validate(data)
        except ValidationError as error:
            fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in error.errors())
            raise _malformed(f"token endpoint reply does not match the standard contract (bad: "
                             f"{printable(fields)})") from None
        livekit_url = self._livekit_url(reply.server_url, "the token endpoint's server_url")
        claims = room_token_claims(reply.participant_token.get_secret_value(), room=room, identity=self._identity)
        return SessionGrant(session_id=claims.video.room, livekit_url=livekit_url, token=reply.participant_token,
                            expires_at=datetime.fromtimestamp(claims.exp, UTC))

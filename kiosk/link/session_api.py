"""The voice-session API client: check the model catalog, then ask for a LiveKit URL and a room token.

Contract (documented in docs/livekit.md):

- ``GET {api_url}/v1/models/{model_id}`` -> ``200 {"id": ..., "status": "available" | "maintenance" | ...}``;
  anything but ``available`` skips that profile (the next configured one is tried, then the offline path).
- ``POST {api_url}/v1/voice/sessions`` with ``{"llm_model", "voice", "stt_model"?, "tts_model"?}`` ->
  ``201 {"session_id", "livekit_url", "token", "expires_at"}`` (``expires_at`` RFC 3339).
- The second source, LiveKit's standard token endpoint: ``POST {token_endpoint_url}`` with
  ``{"room_name", "participant_identity", "participant_name", "room_config"}`` -> ``201 {"server_url",
  "participant_token"}``.

The device credential goes as ``Authorization: Bearer ...`` and is never logged. Failures raise
``SessionRefused`` with a ``RefusalReason`` (the room link turns it into an ``ApiRefused`` event):
401/403 unauthorised, 402 credits exhausted, 429 rate limited (``Retry-After`` honoured), 5xx server error
(retried with exponential backoff and full jitter), timeout, malformed reply, unreachable.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import socket
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import jwt
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from kiosk.errors import KioskError
from kiosk.events import RefusalReason
from kiosk.link.backoff import Backoff
from kiosk.settings import SessionProfile, SessionSettings, SessionSource

_LOGGER = logging.getLogger(__name__)

SESSIONS_PATH = "/v1/voice/sessions"
MODELS_PATH = "/v1/models/"
STATUS_AVAILABLE = "available"
STATUS_MAINTENANCE = "maintenance"


class SessionRefused(KioskError):
    """The session API (or the catalog) refused, or could not be used; ``reason`` says why."""

    def __init__(self, reason: RefusalReason, message: str, retry_after_seconds: float | None = None) -> None:
        super().__init__(f"session_{reason.value}", message)
        self.reason = reason
        self.retry_after_seconds = retry_after_seconds


def _ws_url(value: str) -> str:
    if not value.startswith(("ws://", "wss://", "http://", "https://")):
        raise ValueError(f"'{value}' is not a LiveKit URL (ws://, wss://, http:// or https://)")
    return value


class VoiceSessionReply(BaseModel):
    """The reply of ``POST /v1/voice/sessions``."""

    model_config = ConfigDict(extra="ignore")

    session_id: str = Field(min_length=1, max_length=256)
    livekit_url: str
    token: SecretStr
    expires_at: datetime

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

    server_url: str
    participant_token: SecretStr

    _url = field_validator("server_url")(_ws_url)


class CatalogEntry(BaseModel):
    """One model in the catalog."""

    model_config = ConfigDict(extra="ignore")

    id: str
    status: str


class SessionGrant(BaseModel):
    """What a session needs: where to connect, the room token, and when it expires."""

    model_config = ConfigDict(frozen=True)

    session_id: str
    livekit_url: str
    token: SecretStr
    expires_at: datetime
    profile: SessionProfile | None = None


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    reference = now or datetime.now(UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - reference).total_seconds())


def _token_claims(token: str) -> dict[str, Any]:
    """The unverified claims of a room token (room name and expiry; the server verifies the signature)."""
    try:
        claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as error:
        raise SessionRefused(RefusalReason.MALFORMED_REPLY, f"the token endpoint returned an unreadable token: "
                             f"{error}; check the endpoint's implementation") from None
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
    ) -> None:
        self._settings = settings
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._clock = clock
        self._identity = identity or f"kiosk-{socket.gethostname()}"
        self._http: aiohttp.ClientSession | None = None
        self._not_before = 0.0  # loop time before which a rate-limited API is not asked again

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            timeout = aiohttp.ClientTimeout(total=self._settings.request_timeout_seconds)
            self._http = aiohttp.ClientSession(timeout=timeout)
        return self._http

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

    async def _request(self, method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        """One logical request: retried on 5xx (backoff + jitter) and on a short Retry-After; refusals raise."""
        if self._now() < self._not_before:
            wait_s = self._not_before - self._now()
            raise SessionRefused(RefusalReason.RATE_LIMITED, f"rate limited: the API asked to wait {wait_s:.1f} s "
                                 "more before the next session request", retry_after_seconds=wait_s)
        backoff = Backoff(self._settings.retry_base_seconds, self._settings.retry_max_seconds, rng=self._rng)
        attempts = self._settings.retry_attempts
        for attempt in range(1, attempts + 1):
            last = attempt == attempts
            try:
                async with self._session().request(method, url, json=body, headers=self._headers()) as response:
                    status = response.status
                    retry_after = parse_retry_after(response.headers.get("Retry-After"))
                    if status < 400:
                        try:
                            data = await response.json(content_type=None)
                        except (ValueError, aiohttp.ContentTypeError) as error:
                            raise SessionRefused(RefusalReason.MALFORMED_REPLY, f"{method} {url} answered {status} "
                                                 f"with a body that is not JSON ({error}); check the API") from None
                        return status, data
                    text = (await response.text())[:200]
            except TimeoutError:
                raise SessionRefused(RefusalReason.TIMEOUT, f"{method} {url} took longer than "
                                     f"{self._settings.request_timeout_seconds} s; check the network or raise "
                                     "session.request_timeout_seconds") from None
            except aiohttp.ClientConnectionError as error:
                raise SessionRefused(RefusalReason.UNREACHABLE, f"{method} {url} failed: {error}; check the "
                                     "network and session.api_url") from None
            if status in (401, 403):
                raise SessionRefused(RefusalReason.UNAUTHORISED, f"{method} {url} answered {status}: the device "
                                     "credential was refused; provision a valid 'device-credential'")
            if status == 402:
                raise SessionRefused(RefusalReason.CREDITS_EXHAUSTED, f"{method} {url} answered 402: the account "
                                     "has no credits left; top it up")
            if status == 429:
                wait_s = retry_after if retry_after is not None else backoff.next_delay_seconds()
                if not last and wait_s <= self._settings.rate_limit_wait_max_seconds:
                    _LOGGER.info("session API rate limited; waiting %.2f s as asked", wait_s)
                    await self._sleep(wait_s)
                    continue
                self._not_before = self._now() + wait_s
                raise SessionRefused(RefusalReason.RATE_LIMITED, f"{method} {url} answered 429 (rate limited); "
                                     f"asked to wait {wait_s:.1f} s", retry_after_seconds=wait_s)
            if status >= 500:
                if not last:
                    delay_s = backoff.next_delay_seconds()
                    _LOGGER.warning("session API answered %d; retry %d/%d in %.2f s", status, attempt,
                                    attempts - 1, delay_s)
                    await self._sleep(delay_s)
                    continue
                raise SessionRefused(RefusalReason.SERVER_ERROR, f"{method} {url} answered {status} {attempts} "
                                     f"times ({text!r}); the service is failing, try later")
            raise SessionRefused(RefusalReason.MALFORMED_REPLY, f"{method} {url} answered {status} ({text!r}); "
                                 "the kiosk and the API disagree on the contract")
        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover

    async def model_status(self, model_id: str) -> str:
        """The catalog status of a model (``available``, ``maintenance``, ...); ``unknown`` if not listed."""
        url = self._settings.api_url.rstrip("/") + MODELS_PATH + model_id
        try:
            _, data = await self._request("GET", url)
        except SessionRefused as error:
            if error.reason is RefusalReason.MALFORMED_REPLY and "answered 404" in error.message:
                return "unknown"
            raise
        try:
            return CatalogEntry.model_validate(data).status
        except ValidationError as error:
            raise SessionRefused(RefusalReason.MALFORMED_REPLY, f"catalog entry for {model_id} does not match the "
                                 f"schema: {error.error_count()} error(s); check the API version") from None

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
        _, data = await self._request("POST", url, body)
        try:
            reply = VoiceSessionReply.model_validate(data)
        except ValidationError as error:
            fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in error.errors())
            raise SessionRefused(RefusalReason.MALFORMED_REPLY, f"session reply does not match the schema (bad: "
                                 f"{fields}); check the API version") from None
        _LOGGER.info("session %s for %s/%s, expires %s", reply.session_id, profile.llm_model, profile.voice,
                     reply.expires_at.isoformat())
        return SessionGrant(session_id=reply.session_id, livekit_url=reply.livekit_url, token=reply.token,
                            expires_at=reply.expires_at, profile=profile)

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
        _, data = await self._request("POST", url, body)
        try:
            reply = TokenEndpointReply.model_validate(data)
        except ValidationError as error:
            fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in error.errors())
            raise SessionRefused(RefusalReason.MALFORMED_REPLY, f"token endpoint reply does not match the "
                                 f"standard contract (bad: {fields})") from None
        claims = _token_claims(reply.participant_token.get_secret_value())
        video = claims.get("video") or {}
        exp = claims.get("exp")
        if not isinstance(exp, int | float):
            raise SessionRefused(RefusalReason.MALFORMED_REPLY, "the token endpoint's token has no expiry (exp)")
        return SessionGrant(session_id=str(video.get("room") or room), livekit_url=reply.server_url,
                            token=reply.participant_token, expires_at=datetime.fromtimestamp(exp, UTC))

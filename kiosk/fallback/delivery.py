"""Delivery: upload stored messages to the operator's endpoint, exactly once from the operator's view.

Protocol (also in docs/offline.md): one ``POST`` to ``delivery.url`` per message, ``multipart/form-data``
with two parts, ``metadata`` (``application/json``) and ``audio`` (``application/octet-stream``: the sealed
file as stored, the WAV sealed to the operator's public key; the kiosk sends what it cannot read), a third,
``note`` (``application/octet-stream``, the agent's sealed summary), for a message the agent's ``take_message``
tool took, and the headers ``Authorization: Bearer <delivery credential>`` (delivery's own systemd credential
``delivery-credential``, not the session API's) and ``Idempotency-Key: <message id>``.
Any 2xx is the acknowledgement: only then is the message deleted. Everything else (a 5xx, a 4xx, a
timeout, a dropped connection) keeps it, and it is sent again later with the same key, after a backoff
with full jitter (``Retry-After`` is honoured). The endpoint stores a key once and answers 2xx to a
repeat, so a message whose acknowledgement was lost is not stored twice: at-least-once sending plus
deduplication by key is exactly-once for the operator.

The endpoint's reply is untrusted (``kiosk.link.replies``): a redirect is not followed (it is not an
acknowledgement, and the message is not sent elsewhere), the body is never read, ``Retry-After`` is clamped,
and no reply can raise out of ``upload``. URLs in errors are redacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from kiosk.errors import ConfigError, KioskError
from kiosk.fallback.spool import Message, MessageId, Spool, SpoolError, message_metadata
from kiosk.link.backoff import Backoff
from kiosk.link.replies import client_session, describe_error, parse_retry_after, printable
from kiosk.settings import CREDENTIALS_DIRECTORY
from kiosk.transport import check_secure, redact_url

if TYPE_CHECKING:
    import aiohttp

    from kiosk.settings import Settings

_LOGGER = logging.getLogger(__name__)

USER_AGENT = "kiosk-messages/1"


@dataclass(frozen=True)
class UploadResult:
    """The outcome of one upload attempt."""

    message_id: MessageId
    acknowledged: bool
    status: int | None = None  # HTTP status, None if no reply arrived
    error: str = ""
    retry_after_seconds: float | None = None


def metadata(message: Message, sealed: bytes, note: bytes | None = None) -> dict[str, str | float | int]:
    """The ``metadata`` part of an upload: the message's metadata (nothing from its content) and the attempt."""
    return {**message_metadata(message, sealed, note), "attempt": message.attempts}


class Uploader:
    """Sends one message per call over a shared aiohttp session (created lazily, closed by ``aclose``)."""

    def __init__(self, url: str, credential: str | None, timeout_seconds: float = 30.0, *,
                 allow_insecure_transport: bool = False) -> None:
        """``InsecureTransport`` if ``url`` is plain http to another host (``security.allow_insecure_transport``)."""
        check_secure(url, "delivery.url", allow_insecure=allow_insecure_transport)
        self.url = url
        self._credential = credential
        self._timeout_seconds = timeout_seconds
        self._session: aiohttp.ClientSession | None = None

    async def upload(self, message: Message, sealed: bytes, note: bytes | None = None) -> UploadResult:
        """POST one message (with its sealed ``note``, if any); never raises for network or HTTP failures."""
        import aiohttp

        if self._session is None:
            self._session = client_session(self._timeout_seconds)
        form = aiohttp.FormData()
        form.add_field("metadata", json.dumps(metadata(message, sealed, note)), content_type="application/json")
        form.add_field("audio", sealed, filename=f"{message.id}.wav.sealed", content_type="application/octet-stream")
        if note is not None:
            form.add_field("note", note, filename=f"{message.id}.note.sealed", content_type="application/octet-stream")
        headers = {"Idempotency-Key": message.id, "User-Agent": USER_AGENT}
        if self._credential:
            headers["Authorization"] = f"Bearer {self._credential}"
        try:
            # No redirects: a 3xx is not an acknowledgement, and the message must not go to another host.
            async with self._session.post(self.url, data=form, headers=headers, allow_redirects=False) as response:
                # The body is not read (leaving the context closes the connection): only the status counts.
                ok = 200 <= response.status < 300
                error = "" if ok else f"HTTP {response.status} {printable(response.reason or '', 80)}".strip()
                if 300 <= response.status < 400:
                    error += " (a redirect; the kiosk follows none: set delivery.url to the final address)"
                return UploadResult(message.id, ok, response.status, error,
                                    parse_retry_after(response.headers.get("Retry-After")))
        except TimeoutError:
            return UploadResult(message.id, False, None, f"no reply from {redact_url(self.url)} within "
                                f"{self._timeout_seconds:g} s")
        except aiohttp.ClientError as error:  # unreachable, or a broken reply (oversized headers, ...)
            return UploadResult(message.id, False, None, describe_error(error))

    async def aclose(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None


class Upload(Protocol):
    """Sends one message: ``Uploader.upload`` (tests pass their own)."""

    def __call__(self, message: Message, sealed: bytes, note: bytes | None = None) -> Awaitable[UploadResult]:
        """POST ``message`` (its sealed file, and its sealed note if it has one)."""
        ...


async def deliver_pass(spool: Spool, upload: Upload) -> list[UploadResult]:
    """Send stored messages, oldest first, until none is left or one fails.

    After a failure the endpoint is not taking messages now and the caller backs off. Acknowledged
    messages are deleted; failed ones go back to ``stored``.
    """
    results: list[UploadResult] = []
    skip: set[str] = set()
    while True:
        # Thread boundary: spool calls fsync; they run in the executor so the loop keeps serving audio.
        message = await asyncio.to_thread(spool.claim_next, frozenset(skip))
        if message is None:
            return results
        try:
            sealed = await asyncio.to_thread(spool.read, message)
            note = await asyncio.to_thread(spool.read_note, message)
        except SpoolError as error:
            # A file that fails its checksum is never sent: it goes to quarantine/ for staff to look at.
            _LOGGER.error("not sending message %s: %s", message.id, error.message)
            await asyncio.to_thread(spool.quarantine_message, message.id, error.message)
            skip.add(message.id)
            continue
        try:
            result = await upload(message, sealed, note)
        except BaseException:
            # Cancelled (shutdown) mid-upload: back to stored, sent again later with the same key.
            await asyncio.shield(asyncio.to_thread(spool.release, message.id, "cancelled"))
            raise
        results.append(result)
        if result.acknowledged:
            await asyncio.to_thread(spool.mark_delivered, message.id)
            _LOGGER.info("message %s delivered (HTTP %s)", message.id, result.status)
            continue
        await asyncio.to_thread(spool.release, message.id, result.error)
        if result.status in (401, 403):
            _LOGGER.error("the message endpoint rejects the delivery credential (%s): check the systemd "
                          "credential 'delivery-credential' and delivery.url", result.error)
        else:
            _LOGGER.warning("message %s not delivered: %s; will retry", message.id, result.error)
        return results


class Deliverer:
    """The service's delivery loop: a pass whenever woken (message stored, link up) or a backoff ran out.

    ``run()`` runs until cancelled; ``wake()`` is called from the loop (after a store, on ``LinkUp``);
    ``on_pass`` (e.g. a metrics refresh) is called after every pass that sent something.
    """

    def __init__(self, spool: Spool, upload: Upload, backoff: Backoff, idle_check_seconds: float = 600.0,
                 on_pass: Callable[[list[UploadResult]], None] | None = None,
                 uploader: Uploader | None = None) -> None:
        self._spool = spool
        self._upload = upload
        self._backoff = backoff
        self._idle_check_seconds = idle_check_seconds
        self._on_pass = on_pass
        self._uploader = uploader
        self._wake = asyncio.Event()
        self.delivered_total = 0
        self.failed_attempts_total = 0
        self.passing = False  # a delivery pass is under way (the memory restart waits for its end)

    @classmethod
    def from_settings(cls, settings: Settings, spool: Spool,
                      on_pass: Callable[[list[UploadResult]], None] | None = None) -> Deliverer | None:
        """The deliverer for ``delivery.url`` (None when unset: messages stay until staff export them).

        It registers itself to be woken by every ``spool.store_recording``.
        """
        if settings.delivery.url is None:
            _LOGGER.info("delivery.url is unset: visitors' messages stay on the kiosk (kiosk messages export)")
            return None
        if settings.delivery.credential is None:
            _LOGGER.error("delivery.url is set but there is no delivery credential, so messages stay on the kiosk: "
                          "provision the systemd credential 'delivery-credential' (docs/security.md)")
            return None
        uploader = uploader_from_settings(settings)
        deliverer = cls(spool, uploader.upload, backoff_from_settings(settings), on_pass=on_pass,
                        uploader=uploader)
        spool.on_stored.append(lambda _message_id: deliverer.wake())
        return deliverer

    def wake(self) -> None:
        """Try now (a message was stored, or the link came back)."""
        self._wake.set()

    async def run(self) -> None:
        """Deliver, back off on failure, sleep until woken when the spool is empty."""
        while True:
            self._wake.clear()
            self.passing = True
            try:
                results = await deliver_pass(self._spool, self._upload)
            except KioskError as error:
                # The spool itself failed (card error): keep the loop alive and try again after a backoff.
                _LOGGER.error("delivery pass failed: %s", error)
                results = [UploadResult(MessageId(""), False, None, error.message)]
            finally:
                self.passing = False
            self.delivered_total += sum(r.acknowledged for r in results)
            if results and self._on_pass is not None:
                self._on_pass(results)
            failed = [r for r in results if not r.acknowledged]
            if failed:
                self.failed_attempts_total += len(failed)
                delay = self._backoff.next_delay_seconds()
                hint = failed[-1].retry_after_seconds
                if hint is not None:
                    delay = min(max(delay, hint), self._backoff.max_seconds)
            else:
                self._backoff.reset()
                delay = self._idle_check_seconds
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def aclose(self) -> None:
        """Close the uploader's HTTP session (cancel ``run()``'s task first)."""
        if self._uploader is not None:
            await self._uploader.aclose()


def uploader_from_settings(settings: Settings,
                           credential_file: Path = CREDENTIALS_DIRECTORY / "delivery-credential") -> Uploader:
    """An ``Uploader`` for ``delivery.url`` with delivery's own credential.

    The credential is ``delivery.credential`` (the service's systemd credential, or the environment); run by
    hand, without ``$CREDENTIALS_DIRECTORY``, the provisioned ``credential_file`` is read if it can be.
    ``ConfigError`` if no URL is set or no credential is found: the session API's credential is never sent
    to the message endpoint.
    """
    url = settings.delivery.url
    if url is None:
        raise ConfigError("delivery.url is unset, so messages stay on the kiosk: set KIOSK_DELIVERY__URL or "
                          "[delivery] url in the config file")
    secret = settings.delivery.credential
    credential = secret.get_secret_value() if secret is not None else ""
    if not credential:
        try:
            credential = credential_file.read_text().strip()
        except OSError:
            credential = ""
    if not credential:
        raise ConfigError(f"delivery.credential: no delivery credential (the systemd credential "
                          f"'delivery-credential', {credential_file}, is missing, empty or unreadable): provision "
                          "it (docs/security.md), run as root, or set KIOSK_DELIVERY__CREDENTIAL for this command")
    return Uploader(url, credential, settings.delivery.request_timeout_seconds,
                    allow_insecure_transport=settings.security.allow_insecure_transport)


def backoff_from_settings(settings: Settings) -> Backoff:
    """The delivery backoff (full jitter) from ``delivery.retry_base_seconds`` and ``retry_max_seconds``."""
    base = min(settings.delivery.retry_base_seconds, settings.delivery.retry_max_seconds)
    return Backoff(base_seconds=base, max_seconds=settings.delivery.retry_max_seconds)

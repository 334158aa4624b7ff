"""Offline policy: is the kiosk able to hold a conversation, and if not, what does it say and show.

Connectivity is judged from what a conversation needs, not from a ping: the session API (it hands out
rooms), the catalog status of the model (maintenance, credits, budget) and the LiveKit connection.
``ConnectivityPolicy`` is pure: it is fed the events the link posts (``ApiRefused``, ``LinkLost``,
``SessionOpened``, ``LinkUp``) and answers with a ``Verdict``: online, or an ``OfflineReason`` with
the cue to play and the LED pattern to show. ``Probe`` is the thin async shell: while offline it asks
the API again with backoff and posts ``LinkUp`` once it answers (or ``ApiRefused`` when the reason
changes, e.g. maintenance ended but credits are exhausted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from kiosk.effects import OfflineReason
from kiosk.events import ApiRefused, Event, LinkLost, LinkUp, RefusalReason, SessionOpened
from kiosk.link.backoff import Backoff
from kiosk.ports import EventSink
from kiosk.settings import SessionSettings

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """The policy's answer: ``reason`` None means online."""

    reason: OfflineReason | None = None
    detail: str = ""

    @property
    def online(self) -> bool:
        """A conversation can be attempted."""
        return self.reason is None

    @property
    def cue(self) -> str | None:
        """The local spoken message (``kiosk.audio.cues``) that explains the state, None when online."""
        return None if self.reason is None else CUES[self.reason]

    @property
    def pattern(self) -> str | None:
        """The LED pattern name (``kiosk.panel.patterns``) for the state, None when online."""
        return None if self.reason is None else PATTERNS[self.reason]

    @property
    def leave_message(self) -> bool:
        """Whether the visitor is offered to leave a message (every offline reason: staff still read them)."""
        return self.reason is not None


# Cue and LED pattern per reason; the names are the reason's value so the tables stay obvious.
CUES: dict[OfflineReason, str] = {reason: reason.value for reason in OfflineReason}
PATTERNS: dict[OfflineReason, str] = {reason: reason.value for reason in OfflineReason}

# Refusals that say something definite about the service: offline at once.
DEFINITE: dict[RefusalReason, OfflineReason] = {
    RefusalReason.UNREACHABLE: OfflineReason.OFFLINE,
    RefusalReason.UNAUTHORISED: OfflineReason.OFFLINE,  # the visitor hears "offline"; staff see the log
    RefusalReason.MAINTENANCE: OfflineReason.MAINTENANCE,
    RefusalReason.CREDITS_EXHAUSTED: OfflineReason.CREDITS_EXHAUSTED,
    RefusalReason.BUDGET_CAP: OfflineReason.BUDGET_CAP,
}
# Refusals that can be a blip (one slow reply, one 5xx): offline only after several in a row.
TRANSIENT: frozenset[RefusalReason] = frozenset({
    RefusalReason.TIMEOUT, RefusalReason.SERVER_ERROR, RefusalReason.RATE_LIMITED, RefusalReason.MALFORMED_REPLY,
})
# Refusals the probe's check answers for: once it passes, they are over. The others come from the session request
# itself (an unauthorised credential, a 5xx or malformed reply, a rate limit, exhausted credits, a budget cap) while
# the catalog goes on answering, so a passing check says nothing of them (``LinkUp.proven``).
PROBE_COVERS: frozenset[RefusalReason] = frozenset({
    RefusalReason.UNREACHABLE, RefusalReason.TIMEOUT, RefusalReason.MAINTENANCE,
})


def reason_for(refusal: RefusalReason) -> OfflineReason:
    """The offline reason a refusal leads to (transient ones count as plain offline once they persist)."""
    return DEFINITE.get(refusal, OfflineReason.OFFLINE)


class ConnectivityPolicy:
    """Pure connectivity judgement from link events; no clock, no I/O.

    ``observe(event)`` returns the new verdict. Definite refusals (unreachable, maintenance, credits,
    budget, unauthorised) and a lost LiveKit link switch to offline at once; transient refusals
    (timeout, 5xx, rate limit, malformed reply) only after ``transient_limit`` in a row, so one slow reply
    does not send a visitor to the answering machine. ``SessionOpened`` and ``LinkUp`` are proof that
    everything needed answers: online.
    """

    def __init__(self, transient_limit: int = 2) -> None:
        if transient_limit < 1:
            raise ValueError("transient_limit must be at least 1")
        self.transient_limit = transient_limit
        self._transient_in_a_row = 0
        self.verdict = Verdict()

    def observe(self, event: Event) -> Verdict:
        """Update the verdict from one event (events that say nothing about connectivity leave it)."""
        if isinstance(event, SessionOpened | LinkUp):
            self._transient_in_a_row = 0
            self.verdict = Verdict()
        elif isinstance(event, LinkLost):
            self._transient_in_a_row = 0
            self.verdict = Verdict(OfflineReason.OFFLINE, event.reason or "room link lost")
        elif isinstance(event, ApiRefused):
            detail = f"{event.reason.value}: {event.detail}" if event.detail else event.reason.value
            if event.reason in TRANSIENT:
                self._transient_in_a_row += 1
                if self._transient_in_a_row >= self.transient_limit or not self.verdict.online:
                    self.verdict = Verdict(OfflineReason.OFFLINE, detail)
            else:
                self._transient_in_a_row = 0
                self.verdict = Verdict(reason_for(event.reason), detail)
        return self.verdict


# A probe check asks the API once: None when it answers and would open a session, else the refusal.
ProbeCheck = Callable[[], Awaitable[RefusalReason | None]]
# Waits the given seconds; a true result means it was cut short by news that the network came back
# (``NetworkWatch.sleep``): the backoff starts over. ``asyncio.sleep`` returns None.
Sleep = Callable[[float], Awaitable[bool | None]]


def probe_backoff(settings: SessionSettings) -> Backoff:
    """The offline probe's pacing: 1 s doubling to ``session.probe_max_seconds``, full jitter.

    A probe is one small request, so the ceiling stays low: after a long outage the kiosk is usable again
    within seconds of the API answering (the field bench measured 21-41 s with a 60 s ceiling).
    """
    return Backoff(base_seconds=min(1.0, settings.probe_max_seconds), max_seconds=settings.probe_max_seconds)


class Probe:
    """While offline, ask the API again with backoff; post ``LinkUp`` once it answers.

    ``check`` is the session API's own availability call (catalog status, or a cheap authenticated
    request); ``sleep`` is injected so tests run without waiting. ``run()`` returns after posting
    ``LinkUp``; cancel its task to stop probing (the app does so when a session opens by itself).
    """

    def __init__(self, check: ProbeCheck, sink: EventSink, backoff: Backoff | None = None,
                 sleep: Sleep = asyncio.sleep) -> None:
        self._check = check
        self._sink = sink
        self._backoff = backoff or Backoff(base_seconds=2.0, max_seconds=60.0)
        self._sleep = sleep
        self.attempts = 0

    async def run(self, last: RefusalReason | None = None, *, covered: bool = False) -> None:
        """Probe until the API answers; ``last`` is the refusal already known (not posted again).

        ``covered``: what took the kiosk offline is something the check answers for (``PROBE_COVERS``, or a room
        whose server took no connections); the ``LinkUp`` is ``proven`` if that held for every refusal seen since.
        """
        self._backoff.reset()
        while True:
            if await self._sleep(self._backoff.next_delay_seconds()):
                self._backoff.reset()  # the network came back: ask now, and soon again if it is not ready yet
            self.attempts += 1
            try:
                result = await self._check()
            except Exception as error:  # noqa: BLE001 - a failing check is one more "unreachable"
                _LOGGER.debug("probe check failed: %r", error)
                result = RefusalReason.UNREACHABLE
            if result is None:
                _LOGGER.info("the API answers again after %d probes", self.attempts)
                self._sink(LinkUp(proven=covered))
                return
            covered = covered and result in PROBE_COVERS
            if result is not last:
                _LOGGER.info("still unavailable, now: %s", result.value)
                self._sink(ApiRefused(result, "probe"))
                last = result


_DEFAULT_PORTS = {"ws": 80, "http": 80, "wss": 443, "https": 443}


def reachable_check(url: str, timeout_seconds: float = 5.0) -> ProbeCheck:
    """A probe check that a server takes TCP connections at ``url``'s host and port (``UNREACHABLE`` if not).

    For the LiveKit server: whether it runs and its host can be reached. Only that: its TLS and the SDK's
    protocol are the session's business, and a check stricter than the session would keep a working kiosk
    offline.
    """
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or _DEFAULT_PORTS.get(parts.scheme)
    if not host or port is None:
        raise ValueError(f"{url!r} names no host and port to check")

    async def check() -> RefusalReason | None:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_seconds)
        except (OSError, TimeoutError):
            return RefusalReason.UNREACHABLE
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return None

    return check


def http_check(url: str, timeout_seconds: float = 5.0) -> ProbeCheck:
    """A probe check that GETs ``url``: any reply below 500 counts as answering; 503 as maintenance.

    For deployments whose API has no catalog call the session client can use; the app prefers the
    session API client's catalog check where it exists.
    """
    async def check() -> RefusalReason | None:
        import aiohttp

        try:
            timeout = aiohttp.ClientTimeout(total=timeout_seconds)
            async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
                if response.status == 503:
                    return RefusalReason.MAINTENANCE
                return RefusalReason.SERVER_ERROR if response.status >= 500 else None
        except TimeoutError:
            return RefusalReason.TIMEOUT
        except aiohttp.ClientError:
            return RefusalReason.UNREACHABLE

    return check

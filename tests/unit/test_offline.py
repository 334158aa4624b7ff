from __future__ import annotations

import asyncio
import contextlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiosk.audio.cues import CUE_NAMES
from kiosk.events import (
    ApiRefused,
    ButtonPressed,
    Event,
    LinkLost,
    LinkUp,
    RefusalReason,
    SessionOpened,
)
from kiosk.fallback.offline import (
    CUES,
    ConnectivityPolicy,
    OfflineReason,
    Probe,
    Verdict,
    http_check,
    probe_backoff,
    reachable_check,
)
from kiosk.link.backoff import Backoff
from kiosk.settings import SessionSettings

DEFINITE_TABLE = [
    (RefusalReason.UNREACHABLE, OfflineReason.OFFLINE),
    (RefusalReason.UNAUTHORISED, OfflineReason.OFFLINE),
    (RefusalReason.MAINTENANCE, OfflineReason.MAINTENANCE),
    (RefusalReason.CREDITS_EXHAUSTED, OfflineReason.CREDITS_EXHAUSTED),
    (RefusalReason.BUDGET_CAP, OfflineReason.BUDGET_CAP),
]
TRANSIENT = [RefusalReason.TIMEOUT, RefusalReason.SERVER_ERROR, RefusalReason.RATE_LIMITED,
             RefusalReason.MALFORMED_REPLY]


def test_every_refusal_reason_is_classified() -> None:
    covered = {r for r, _ in DEFINITE_TABLE} | set(TRANSIENT)
    assert covered == set(RefusalReason)


def test_every_offline_reason_has_a_shipped_cue_and_a_pattern() -> None:
    for reason in OfflineReason:
        verdict = Verdict(reason)
        assert verdict.cue in CUE_NAMES
        assert verdict.pattern == reason.value
        assert verdict.leave_message and not verdict.online
    assert Verdict().online and Verdict().cue is None and Verdict().pattern is None
    assert set(CUES.values()) <= set(CUE_NAMES)


@pytest.mark.parametrize(("refusal", "reason"), DEFINITE_TABLE)
def test_definite_refusals_go_offline_at_once(refusal: RefusalReason, reason: OfflineReason) -> None:
    policy = ConnectivityPolicy()
    verdict = policy.observe(ApiRefused(refusal, "detail"))
    assert verdict.reason is reason and "detail" in verdict.detail


@pytest.mark.parametrize("refusal", TRANSIENT)
def test_transient_refusals_need_several_in_a_row(refusal: RefusalReason) -> None:
    policy = ConnectivityPolicy(transient_limit=2)
    assert policy.observe(ApiRefused(refusal)).online
    assert policy.observe(ApiRefused(refusal)).reason is OfflineReason.OFFLINE
    assert policy.observe(SessionOpened("s")).online
    # A success in between starts the count again.
    assert policy.observe(ApiRefused(refusal)).online
    assert policy.observe(SessionOpened("s")).online
    assert policy.observe(ApiRefused(refusal)).online


def test_sequences() -> None:
    policy = ConnectivityPolicy()
    steps: list[tuple[Event, OfflineReason | None]] = [
        (ButtonPressed(), None),
        (LinkLost("ice failed"), OfflineReason.OFFLINE),
        (ButtonPressed(), OfflineReason.OFFLINE),  # says nothing about connectivity
        (ApiRefused(RefusalReason.MAINTENANCE), OfflineReason.MAINTENANCE),
        (ApiRefused(RefusalReason.TIMEOUT), OfflineReason.OFFLINE),  # already offline: no grace
        (ApiRefused(RefusalReason.CREDITS_EXHAUSTED), OfflineReason.CREDITS_EXHAUSTED),
        (LinkUp(), None),
    ]
    for event, expected in steps:
        assert policy.observe(event).reason is expected, event


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.sleeps: list[float] = []

    def sink(self, event: Event) -> None:
        self.events.append(event)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


async def test_probe_backs_off_and_posts_link_up_once() -> None:
    answers: list[RefusalReason | None | Exception] = [
        RefusalReason.UNREACHABLE, RefusalReason.UNREACHABLE, OSError("no route"),
        RefusalReason.MAINTENANCE, RefusalReason.MAINTENANCE, RefusalReason.MAINTENANCE, None]

    async def check() -> RefusalReason | None:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    recorder = Recorder()
    backoff = Backoff(base_seconds=1.0, max_seconds=8.0, rng=random.Random(5))
    probe = Probe(check, recorder.sink, backoff, recorder.sleep)
    await probe.run(last=RefusalReason.UNREACHABLE)
    assert probe.attempts == 7 and not answers
    # Only changes are posted: maintenance once, then LinkUp once.
    assert recorder.events == [ApiRefused(RefusalReason.MAINTENANCE, "probe"), LinkUp()]
    ceilings = [min(8.0, 2.0**i) for i in range(7)]
    assert all(0 <= s <= c for s, c in zip(recorder.sleeps, ceilings, strict=True))
    assert max(recorder.sleeps) > 1.0  # it does back off


@pytest.mark.parametrize(("last", "covered", "seen", "proven"), [
    (RefusalReason.UNREACHABLE, True, [RefusalReason.TIMEOUT, RefusalReason.MAINTENANCE], True),
    (RefusalReason.UNREACHABLE, True, [RefusalReason.SERVER_ERROR], False),  # a 5xx on the way: not over for sure
    (RefusalReason.CREDITS_EXHAUSTED, False, [], False),  # the catalog answering says nothing of credits
    (None, True, [], True),  # a room whose server took no connections, and now does
    (None, False, [RefusalReason.UNREACHABLE], False),  # an agent that never came: nothing checks for it
])
async def test_link_up_is_proven_only_if_the_check_covered_every_refusal(
        last: RefusalReason | None, covered: bool, seen: list[RefusalReason], proven: bool) -> None:
    answers: list[RefusalReason | None] = [*seen, None]

    async def check() -> RefusalReason | None:
        return answers.pop(0)

    recorder = Recorder()
    await Probe(check, recorder.sink, Backoff(1.0, 1.0), recorder.sleep).run(last, covered=covered)
    assert recorder.events[-1] == LinkUp(proven=proven)


def test_the_probe_notices_a_restored_api_within_its_ceiling() -> None:
    backoff = probe_backoff(SessionSettings())
    ceilings = []
    for _ in range(40):  # a long outage
        ceilings.append(backoff.ceiling_seconds())
        backoff.next_delay_seconds()
    assert ceilings[0] == 1.0 and max(ceilings) == SessionSettings().probe_max_seconds == 2.5
    assert probe_backoff(SessionSettings(probe_max_seconds=3.0)).max_seconds == 3.0


async def test_http_check_against_a_real_server(unused_tcp_port: int) -> None:
    from aiohttp import web

    status = {"code": 200}

    async def handler(_request: web.Request) -> web.Response:
        return web.Response(status=status["code"])

    app = web.Application()
    app.router.add_get("/health", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    try:
        check = http_check(f"http://127.0.0.1:{unused_tcp_port}/health", timeout_seconds=2)
        assert await check() is None
        status["code"] = 503
        assert await check() is RefusalReason.MAINTENANCE
        status["code"] = 500
        assert await check() is RefusalReason.SERVER_ERROR
    finally:
        await runner.cleanup()
    assert await check() is RefusalReason.UNREACHABLE


async def test_reachable_check_asks_only_whether_the_server_takes_connections(unused_tcp_port: int) -> None:
    """The LiveKit server's check: a TCP connection to its URL's host and port (ws/wss defaults 80/443)."""
    async def hang_up(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", unused_tcp_port)
    check = reachable_check(f"ws://127.0.0.1:{unused_tcp_port}/rtc?x=1", timeout_seconds=2)
    try:
        assert await check() is None
    finally:
        server.close()
        await server.wait_closed()
    assert await check() is RefusalReason.UNREACHABLE
    with pytest.raises(ValueError, match="no host"):
        reachable_check("wss:///rtc")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80) | st.from_regex(r"\A(ws|wss|http|https|ftp)://[^\s]{0,40}\Z"))
def test_reachable_check_takes_any_url_apart_or_names_what_is_missing(url: str) -> None:
    """The URL comes from the session API: any string gives a check or a ValueError, nothing else."""
    with contextlib.suppress(ValueError):
        reachable_check(url)

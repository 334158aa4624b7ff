"""Every session-API failure mode, through the room link against the stand-in API in the local stack."""

from __future__ import annotations

import pytest

from kiosk.events import ApiRefused, LinkLost, RefusalReason, SessionOpened
from kiosk.settings import SessionProfile
from kiosk_dev.stack import LinkHarness, LocalStack

pytestmark = [pytest.mark.livekit, pytest.mark.timeout(60)]


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("unauthorised", RefusalReason.UNAUTHORISED),
        ("forbidden", RefusalReason.UNAUTHORISED),
        ("credits_exhausted", RefusalReason.CREDITS_EXHAUSTED),
        ("rate_limited", RefusalReason.RATE_LIMITED),
        ("server_error", RefusalReason.SERVER_ERROR),
        ("timeout", RefusalReason.TIMEOUT),
        ("malformed", RefusalReason.MALFORMED_REPLY),
        ("not_json", RefusalReason.MALFORMED_REPLY),
    ],
)
async def test_failure_mode_posts_the_right_refusal(stack: LocalStack, mode: str, reason: RefusalReason) -> None:
    stack.fail(mode, retry_after_seconds=60)
    kiosk = LinkHarness(stack, request_timeout_seconds=1.0, retry_attempts=2, retry_base_seconds=0.05)
    try:
        await kiosk.link.open()
        events = [e for _, e in kiosk.events.events]
        assert len(events) == 1 and isinstance(events[0], ApiRefused), events
        assert events[0].reason is reason and events[0].detail
        assert not kiosk.link.connected and kiosk.status.last_refusal == reason.value
        assert kiosk.metrics.api_refusals.labels(reason=reason.value)._value.get() == 1  # type: ignore[attr-defined]
    finally:
        await kiosk.link.aclose()


async def test_maintenance_falls_back_to_the_next_profile(stack: LocalStack) -> None:
    stack.set_model_status("gpt-realtime", "maintenance")
    chained = SessionProfile(llm_model="gpt-4o-mini-chained", voice="sage")
    kiosk = LinkHarness(stack, profiles=[SessionProfile(), chained])
    try:
        await kiosk.open()
        mine = [s for s in stack.sessions() if s["session_id"] == kiosk.link.session_id]
        assert mine[0]["request"] == {"llm_model": "gpt-4o-mini-chained", "voice": "sage"}
    finally:
        await kiosk.link.aclose()


async def test_all_profiles_in_maintenance_is_refused(stack: LocalStack) -> None:
    stack.set_model_status("gpt-realtime", "maintenance")
    kiosk = LinkHarness(stack)
    try:
        await kiosk.link.open()
        refused = kiosk.events.of(ApiRefused)
        assert len(refused) == 1 and refused[0].reason is RefusalReason.MAINTENANCE  # type: ignore[attr-defined]
        assert kiosk.events.of(SessionOpened) == [] and kiosk.events.of(LinkLost) == []
    finally:
        await kiosk.link.aclose()


async def test_transient_server_errors_are_retried_into_a_session(stack: LocalStack) -> None:
    stack.fail("server_error", times=2)
    kiosk = LinkHarness(stack, retry_attempts=3, retry_base_seconds=0.05)
    try:
        await kiosk.open()
        assert kiosk.events.of(ApiRefused) == []
    finally:
        await kiosk.link.aclose()

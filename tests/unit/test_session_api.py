"""The session API client against the real stand-in API over real HTTP on loopback."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from livekit import api
from pydantic import SecretStr

from kiosk.events import RefusalReason
from kiosk.link.replies import RETRY_AFTER_MAX_SECONDS
from kiosk.link.session_api import SessionApi, SessionRefused, parse_retry_after
from kiosk.settings import SessionProfile, SessionSettings, SessionSource
from kiosk_dev.session_stub import FailMode, SessionStub

KEY, SECRET = "devkey", "a-test-secret-of-at-least-thirty-two-chars"
CREDENTIAL = "test-device-credential"
LIVEKIT_URL = "wss://livekit.example.test"


@pytest.fixture
async def stub() -> AsyncIterator[tuple[SessionStub, str]]:
    s = SessionStub(LIVEKIT_URL, KEY, SECRET, credential=CREDENTIAL)
    url = await s.start()
    yield s, url
    await s.aclose()


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def _client(url: str, sleeps: Sleeps | None = None, *, allow_insecure_transport: bool = False,
            **overrides: object) -> SessionApi:
    fields: dict[str, object] = {"api_url": url, "credential": SecretStr(CREDENTIAL), "retry_attempts": 3,
                                 "request_timeout_seconds": 0.5}
    fields.update(overrides)
    settings = SessionSettings.model_validate(fields)
    return SessionApi(settings, rng=random.Random(5), sleep=sleeps or Sleeps(), identity="kiosk-test",
                      allow_insecure_transport=allow_insecure_transport)


async def test_session_has_a_real_room_scoped_token(stub: tuple[SessionStub, str]) -> None:
    s, url = stub
    client = _client(url)
    grant = await client.open_session()
    await client.aclose()
    claims = api.TokenVerifier(KEY, SECRET).verify(grant.token.get_secret_value())
    assert claims.video is not None and claims.video.room_join and claims.video.room == s.sessions[0].room
    assert claims.room_config is not None and claims.room_config.agents[0].agent_name == "kiosk-agent"
    assert grant.livekit_url == LIVEKIT_URL
    assert grant.agent_identity == f"agent-{s.sessions[0].room}"  # the only participant the link trusts
    assert grant.expires_at > datetime.now(UTC)
    assert grant.profile is not None and grant.profile.llm_model == "gpt-realtime"
    assert s.sessions[0].body == {"llm_model": "gpt-realtime", "voice": "marin"}
    # A fresh room per session.
    client = _client(url)
    second = await client.open_session()
    await client.aclose()
    assert second.session_id != grant.session_id and s.sessions[1].room != s.sessions[0].room


async def test_credential_is_not_in_repr_or_logs(stub: tuple[SessionStub, str],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    _, url = stub
    caplog.set_level("DEBUG")
    client = _client(url)
    grant = await client.open_session()
    await client.aclose()
    assert CREDENTIAL not in caplog.text and CREDENTIAL not in repr(client._settings)
    assert grant.token.get_secret_value() not in repr(grant)


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        (FailMode.UNAUTHORISED, RefusalReason.UNAUTHORISED),
        (FailMode.FORBIDDEN, RefusalReason.UNAUTHORISED),
        (FailMode.CREDITS_EXHAUSTED, RefusalReason.CREDITS_EXHAUSTED),
        (FailMode.SERVER_ERROR, RefusalReason.SERVER_ERROR),
        (FailMode.TIMEOUT, RefusalReason.TIMEOUT),
        (FailMode.MALFORMED, RefusalReason.MALFORMED_REPLY),
        (FailMode.NOT_JSON, RefusalReason.MALFORMED_REPLY),
    ],
)
async def test_each_failure_maps_to_its_reason(stub: tuple[SessionStub, str], mode: FailMode,
                                               reason: RefusalReason) -> None:
    s, url = stub
    s.fail(mode)
    client = _client(url)
    with pytest.raises(SessionRefused) as caught:
        await client.open_session()
    await client.aclose()
    assert caught.value.reason is reason
    assert caught.value.code == f"session_{reason.value}"


async def test_wrong_credential_is_unauthorised(stub: tuple[SessionStub, str]) -> None:
    _, url = stub
    client = _client(url, credential=SecretStr("wrong"))
    with pytest.raises(SessionRefused) as caught:
        await client.open_session()
    await client.aclose()
    assert caught.value.reason is RefusalReason.UNAUTHORISED


async def test_missing_credential_is_refused_without_a_request(stub: tuple[SessionStub, str]) -> None:
    s, url = stub
    client = _client(url, credential=None)
    with pytest.raises(SessionRefused) as caught:
        await client.open_session()
    assert caught.value.reason is RefusalReason.UNAUTHORISED and s.requests == 0


async def test_server_errors_are_retried_with_backoff_then_succeed(stub: tuple[SessionStub, str]) -> None:
    s, url = stub
    s.fail(FailMode.SERVER_ERROR, times=2)
    sleeps = Sleeps()
    client = _client(url, sleeps, retry_base_seconds=0.5, retry_max_seconds=4.0)
    grant = await client.open_session()
    await client.aclose()
    assert grant.session_id and s.requests == 3
    assert len(sleeps.calls) == 2 and 0 <= sleeps.calls[0] <= 0.5 and 0 <= sleeps.calls[1] <= 1.0


async def test_server_errors_exhaust_the_attempts(stub: tuple[SessionStub, str]) -> None:
    s, url = stub
    s.fail(FailMode.SERVER_ERROR)
    sleeps = Sleeps()
    client = _client(url, sleeps, retry_attempts=4)
    with pytest.raises(SessionRefused) as caught:
        await client.open_session()
    await client.aclose()
    assert caught.value.reason is RefusalReason.SERVER_ERROR and s.requests == 4 and len(sleeps.calls) == 3


async def test_a_lost_session_reply_is_asked_again_and_makes_one_session(stub: tuple[SessionStub, str]) -> None:
    # A lossy link: the API made the session, its reply never arrived. The retry carries the same
    # Idempotency-Key, so the API hands back that session instead of making a second one.
    s, url = stub
    s.fail(FailMode.REPLY_LOST, times=1)
    sleeps = Sleeps()
    client = _client(url, sleeps)
    grant = await client.open_session()
    await client.aclose()
    assert s.requests == 2 and len(sleeps.calls) == 1
    assert [x.session_id for x in s.sessions] == [grant.session_id]
    # The next visitor's request is a new one: a new key, a new session.
    client = _client(url)
    second = await client.open_session()
    await client.aclose()
    assert second.session_id != grant.session_id and len(s.sessions) == 2


async def test_a_lost_token_endpoint_reply_is_asked_again_for_the_same_room(stub: tuple[SessionStub, str]) -> None:
    s, url = stub
    s.fail(FailMode.REPLY_LOST, times=1)
    client = _client(url, source=SessionSource.TOKEN_ENDPOINT, token_endpoint_url=url + "/token")
    grant = await client.open_session()
    await client.aclose()
    assert s.requests == 2 and {x.room for x in s.sessions} == {grant.session_id}


async def test_timeouts_exhaust_the_attempts(stub: tuple[SessionStub, str]) -> None:
    s, url = stub
    s.fail(FailMode.TIMEOUT)
    sleeps = Sleeps()
    client = _client(url, sleeps, retry_attempts=2, request_timeout_seconds=0.3)
    with pytest.raises(SessionRefused) as caught:
        await client.open_session()
    await client.aclose()
    assert caught.value.reason is RefusalReason.TIMEOUT and s.requests == 2 and len(sleeps.calls) == 1
    assert "2 times" in caught.value.message

RETRY_AFTER = pytest.mark.parametrize(("mode", "reason"), [(FailMode.RATE_LIMITED, RefusalReason.RATE_LIMITED),
                                                           (FailMode.UNAVAILABLE, RefusalReason.SERVER_ERROR)])


@RETRY_AFTER
async def test_short_retry_after_is_waited_out(stub: tuple[SessionStub, str], mode: FailMode,
                                               reason: RefusalReason) -> None:
    s, url = stub
    s.fail(mode, times=1, retry_after_seconds=1.5)
    sleeps = Sleeps()
    client = _client(url, sleeps, rate_limit_wait_max_seconds=2.0)
    grant = await client.open_session()
    await client.aclose()
    assert grant.session_id and sleeps.calls == [1.5] and s.requests == 2


@RETRY_AFTER
async def test_long_retry_after_refuses_and_holds_back_the_next_request(stub: tuple[SessionStub, str],
                                                                        mode: FailMode, reason: RefusalReason) -> None:
    # A 503's Retry-After too: an API under strain slows every kiosk, the offline probe included.
    s, url = stub
    s.fail(mode, times=1, retry_after_seconds=30)
    now = [100.0]
    settings = SessionSettings(api_url=url, credential=SecretStr(CREDENTIAL), rate_limit_wait_max_seconds=2.0)
    client = SessionApi(settings, rng=random.Random(1), sleep=Sleeps(), clock=lambda: now[0])
    with pytest.raises(SessionRefused) as caught:
        await client.open_session()
    assert caught.value.reason is reason and caught.value.retry_after_seconds == 30 and s.requests == 1
    requests = s.requests
    now[0] = 120.0  # still inside Retry-After: refused without asking the API, the catalog check included
    with pytest.raises(SessionRefused) as again:
        await client.open_session()
    assert again.value.reason is reason and s.requests == requests
    with pytest.raises(SessionRefused) as probe:
        await client.model_status("gpt-realtime")
    assert probe.value.reason is reason
    now[0] = 131.0  # after it: asked again, and the stub no longer fails
    grant = await client.open_session()
    await client.aclose()
    assert grant.session_id and s.requests == requests + 1


async def test_unreachable_api() -> None:
    client = _client("http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(SessionRefused) as caught:
        await client.open_session()
    await client.aclose()
    assert caught.value.reason is RefusalReason.UNREACHABLE


async def test_maintenance_selects_the_next_profile(stub: tuple[SessionStub, str]) -> None:
    s, url = stub
    s.set_model_status("gpt-realtime", "maintenance")
    profiles = [SessionProfile(), SessionProfile(llm_model="gpt-4o-mini-chained", voice="coral",
                                                 stt_model="stt-1", tts_model="tts-1")]
    client = _client(url, profiles=profiles)
    grant = await client.open_session()
    await client.aclose()
    assert grant.profile is not None and grant.profile.llm_model == "gpt-4o-mini-chained"
    assert s.sessions[0].body == {"llm_model": "gpt-4o-mini-chained", "voice": "coral", "stt_model": "stt-1",
                                  "tts_model": "tts-1"}


async def test_all_profiles_in_maintenance_is_the_offline_path(stub: tuple[SessionStub, str]) -> None:
    s, url = stub
    s.set_model_status("gpt-realtime", "maintenance")
    client = _client(url, profiles=[SessionProfile(), SessionProfile(llm_model="not-in-catalog")])
    with pytest.raises(SessionRefused) as caught:
        await client.open_session()
    await client.aclose()
    assert caught.value.reason is RefusalReason.MAINTENANCE
    assert "gpt-realtime: maintenance" in caught.value.message and "not-in-catalog: unknown" in caught.value.message
    assert s.requests == 0  # no session was asked for


async def test_standard_token_endpoint(stub: tuple[SessionStub, str]) -> None:
    s, url = stub
    client = _client(url, source=SessionSource.TOKEN_ENDPOINT, token_endpoint_url=url + "/token")
    grant = await client.open_session()
    await client.aclose()
    claims = api.TokenVerifier(KEY, SECRET).verify(grant.token.get_secret_value())
    assert claims.identity == "kiosk-test" and claims.video is not None
    assert grant.session_id == claims.video.room == s.sessions[0].room
    assert grant.expires_at > datetime.now(UTC)


async def test_token_endpoint_failure_is_mapped(stub: tuple[SessionStub, str]) -> None:
    s, url = stub
    s.fail(FailMode.CREDITS_EXHAUSTED)
    client = _client(url, source=SessionSource.TOKEN_ENDPOINT, token_endpoint_url=url + "/token")
    with pytest.raises(SessionRefused) as caught:
        await client.open_session()
    await client.aclose()
    assert caught.value.reason is RefusalReason.CREDITS_EXHAUSTED


def test_parse_retry_after() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Wed, 01 Jan 2025 12:00:30 GMT", now) == 30.0
    # Hostile values: clamped or ignored, never a wait that keeps the kiosk offline until a restart.
    assert parse_retry_after("99999999999") == RETRY_AFTER_MAX_SECONDS
    assert parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now) == RETRY_AFTER_MAX_SECONDS
    assert parse_retry_after("Wed, 01 Jan 2025 11:00:00 GMT", now) == 0.0
    for bad in ("1e12", "-5", "NaN", "nan", "inf", "-inf", "1e400", "0x10", " ", "5 s"):
        assert parse_retry_after(bad) is None, bad


@pytest.mark.parametrize("source", [SessionSource.VOICE_API, SessionSource.TOKEN_ENDPOINT])
async def test_plain_livekit_url_from_the_api_is_refused(stub: tuple[SessionStub, str], source: SessionSource) -> None:
    s, url = stub
    s.livekit_url = "ws://10.213.0.1:7880"  # plain, to another host: anyone on the network could listen in
    client = _client(url, source=source, token_endpoint_url=url + "/token")
    with pytest.raises(SessionRefused) as caught:
        await client.open_session()
    await client.aclose()
    assert caught.value.reason is RefusalReason.MALFORMED_REPLY
    assert "wss://" in caught.value.message and "allow_insecure_transport" in caught.value.message
    # A development stack on its private network may (security.allow_insecure_transport).
    client = _client(url, source=source, token_endpoint_url=url + "/token", allow_insecure_transport=True)
    grant = await client.open_session()
    await client.aclose()
    assert grant.livekit_url == "ws://10.213.0.1:7880"


async def test_plain_livekit_url_on_loopback_is_accepted(stub: tuple[SessionStub, str]) -> None:
    s, url = stub
    s.livekit_url = "ws://127.0.0.1:7880"
    client = _client(url)
    grant = await client.open_session()
    await client.aclose()
    assert grant.livekit_url == "ws://127.0.0.1:7880"


async def test_from_settings_carries_the_transport_switch(stub: tuple[SessionStub, str]) -> None:
    from kiosk.settings import Settings

    s, url = stub
    s.livekit_url = "ws://10.213.0.1:7880"
    for allow in (False, True):
        settings = Settings(session={"api_url": url, "credential": CREDENTIAL},
                            security={"allow_insecure_transport": allow})
        client = SessionApi.from_settings(settings, sleep=Sleeps())
        try:
            if allow:
                assert (await client.open_session()).livekit_url == "ws://10.213.0.1:7880"
            else:
                with pytest.raises(SessionRefused):
                    await client.open_session()
        finally:
            await client.aclose()


async def test_secrets_in_the_api_url_stay_out_of_messages(stub: tuple[SessionStub, str]) -> None:
    s, url = stub
    s.fail(FailMode.SERVER_ERROR)
    client = _client(url, retry_attempts=1, source=SessionSource.TOKEN_ENDPOINT,
                     token_endpoint_url=url + "/token?token=hunter3")
    with pytest.raises(SessionRefused) as caught:
        await client.open_session()
    await client.aclose()
    assert "hunter3" not in caught.value.message and "token=***" in caught.value.message
    # user:password@ together with the device credential: aiohttp would raise; a refusal names the fix.
    client = _client(url.replace("http://", "http://user:hunter2@"))
    with pytest.raises(SessionRefused) as caught:
        await client.open_session()
    await client.aclose()
    assert caught.value.reason is RefusalReason.UNAUTHORISED and "remove the user info" in caught.value.message
    assert "hunter2" not in caught.value.message

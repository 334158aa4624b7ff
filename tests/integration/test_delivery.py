"""Delivery to a stand-in endpoint (real aiohttp over real sockets) that fails, times out and acks twice.

The last test runs the offline flow in a private network namespace joined to the endpoint's namespace by
a veth pair (``kiosk_dev.netns``; this file is the scenario when run as a script): the link is down, the
policy says offline, messages are recorded and stored, the probe sees the endpoint come back and posts
LinkUp, delivery starts, and the link is taken down and up again during delivery. No message may be
lost or stored twice at the endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from kiosk.audio.format import encode_wav
from kiosk.fallback.delivery import Deliverer, Uploader, deliver_pass
from kiosk.fallback.sealing import MAGIC
from kiosk.fallback.spool import Spool
from kiosk.link.backoff import Backoff
from kiosk_dev.message_endpoint import DEFAULT_TOKEN, MessageEndpoint

if TYPE_CHECKING:
    from fixtures.fallback import OperatorKeys, RunningEndpoint
    from kiosk_dev.netns import PrivateNetwork

TOKEN = DEFAULT_TOKEN  # delivery's own credential, as the stand-in endpoint expects it


def speech_like(seed: int, seconds: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(16000 * seconds)) * 3000).astype(np.int16)


async def wait_until_empty(spool: Spool, limit_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_seconds
    while spool.messages():
        assert loop.time() < deadline, f"still undelivered: {[m.as_dict() for m in spool.messages()]}"
        await asyncio.sleep(0.05)


def check_exactly_once(endpoint: MessageEndpoint, expected: dict[str, str],
                       recorded: dict[str, bytes] | None = None) -> None:
    """Each expected message stored once with its checksum; opened with the operator's key, the WAV recorded."""
    assert set(endpoint.stored) == set(expected), "lost or foreign messages at the endpoint"
    assert all(count == 1 for count in endpoint.store_count.values()), "a message was stored twice"
    for key, sha in expected.items():
        received = endpoint.stored[key]
        assert hashlib.sha256(received.audio).hexdigest() == sha == received.metadata["sha256"]
        assert received.metadata["id"] == key and received.audio.startswith(MAGIC)
        if recorded is not None:
            assert received.wav == recorded[key], "the audio did not arrive intact"


async def test_faults_lose_nothing_and_duplicate_nothing(tmp_path: Path, operator_keys: OperatorKeys) -> None:
    endpoint = MessageEndpoint(token=TOKEN, private_key=operator_keys.private, slow_seconds=2.5)


    # Per request, in order: the first message meets a 500, a timeout before storing, then goes through;
    # the second's ack is lost to a timeout; the third's connection drops after it was stored; ...
    endpoint.script(["fail", "slow", "ok", "slow_after_store", "ok", "drop_after_store", "ok", "fail", "ok"])
    url = await endpoint.start()
    expected: dict[str, str] = {}
    recorded: dict[str, bytes] = {}
    with Spool(tmp_path, recipient_public_key=operator_keys.public) as spool:
        for i in range(6):
            pcm = speech_like(i, 0.5 + i * 0.4)
            message_id = spool.store(pcm)
            expected[message_id] = spool.get(message_id).sha256
            recorded[message_id] = encode_wav(pcm)
        uploader = Uploader(url, TOKEN, timeout_seconds=1.0)
        deliverer = Deliverer(spool, uploader.upload, Backoff(0.05, 0.2, rng=random.Random(1)))
        task = asyncio.create_task(deliverer.run())
        try:
            await wait_until_empty(spool, 30)
            # The counters are added up when the pass ends, a moment after the last delete.
            for _ in range(200):  # at most 10 s
                if deliverer.delivered_total >= 6:
                    break
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await uploader.aclose()
            await endpoint.aclose()
        assert list((tmp_path / "audio").iterdir()) == []
    check_exactly_once(endpoint, expected, recorded)
    first, second, third = list(expected)[:3]
    assert endpoint.posts[first] == 3  # 500, timeout, ok
    assert endpoint.posts[second] == 2 and endpoint.posts[third] == 2  # acked twice: lost ack, then duplicate
    assert deliverer.delivered_total == 6 and deliverer.failed_attempts_total == 5


async def test_rejected_credential_keeps_messages(tmp_path: Path, operator_keys: OperatorKeys) -> None:
    endpoint = MessageEndpoint(token=TOKEN)
    url = await endpoint.start()
    try:
        with Spool(tmp_path, recipient_public_key=operator_keys.public) as spool:
            message_id = spool.store(speech_like(9, 1.0))
            wrong = Uploader(url, "stolen-or-stale", timeout_seconds=2)
            results = await deliver_pass(spool, wrong.upload)
            await wrong.aclose()
            assert [(r.acknowledged, r.status) for r in results] == [(False, 401)]
            [kept] = spool.messages()
            assert kept.id == message_id and kept.attempts == 1 and "401" in kept.last_error
            right = Uploader(url, TOKEN, timeout_seconds=2)
            results = await deliver_pass(spool, right.upload)
            await right.aclose()
            assert [r.status for r in results] == [201] and spool.messages() == []
    finally:
        await endpoint.aclose()
    assert endpoint.rejected == 1 and list(endpoint.stored) == [message_id]


async def test_fixtures_deliver_end_to_end(spool: Spool, message_endpoint: RunningEndpoint,
                                          operator_keys: OperatorKeys) -> None:
    pcm = speech_like(80, 1.0)
    message_id = await spool.store_async(pcm)
    sealed_sha = spool.get(message_id).sha256
    uploader = Uploader(message_endpoint.url, TOKEN, timeout_seconds=2)
    results = await deliver_pass(spool, uploader.upload)
    await uploader.aclose()
    assert [(r.message_id, r.status) for r in results] == [(message_id, 201)]
    assert list(message_endpoint.stored) == [message_id] and spool.messages() == []
    # What travelled is the sealed file; the operator's key opens it to the recording.
    received = message_endpoint.stored[message_id]
    wav = encode_wav(pcm)
    assert received.audio.startswith(MAGIC) and wav[44:1044] not in received.audio
    assert received.wav == wav
    meta = received.metadata
    assert meta["sha256"] == sealed_sha and meta["format"] == "kiosk-sealed-1" and meta["duration_seconds"] == 1.0
    assert hashlib.sha256(wav).hexdigest() not in json.dumps(meta)  # nothing derived from the content


async def test_the_endpoint_refuses_plain_audio(message_endpoint: RunningEndpoint) -> None:
    """A kiosk that sent a plain WAV (as before messages were sealed) is refused, so the tests above would fail."""
    import aiohttp

    wav = encode_wav(speech_like(81, 0.5))
    key = "0b5e1d2c-0000-4000-8000-000000000001"
    form = aiohttp.FormData()
    form.add_field("metadata", json.dumps({"id": key, "sha256": hashlib.sha256(wav).hexdigest()}),
                   content_type="application/json")
    form.add_field("audio", wav, filename=f"{key}.wav", content_type="audio/wav")
    headers = {"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": key}
    async with aiohttp.ClientSession() as http, http.post(message_endpoint.url, data=form, headers=headers) as reply:
        assert reply.status == 400 and "plain audio" in (await reply.json())["error"]
    assert message_endpoint.stored == {} and message_endpoint.rejected == 1


async def test_service_wiring_store_wakes_delivery(spool: Spool, message_endpoint: RunningEndpoint) -> None:
    from pydantic import SecretStr

    from kiosk.ports import Recording
    from kiosk.settings import DeliverySettings, SessionSettings, Settings

    assert Deliverer.from_settings(Settings(), spool) is None  # no URL: messages stay on the kiosk
    # Delivery's own credential goes to the endpoint; the session API's (a different secret) never does.
    settings = Settings(delivery=DeliverySettings(url=message_endpoint.url, retry_base_seconds=0.05,
                                                  retry_max_seconds=0.2, credential=SecretStr(TOKEN)),
                        session=SessionSettings(credential=SecretStr("session-api-secret")))
    passes: list[int] = []
    deliverer = Deliverer.from_settings(settings, spool, on_pass=lambda results: passes.append(len(results)))
    assert deliverer is not None
    task = asyncio.create_task(deliverer.run())
    try:
        await asyncio.sleep(0.1)  # the first pass finds nothing and the loop sleeps (idle check: 600 s)
        message_endpoint.script(["fail"])
        message_id = await spool.store_recording(Recording(speech_like(90, 1.5), 1.5))
        await wait_until_empty(spool, 10)  # woken by the store, not by the idle check
        for _ in range(200):  # the pass reports a moment after its last delete (at most 10 s)
            if len(passes) >= 2:
                break
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await deliverer.aclose()
    assert list(message_endpoint.stored) == [message_id] and passes == [1, 1]
    assert message_endpoint.rejected == 0


def test_the_stand_in_endpoint_answers_any_body_without_failing(operator_keys: OperatorKeys) -> None:
    """Whatever arrives (not multipart, broken multipart, bad JSON, plain or damaged audio), the stand-in answers
    4xx and stores nothing: a test that sends something wrong fails on the answer, not on a crashed server."""
    import urllib.error
    import urllib.request

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from kiosk.fallback.sealing import seal
    from kiosk_dev.message_endpoint import endpoint_in_thread

    endpoint = MessageEndpoint(token=TOKEN, private_key=operator_keys.private)
    key = "0b5e1d2c-0000-4000-8000-000000000002"

    def part(name: str, value: bytes) -> bytes:
        return (f'--b\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n').encode() + value + b"\r\n"

    def multipart(meta: bytes, audio: bytes) -> bytes:
        return part("metadata", meta) + part("audio", audio) + b"--b--\r\n"

    sealed_noise = st.builds(lambda tail: seal(b"RIFF" + tail, operator_keys.public), st.binary(max_size=64))
    audio = st.one_of(st.binary(max_size=200), sealed_noise)
    bodies = st.one_of(
        st.binary(max_size=300),
        st.builds(lambda meta, data: multipart(meta, data), st.binary(max_size=80), audio),
        st.builds(lambda data: multipart(json.dumps({"id": key, "sha256": hashlib.sha256(data).hexdigest()})
                                         .encode(), data), audio))

    with endpoint_in_thread(endpoint) as url:
        @settings(max_examples=60, deadline=None, derandomize=True)
        @given(bodies)
        def answered(body: bytes) -> None:
            request = urllib.request.Request(url, data=body, method="POST", headers={
                "Authorization": f"Bearer {TOKEN}", "Idempotency-Key": key,
                "Content-Type": "multipart/form-data; boundary=b"})
            try:
                with urllib.request.urlopen(request, timeout=10) as reply:
                    status = reply.status
            except urllib.error.HTTPError as error:
                status = error.code
            assert status == 400, status

        answered()
    assert endpoint.stored == {}


def test_staff_deliver_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str], operator_keys: OperatorKeys) -> None:
    from kiosk.__main__ import main
    from kiosk_dev.message_endpoint import endpoint_in_thread

    monkeypatch.setattr("kiosk.__main__.setup_logging", lambda level: None)  # keep pytest's log capture
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with Spool(tmp_path, recipient_public_key=operator_keys.public) as spool:
        ids = [spool.store(speech_like(70 + i, 1.0)) for i in range(3)]
    endpoint = MessageEndpoint(token=TOKEN, private_key=operator_keys.private)
    endpoint.script(["ok", "fail"])
    monkeypatch.setenv("KIOSK_SPOOL__DIRECTORY", str(tmp_path))
    monkeypatch.setenv("KIOSK_SESSION__CREDENTIAL", TOKEN)  # the session API's credential is not delivery's
    assert main(["messages", "deliver"]) == 2  # a configuration problem
    assert "delivery.url is unset" in capsys.readouterr().err
    with endpoint_in_thread(endpoint) as url:
        monkeypatch.setenv("KIOSK_DELIVERY__URL", url)
        if not Path("/etc/kiosk/credentials/delivery-credential").exists():
            assert main(["messages", "deliver"]) == 2
            assert "delivery.credential" in capsys.readouterr().err
        monkeypatch.setenv("KIOSK_DELIVERY__CREDENTIAL", TOKEN)
        assert main(["messages", "deliver"]) == 1  # the second upload meets a 500 and stays
        out = capsys.readouterr().out
        assert "1 delivered, 2 left" in out and "kept: HTTP 500" in out
        assert main(["messages", "deliver"]) == 0
        assert "2 delivered, 0 left" in capsys.readouterr().out
    assert list(endpoint.stored) == ids and set(endpoint.store_count.values()) == {1}
    assert endpoint.rejected == 0 and all(r.wav is not None for r in endpoint.stored.values())


# ---------------------------------------------------------------------- private network namespace
def start_endpoint_across_veth(key_file: Path) -> tuple[PrivateNetwork, subprocess.Popen[str], str]:
    """Enter a private network (main thread, before any loop) and start the endpoint across the veth."""
    from kiosk_dev.netns import enter_private_network

    network = enter_private_network()
    server = subprocess.Popen(network.server_command(
        [sys.executable, "-m", "kiosk_dev.message_endpoint", "--host", network.server_ip, "--port", "8099",
         "--token", TOKEN, "--private-key", str(key_file), "--slow-seconds", "1",
         "--faults", "fail,ok,slow_after_store,ok,drop_after_store"]), stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    return network, server, server.stdout.readline().strip()


async def scenario(spool_dir: Path, network: PrivateNetwork, url: str, public_key: bytes) -> dict[str, object]:
    """The kiosk side of a veth pair, the endpoint across it in another namespace."""
    import aiohttp

    from kiosk.audio.cues import load_cue
    from kiosk.events import ApiRefused, LinkUp, RefusalReason
    from kiosk.fallback.offline import ConnectivityPolicy, Probe, http_check
    from kiosk_dev.speech import espeak

    network.set_link(False)  # the outage: the veth is down before the kiosk looks
    policy = ConnectivityPolicy()
    check = http_check(url.replace("/messages", "/health"), timeout_seconds=0.3)
    checks = 0
    refusal: RefusalReason | None = None
    while policy.verdict.online and checks < 5:  # a timeout is transient: offline after two in a row
        refusal = await check()
        policy.observe(ApiRefused(refusal or RefusalReason.UNREACHABLE, "startup check"))
        checks += 1
    cue = policy.verdict.cue
    record: dict[str, object] = {"first_check": str(refusal), "offline_cue": cue, "checks": checks,
                                 "cue_seconds": len(load_cue(cue)) / 16000 if cue else 0.0}
    expected: dict[str, str] = {}
    recorded: dict[str, str] = {}  # SHA-256 of each WAV, to compare with what the endpoint opened
    spool = Spool(spool_dir, recipient_public_key=public_key)
    sentences = ["Please call me back about the order.", "The printer on stand four is out of paper.",
                 "I will come back tomorrow morning.", "Can someone send me the brochure?"]
    for i, text in enumerate(sentences):
        pcm = (np.clip(espeak(text, "en-us" if i % 2 else "en-gb"), -1, 1) * 20000).astype(np.int16)
        message_id = await spool.store_async(pcm)
        expected[message_id] = spool.get(message_id).sha256
        recorded[message_id] = hashlib.sha256(encode_wav(pcm)).hexdigest()
    events: list[object] = []
    # The endpoint is across the veth pair, on a private network of this machine: plain http on purpose.
    uploader = Uploader(url, TOKEN, timeout_seconds=0.5, allow_insecure_transport=True)
    deliverer = Deliverer(spool, uploader.upload, Backoff(0.05, 0.3, rng=random.Random(2)))

    def sink(event: object) -> None:
        events.append(event)
        if isinstance(event, LinkUp) and policy.observe(event).online:
            deliverer.wake()

    delivery = asyncio.create_task(deliverer.run())
    probe = asyncio.create_task(Probe(check, sink, Backoff(0.05, 0.2, rng=random.Random(3))).run(refusal))
    await asyncio.sleep(0.5)
    network.set_link(True)  # the link comes back: the probe sees the endpoint, delivery starts
    await probe
    toggles = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    rng = random.Random(4)
    while spool.messages() and loop.time() < deadline and toggles < 4:
        await asyncio.sleep(rng.uniform(0.02, 0.2))
        network.set_link(False)  # taken down again in the middle of delivery
        await asyncio.sleep(rng.uniform(0.2, 0.8))
        network.set_link(True)
        toggles += 1
        if toggles == 2:
            for i in range(3):  # more recorded while the link flaps
                pcm = speech_like(100 + i, 2.0)
                message_id = await spool.store_async(pcm)
                expected[message_id] = spool.get(message_id).sha256
                recorded[message_id] = hashlib.sha256(encode_wav(pcm)).hexdigest()
            deliverer.wake()
    with contextlib.suppress(AssertionError):  # what is left is reported and asserted by the test
        await wait_until_empty(spool, max(0.1, deadline - loop.time()))
    delivery.cancel()
    await asyncio.gather(delivery, return_exceptions=True)
    await uploader.aclose()
    async with aiohttp.ClientSession() as http, http.get(url.replace("/messages", "/received")) as response:
        record.update(await response.json())
    record.update({
        "events": [type(e).__name__ for e in events], "online": policy.verdict.online, "toggles": toggles,
        "left": len(spool.messages()), "expected": expected, "recorded": recorded,
        "failed_attempts": deliverer.failed_attempts_total,
    })
    spool.close()
    return record


@pytest.mark.slow
def test_link_down_and_up_across_a_veth_pair(tmp_path: Path) -> None:
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs network namespaces (root, as in CI)")
    proc = subprocess.run([sys.executable, __file__, str(tmp_path / "spool")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout.splitlines()[-1])
    assert record["first_check"] in ("timeout", "unreachable")
    assert record["offline_cue"] == "offline" and record["checks"] == (2 if record["first_check"] == "timeout" else 1)
    assert record["cue_seconds"] > 1.0  # the spoken "offline" message is there to play
    # The probe posts LinkUp once, last (an ApiRefused before it only if the kind of failure changed).
    assert record["events"][-1] == "LinkUp" and record["events"].count("LinkUp") == 1 and record["online"]
    assert set(record["events"]) <= {"LinkUp", "ApiRefused"}
    assert record["toggles"] >= 2 and record["left"] == 0
    expected = record["expected"]
    assert len(expected) == 7
    assert record["stored"] == expected, "lost, altered or foreign messages at the endpoint"
    # The endpoint opened each with the operator's key: the audio arrived intact.
    assert {k: v["sha256"] for k, v in record["opened"].items()} == record["recorded"]
    assert set(record["store_count"].values()) == {1}, "a message was stored twice"
    assert record["failed_attempts"] >= 3  # the scripted faults, plus whatever the link flaps cost
    print(f"\nveth delivery: {len(expected)} messages, {record['toggles']} link flaps during delivery, "
          f"{sum(record['posts'].values())} uploads reached the endpoint, {record['failed_attempts']} failed "
          f"attempts, each message stored once")


if __name__ == "__main__":
    from kiosk.fallback.sealing import generate_keypair, write_private_key

    spool_path = Path(sys.argv[1])
    spool_path.parent.mkdir(parents=True, exist_ok=True)
    operator_private, operator_public = generate_keypair()
    write_private_key(spool_path.parent / "operator.key", operator_private)
    private_network, endpoint_process, endpoint_url = start_endpoint_across_veth(spool_path.parent / "operator.key")
    try:
        print(json.dumps(asyncio.run(scenario(spool_path, private_network, endpoint_url, operator_public))))
    finally:
        endpoint_process.kill()
        endpoint_process.wait()

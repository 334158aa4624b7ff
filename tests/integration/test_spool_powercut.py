"""Hard kills (SIGKILL) at random moments while a child records-and-stores and delivers, then reopen.

The child seals every message to a test operator key and prints ``STORED <id> <sha256>`` only after
``store()`` returned (when the kiosk would play the confirmation). After every kill the spool is reopened
(reconciled) and checked: every confirmed message is in the spool and intact (opened with the operator's
private key to the samples recorded), or was acknowledged by the endpoint (stored there once, same
checksum, opened there); no corrupt entry, no temporary file left, nothing quarantined. At the end
everything is delivered and the endpoint holds each confirmed message exactly once.

Run as a script, this file is the child: ``python test_spool_powercut.py SPOOL_DIR URL SEED PUBLIC_KEY_HEX``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

KILLS = 60
KILL_WINDOW_SECONDS = 0.35
TOKEN = "delivery-secret"


def message_pcm(seed: int, index: int) -> np.ndarray:
    rng = np.random.default_rng([seed, index])
    samples = int(16000 * rng.uniform(0.3, 1.5))
    return (rng.standard_normal(samples) * 4000).astype(np.int16)


def child(spool_dir: Path, url: str, seed: int, public_key: bytes) -> None:
    from kiosk.fallback.delivery import Uploader, deliver_pass
    from kiosk.fallback.spool import Spool

    spool = Spool(spool_dir, recipient_public_key=public_key)
    print("OPEN", json.dumps(vars(spool.reconciled)), flush=True)
    rng = random.Random(seed)
    uploader = Uploader(url, TOKEN, timeout_seconds=0.3)

    async def deliver() -> None:
        for result in await deliver_pass(spool, uploader.upload):
            print("ACKED" if result.acknowledged else "FAILED", result.message_id, flush=True)

    loop = asyncio.new_event_loop()
    index = 0
    store_share = 1.0 if seed % 2 == 0 else 0.3  # even seeds: recording only; odd: recording and delivery
    while True:
        if rng.random() < store_share:
            message_id = spool.store(message_pcm(seed, index))
            print("STORED", message_id, spool.get(message_id).sha256, index, flush=True)
            index += 1
        else:
            loop.run_until_complete(deliver())


def run_child(spool_dir: Path, url: str, seed: int, kill_after_seconds: float | None,
              public_key: bytes) -> tuple[list[str], float]:
    """Start a child, wait until it opened the spool, kill it after the delay; its output lines."""
    proc = subprocess.Popen([sys.executable, __file__, str(spool_dir), url, str(seed), public_key.hex()],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    assert ready, "child did not open the spool"
    first = proc.stdout.readline()
    assert first.startswith("OPEN"), first + (proc.stderr.read() if proc.stderr else "")
    started = time.monotonic()
    if kill_after_seconds is None:
        proc.wait(60)
    else:
        time.sleep(kill_after_seconds)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    rest = proc.stdout.read()
    # A line cut short by the kill (no newline yet) was never a confirmation the parent could act on.
    complete = rest if rest.endswith("\n") else rest[: rest.rfind("\n") + 1]
    lines = [first, *complete.splitlines()]
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    return lines, time.monotonic() - started


@pytest.mark.slow
def test_power_cuts_lose_no_confirmed_message(tmp_path: Path) -> None:
    from kiosk.fallback.delivery import Uploader, deliver_pass
    from kiosk.fallback.sealing import generate_keypair, unseal
    from kiosk.fallback.spool import AUDIO_DIR, Spool, decode_message
    from kiosk_dev.message_endpoint import MessageEndpoint, endpoint_in_thread

    rng = random.Random(20261124)
    private_key, public_key = generate_keypair()
    endpoint = MessageEndpoint(token=TOKEN, private_key=private_key, slow_seconds=0.5)
    faults = ["ok"] * 12 + ["fail"] * 4 + ["drop_after_store"] * 2 + ["slow_after_store"] * 1 + ["slow"] * 1
    endpoint.script(rng.choice(faults) for _ in range(5000))
    confirmed: dict[str, str] = {}
    confirmed_index: dict[str, tuple[int, int]] = {}
    checked: set[str] = set()
    totals: dict[str, int] = {}
    interrupted = 0
    spool_dir = tmp_path / "spool"
    began = time.monotonic()
    with endpoint_in_thread(endpoint) as url:
        for kill in range(KILLS):
            lines, _ = run_child(spool_dir, url, seed=kill, kill_after_seconds=rng.uniform(0, KILL_WINDOW_SECONDS),
                                 public_key=public_key)
            for line in lines:
                if line.startswith("STORED"):
                    _, message_id, sha, index = line.split()
                    confirmed[message_id] = sha
                    confirmed_index[message_id] = (kill, int(index))
            with Spool(spool_dir, recipient_public_key=public_key) as spool:
                interrupted += not spool.reconciled.clean
                for key, value in vars(spool.reconciled).items():
                    totals[key] = totals.get(key, 0) + value
                assert spool.reconciled.quarantined == 0, f"kill {kill}: corrupt entry quarantined"
                assert spool.reconciled.rows_without_file == 0, f"kill {kill}: a row lost its audio"
                assert not spool.reconciled.index_rebuilt, f"kill {kill}: the index was damaged"
                # Opening verified every indexed file (size, SHA-256, sealed header) and quarantined none.
                in_spool = {m.id: m for m in spool.messages()}
                for message_id, sha in confirmed.items():
                    if message_id in in_spool:
                        assert in_spool[message_id].sha256 == sha
                        if message_id not in checked:  # opened once, compared with what the child recorded
                            checked.add(message_id)
                            recorded = message_pcm(*confirmed_index[message_id])
                            opened = decode_message(unseal(spool.read(in_spool[message_id]), private_key))
                            assert np.array_equal(opened, recorded)
                    else:
                        received = endpoint.stored.get(message_id)
                        assert received is not None, f"kill {kill}: confirmed message {message_id} lost"
                        assert hashlib.sha256(received.audio).hexdigest() == sha and received.wav is not None
            assert not list((spool_dir / AUDIO_DIR).glob("*.tmp"))
        # Back online for good: everything left goes, each exactly once at the endpoint.
        endpoint.faults.clear()

        async def drain() -> None:
            uploader = Uploader(url, TOKEN, timeout_seconds=5)
            with Spool(spool_dir, recipient_public_key=public_key) as spool:
                await deliver_pass(spool, uploader.upload)
                assert spool.messages() == []
            await uploader.aclose()

        asyncio.run(drain())
    elapsed = time.monotonic() - began
    assert set(confirmed) <= set(endpoint.stored)
    assert all(count == 1 for count in endpoint.store_count.values())
    for message_id, sha in confirmed.items():
        assert hashlib.sha256(endpoint.stored[message_id].audio).hexdigest() == sha
        opened = endpoint.stored[message_id].wav
        assert opened is not None and np.array_equal(decode_message(opened), message_pcm(*confirmed_index[message_id]))
    resent = sum(count - 1 for count in endpoint.posts.values())
    print(f"\npower cuts: {KILLS} SIGKILLs survived in {elapsed:.1f} s; {len(confirmed)} confirmed messages, "
          f"all delivered once ({len(endpoint.stored)} stored at the endpoint, {sum(endpoint.posts.values())} "
          f"uploads, {resent} re-sends after a failure or lost ack); {interrupted} kills left work in flight, "
          f"repaired on reopen: {totals}")
    assert len(confirmed) >= KILLS  # the loop did real work between kills


if __name__ == "__main__":
    child(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), bytes.fromhex(sys.argv[4]))

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from kiosk.audio.format import encode_wav
from kiosk.fallback.spool import (
    AUDIO_DIR,
    INDEX_NAME,
    MessageState,
    Spool,
    SpoolError,
    decode_message,
)

DAY = 86400.0


class WallClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def speech(seed: int, seconds: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(16000 * seconds)) * 3000).astype(np.int16)


def open_spool(path: Path, **kwargs: object) -> Spool:
    kwargs.setdefault("wall_clock", WallClock())
    kwargs.setdefault("disk_free", lambda _p: 10**12)
    return Spool(path, **kwargs)  # type: ignore[arg-type]


def test_store_then_read_back_verified(tmp_path: Path) -> None:
    pcm = speech(1, 2.5)
    with open_spool(tmp_path) as spool:
        message_id = spool.store(pcm)
        [message] = spool.messages()
    assert message.id == message_id and message.state is MessageState.STORED
    assert message.duration_seconds == pytest.approx(2.5)
    with open_spool(tmp_path) as spool:
        assert spool.reconciled.clean
        message = spool.get(message_id[:8])
        assert np.array_equal(spool.pcm(message), pcm)
        data = spool.read(message)
        assert hashlib.sha256(data).hexdigest() == message.sha256
        assert message.sha256 in message.file  # the name carries the checksum for orphan checks


def test_index_is_wal_with_full_sync(tmp_path: Path) -> None:
    with open_spool(tmp_path) as spool:
        spool.store(speech(2))
        db = spool._require_db()
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_one_writer_at_a_time_readers_always(tmp_path: Path) -> None:
    with open_spool(tmp_path) as spool:
        spool.store(speech(3))
        with pytest.raises(SpoolError) as caught:
            open_spool(tmp_path)
        assert caught.value.code == "spool_busy"
        with Spool(tmp_path, read_only=True) as reader:
            assert len(reader.messages()) == 1
            with pytest.raises(SpoolError):
                reader.store(speech(4))


def test_reconcile_removes_temp_files_and_reindexes_orphans(tmp_path: Path) -> None:
    clock = WallClock()
    with open_spool(tmp_path, wall_clock=clock) as spool:
        kept = spool.store(speech(5, 1.5))
        orphan = spool.store(speech(6, 0.5))
    # A cut between rename and commit: the file is complete, the row missing.
    db = sqlite3.connect(tmp_path / INDEX_NAME)
    db.execute("DELETE FROM messages WHERE id = ?", (orphan,))
    db.commit()
    db.close()
    # A cut in the middle of writing: a partial temporary file.
    (tmp_path / AUDIO_DIR / ".0000-partial.tmp").write_bytes(b"RIFF\x00\x00")
    with open_spool(tmp_path, wall_clock=clock) as spool:
        report = spool.reconciled
        assert (report.temp_removed, report.orphans_indexed, report.quarantined) == (1, 1, 0)
        ids = {m.id for m in spool.messages()}
        assert ids == {kept, orphan}
        restored = spool.get(orphan)
        assert restored.created_unix == pytest.approx(clock.now)
        assert restored.duration_seconds == pytest.approx(0.5)
        assert np.array_equal(spool.pcm(restored), speech(6, 0.5))
    assert not list((tmp_path / AUDIO_DIR).glob("*.tmp"))


def test_corrupt_files_are_quarantined_never_deleted(tmp_path: Path) -> None:
    with open_spool(tmp_path) as spool:
        damaged = spool.store(speech(7))
        orphan = spool.store(speech(8))
        good = spool.store(speech(9))
        files = {m.id: tmp_path / AUDIO_DIR / m.file for m in spool.messages()}
    raw = bytearray(files[damaged].read_bytes())
    raw[100] ^= 0xFF  # a flipped byte in an indexed file
    files[damaged].write_bytes(bytes(raw))
    db = sqlite3.connect(tmp_path / INDEX_NAME)
    db.execute("DELETE FROM messages WHERE id = ?", (orphan,))
    db.commit()
    db.close()
    files[orphan].write_bytes(files[orphan].read_bytes()[:-10])  # a truncated orphan
    (tmp_path / AUDIO_DIR / "stray.wav").write_bytes(b"not ours")
    with open_spool(tmp_path) as spool:
        assert spool.reconciled.quarantined == 3
        assert [m.id for m in spool.messages()] == [good]
    assert sorted(p.name for p in (tmp_path / "quarantine").iterdir()) == sorted(
        [files[damaged].name, files[orphan].name, "stray.wav"])


def test_delivery_states_and_interrupted_delivery(tmp_path: Path) -> None:
    clock = WallClock()
    with open_spool(tmp_path, wall_clock=clock) as spool:
        first = spool.store(speech(10))
        clock.now += 1
        second = spool.store(speech(11))
        claimed = spool.claim_next()
        assert claimed is not None and claimed.id == first and claimed.state is MessageState.DELIVERING
        assert claimed.attempts == 1
        spool.release(first, "HTTP 500")
        assert spool.get(first).state is MessageState.STORED and spool.get(first).last_error == "HTTP 500"
        claimed = spool.claim_next()
        assert claimed is not None and claimed.id == first and claimed.attempts == 2
        spool.mark_delivered(first)
        assert [m.id for m in spool.messages()] == [second]
        assert len(list((tmp_path / AUDIO_DIR).iterdir())) == 1
        claimed = spool.claim_next()
        assert claimed is not None and claimed.id == second
    # Killed while delivering: back to stored on open, same id (the idempotency key).
    with open_spool(tmp_path, wall_clock=clock) as spool:
        assert spool.reconciled.delivering_reset == 1
        assert spool.get(second).state is MessageState.STORED
        # Killed after the ack was recorded but before the clean-up: finished on open.
        spool._require_db().execute("UPDATE messages SET state = 'delivered' WHERE id = ?", (second,))
    with open_spool(tmp_path, wall_clock=clock) as spool:
        assert spool.reconciled.delivered_finished == 1
        assert spool.messages() == []
        assert not list((tmp_path / AUDIO_DIR).iterdir())


def test_retention_by_age_oldest_first(tmp_path: Path) -> None:
    clock = WallClock()
    with open_spool(tmp_path, wall_clock=clock, max_age_seconds=10 * DAY) as spool:
        old = spool.store(speech(12))
        clock.now += 6 * DAY
        young = spool.store(speech(13))
        assert spool.enforce_retention() == []
        assert spool.stats().retention_fraction == pytest.approx(0.6)
        clock.now += 5 * DAY
        assert spool.enforce_retention() == [old]
        assert [m.id for m in spool.messages()] == [young]
        assert spool.dropped_total == 1 and spool.stats().dropped_total == 1


def test_retention_by_free_space_and_full_spool(tmp_path: Path) -> None:
    clock = WallClock()
    free = {"bytes": 10_000_000}

    def disk_free(_path: Path) -> int:
        # Each stored message takes its size out of the free space.
        used = sum(p.stat().st_size for p in (tmp_path / AUDIO_DIR).iterdir())
        return free["bytes"] - used

    message_bytes = len(encode_wav(speech(0)))
    with open_spool(tmp_path, wall_clock=clock, disk_free=disk_free,
                    min_free_bytes=10_000_000 - 3 * message_bytes - 10) as spool:
        ids = []
        for i in range(5):
            clock.now += 60
            ids.append(spool.store(speech(20 + i)))
        # Room for three: the two oldest went, oldest first.
        assert [m.id for m in spool.messages()] == ids[2:]
        assert spool.dropped_total == 2
        free["bytes"] = 10_000_000 - 3 * message_bytes  # something else filled the card
        with pytest.raises(SpoolError) as caught:
            spool.store(speech(30, 4.0))
        assert caught.value.code == "spool_full"
        assert "min_free_mb" in caught.value.message
        # Refused without dropping anything: dropping all three would not have made room.
        assert [m.id for m in spool.messages()] == ids[2:]
        assert spool.stats().low_space


def test_decode_rejects_other_formats() -> None:
    with pytest.raises(SpoolError):
        decode_message(b"RIFF....WAVEfmt ")
    wav = encode_wav(speech(40, 0.1))
    with pytest.raises(SpoolError):
        decode_message(wav[:-2])
    with pytest.raises(SpoolError):
        decode_message(encode_wav(speech(40, 0.1), rate_hz=8000))


def test_export_and_stats(tmp_path: Path) -> None:
    with open_spool(tmp_path) as spool:
        message_id = spool.store(speech(41, 3.0))
        message = spool.get(message_id)
        out = spool.export(message, tmp_path / "out")
        assert out.read_bytes() == spool.read(message)
        stats = spool.stats()
        assert (stats.stored, stats.delivering, stats.total_bytes) == (1, 0, message.size_bytes)
        (tmp_path / AUDIO_DIR / message.file).write_bytes(b"x" * message.size_bytes)
        with pytest.raises(SpoolError) as caught:
            spool.read(message)
        assert caught.value.code == "message_corrupt"


def test_metrics_and_status_follow_the_spool(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from kiosk.fallback.spool import publish_stats
    from kiosk.metrics import Metrics, Status

    clock = WallClock()
    metrics, status = Metrics(CollectorRegistry()), Status()
    with open_spool(tmp_path, wall_clock=clock, max_age_seconds=10 * DAY) as spool:
        spool.store(speech(50))
        clock.now += 1 * DAY
        spool.store(speech(51))
        stats = publish_stats(spool, metrics, status, warn_fraction=0.8)
        text = metrics.exposition().decode()
        assert "kiosk_spool_messages 2.0" in text and "kiosk_spool_retention_warning 0.0" in text
        assert status.spool_messages == 2 and status.spool_bytes == stats.total_bytes and not status.spool_warning
        clock.now += 8 * DAY  # the oldest is 9 days old: 90 % of the age limit
        publish_stats(spool, metrics, status, warn_fraction=0.8)
        assert "90%" in status.spool_warning
        assert "kiosk_spool_retention_warning 1.0" in metrics.exposition().decode()
        clock.now += 2 * DAY
        spool.enforce_retention()
        publish_stats(spool, metrics, status, warn_fraction=0.8)
        assert status.spool_messages == 1 and "1 undelivered message(s) dropped" in status.spool_warning


def test_staff_commands_list_and_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from kiosk.__main__ import main

    monkeypatch.setenv("KIOSK_SPOOL__DIRECTORY", str(tmp_path / "spool"))
    monkeypatch.setattr("kiosk.__main__.setup_logging", lambda level: None)  # keep pytest's log capture

    assert main(["messages", "list"]) == 0
    assert "no messages" in capsys.readouterr().out
    clock = WallClock()
    with open_spool(tmp_path / "spool", wall_clock=clock) as spool:
        ids = []
        for i in range(2):
            clock.now += 60
            ids.append(spool.store(speech(60 + i, 1.0 + i)))
        # The service keeps the spool open: list and export still work (read-only).
        assert main(["messages", "list", "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert [m["id"] for m in listed] == ids
        assert {"id", "time", "duration_seconds", "state", "sha256"} <= set(listed[0])
        assert listed[1]["duration_seconds"] == 2.0 and listed[0]["state"] == "stored"
        assert main(["messages", "export", ids[1][:8], str(tmp_path / "one")]) == 0
        [exported] = (tmp_path / "one").iterdir()
        assert exported.read_bytes() == spool.read(spool.get(ids[1]))
        assert main(["messages", "export", "--all", str(tmp_path / "all")]) == 0
        assert len(list((tmp_path / "all").iterdir())) == 2
        assert main(["messages", "export", "nosuchid", str(tmp_path / "x")]) == 1
        assert "kiosk messages list" in capsys.readouterr().err
        # Delivery needs the writer lock, which the running service holds.
        monkeypatch.setenv("KIOSK_DELIVERY__URL", "http://127.0.0.1:9/messages")
        assert main(["messages", "deliver"]) == 1
        assert "spool_busy" in capsys.readouterr().err
    assert main(["messages", "export", str(tmp_path / "y")]) == 2  # neither an id nor --all


def test_empty_recording_is_refused(tmp_path: Path) -> None:
    with open_spool(tmp_path) as spool, pytest.raises(SpoolError) as caught:
        spool.store(np.zeros(0, dtype=np.int16))
    assert caught.value.code == "message_empty"


async def test_a_corrupt_message_is_quarantined_not_sent(tmp_path: Path) -> None:
    from kiosk.fallback.delivery import UploadResult, deliver_pass
    from kiosk.fallback.spool import Message

    sent: list[str] = []

    async def upload(message: Message, wav: bytes) -> UploadResult:
        sent.append(message.id)
        return UploadResult(message.id, True, 201)

    clock = WallClock()
    with open_spool(tmp_path, wall_clock=clock) as spool:
        bad = spool.store(speech(90))
        clock.now += 1
        good = spool.store(speech(91))
        path = tmp_path / AUDIO_DIR / spool.get(bad).file
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0x01  # bit rot after the open-time check
        path.write_bytes(bytes(raw))
        results = await deliver_pass(spool, upload)
        assert sent == [good] and [r.message_id for r in results] == [good]
        assert spool.messages() == []
    assert [p.name for p in (tmp_path / "quarantine").iterdir()] == [path.name]


def test_delivery_url_must_be_http(monkeypatch: pytest.MonkeyPatch) -> None:
    from kiosk.errors import ConfigError
    from kiosk.settings import load_settings

    monkeypatch.setenv("KIOSK_DELIVERY__URL", "ftp://example.invalid/messages")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "delivery.url" in caught.value.message and "http" in caught.value.message


def test_a_damaged_index_is_rebuilt_from_the_files(tmp_path: Path) -> None:
    clock = WallClock()
    with open_spool(tmp_path, wall_clock=clock) as spool:
        ids = []
        for i in range(3):
            clock.now += 10
            ids.append(spool.store(speech(95 + i, 0.5)))
        spool.claim_next()
    index = tmp_path / INDEX_NAME
    for suffix in ("-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    index.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)  # garbage after a valid-looking header
    with open_spool(tmp_path, wall_clock=clock) as spool:
        assert spool.reconciled.index_rebuilt and spool.reconciled.orphans_indexed == 3
        messages = spool.messages()
        assert [m.id for m in messages] == ids
        assert all(m.state is MessageState.STORED for m in messages)
        assert [m.created_unix for m in messages] == [clock.now - 20, clock.now - 10, clock.now]
        for i, m in enumerate(messages):
            assert np.array_equal(spool.pcm(m), speech(95 + i, 0.5))
    assert any(p.name.startswith(INDEX_NAME) for p in (tmp_path / "quarantine").iterdir())

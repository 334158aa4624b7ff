from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import uuid
from pathlib import Path

import numpy as np
import pytest

from kiosk.audio.format import encode_wav
from kiosk.fallback import sealing
from kiosk.fallback.spool import (
    AUDIO_DIR,
    INDEX_NAME,
    QUARANTINE_DIR,
    Message,
    MessageState,
    Spool,
    SpoolError,
    decode_message,
    run_retention,
    spool_warning,
)

DAY = 86400.0
# The operator's key pair for this file (the kiosk side only ever gets PUBLIC).
PRIVATE, PUBLIC = sealing.generate_keypair()


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
    kwargs.setdefault("recipient_public_key", PUBLIC)
    return Spool(path, **kwargs)  # type: ignore[arg-type]


def operator_opens(spool: Spool, message: Message) -> np.ndarray:
    """What the operator hears, on their own machine with the private key."""
    return decode_message(sealing.unseal(spool.read(message), PRIVATE))


def test_store_then_read_back_verified(tmp_path: Path) -> None:
    pcm = speech(1, 2.5)
    with open_spool(tmp_path) as spool:
        message_id = spool.store(pcm)
        [message] = spool.messages()
    assert message.id == message_id and message.state is MessageState.STORED and message.sealed
    assert message.duration_seconds == pytest.approx(2.5)
    with open_spool(tmp_path) as spool:
        assert spool.reconciled.clean
        message = spool.get(message_id[:8])
        data = spool.read(message)
        assert hashlib.sha256(data).hexdigest() == message.sha256  # the checksum covers the sealed bytes
        assert message.sha256 in message.file and message.file.endswith(".sealed")
        assert sealing.recipient_of(data) == PUBLIC
        assert np.array_equal(operator_opens(spool, message), pcm)


def test_the_card_holds_only_ciphertext(tmp_path: Path) -> None:
    """Nothing the visitor said is on the card in the clear: not in the audio files, the index or its WAL."""
    pcm = speech(2, 1.0)
    with open_spool(tmp_path) as spool:
        message_id = spool.store(pcm)
        wav = encode_wav(pcm)
        for path in tmp_path.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert b"RIFF" not in data and b"WAVEfmt" not in data, path
                # Any 64 bytes of the samples would be found if they had been written as they are.
                for start in range(44, len(wav) - 64, 4000):
                    assert wav[start:start + 64] not in data, path
        sealed = spool.read(spool.get(message_id))
        assert sealed.startswith(sealing.MAGIC) and len(sealed) == len(wav) + sealing.OVERHEAD_BYTES
        # Sealing is randomised: the same recording sealed twice gives different files and checksums.
        assert spool.get(spool.store(pcm)).sha256 != spool.get(message_id).sha256


def test_without_a_recipient_key_nothing_is_stored(tmp_path: Path) -> None:
    with open_spool(tmp_path, recipient_public_key=None) as spool:
        with pytest.raises(SpoolError) as caught:
            spool.store(speech(3))
        assert caught.value.code == "no_recipient_key" and "spool.recipient_public_key" in caught.value.message
        assert spool.messages() == []
    assert list((tmp_path / AUDIO_DIR).iterdir()) == []


def test_from_settings_seals_to_the_configured_key(tmp_path: Path) -> None:
    from kiosk.settings import SpoolSettings

    hex_key = PUBLIC.hex()  # hex is accepted too and stored as base64
    settings = SpoolSettings(directory=tmp_path, recipient_public_key=hex_key, max_age_days=7,
                             quarantine_max_age_days=3)
    assert settings.recipient_public_key == sealing.encode_key(PUBLIC)
    with Spool.from_settings(settings) as spool:
        assert (spool.max_age_seconds, spool.quarantine_max_age_seconds) == (7 * DAY, 3 * DAY)
        message = spool.get(spool.store(speech(4)))
        assert sealing.recipient_of(spool.read(message)) == PUBLIC


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
        assert restored.duration_seconds == pytest.approx(0.5)  # from the sealed file's size, not its content
        assert np.array_equal(operator_opens(spool, restored), speech(6, 0.5))
    assert not list((tmp_path / AUDIO_DIR).glob("*.tmp"))


def test_corrupt_files_are_quarantined_not_deleted_at_once(tmp_path: Path) -> None:
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
    # A file with a good name and checksum whose size cannot be a sealed WAV (a header without a box).
    odd = sealing.MAGIC + PUBLIC + b"x" * 49
    odd_name = f"{1_700_000_000_000:013d}_{uuid.uuid4()}_{hashlib.sha256(odd).hexdigest()}.sealed"
    (tmp_path / AUDIO_DIR / odd_name).write_bytes(odd)
    with open_spool(tmp_path) as spool:
        assert spool.reconciled.quarantined == 4
        assert [m.id for m in spool.messages()] == [good]
        assert spool.stats().quarantined_files == 4
    assert sorted(p.name for p in (tmp_path / "quarantine").iterdir()) == sorted(
        [files[damaged].name, files[orphan].name, "stray.wav", odd_name])


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
        claimed = spool.claim_next()  # past the limit: the old one is not sent, even before retention runs
        assert claimed is not None and claimed.id == young
        spool.release(young, "not sent in this test")
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

    message_bytes = len(encode_wav(speech(0))) + sealing.OVERHEAD_BYTES
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
    old_umask = os.umask(0)  # the export's modes must not depend on the caller's umask
    try:
        with open_spool(tmp_path / "spool") as spool:
            message_id = spool.store(speech(41, 3.0))
            message = spool.get(message_id)
            sealed, meta = spool.export(message, tmp_path / "out")
    finally:
        os.umask(old_umask)
    with open_spool(tmp_path / "spool") as spool:
        assert sealed.name.endswith(f"_{message_id}.wav.sealed") and sealed.read_bytes() == spool.read(message)
        assert (tmp_path / "out").stat().st_mode & 0o777 == 0o700
        for path in (sealed, meta):
            assert path.stat().st_mode & 0o777 == 0o600, path
        exported = json.loads(meta.read_text())
        assert exported == {"id": message_id, "recorded_at": message.recorded_at, "duration_seconds": 3.0,
                            "sha256": message.sha256, "size_bytes": message.size_bytes, "format": "kiosk-sealed-1",
                            "recipient_public_key": sealing.encode_key(PUBLIC), "content_type": "audio/wav",
                            "sample_rate_hz": 16000, "channels": 1}
        # An existing file with looser permissions is tightened when exported over.
        sealed.chmod(0o644)
        spool.export(message, tmp_path / "out")
        assert sealed.stat().st_mode & 0o777 == 0o600
        stats = spool.stats()
        assert (stats.stored, stats.delivering, stats.total_bytes) == (1, 0, message.size_bytes)
        (tmp_path / "spool" / AUDIO_DIR / message.file).write_bytes(b"x" * message.size_bytes)
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
        assert "kiosk messages decrypt --key" in capsys.readouterr().err  # how the operator opens them
        meta, exported = sorted((tmp_path / "one").iterdir(), key=lambda p: p.suffix)
        assert exported.read_bytes() == spool.read(spool.get(ids[1])) and meta.suffix == ".json"
        assert main(["messages", "export", "--all", str(tmp_path / "all")]) == 0
        assert len(list((tmp_path / "all").glob("*.wav.sealed"))) == 2
        assert len(list((tmp_path / "all").glob("*.json"))) == 2
        assert main(["messages", "export", "nosuchid", str(tmp_path / "x")]) == 1
        assert "kiosk messages list" in capsys.readouterr().err
        # Delivery needs the writer lock, which the running service holds.
        monkeypatch.setenv("KIOSK_DELIVERY__URL", "http://127.0.0.1:9/messages")
        monkeypatch.setenv("KIOSK_DELIVERY__CREDENTIAL", "delivery-secret")
        assert main(["messages", "deliver"]) == 1
        assert "spool_busy" in capsys.readouterr().err
    assert main(["messages", "export", str(tmp_path / "y")]) == 2  # neither an id nor --all


def test_empty_recording_is_refused(tmp_path: Path) -> None:
    with open_spool(tmp_path) as spool, pytest.raises(SpoolError) as caught:
        spool.store(np.zeros(0, dtype=np.int16))
    assert caught.value.code == "message_empty"


async def test_a_corrupt_message_is_quarantined_not_sent(tmp_path: Path) -> None:
    from kiosk.fallback.delivery import UploadResult, deliver_pass

    sent: list[str] = []

    async def upload(message: Message, sealed: bytes) -> UploadResult:
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
            assert m.duration_seconds == pytest.approx(0.5)
            assert np.array_equal(operator_opens(spool, m), speech(95 + i, 0.5))
    assert any(p.name.startswith(INDEX_NAME) for p in (tmp_path / "quarantine").iterdir())


# ------------------------------------------------------------------ plain files from an earlier version
def plant_legacy(directory: Path, pcm: np.ndarray, created_ms: int, *, indexed: bool) -> tuple[str, Path]:
    """What an earlier version left: a plain WAV named by its checksum, with (or without) its index row."""
    with open_spool(directory, recipient_public_key=None):
        pass  # creates the layout and the index (and, without a key, leaves plain files as they are)
    wav = encode_wav(pcm)
    message_id = str(uuid.uuid4())
    sha = hashlib.sha256(wav).hexdigest()
    path = directory / AUDIO_DIR / f"{created_ms:013d}_{message_id}_{sha}.wav"
    path.write_bytes(wav)
    if indexed:
        db = sqlite3.connect(directory / INDEX_NAME)
        db.execute("INSERT INTO messages (id, file, created_unix, duration_seconds, size_bytes, sha256, state) "
                   "VALUES (?, ?, ?, ?, ?, ?, 'stored')", (message_id, path.name, created_ms / 1000,
                                                           len(pcm) / 16000, len(wav), sha))
        db.commit()
        db.close()
    return message_id, path


def test_plain_files_from_an_earlier_version_are_sealed_on_open(tmp_path: Path) -> None:
    clock = WallClock()
    indexed, indexed_path = plant_legacy(tmp_path, speech(200, 1.2), 1_699_000_000_000, indexed=True)
    orphan, orphan_path = plant_legacy(tmp_path, speech(201, 0.7), 1_699_000_100_000, indexed=False)
    # Without a key they stay as they are: listed, never sent (delivery sends only what is sealed).
    with open_spool(tmp_path, wall_clock=clock, recipient_public_key=None) as spool:
        assert spool.reconciled.legacy_sealed == 0 and spool.reconciled.orphans_indexed == 1
        assert {m.id: m.sealed for m in spool.messages()} == {indexed: False, orphan: False}
        assert spool.claim_next() is None
    # With the operator's key, the next open seals both and deletes the plain files.
    with open_spool(tmp_path, wall_clock=clock) as spool:
        assert spool.reconciled.legacy_sealed == 2
        messages = {m.id: m for m in spool.messages()}
        assert set(messages) == {indexed, orphan} and all(m.sealed for m in messages.values())
        assert messages[indexed].created_unix == pytest.approx(1_699_000_000)
        assert messages[indexed].duration_seconds == pytest.approx(1.2)
        assert np.array_equal(operator_opens(spool, messages[indexed]), speech(200, 1.2))
        assert np.array_equal(operator_opens(spool, messages[orphan]), speech(201, 0.7))
        claimed = spool.claim_next()
        assert claimed is not None and claimed.id == indexed
    assert not indexed_path.exists() and not orphan_path.exists()
    assert not list((tmp_path / AUDIO_DIR).glob("*.wav"))


def test_an_interrupted_sealing_leaves_one_copy(tmp_path: Path) -> None:
    # Cut after the sealed copy was renamed into place, before the row pointed at it: two files, one id.
    message_id, plain = plant_legacy(tmp_path, speech(210, 0.5), 1_699_000_000_000, indexed=True)
    sealed_copy = sealing.seal(plain.read_bytes(), PUBLIC)
    sha = hashlib.sha256(sealed_copy).hexdigest()
    stray = tmp_path / AUDIO_DIR / f"{1_699_000_000_000:013d}_{message_id}_{sha}.sealed"
    stray.write_bytes(sealed_copy)
    with open_spool(tmp_path) as spool:
        report = spool.reconciled
        assert (report.legacy_sealed, report.copies_removed, report.quarantined) == (1, 1, 0)
        [message] = spool.messages()
        assert message.id == message_id and np.array_equal(operator_opens(spool, message), speech(210, 0.5))
    assert [p.suffix for p in (tmp_path / AUDIO_DIR).iterdir()] == [".sealed"]
    # Cut after the row pointed at the sealed file, before the plain one was unlinked: the plain copy goes.
    plain.write_bytes(encode_wav(speech(210, 0.5)))
    with open_spool(tmp_path) as spool:
        assert spool.reconciled.copies_removed == 1 and [m.id for m in spool.messages()] == [message_id]
    assert not plain.exists() and not list((tmp_path / AUDIO_DIR).glob("*.wav"))


# --------------------------------------------------------------------------------- retention timer
def test_quarantined_files_expire(tmp_path: Path) -> None:
    clock = WallClock()
    with open_spool(tmp_path, wall_clock=clock) as spool:
        damaged = spool.store(speech(220))
        path = tmp_path / AUDIO_DIR / spool.get(damaged).file
    clock.now += 100 * DAY  # the recording's age does not count: the quarantine's does
    path.write_bytes(path.read_bytes()[:-1])
    with open_spool(tmp_path, wall_clock=clock, max_age_seconds=90 * DAY,
                    quarantine_max_age_seconds=14 * DAY) as spool:
        assert spool.reconciled.quarantined == 1
        [kept] = list((tmp_path / QUARANTINE_DIR).iterdir())
        assert "1 file(s) in quarantine/" in spool_warning(spool.stats(), 0.8)  # staff are told, with the limit
        clock.now += 13 * DAY
        spool.enforce_retention()
        assert kept.exists() and spool.quarantine_expired_total == 0
        clock.now += 2 * DAY
        spool.enforce_retention()
        assert not kept.exists() and spool.quarantine_expired_total == 1
        assert spool.stats().quarantined_files == 0


async def test_retention_runs_on_a_timer_without_new_messages(tmp_path: Path) -> None:
    clock = WallClock()
    with open_spool(tmp_path, wall_clock=clock, max_age_seconds=10 * DAY) as spool:
        old = spool.store(speech(230))
        clock.now += 5 * DAY
        young = spool.store(speech(231))
        path = tmp_path / AUDIO_DIR / spool.get(old).file
        runs: list[list[str]] = []
        task = asyncio.create_task(run_retention(spool, 0.05, on_run=lambda dropped: runs.append(list(dropped))))
        try:
            for _ in range(100):  # the first pass runs at once
                if runs:
                    break
                await asyncio.sleep(0.01)
            assert runs == [[]]
            clock.now += 6 * DAY  # nothing is stored from here on: only the timer can drop the old message
            for _ in range(200):
                if any(runs):
                    break
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert [r for r in runs if r] == [[old]]
        assert [m.id for m in spool.messages()] == [young]
        assert not path.exists()  # really deleted, not just unindexed


async def test_a_failing_retention_pass_does_not_stop_the_timer(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    def disk_free(_path: Path) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(5, "Input/output error")
        return 10**12

    with open_spool(tmp_path, disk_free=disk_free) as spool:
        task = asyncio.create_task(run_retention(spool, 0.02))
        try:
            for _ in range(200):
                if calls >= 3:
                    break
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert calls >= 3 and "retention pass" in caplog.text


def test_max_age_is_capped() -> None:
    from pydantic import ValidationError

    from kiosk.settings import MAX_AGE_DAYS, SpoolSettings

    assert SpoolSettings(max_age_days=MAX_AGE_DAYS, quarantine_max_age_days=MAX_AGE_DAYS).max_age_days == 90
    for field in ("max_age_days", "quarantine_max_age_days"):
        with pytest.raises(ValidationError) as caught:
            SpoolSettings(**{field: 365})
        assert "cap of 90 days" in str(caught.value), field


def test_file_names_of_both_versions_parse() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from kiosk.fallback.spool import _parse_file_name

    message_id = str(uuid.uuid4())
    sha = "ab" * 32
    parsed = _parse_file_name(f"{1_700_000_000_000:013d}_{message_id}_{sha}.sealed")
    assert parsed is not None and parsed.sealed and parsed.id == message_id and parsed.sha256 == sha
    legacy = _parse_file_name(f"{1_700_000_000_000:013d}_{message_id}_{sha}.wav")
    assert legacy is not None and not legacy.sealed
    for bad in (f"x_{message_id}_{sha}.sealed", f"1_{message_id.upper()}_{sha}.sealed", f"1_{message_id}_{sha}",
                f"1_{message_id}_{sha[:-1]}.sealed", f"١٢_{message_id}_{sha}.sealed"):
        assert _parse_file_name(bad) is None, bad

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(st.text(max_size=200))
    def never_raises(name: str) -> None:
        result = _parse_file_name(name)
        assert result is None or (len(result.sha256) == 64 and result.created_ms >= 0)

    never_raises()


def test_any_file_found_on_the_card_is_indexed_or_quarantined(tmp_path: Path) -> None:
    """Whatever bytes a file with a well-formed name holds (a damaged card, someone's copy), opening the spool
    indexes it (only if it has the sealed header and a size that fits) or sets it aside; it never fails."""
    import tempfile

    from hypothesis import given, settings
    from hypothesis import strategies as st

    sealed_like = st.builds(lambda tail: sealing.MAGIC + PUBLIC + tail, st.binary(max_size=400))
    counter = iter(range(10**6))

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(st.one_of(st.binary(max_size=400), sealed_like), st.sampled_from([".sealed", ".wav"]))
    def opens(data: bytes, suffix: str) -> None:
        with tempfile.TemporaryDirectory(dir=tmp_path) as directory:
            root = Path(directory)
            (root / AUDIO_DIR).mkdir(parents=True)
            name = f"{1_700_000_000_000 + next(counter):013d}_{uuid.uuid4()}_{hashlib.sha256(data).hexdigest()}"
            (root / AUDIO_DIR / f"{name}{suffix}").write_bytes(data)
            with open_spool(root, recipient_public_key=None) as spool:
                report = spool.reconciled
                assert report.orphans_indexed + report.quarantined == 1
                if report.orphans_indexed:
                    [message] = spool.messages()
                    assert suffix == ".sealed" and data.startswith(sealing.MAGIC)
                    assert message.duration_seconds == (len(data) - sealing.OVERHEAD_BYTES - 44) / 2 / 16000

    opens()

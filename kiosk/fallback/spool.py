"""The message spool: visitors' recorded messages kept durably until the endpoint acknowledges them.

Layout under the spool directory::

    index.sqlite3                     one row per message (SQLite, WAL, synchronous=FULL): id, time,
                                      duration, size, checksum, delivery state; never any content
    audio/<ms>_<id>_<sha256>.sealed   the message: its WAV (16 kHz mono 16-bit) sealed to the operator's
                                      public key (``kiosk.fallback.sealing``); the name carries the checksum
                                      of the sealed bytes
    audio/.<id>.tmp                   a message being written (never confirmed; removed on open)
    quarantine/                       files that failed verification (kept for staff, deleted after
                                      ``quarantine_max_age_seconds``)
    .lock                             flock held by the one process that writes (the service, or
                                      `kiosk messages deliver`)

Each message is sealed in memory before its first byte is written: the card only ever holds ciphertext,
and the kiosk, which has no private key, cannot read its own spool back. Without a recipient key nothing
is stored (``no_recipient_key``). Plain ``.wav`` files left by an earlier version are sealed on open, and
their plain copy deleted, once a recipient key is configured.

``store(pcm)`` returns only when the message survives a power cut: the sealed file is written to a
temporary file, fsync'd, renamed to its final name, the directory fsync'd, then the index row committed (a
synchronous=FULL commit syncs the WAL). Only then may the confirmation cue play. Opening the spool
reconciles what a cut may have left: temporary files go, complete files without a row (cut between rename
and commit) are verified against the checksum in their name and indexed again, rows whose delivery was
interrupted go back to ``stored``; nothing that the endpoint has not acknowledged is deleted except by the
retention limits (age, free space), which the service enforces at start and on a timer (``run_retention``),
log without personal data and count. States: ``stored`` -> ``delivering`` -> ``delivered``, after which
file and row are removed. The message id (a UUID) is the idempotency key for delivery. See docs/offline.md
for the argument step by step.

The methods block on disk I/O (fsync): the service calls them through ``asyncio.to_thread`` (or the
``*_async`` helpers); one lock serialises them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, NewType
from urllib.parse import quote

from kiosk.audio.format import RATE_HZ, Pcm, WavError, decode_wav, encode_wav
from kiosk.errors import KioskError
from kiosk.fallback import sealing

if TYPE_CHECKING:
    from kiosk.metrics import Metrics, Status
    from kiosk.ports import Recording
    from kiosk.settings import SpoolSettings

_LOGGER = logging.getLogger(__name__)

MessageId = NewType("MessageId", str)

INDEX_NAME = "index.sqlite3"
AUDIO_DIR = "audio"
QUARANTINE_DIR = "quarantine"
LOCK_NAME = ".lock"
TMP_SUFFIX = ".tmp"
SEALED_SUFFIX = sealing.SUFFIX
LEGACY_SUFFIX = ".wav"  # plain WAV files written before messages were sealed
FORMAT = "kiosk-sealed-1"  # the delivery and export metadata's name for the sealed file format
_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    file TEXT NOT NULL UNIQUE,
    created_unix REAL NOT NULL,
    duration_seconds REAL NOT NULL,
    size_bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('stored', 'delivering', 'delivered')),
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT ''
)
"""
_COLUMNS = "id, file, created_unix, duration_seconds, size_bytes, sha256, state, attempts, last_error"


class SpoolError(KioskError):
    """The spool cannot do what was asked; the message names the problem and the fix."""


class MessageState(StrEnum):
    """Where a message is on its way to the endpoint."""

    STORED = "stored"
    DELIVERING = "delivering"
    DELIVERED = "delivered"


@dataclass(frozen=True)
class Message:
    """One message's index row."""

    id: MessageId
    file: str
    created_unix: float
    duration_seconds: float
    size_bytes: int
    sha256: str
    state: MessageState
    attempts: int = 0
    last_error: str = ""

    @property
    def sealed(self) -> bool:
        """The file is sealed to the operator's key (False only for plain files from an earlier version)."""
        return self.file.endswith(SEALED_SUFFIX)

    @property
    def recorded_at(self) -> str:
        """Recording time, ISO 8601 UTC (seconds)."""
        return datetime.fromtimestamp(self.created_unix, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

    def as_dict(self) -> dict[str, str | float | int | bool]:
        """Plain data for ``kiosk messages list --json`` and delivery metadata."""
        return {"id": self.id, "time": self.recorded_at, "duration_seconds": round(self.duration_seconds, 3),
                "state": self.state.value, "sha256": self.sha256, "size_bytes": self.size_bytes,
                "attempts": self.attempts, "last_error": self.last_error, "sealed": self.sealed}


@dataclass
class ReconcileReport:
    """What opening the spool found and repaired (all zero after a clean shutdown)."""

    temp_removed: int = 0
    orphans_indexed: int = 0
    delivering_reset: int = 0
    delivered_finished: int = 0
    quarantined: int = 0
    rows_without_file: int = 0
    legacy_sealed: int = 0  # plain files from an earlier version, sealed and their plain copy deleted
    copies_removed: int = 0  # a second copy of a message left by an interrupted sealing
    index_rebuilt: bool = False

    @property
    def clean(self) -> bool:
        """Nothing needed repair."""
        return not any(vars(self).values())


@dataclass(frozen=True)
class SpoolStats:
    """Figures for metrics and the status endpoint."""

    stored: int
    delivering: int
    total_bytes: int
    oldest_age_seconds: float
    free_bytes: int
    dropped_total: int
    quarantined_files: int
    retention_fraction: float  # 1.0: at a retention limit (age or free space); drops happen beyond it
    low_space: bool


@dataclass(frozen=True)
class _FileName:
    created_ms: int
    id: MessageId
    sha256: str
    sealed: bool


def _file_name(created_ms: int, message_id: MessageId, sha256: str) -> str:
    return f"{created_ms:013d}_{message_id}_{sha256}{SEALED_SUFFIX}"


def _parse_file_name(name: str) -> _FileName | None:
    """The parts of ``<ms>_<uuid>_<sha256>.sealed`` (or an earlier version's ``.wav``); None for anything else."""
    suffix = next((s for s in (SEALED_SUFFIX, LEGACY_SUFFIX) if name.endswith(s)), None)
    if suffix is None:
        return None
    parts = name.removesuffix(suffix).split("_")
    if len(parts) != 3:
        return None
    created, message_id, sha = parts
    try:
        if str(uuid.UUID(message_id)) != message_id:
            return None
    except ValueError:
        return None
    if not (created.isascii() and created.isdigit()) or len(sha) != 64 or \
            any(c not in "0123456789abcdef" for c in sha):
        return None
    return _FileName(int(created), MessageId(message_id), sha, suffix == SEALED_SUFFIX)


def decode_message(data: bytes) -> Pcm:
    """A spool WAV's samples; raise ``SpoolError`` unless it is 16 kHz mono 16-bit and complete."""
    try:
        wav = decode_wav(data)
    except WavError as error:
        raise SpoolError("message_corrupt", f"not a PCM WAV file ({error})") from None
    if (wav.channels, wav.sample_bits, wav.is_float, wav.rate_hz, wav.truncated) != (1, 16, False, RATE_HZ, False):
        raise SpoolError("message_corrupt", f"not a complete 16 kHz mono 16-bit WAV ({wav.channels} channel(s), "
                         f"{wav.sample_bits}-bit, {wav.rate_hz} Hz{', cut short' if wav.truncated else ''})")
    return wav.mono_pcm()


def _fsync_directory(path: Path) -> None:
    # The rename or unlink is only durable once the directory entry itself reaches the card.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner only (0600, also when the file existed), and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def message_metadata(message: Message, sealed: bytes) -> dict[str, str | float | int]:
    """What the endpoint and the operator get beside a sealed message: nothing derived from its content.

    ``sha256`` and ``size_bytes`` are those of the sealed file; ``recipient_public_key`` (read from the file's
    header) says which of the operator's keys opens it.
    """
    return {"id": message.id, "recorded_at": message.recorded_at,
            "duration_seconds": round(message.duration_seconds, 3), "sha256": message.sha256,
            "size_bytes": message.size_bytes, "format": FORMAT,
            "recipient_public_key": sealing.encode_key(sealing.recipient_of(sealed)),
            "content_type": "audio/wav", "sample_rate_hz": RATE_HZ, "channels": 1}


class Spool:
    """The durable message store; see the module docstring. Use as a context manager or call ``close()``.

    ``recipient_public_key`` is the operator's X25519 public key (32 raw bytes) every message is sealed to;
    without it ``store`` refuses. ``read_only=True`` opens without the writer lock and without reconciling
    (``kiosk messages list`` and ``export`` while the service runs). ``wall_clock`` gives the recording
    time (Unix seconds, for people and for retention by age) and ``disk_free`` the free bytes; both are
    injected for tests.
    """

    def __init__(self, directory: Path, *, recipient_public_key: bytes | None = None,
                 max_age_seconds: float = 30 * 86400.0, quarantine_max_age_seconds: float = 30 * 86400.0,
                 min_free_bytes: int = 0, read_only: bool = False, verify_on_open: bool = True,
                 wall_clock: Callable[[], float] = time.time,
                 disk_free: Callable[[Path], int] = _disk_free_bytes) -> None:
        self.directory = Path(directory)
        self.audio_directory = self.directory / AUDIO_DIR
        self.quarantine_directory = self.directory / QUARANTINE_DIR
        self.recipient_public_key = recipient_public_key
        self.max_age_seconds = max_age_seconds
        self.quarantine_max_age_seconds = quarantine_max_age_seconds
        self.min_free_bytes = min_free_bytes
        self.read_only = read_only
        self._wall_clock = wall_clock
        self._disk_free = disk_free
        self._lock = threading.Lock()
        self._lock_fd: int | None = None
        self._db: sqlite3.Connection | None = None
        self.dropped_total = 0
        self.quarantine_expired_total = 0
        self.reconciled = ReconcileReport()
        # Called on the loop after each store_recording (e.g. Deliverer.wake, metrics refresh).
        self.on_stored: list[Callable[[MessageId], None]] = []
        if read_only:
            self._open_read_only()
        else:
            self._open_writer(verify_on_open)

    @classmethod
    def from_settings(cls, settings: SpoolSettings, *, read_only: bool = False) -> Spool:
        """A spool configured from ``SpoolSettings``."""
        key = settings.recipient_public_key
        return cls(settings.directory, recipient_public_key=sealing.parse_key(key) if key else None,
                   max_age_seconds=settings.max_age_days * 86400.0,
                   quarantine_max_age_seconds=settings.quarantine_max_age_days * 86400.0,
                   min_free_bytes=settings.min_free_mb * 1024 * 1024, read_only=read_only)

    # ----------------------------------------------------------------------------------- opening
    def _open_writer(self, verify: bool) -> None:
        try:
            # Private to the service user (systemd's StateDirectoryMode=0700 and UMask=0077 say the same).
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.audio_directory.mkdir(mode=0o700, exist_ok=True)
        except OSError as error:
            raise SpoolError("spool_unwritable", f"cannot create the spool directory {self.directory} "
                             f"({error.strerror}): create it writable for the kiosk user, or set "
                             "spool.directory") from None
        try:
            fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise SpoolError("spool_unwritable", f"cannot write in the spool directory {self.directory} "
                             f"({error.strerror}): make it writable for the kiosk user") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise SpoolError("spool_busy", f"another process (the kiosk service?) has the spool "
                                 f"{self.directory} open for writing; it delivers by itself, or stop it "
                                 "first (systemctl stop kiosk)") from None
            raise
        self._lock_fd = fd
        rebuilt = False
        try:
            self._db = self._open_index()
        except sqlite3.DatabaseError as error:
            # The index is damaged (the card): set it aside and rebuild it from the audio files, whose
            # names carry their id, time and checksum. Nothing is lost but delivery attempt counts.
            _LOGGER.error("the spool index in %s is damaged (%s); moving it to %s/ and rebuilding it from "
                          "the audio files", self.directory, error, QUARANTINE_DIR)
            self._set_index_aside()
            self._db = self._open_index()
            rebuilt = True
        # A new spool's own entries (audio/, the index) must reach the card before anything is confirmed.
        _fsync_directory(self.directory)
        _fsync_directory(self.directory.parent)
        self.reconciled = self._reconcile(verify)
        self.reconciled.index_rebuilt = rebuilt
        if not self.reconciled.clean:
            _LOGGER.warning("spool %s repaired on open: %s", self.directory, self.reconciled)

    def _open_index(self) -> sqlite3.Connection:
        db = self._connect(f"file:{quote(str(self.directory / INDEX_NAME))}", uri=True)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: a WAL commit is synced before it returns; NORMAL may roll a commit back on power loss.
            db.execute("PRAGMA synchronous=FULL")
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
            db.execute(_SCHEMA)
            db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _set_index_aside(self) -> None:
        self.quarantine_directory.mkdir(mode=0o700, exist_ok=True)
        stamp = round(self._wall_clock())
        for suffix in ("", "-wal", "-shm"):
            path = self.directory / f"{INDEX_NAME}{suffix}"
            if path.exists():
                target = self.quarantine_directory / f"{INDEX_NAME}{suffix}.damaged-{stamp}"
                os.replace(path, target)
                os.utime(target, (stamp, stamp))  # the quarantine's age counts from now
        _fsync_directory(self.quarantine_directory)
        _fsync_directory(self.directory)

    def _open_read_only(self) -> None:
        path = self.directory / INDEX_NAME
        try:
            if path.exists():
                self._db = self._connect(f"file:{quote(str(path))}?mode=ro", uri=True)
        except (OSError, sqlite3.Error) as error:
            raise SpoolError("spool_unreadable", f"cannot read the spool index {path} ({error}): run as the "
                             "service user (sudo -u kiosk kiosk messages ...)") from None

    @staticmethod
    def _connect(target: str, uri: bool) -> sqlite3.Connection:
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT), nothing implicit.
        db = sqlite3.connect(target, uri=uri, isolation_level=None, check_same_thread=False, timeout=10.0)
        db.execute("PRAGMA busy_timeout=10000")
        return db

    def close(self) -> None:
        """Close the index and release the writer lock."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # closing releases the flock
                self._lock_fd = None

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._require_db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _require_db(self) -> sqlite3.Connection:
        if self._db is None:
            raise SpoolError("spool_closed", f"the spool {self.directory} is closed or has no index yet")
        return self._db

    def _require_writer(self) -> None:
        if self.read_only or self._lock_fd is None:
            raise SpoolError("spool_read_only", "this spool was opened read-only; open it for writing to change it")

    # --------------------------------------------------------------------------------- reconcile
    def _reconcile(self, verify: bool) -> ReconcileReport:
        report = ReconcileReport()
        db = self._require_db()
        files = {p.name: p for p in self.audio_directory.iterdir()}
        changed = False
        for name in [n for n in files if n.endswith(TMP_SUFFIX)]:
            # A temporary file was never confirmed (the row commit comes after the rename): safe to remove.
            files.pop(name).unlink()
            report.temp_removed += 1
            changed = True
        rows = [self._row(r) for r in db.execute(f"SELECT {_COLUMNS} FROM messages").fetchall()]
        for message in rows:
            path = files.pop(message.file, None)
            if message.state is MessageState.DELIVERED:
                # Acknowledged by the endpoint; the cut came before the clean-up finished.
                if path is not None:
                    path.unlink()
                    changed = True
                with self._transaction() as tx:
                    tx.execute("DELETE FROM messages WHERE id = ?", (message.id,))
                report.delivered_finished += 1
                continue
            if path is None:
                _LOGGER.error("message %s has an index row but no audio file %s; removing the row",
                              message.id, message.file)
                with self._transaction() as tx:
                    tx.execute("DELETE FROM messages WHERE id = ?", (message.id,))
                report.rows_without_file += 1
                continue
            if verify or path.stat().st_size != message.size_bytes or not message.sealed:
                problem = self._verify_file(path, message.sha256, message.size_bytes)
                if problem:
                    # Row first: a cut before the move leaves an orphan that fails verification again.
                    with self._transaction() as tx:
                        tx.execute("DELETE FROM messages WHERE id = ?", (message.id,))
                    self._quarantine(path, problem)
                    report.quarantined += 1
                    changed = True
                    continue
            if message.state is MessageState.DELIVERING:
                # The upload was interrupted; it is sent again with the same idempotency key.
                with self._transaction() as tx:
                    tx.execute("UPDATE messages SET state = 'stored' WHERE id = ?", (message.id,))
                report.delivering_reset += 1
            if not message.sealed and self.recipient_public_key is not None:
                report.legacy_sealed += self._seal_legacy(path, round(message.created_unix * 1000), message.id,
                                                          indexed=True)
        for name, path in files.items():
            parsed = _parse_file_name(name)
            if parsed is not None and self._has_row(parsed.id):
                # Two files, one id: only an interrupted sealing of a plain file leaves that (cut after the
                # sealed copy was renamed into place). The row's file is verified and complete; this copy goes.
                self._delete_file(path)
                _LOGGER.warning("removed a second copy of message %s left by an interrupted sealing", parsed.id)
                report.copies_removed += 1
                continue
            problem = "its name is not <ms>_<uuid>_<sha256>.sealed" if parsed is None else \
                self._verify_file(path, parsed.sha256, None)
            if parsed is None or problem:
                self._quarantine(path, problem)
                report.quarantined += 1
                changed = True
                continue
            if not parsed.sealed and self.recipient_public_key is not None and \
                    self._seal_legacy(path, parsed.created_ms, parsed.id, indexed=False):
                report.legacy_sealed += 1
                report.orphans_indexed += 1
                continue
            # Renamed into place but the row commit did not happen: complete and verified, so index it.
            size = path.stat().st_size
            samples = sealing.samples_for_size(size) if parsed.sealed else len(decode_message(path.read_bytes()))
            assert samples is not None  # _verify_file checked that the size fits
            with self._transaction() as tx:
                tx.execute(f"INSERT INTO messages ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, 'stored', 0, '')",
                           (parsed.id, name, parsed.created_ms / 1000.0, samples / RATE_HZ, size, parsed.sha256))
            report.orphans_indexed += 1
        if changed:
            _fsync_directory(self.audio_directory)
        return report

    def _has_row(self, message_id: str) -> bool:
        return self._require_db().execute("SELECT 1 FROM messages WHERE id = ?", (message_id,)).fetchone() is not None

    @staticmethod
    def _verify_file(path: Path, sha256: str, size_bytes: int | None) -> str:
        """'' when the file is complete and matches its checksum, else what is wrong."""
        data = path.read_bytes()
        if size_bytes is not None and len(data) != size_bytes:
            return f"size {len(data)} bytes, the index says {size_bytes}"
        if hashlib.sha256(data).hexdigest() != sha256:
            return "checksum mismatch"
        if path.name.endswith(SEALED_SUFFIX):
            # The content cannot be checked without the operator's key: the header and the size must fit.
            try:
                sealing.recipient_of(data)
            except sealing.SealError as error:
                return error.message
            if sealing.samples_for_size(len(data)) is None:
                return f"{len(data)} bytes is not the size of a sealed 16 kHz mono 16-bit WAV"
            return ""
        try:
            decode_message(data)
        except SpoolError as error:
            return error.message
        return ""

    def _seal_legacy(self, path: Path, created_ms: int, message_id: MessageId, *, indexed: bool) -> bool:
        """Seal a plain WAV left by an earlier version, index the sealed file, then delete the plain one.

        Order: sealed copy durable under its final name, index row pointing at it committed, plain file
        unlinked and the directory synced. A cut in between leaves two files for one id, which the next
        open resolves by keeping the row's file and removing the other (both hold the same message).
        """
        assert self.recipient_public_key is not None
        plain = path.read_bytes()
        sealed = sealing.seal(plain, self.recipient_public_key)
        sha256 = hashlib.sha256(sealed).hexdigest()
        name = _file_name(created_ms, message_id, sha256)
        try:
            self._write_durably(f".{message_id}{TMP_SUFFIX}", name, sealed)
            with self._transaction() as tx:
                if indexed:
                    tx.execute("UPDATE messages SET file = ?, size_bytes = ?, sha256 = ? WHERE id = ?",
                               (name, len(sealed), sha256, message_id))
                else:
                    samples = len(decode_message(plain))
                    tx.execute(f"INSERT INTO messages ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, 'stored', 0, '')",
                               (message_id, name, created_ms / 1000.0, samples / RATE_HZ, len(sealed), sha256))
        except (OSError, sqlite3.Error) as error:
            # The plain file stays as it was (indexed or an orphan); the next open tries again.
            _LOGGER.error("could not seal message %s stored in the clear by an earlier version (%s): check the "
                          "card and free space", message_id, error)
            return False
        self._delete_file(path)
        _LOGGER.warning("message %s was stored in the clear by an earlier version: sealed to the recipient key, "
                        "plain file deleted", message_id)
        return True

    def _delete_file(self, path: Path) -> None:
        """Unlink ``path`` and sync its directory: the name is gone from the card, not just from a cache."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        _fsync_directory(path.parent)

    def _write_durably(self, tmp_name: str, name: str, data: bytes) -> None:
        """``data`` under ``audio/name``, durable: temporary file, fsync, rename, fsync of the directory."""
        tmp = self.audio_directory / tmp_name
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.audio_directory / name)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_directory(self.audio_directory)

    def _quarantine(self, path: Path, problem: str) -> None:
        # Not deleted at once: it may be the only copy of something a visitor said; staff have
        # quarantine_max_age_seconds to look, then retention deletes it.
        self.quarantine_directory.mkdir(mode=0o700, exist_ok=True)
        target = self.quarantine_directory / path.name
        os.replace(path, target)
        now = self._wall_clock()
        os.utime(target, (now, now))  # the quarantine's age counts from now, not from the recording
        _fsync_directory(self.quarantine_directory)
        _LOGGER.error("spool file %s failed verification (%s); moved to %s", path.name, problem, target)

    # ------------------------------------------------------------------------------------- store
    def store(self, pcm: Pcm) -> MessageId:
        """Seal a message to the recipient key, store it durably and return its id (also its idempotency key).

        Returns only after the sealed file and its index row are on stable storage: the confirmation cue
        may play. Raises ``SpoolError`` (``no_recipient_key``, ``spool_full``, ``spool_write_failed``)
        otherwise; nothing of the message reaches the card unsealed.
        """
        if len(pcm) == 0:
            raise SpoolError("message_empty", "the recording is empty, so there is nothing to store")
        with self._lock:
            self._require_writer()
            if self.recipient_public_key is None:
                raise SpoolError("no_recipient_key", "visitors' messages are not recorded: spool.recipient_public_key "
                                 "is unset and a visitor's voice is never written to the card unencrypted; set the "
                                 "operator's public key (made by `kiosk messages keygen`)")
            created_ms = round(self._wall_clock() * 1000)
            data = sealing.seal(encode_wav(pcm), self.recipient_public_key)
            sha256 = hashlib.sha256(data).hexdigest()
            self._make_room(len(data))
            message_id = MessageId(str(uuid.uuid4()))
            name = _file_name(created_ms, message_id, sha256)
            try:
                self._write_durably(f".{message_id}{TMP_SUFFIX}", name, data)
                with self._transaction() as tx:
                    tx.execute(f"INSERT INTO messages ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, 'stored', 0, '')",
                               (message_id, name, created_ms / 1000.0, len(pcm) / RATE_HZ, len(data), sha256))
            except (OSError, sqlite3.Error) as error:
                raise SpoolError("spool_write_failed", f"could not store a message in {self.directory} "
                                 f"({error}): check the card (`kiosk doctor`, dmesg) and free space") from None
            return message_id

    async def store_recording(self, recording: Recording) -> str:
        """The ``MessageStore`` port: store durably off the loop, then call the ``on_stored`` listeners.

        The controller plays the confirmation only after this returns (``RecordingStored``).
        """
        message_id = await self.store_async(recording.pcm)
        for listener in self.on_stored:
            listener(message_id)
        return message_id

    async def store_async(self, pcm: Pcm) -> MessageId:
        """``store`` off the event loop (fsync may take a while on an SD card)."""
        # Thread boundary: the blocking fsyncs run in the default executor; the loop keeps serving audio.
        return await asyncio.to_thread(self.store, pcm)

    # --------------------------------------------------------------------------------- retention
    def _make_room(self, needed_bytes: int) -> None:
        self._drop_expired()
        free = self._disk_free(self.directory)
        if free - needed_bytes >= self.min_free_bytes:
            return
        reclaimable = self._require_db().execute(
            "SELECT COALESCE(SUM(size_bytes), 0) FROM messages WHERE state = 'stored'").fetchone()[0]
        if free + int(reclaimable) - needed_bytes < self.min_free_bytes:
            # Even dropping every stored message would not make room: keep them all and refuse this one.
            raise SpoolError("spool_full", f"not enough free space in {self.directory} for a message "
                             f"({free / 1048576:.0f} MB free, spool.min_free_mb is "
                             f"{self.min_free_bytes / 1048576:.0f}): free space on the card or lower "
                             "spool.min_free_mb")
        while self._disk_free(self.directory) - needed_bytes < self.min_free_bytes:
            oldest = self._oldest_stored()
            if oldest is None:
                break
            self._drop(oldest, "free space below spool.min_free_mb")

    def enforce_retention(self) -> list[MessageId]:
        """Apply the retention limits now; return the ids of the messages dropped.

        Messages past the age limit go, then the oldest while free space is below the minimum, then
        quarantined files past their own limit. The service calls this at start and every
        ``spool.retention_check_seconds`` (``run_retention``), so the limits hold on a kiosk that records
        nothing new.
        """
        with self._lock:
            self._require_writer()
            before = self.dropped_total
            dropped = self._drop_expired()
            while self._disk_free(self.directory) < self.min_free_bytes:
                oldest = self._oldest_stored()
                if oldest is None:
                    break
                self._drop(oldest, "free space below spool.min_free_mb")
                dropped.append(oldest.id)
            self._expire_quarantine()
            assert self.dropped_total - before == len(dropped)
            return dropped

    def _expire_quarantine(self) -> int:
        """Delete quarantined files older than the quarantine limit (counted from when they were set aside)."""
        if not self.quarantine_directory.is_dir():
            return 0
        limit = self._wall_clock() - self.quarantine_max_age_seconds
        removed = 0
        for path in sorted(self.quarantine_directory.iterdir()):
            status = path.lstat()
            if stat.S_ISREG(status.st_mode) and status.st_mtime < limit:
                path.unlink()
                removed += 1
        if removed:
            _fsync_directory(self.quarantine_directory)
            self.quarantine_expired_total += removed
            _LOGGER.warning("deleted %d file(s) from %s kept longer than spool.quarantine_max_age_days", removed,
                            self.quarantine_directory)
        return removed

    def _drop_expired(self) -> list[MessageId]:
        dropped = []
        limit = self._wall_clock() - self.max_age_seconds
        db = self._require_db()
        rows = db.execute(f"SELECT {_COLUMNS} FROM messages WHERE state = 'stored' AND created_unix < ? "
                          "ORDER BY created_unix", (limit,)).fetchall()
        for row in rows:
            message = self._row(row)
            self._drop(message, "older than spool.max_age_days")
            dropped.append(message.id)
        return dropped

    def _oldest_stored(self) -> Message | None:
        row = self._require_db().execute(f"SELECT {_COLUMNS} FROM messages WHERE state = 'stored' "
                                         "ORDER BY created_unix LIMIT 1").fetchone()
        return None if row is None else self._row(row)

    def _drop(self, message: Message, why: str) -> None:
        # Retention is the one place an unacknowledged message goes: an operator's limit, logged (id and time,
        # nothing a visitor said) and counted.
        _LOGGER.warning("dropping undelivered message %s recorded %s (%s)", message.id, message.recorded_at, why)
        # Row first: a cut before the unlink leaves an orphan that is indexed again, never a row without audio.
        with self._transaction() as tx:
            tx.execute("DELETE FROM messages WHERE id = ?", (message.id,))
        self._delete_file(self.audio_directory / message.file)
        self.dropped_total += 1

    # ---------------------------------------------------------------------------------- delivery
    def claim_next(self, exclude: frozenset[str] = frozenset()) -> Message | None:
        """The oldest stored sealed message, now marked ``delivering`` (None when there is nothing to send).

        Plain files from an earlier version are never sent: they wait until a recipient key seals them. Nor is
        a message past the age limit: retention deletes it instead (the operator's limit holds for delivery too).
        """
        with self._lock:
            self._require_writer()
            with self._transaction() as tx:
                marks = ",".join("?" * len(exclude))
                where = f"AND id NOT IN ({marks})" if exclude else ""
                oldest = self._wall_clock() - self.max_age_seconds
                row = tx.execute(f"SELECT {_COLUMNS} FROM messages WHERE state = 'stored' AND file LIKE ? "
                                 f"AND created_unix >= ? {where} ORDER BY created_unix LIMIT 1",
                                 (f"%{SEALED_SUFFIX}", oldest, *exclude)).fetchone()
                if row is None:
                    return None
                tx.execute("UPDATE messages SET state = 'delivering', attempts = attempts + 1 WHERE id = ?",
                           (row[0],))
            return self._row(row[:6] + ("delivering", row[7] + 1, row[8]))

    def mark_delivered(self, message_id: str) -> None:
        """The endpoint acknowledged: record it, then remove the file and the row (the ack comes first)."""
        with self._lock:
            self._require_writer()
            with self._transaction() as tx:
                row = tx.execute("SELECT file FROM messages WHERE id = ?", (message_id,)).fetchone()
                if row is None:
                    return
                tx.execute("UPDATE messages SET state = 'delivered' WHERE id = ?", (message_id,))
            self._delete_file(self.audio_directory / row[0])
            with self._transaction() as tx:
                tx.execute("DELETE FROM messages WHERE id = ?", (message_id,))

    def quarantine_message(self, message_id: str, problem: str) -> None:
        """Take a message whose audio failed verification out of delivery: row removed, file to quarantine/."""
        with self._lock:
            self._require_writer()
            row = self._require_db().execute("SELECT file FROM messages WHERE id = ?", (message_id,)).fetchone()
            if row is None:
                return
            with self._transaction() as tx:
                tx.execute("DELETE FROM messages WHERE id = ?", (message_id,))
            path = self.audio_directory / row[0]
            if path.exists():
                self._quarantine(path, problem)
            else:
                _LOGGER.error("message %s has no audio file (%s); its row is removed", message_id, problem)

    def release(self, message_id: str, error: str) -> None:
        """An upload failed: back to ``stored`` (sent again later with the same key)."""
        with self._lock:
            self._require_writer()
            with self._transaction() as tx:
                tx.execute("UPDATE messages SET state = 'stored', last_error = ? WHERE id = ? "
                           "AND state = 'delivering'", (error[:500], message_id))

    # -------------------------------------------------------------------------------------- read
    def messages(self) -> list[Message]:
        """Every message not yet removed, oldest first."""
        with self._lock:
            if self._db is None:
                return []
            try:
                rows = self._db.execute(f"SELECT {_COLUMNS} FROM messages ORDER BY created_unix, id").fetchall()
            except sqlite3.Error as error:
                raise SpoolError("spool_unreadable", f"cannot read the spool index in {self.directory} ({error}): "
                                 "run as the service user (sudo -u kiosk kiosk messages ...)") from None
            return [self._row(r) for r in rows]

    def get(self, message_id: str) -> Message:
        """One message by id (a unique prefix of at least 8 characters is enough)."""
        matches = [m for m in self.messages() if m.id == message_id or
                   (len(message_id) >= 8 and m.id.startswith(message_id))]
        if len(matches) != 1:
            what = "no message" if not matches else f"{len(matches)} messages"
            raise SpoolError("message_unknown", f"{what} with id {message_id} in {self.directory}: "
                             "see `kiosk messages list`")
        return matches[0]

    def read(self, message: Message) -> bytes:
        """The message's file as stored (sealed), verified against its checksum (``SpoolError`` if they differ).

        The kiosk cannot open what it reads: only the operator's private key can.
        """
        try:
            data = (self.audio_directory / message.file).read_bytes()
        except FileNotFoundError:
            raise SpoolError("message_missing", f"message {message.id}'s audio is gone (delivered meanwhile?): "
                             "see `kiosk messages list`") from None
        if hashlib.sha256(data).hexdigest() != message.sha256:
            raise SpoolError("message_corrupt", f"message {message.id}'s audio does not match its checksum "
                             "(damaged on the card); delivery or the next start moves it to quarantine/")
        return data

    def export(self, message: Message, directory: Path) -> list[Path]:
        """Copy a verified message into ``directory``, readable by its owner only (0600); return the paths.

        Written: ``<time>_<id>.wav.sealed`` (the sealed file as stored) and ``<time>_<id>.json`` (its metadata,
        the same as delivery sends). The operator opens the sealed file on their own machine with
        ``kiosk messages decrypt --key FILE``. A plain file from an earlier version (no recipient key was
        ever configured) is copied as ``<time>_<id>.wav``, also 0600.
        """
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        stamp = message.recorded_at.replace(":", "").replace("-", "")
        data = self.read(message)
        if not message.sealed:
            target = directory / f"{stamp}_{message.id}{LEGACY_SUFFIX}"
            write_private_file(target, data)
            return [target]
        target = directory / f"{stamp}_{message.id}.wav{SEALED_SUFFIX}"
        meta = directory / f"{stamp}_{message.id}.json"
        write_private_file(target, data)
        write_private_file(meta, (json.dumps(message_metadata(message, data), indent=2) + "\n").encode())
        return [target, meta]

    def quarantined_files(self) -> int:
        """How many files wait in quarantine/ for staff (deleted after ``quarantine_max_age_seconds``)."""
        try:
            return sum(1 for p in self.quarantine_directory.iterdir() if p.is_file())
        except OSError:
            return 0

    def stats(self) -> SpoolStats:
        """Counts, sizes and how close the spool is to its retention limits."""
        messages = self.messages()
        now = self._wall_clock()
        stored = [m for m in messages if m.state is MessageState.STORED]
        oldest_age = max((now - m.created_unix for m in messages), default=0.0)
        free = self._disk_free(self.directory) if self.directory.exists() else 0
        space_fraction = self.min_free_bytes / free if free > 0 else 1.0
        return SpoolStats(
            stored=len(stored),
            delivering=sum(m.state is MessageState.DELIVERING for m in messages),
            total_bytes=sum(m.size_bytes for m in messages),
            oldest_age_seconds=oldest_age,
            free_bytes=free,
            dropped_total=self.dropped_total,
            quarantined_files=self.quarantined_files(),
            retention_fraction=min(1.0, max(oldest_age / self.max_age_seconds, space_fraction)),
            low_space=free < self.min_free_bytes,
        )

    @staticmethod
    def _row(row: tuple[object, ...]) -> Message:
        (message_id, file, created, duration, size, sha, state, attempts, last_error) = row
        return Message(MessageId(str(message_id)), str(file), float(str(created)), float(str(duration)),
                       int(str(size)), str(sha), MessageState(str(state)), int(str(attempts)), str(last_error))


async def run_retention(spool: Spool, interval_seconds: float,
                        on_run: Callable[[list[MessageId]], None] | None = None) -> None:
    """Enforce the retention limits now and every ``interval_seconds`` until cancelled (the service's timer).

    Without it the limits would only be checked when a new message is stored, and a kiosk nobody leaves
    messages on would keep old ones (and quarantined files) for ever. A failing pass (card error) is logged
    and the timer goes on.
    """
    while True:
        try:
            # Thread boundary: unlinks and fsyncs run in the executor; the loop keeps serving audio.
            dropped = await asyncio.to_thread(spool.enforce_retention)
        except (KioskError, OSError, sqlite3.Error) as error:
            _LOGGER.error("retention pass on the spool %s failed: %s", spool.directory, error)
        else:
            if on_run is not None:
                on_run(dropped)
        await asyncio.sleep(interval_seconds)


def spool_warning(stats: SpoolStats, warn_fraction: float) -> str:
    """A line for staff when the spool drops messages or nears a retention limit ('' when all is well)."""
    parts = []
    if stats.dropped_total:
        parts.append(f"{stats.dropped_total} undelivered message(s) dropped by the retention limits")
    if stats.low_space:
        parts.append(f"free space below spool.min_free_mb ({stats.free_bytes / 1048576:.0f} MB free)")
    elif stats.retention_fraction >= warn_fraction:
        parts.append(f"spool at {stats.retention_fraction:.0%} of its age or free-space limit: check delivery")
    if stats.quarantined_files:
        parts.append(f"{stats.quarantined_files} file(s) in quarantine/ (deleted after "
                     "spool.quarantine_max_age_days): see docs/offline.md")
    return "; ".join(parts)


def publish_stats(spool: Spool, metrics: Metrics, status: Status, warn_fraction: float = 0.8) -> SpoolStats:
    """Copy the spool's figures into the metrics and the status endpoint; log the warning when it changes.

    The service calls this periodically and after each store or delivery.
    """
    stats = spool.stats()
    warning = spool_warning(stats, warn_fraction)
    metrics.spool_messages.set(stats.stored + stats.delivering)
    metrics.spool_bytes.set(stats.total_bytes)
    metrics.spool_retention_warning.set(1.0 if warning else 0.0)
    if warning and warning != status.spool_warning:
        _LOGGER.warning("spool %s: %s", spool.directory, warning)
    status.spool_messages = stats.stored + stats.delivering
    status.spool_bytes = stats.total_bytes
    status.spool_warning = warning
    return stats

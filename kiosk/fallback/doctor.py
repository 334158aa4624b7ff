"""On-site checks of the message spool for ``kiosk doctor``.

``check_disk`` (area ``disk``): free space, persistence and writability. ``security_checks`` (area
``security``, its stored-voice part): encryption, plain audio, retention, delivery credential, spool permissions.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from kiosk.checks import Check, Figures, Verdict
from kiosk.settings import Settings

PERSISTENT_HINT = "the A/B image binds /var/lib/kiosk from /persistent (image/README.md)"


def _mount_of(path: Path, mounts_file: Path) -> tuple[str, str, list[str]]:
    """(mount point, fs type, options) of the mount holding ``path`` (longest matching mount point)."""
    best: tuple[str, str, list[str]] = ("/", "unknown", [])
    resolved = str(path)
    try:
        text = mounts_file.read_text()
    except OSError:
        return best
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        point = parts[1].replace("\\040", " ")
        if (resolved == point or resolved.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[0]):
            best = (point, parts[2], parts[3].split(","))
    return best


def check_disk(settings: Settings, mounts_file: Path = Path("/proc/mounts")) -> list[Check]:
    """The spool directory: free space against ``spool.min_free_mb``, persistence, writability."""
    spool = settings.spool.directory
    checks: list[Check] = []
    existing = spool
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    usage = shutil.disk_usage(existing)
    free_mb = usage.free / 1e6
    keep = settings.spool.min_free_mb
    figures: Figures = {
        "path": str(spool), "free_mb": round(free_mb, 1), "total_mb": round(usage.total / 1e6, 1),
        "min_free_mb": keep}
    if free_mb < keep:
        checks.append(Check("disk", "spool space", Verdict.FAIL,
                            f"{free_mb:.0f} MB free on {existing}, below spool.min_free_mb = {keep} MB",
                            "free space (old logs, old messages: `kiosk messages export` then delete) "
                            "or lower spool.min_free_mb", figures))
    elif free_mb < 2 * keep:
        checks.append(Check("disk", "spool space", Verdict.WARN,
                            f"{free_mb:.0f} MB free on {existing}: less than twice spool.min_free_mb = {keep} MB",
                            "free space before the spool starts dropping the oldest messages", figures))
    else:
        checks.append(Check("disk", "spool space", Verdict.OK,
                            f"{free_mb:.0f} MB free on {existing} (keeps {keep} MB)", None, figures))

    point, fstype, options = _mount_of(existing.resolve(), mounts_file)
    mount_figures: Figures = {"mount_point": point, "fs_type": fstype}
    if fstype in ("tmpfs", "ramfs", "overlay"):
        checks.append(Check("disk", "spool persistence", Verdict.FAIL if fstype != "overlay" else Verdict.WARN,
                            f"{existing} is on {fstype} ({point}): stored messages would not survive a reboot",
                            f"put spool.directory on persistent storage; {PERSISTENT_HINT}", mount_figures))
    elif "ro" in options:
        checks.append(Check("disk", "spool persistence", Verdict.FAIL,
                            f"{point} is mounted read-only: messages cannot be stored",
                            f"give the spool a writable, persistent mount; {PERSISTENT_HINT}", mount_figures))
    else:
        checks.append(Check("disk", "spool persistence", Verdict.OK, f"on {fstype} at {point}", None, mount_figures))

    if spool.exists():
        try:
            with tempfile.NamedTemporaryFile(dir=spool, prefix=".doctor-") as probe:
                probe.write(b"x")
                probe.flush()
                os.fsync(probe.fileno())
            checks.append(Check("disk", "spool writable", Verdict.OK, f"wrote and synced a file in {spool}"))
        except OSError as error:
            checks.append(Check("disk", "spool writable", Verdict.FAIL, f"cannot write in {spool}: {error.strerror}",
                                "run as the kiosk user or root; systemd's StateDirectory=kiosk sets the owner"))
    else:
        checks.append(Check("disk", "spool writable", Verdict.WARN, f"{spool} does not exist yet",
                            "start kiosk.service once (StateDirectory= creates it) or create it for the "
                            "kiosk user"))
    return checks


def _plain_files(directory: Path) -> tuple[list[str], list[str]]:
    """(files in ``directory`` that hold a plain WAV, files that could not be read)."""
    from kiosk.fallback.spool import SEALED_SUFFIX

    plain: list[str] = []
    unreadable: list[str] = []
    try:
        paths = sorted(p for p in directory.iterdir() if p.is_file())
    except FileNotFoundError:
        return plain, unreadable
    except OSError:
        return plain, [str(directory)]
    for path in paths:
        if path.name.endswith(SEALED_SUFFIX) or path.name.startswith(".") or ".sqlite3" in path.name:
            continue
        try:
            with path.open("rb") as file:
                head = file.read(12)
        except OSError:
            unreadable.append(path.name)
            continue
        if head.startswith(b"RIFF") or path.name.endswith(".wav"):
            plain.append(path.name)
    return plain, unreadable


def security_checks(settings: Settings, credential_file: Path | None = None,
                    now: float | None = None) -> list[Check]:
    """``kiosk doctor security``'s stored-voice checks (see the module docstring).

    ``credential_file`` is where provisioning puts the delivery credential (read when the settings have none,
    as when run by hand); ``now`` (Unix seconds) is injected for tests.
    """
    import time

    from kiosk.fallback.spool import AUDIO_DIR, QUARANTINE_DIR, Spool, SpoolError
    from kiosk.settings import CREDENTIALS_DIRECTORY, MAX_AGE_DAYS

    spool_settings = settings.spool
    spool = spool_settings.directory
    credential_file = credential_file or CREDENTIALS_DIRECTORY / "delivery-credential"
    now = time.time() if now is None else now
    checks: list[Check] = []

    key = spool_settings.recipient_public_key
    if key:
        checks.append(Check("security", "message encryption", Verdict.OK,
                            f"each message is sealed to the operator's public key {key} before it is written",
                            figures={"recipient_public_key": key}))
    else:
        checks.append(Check("security", "message encryption", Verdict.WARN,
                            "spool.recipient_public_key is unset: visitors are not offered to leave a message "
                            "(a voice is never written to the card unencrypted)",
                            "make an operator key pair on the operator's machine (`kiosk messages keygen FILE`) "
                            "and set the printed spool.recipient_public_key"))

    plain, unreadable = _plain_files(spool / AUDIO_DIR)
    plain_quarantine, unreadable_quarantine = _plain_files(spool / QUARANTINE_DIR)
    figures: Figures = {"plain_in_spool": len(plain), "plain_in_quarantine": len(plain_quarantine)}
    if plain or plain_quarantine:
        fix = ("set spool.recipient_public_key and restart the service: it seals plain messages on start and "
               "deletes the plain copies" if plain else
               f"export what staff need, then delete the plain files in {spool / QUARANTINE_DIR} (retention "
               "deletes them after spool.quarantine_max_age_days)")
        checks.append(Check("security", "plain audio on the card", Verdict.FAIL,
                            f"{len(plain)} unencrypted message file(s) in {spool / AUDIO_DIR}, "
                            f"{len(plain_quarantine)} in {spool / QUARANTINE_DIR}", fix, figures))
    elif unreadable or unreadable_quarantine:
        checks.append(Check("security", "plain audio on the card", Verdict.WARN,
                            f"could not look at {len(unreadable) + len(unreadable_quarantine)} file(s) in {spool}",
                            "run kiosk doctor as root or as the kiosk user", figures))
    else:
        checks.append(Check("security", "plain audio on the card", Verdict.OK,
                            f"no unencrypted audio in {spool}", None, figures))

    retention: Figures = {"max_age_days": spool_settings.max_age_days,
                          "quarantine_max_age_days": spool_settings.quarantine_max_age_days,
                          "retention_check_seconds": spool_settings.retention_check_seconds,
                          "cap_days": MAX_AGE_DAYS}
    # A message older than its limit plus two timer periods means retention is not running.
    slack = 2 * spool_settings.retention_check_seconds
    overdue = 0
    try:
        with Spool.from_settings(spool_settings, read_only=True) as reader:
            overdue = sum(now - m.created_unix > spool_settings.max_age_days * 86400 + slack
                          for m in reader.messages() if m.state == "stored")
    except SpoolError:
        pass  # unreadable as this user: the permissions check below says so
    quarantine = spool / QUARANTINE_DIR
    with contextlib.suppress(OSError):
        overdue += sum(now - p.stat().st_mtime > spool_settings.quarantine_max_age_days * 86400 + slack
                       for p in quarantine.iterdir() if p.is_file())
    retention["overdue_files"] = overdue
    if overdue:
        checks.append(Check("security", "retention", Verdict.FAIL,
                            f"{overdue} message(s) or quarantined file(s) are past their age limit: retention is "
                            "not running", "check that kiosk.service runs (it enforces retention at start and "
                            "every spool.retention_check_seconds); journalctl -u kiosk", retention))
    else:
        checks.append(Check("security", "retention", Verdict.OK,
                            f"messages kept at most {spool_settings.max_age_days:g} days, quarantined files "
                            f"{spool_settings.quarantine_max_age_days:g} days (cap {MAX_AGE_DAYS}), enforced "
                            f"every {spool_settings.retention_check_seconds:g} s", None, retention))

    if settings.delivery.url is None:
        checks.append(Check("security", "delivery credential", Verdict.SKIP,
                            "delivery.url is unset: messages stay on the kiosk"))
    else:
        secret = settings.delivery.credential
        present = bool(secret is not None and secret.get_secret_value())
        readable = True
        if not present:
            try:
                present = bool(credential_file.read_text().strip())
            except FileNotFoundError:
                present = False
            except OSError:
                readable = False
        if present:
            checks.append(Check("security", "delivery credential", Verdict.OK, "present (not shown)"))
        elif not readable:
            checks.append(Check("security", "delivery credential", Verdict.WARN,
                                f"cannot read {credential_file} as this user", "run kiosk doctor as root"))
        else:
            checks.append(Check("security", "delivery credential", Verdict.FAIL,
                                "delivery.url is set but no delivery credential is provisioned, so nothing is "
                                "delivered", "put delivery-credential in kiosk-provision/ on the boot partition "
                                "and reboot (docs/security.md); the session API's credential is never used for "
                                "delivery"))

    loose: list[str] = []
    for directory in (spool, spool / AUDIO_DIR, spool / QUARANTINE_DIR):
        try:
            mode = directory.stat().st_mode
        except FileNotFoundError:
            continue
        if mode & 0o077:
            loose.append(f"{directory} ({mode & 0o777:o})")
    if loose:
        checks.append(Check("security", "spool permissions", Verdict.FAIL,
                            f"open to other users: {', '.join(loose)}",
                            f"chmod 0700 {spool} and its folders (kiosk.service's StateDirectoryMode=0700 and "
                            "UMask=0077 keep them so)"))
    elif spool.exists():
        checks.append(Check("security", "spool permissions", Verdict.OK, f"{spool} is private to its owner"))
    else:
        checks.append(Check("security", "spool permissions", Verdict.SKIP, f"{spool} does not exist yet"))
    return checks

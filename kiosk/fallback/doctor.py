"""``kiosk doctor disk``: the message spool's free space, persistence and writability."""

from __future__ import annotations

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

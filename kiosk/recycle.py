"""A planned restart while nobody uses the kiosk, to hand back the memory the rtc SDK keeps.

The rtc SDK keeps native memory for every room it connected to and left: about 0.45 MiB for a bare connect
and disconnect, 0.6 MiB for a kiosk session with a question and its answer (docs/field.md, "Memory").
Python's heap does not grow with sessions (tracemalloc), glibc's ``malloc_trim`` hands none of it back, and
no SDK call releases it, so a kiosk that opens hundreds of sessions a day grows without bound. Once the
process has grown ``livekit.recycle_above_mib`` since it started, the kiosk ends itself cleanly at a quiet
moment (idle or offline, nobody at the buttons or the microphone, no message being recorded or sent, for
``livekit.recycle_idle_seconds``) and systemd's ``Restart=always`` starts it again. Only under systemd
(``$NOTIFY_SOCKET``): run by hand, nobody would start it again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MIB = 1024 * 1024
STATM = Path("/proc/self/statm")


def resident_mib(statm: Path = STATM) -> float | None:
    """The resident memory of the running process in MiB (None when ``/proc`` cannot tell)."""
    try:
        resident_pages = int(statm.read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / MIB


@dataclass
class MemoryRecycle:
    """When to restart: grown ``above_mib`` over the first reading, and quiet for ``idle_seconds``."""

    above_mib: float
    idle_seconds: float
    baseline_mib: float | None = None
    quiet_since: float | None = None

    def note(self, quiet: bool, now: float) -> None:
        """Whether the kiosk is quiet at ``now`` (call on every change, and before ``due``)."""
        if not quiet:
            self.quiet_since = None
        elif self.quiet_since is None:
            self.quiet_since = now

    def due(self, now: float, resident: float | None) -> str | None:
        """Why the kiosk should restart now, or None. The first reading is the baseline."""
        if self.above_mib <= 0 or resident is None:
            return None
        if self.baseline_mib is None:
            self.baseline_mib = resident
            return None
        grown = resident - self.baseline_mib
        if grown < self.above_mib or self.quiet_since is None:
            return None
        quiet_for = now - self.quiet_since
        if quiet_for < self.idle_seconds:
            return None
        return (f"resident memory {resident:.0f} MiB, {grown:.0f} MiB over the start "
                f"(livekit.recycle_above_mib {self.above_mib:.0f}); nobody has used the kiosk for {quiet_for:.0f} s")

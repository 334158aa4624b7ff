"""Which slot and image version a kiosk runs, what waits for a trial, and how the last trial ended.

For ``kiosk update status`` and the metrics. Read without root and without RAUC (everything is world-readable):

- the booted slot (A or B): the firmware's ``/proc/device-tree/chosen/bootloader/partition``;
- the committed slot: ``/bootfs/autoboot.txt`` (``[all] boot_partition``);
- the image version of the running slot: ``/usr/share/kiosk/image-version`` (the image build writes
  ``IGconf_kiosk_version`` there; it is on the read-only root, so it is the running slot's own);
- the slot waiting for its trial and the slots marked bad: the tryboot backend's
  ``/persistent/rauc/kiosk-tryboot.json``;
- the last trial: the gate's ``/persistent/rauc/kiosk-gate.json`` (slot, image version, action: ``commit``,
  ``roll_back`` or ``return``, the reasons, the checks' outcomes, times).

``last_rolled_back`` is True when the last trial ended in anything but a commit; a trial that crashed before the
gate decided shows as an installation still waiting (``pending_slot``) while the committed slot runs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiosk.update.tryboot import (
    SlotState,
    TrybootError,
    effective,
    read_autoboot,
    read_firmware,
    read_state,
)

IMAGE_VERSION = "usr/share/kiosk/image-version"
MAX_VERSION_BYTES = 128
MAX_RECORD_BYTES = 64 * 1024


def read_image_version(root: Path = Path("/")) -> str | None:
    """The running image's version (first line of ``/usr/share/kiosk/image-version``), None when absent."""
    try:
        with (root / IMAGE_VERSION).open("rb") as handle:
            text = handle.read(MAX_VERSION_BYTES).decode("ascii", errors="replace")
    except OSError:
        return None
    first = text.splitlines()[0].strip() if text.strip() else ""
    return first or None


@dataclass
class UpdateStatus:
    """The update state of this kiosk (None: not known here, e.g. not the A/B image)."""

    slot: str | None = None
    committed_slot: str | None = None
    trial: bool = False  # running a slot that is not (yet) committed
    image_version: str | None = None
    pending_slot: str | None = None
    bad_slots: list[str] = field(default_factory=list)
    last_trial: dict[str, Any] | None = None
    last_rolled_back: bool | None = None
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Plain data."""
        return asdict(self)


def read_record(path: Path) -> dict[str, Any] | None:
    """The gate's record (None when there is none or it is unreadable)."""
    try:
        with path.open("rb") as handle:
            data = json.loads(handle.read(MAX_RECORD_BYTES))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("version") != 1:
        return None
    keep = ("slot", "image_version", "action", "reasons", "kiosk_ready", "doctor", "voice", "started_unix",
            "finished_unix", "tryboot_flag", "marked")
    return {key: data.get(key) for key in keep}


def read_status(root: Path = Path("/")) -> UpdateStatus:
    """Everything above, each part independently (a missing part is a problem line, not an exception)."""
    from kiosk.update.gate import RECORD

    status = UpdateStatus(image_version=read_image_version(root))
    firmware = read_firmware(root)
    status.slot = firmware.booted
    try:
        autoboot = read_autoboot(root)
    except TrybootError as error:
        status.problems.append(error.message)
        return status
    status.committed_slot = autoboot.committed_slot
    status.trial = status.slot is not None and status.slot != autoboot.committed_slot
    try:
        state = effective(read_state(root), autoboot)
    except TrybootError as error:
        status.problems.append(error.message)
        state = SlotState()
    status.pending_slot = state.pending
    status.bad_slots = sorted(state.bad)
    status.last_trial = read_record(root / RECORD)
    if status.last_trial is not None and status.last_trial.get("action") not in (None, "deciding"):
        status.last_rolled_back = status.last_trial.get("action") != "commit"
    return status


def format_status(status: UpdateStatus) -> str:
    """The readable form (``kiosk update status``)."""
    lines = [f"slot: {status.slot or 'unknown'} (committed: {status.committed_slot or 'unknown'}"
             + (", THIS BOOT IS A TRIAL" if status.trial else "") + ")",
             f"image version: {status.image_version or 'unknown'}"]
    if status.pending_slot:
        lines.append(f"installed, waiting for its trial: slot {status.pending_slot} "
                     "(reboot \"0 tryboot\" to try it)")
    if status.bad_slots:
        lines.append(f"marked bad: {', '.join(status.bad_slots)}")
    last = status.last_trial
    if last:
        lines.append(f"last trial: slot {last.get('slot')} (image {last.get('image_version') or '?'}): "
                     f"{last.get('action')}")
        lines += [f"  - {reason}" for reason in last.get("reasons") or []]
    lines += [f"note: {problem}" for problem in status.problems]
    return "\n".join(lines) + "\n"

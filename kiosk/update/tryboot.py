"""RAUC's custom bootloader backend for the Raspberry Pi's ``tryboot`` (``autoboot.txt``).

The image (rpi-image-gen's A/B layout) has two slots, A and B, each a boot partition (FAT, partitions 2 and 3)
and a system partition; the firmware chooses the boot partition from ``autoboot.txt`` on the small boot
configuration partition (``/bootfs``)::

    [all]
    tryboot_a_b=1
    boot_partition=2        <- the committed slot: every normal boot, and every reset
    [tryboot]
    boot_partition=3        <- the other slot: only the one boot after ``reboot "0 tryboot"``

The tryboot flag is cleared by the firmware as it boots, so the trial is exactly one boot: a crash, a hang
(the hardware watchdog resets the Pi), a power cut or a plain reboot returns to the committed slot. Nothing
counts attempts. A slot becomes the committed one only when this backend rewrites ``[all]`` (on ``set-state
<booted> good`` during its trial, i.e. ``rauc status mark-good`` from the health gate).

RAUC calls the backend as ``BACKEND get-primary | set-primary SLOT | get-state SLOT | set-state SLOT good|bad |
get-current`` (its "custom" bootloader interface) and reads one word from stdout; exit status 0 on success.
Here:

- ``get-primary``: the slot the next boot is meant to run: the slot installed and waiting for its trial, else
  the committed one.
- ``set-primary SLOT`` (RAUC, after installing into SLOT): SLOT waits for its trial (``[tryboot]`` points at
  it); ``[all]`` is not touched, so only ``reboot "0 tryboot"`` boots it. SLOT = the committed slot cancels
  a waiting trial.
- ``get-state`` / ``set-state``: ``bad`` slots are recorded in the backend's state file; ``set-state B good``
  while B runs its trial commits it (``autoboot.txt``'s two partitions swap), ``set-state B bad`` drops a
  waiting trial of B.
- ``get-current`` (RAUC >= 1.11 asks): the slot the firmware booted (``/proc/device-tree/chosen/bootloader/
  partition``). Older RAUC finds it from ``root=`` on the kernel command line, which the image points at
  ``/dev/disk/by-slot/active/system``.

State (``/persistent/rauc/kiosk-tryboot.json``, next to RAUC's own status on the persistent partition that
both slots share): the slot waiting for its trial and the slots marked bad. Every file is written durably
(temporary file, fsync, rename, fsync of the directory); ``autoboot.txt`` is written only on a commit.

Run as root by RAUC through ``/usr/lib/kiosk/rauc-tryboot-backend`` (``python -I -m kiosk.update.tryboot``);
standard library only. ``--root DIR`` (tests) reads and writes under DIR instead of ``/``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from kiosk.errors import KioskError

# Paths relative to the root (``--root`` in tests, ``/`` on a kiosk).
AUTOBOOT = "bootfs/autoboot.txt"
STATE_DIR = "persistent/rauc"
STATE = "persistent/rauc/kiosk-tryboot.json"
DEVICE_TREE = "proc/device-tree/chosen/bootloader"

# The A/B layout of rpi-image-gen's image-rota: bootconfig (1), boot_a (2), boot_b (3), system_a (4), ...
SLOT_PARTITIONS: dict[str, int] = {"A": 2, "B": 3}
PARTITION_SLOTS: dict[int, str] = {p: s for s, p in SLOT_PARTITIONS.items()}
MAX_AUTOBOOT_BYTES = 512  # the firmware reads no more of autoboot.txt
MAX_STATE_BYTES = 4096
STATE_MODE = 0o644  # nothing secret: the kiosk reads it for its status
AUTOBOOT_MODE = 0o644

_SECTION = re.compile(r"\[(?P<name>[a-z_]+)\]")
_SETTING = re.compile(r"(?P<key>[a-z_]+)=(?P<value>[0-9]+)")
_SECTIONS = ("all", "tryboot")
_KEYS = {"all": ("tryboot_a_b", "boot_partition"), "tryboot": ("boot_partition",)}


class TrybootError(KioskError):
    """The backend cannot answer or act; the message names the file or argument and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__("tryboot", message)


# ------------------------------------------------------------------------------------------ autoboot.txt
@dataclass(frozen=True)
class Autoboot:
    """``autoboot.txt``: the committed boot partition (``[all]``) and the trial one (``[tryboot]``)."""

    committed: int
    trial: int

    @property
    def committed_slot(self) -> str:
        """The committed slot's name (A or B)."""
        return PARTITION_SLOTS[self.committed]

    @property
    def trial_slot(self) -> str:
        """The slot a tryboot boots."""
        return PARTITION_SLOTS[self.trial]


def parse_autoboot(data: bytes) -> Autoboot:
    """Parse ``autoboot.txt`` strictly: the two sections, their keys, the two slots' partitions.

    Anything else (another key, filter or partition) raises ``TrybootError``: the backend rewrites the file on a
    commit and must never drop a line it does not understand.
    """
    if len(data) > MAX_AUTOBOOT_BYTES:
        raise TrybootError(f"{AUTOBOOT} has {len(data)} bytes; the firmware reads only {MAX_AUTOBOOT_BYTES}")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise TrybootError(f"{AUTOBOOT} is not plain ASCII; restore it (docs/fleet.md, 'When the card does not "
                           "boot')") from None
    values: dict[str, dict[str, int]] = {}
    section: str | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        heading = _SECTION.fullmatch(line)
        if heading:
            section = heading["name"]
            if section not in _SECTIONS:
                raise TrybootError(f"{AUTOBOOT} line {number}: filter [{section}] is not one this backend "
                                   "rewrites faithfully ([all], [tryboot])")
            values.setdefault(section, {})
            continue
        setting = _SETTING.fullmatch(line)
        if setting is None or section is None:
            raise TrybootError(f"{AUTOBOOT} line {number}: expected [all], [tryboot] or key=number, got {line!r}")
        key = setting["key"]
        if key not in _KEYS[section]:
            raise TrybootError(f"{AUTOBOOT} line {number}: {key} in [{section}] is not one this backend rewrites "
                               "faithfully")
        if key in values[section]:
            raise TrybootError(f"{AUTOBOOT} line {number}: {key} is set twice in [{section}]")
        values[section][key] = int(setting["value"])
    everywhere = values.get("all", {})
    if everywhere.get("tryboot_a_b") != 1:
        raise TrybootError(f"{AUTOBOOT}: [all] needs tryboot_a_b=1 (A/B switching by partition)")
    committed = everywhere.get("boot_partition")
    trial = values.get("tryboot", {}).get("boot_partition")
    slots = sorted(PARTITION_SLOTS)
    if committed not in PARTITION_SLOTS or trial not in PARTITION_SLOTS or committed == trial:
        raise TrybootError(f"{AUTOBOOT}: [all] and [tryboot] must name the two slots' boot partitions "
                           f"({slots[0]} and {slots[1]}), one each; found {committed} and {trial}")
    return Autoboot(committed=committed, trial=trial)


def render_autoboot(autoboot: Autoboot) -> bytes:
    """The canonical ``autoboot.txt`` (what the image's build writes, partitions swapped as needed)."""
    text = (f"[all]\ntryboot_a_b=1\nboot_partition={autoboot.committed}\n"
            f"[tryboot]\nboot_partition={autoboot.trial}\n")
    return text.encode("ascii")


# -------------------------------------------------------------------------------------------- the state
@dataclass(frozen=True)
class SlotState:
    """The backend's own record: the slot waiting for its trial, and the slots marked bad."""

    pending: str | None = None
    bad: frozenset[str] = field(default_factory=frozenset)


def parse_state(data: bytes) -> SlotState:
    """The state file (JSON); ``TrybootError`` when it is not one this backend wrote."""
    if len(data) > MAX_STATE_BYTES:
        raise TrybootError(f"{STATE} is larger than {MAX_STATE_BYTES} bytes: not written by this backend")
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise TrybootError(f"{STATE} is not JSON: remove it (the slots' states start over as good)") from None
    if not isinstance(raw, dict) or raw.get("version") != 1:
        raise TrybootError(f"{STATE}: unknown format; remove it (the slots' states start over as good)")
    pending = raw.get("pending")
    bad = raw.get("bad", [])
    if (pending is not None and pending not in SLOT_PARTITIONS) or not isinstance(bad, list) \
            or not all(isinstance(s, str) and s in SLOT_PARTITIONS for s in bad):
        raise TrybootError(f"{STATE}: names a slot other than {' and '.join(SLOT_PARTITIONS)}; remove it")
    return SlotState(pending=pending, bad=frozenset(bad))


def render_state(state: SlotState) -> bytes:
    """The state file's JSON."""
    data = {"version": 1, "pending": state.pending, "bad": sorted(state.bad)}
    return (json.dumps(data) + "\n").encode("ascii")


# ------------------------------------------------------------------------------------------ the commands
@dataclass(frozen=True)
class Reply:
    """What a command prints, and what it changes (None: unchanged)."""

    output: str | None = None
    autoboot: Autoboot | None = None
    state: SlotState | None = None


def _slot(name: str) -> str:
    if name not in SLOT_PARTITIONS:
        raise TrybootError(f"unknown slot '{name}': the bootnames in /etc/rauc/system.conf are "
                           f"{' and '.join(SLOT_PARTITIONS)}")
    return name


def effective(state: SlotState, autoboot: Autoboot) -> SlotState:
    """A waiting trial of the committed slot is no trial (a commit interrupted between its two writes)."""
    if state.pending == autoboot.committed_slot:
        return replace(state, pending=None)
    return state


def handle(argv: Sequence[str], autoboot: Autoboot, state: SlotState, booted: str | None) -> Reply:
    """One call of RAUC's custom backend interface, without I/O (``booted``: the slot the firmware booted)."""
    state = effective(state, autoboot)
    command, *args = argv if argv else ("",)
    expected = {"get-primary": 0, "set-primary": 1, "get-state": 1, "set-state": 2, "get-current": 0}
    if command not in expected:
        raise TrybootError(f"unknown command '{command}': expected one of {', '.join(expected)}")
    if len(args) != expected[command]:
        raise TrybootError(f"{command} takes {expected[command]} argument(s), got {len(args)}")
    if command == "get-primary":
        waiting = state.pending is not None and state.pending not in state.bad
        return Reply(output=state.pending if waiting else autoboot.committed_slot)
    if command == "get-current":
        if booted is None:
            raise TrybootError(f"the booted partition is not known (/{DEVICE_TREE}/partition): not a Raspberry Pi "
                               "booted by its firmware")
        return Reply(output=booted)
    slot = _slot(args[0])
    if command == "get-state":
        return Reply(output="bad" if slot in state.bad else "good")
    if command == "set-primary":
        if slot == autoboot.committed_slot:
            # Back to the committed slot: nothing waits for a trial any more.
            return Reply(state=SlotState(pending=None, bad=state.bad - {slot}))
        return Reply(autoboot=Autoboot(committed=autoboot.committed, trial=SLOT_PARTITIONS[slot]),
                     state=SlotState(pending=slot, bad=state.bad - {slot}))
    verdict = args[1]
    if verdict == "bad":
        return Reply(state=SlotState(pending=None if state.pending == slot else state.pending,
                                     bad=state.bad | {slot}))
    if verdict != "good":
        raise TrybootError(f"set-state {slot} {verdict}: the state is good or bad")
    if slot == booted and slot != autoboot.committed_slot:
        # The trial passed: this slot becomes the committed one, the old one the next trial's target.
        return Reply(autoboot=Autoboot(committed=SLOT_PARTITIONS[slot], trial=autoboot.committed),
                     state=SlotState(pending=None, bad=state.bad - {slot}))
    return Reply(state=SlotState(pending=state.pending, bad=state.bad - {slot}))


# ------------------------------------------------------------------------------------------------ I/O
def read_u32(path: Path) -> int | None:
    """A big-endian 32-bit device-tree cell (what the firmware writes under chosen/bootloader); None if absent."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return int.from_bytes(data[:4], "big") if len(data) >= 4 else None


@dataclass(frozen=True)
class Firmware:
    """What the firmware says about this boot (``/proc/device-tree/chosen/bootloader``)."""

    partition: int | None
    tryboot: bool | None

    @property
    def booted(self) -> str | None:
        """The booted slot (A or B), None when the partition is not one of the slots' or not known."""
        return PARTITION_SLOTS.get(self.partition) if self.partition is not None else None


def read_firmware(root: Path) -> Firmware:
    """The booted partition and the tryboot flag from the device tree."""
    base = root / DEVICE_TREE
    tryboot = read_u32(base / "tryboot")
    return Firmware(partition=read_u32(base / "partition"), tryboot=None if tryboot is None else tryboot == 1)


def read_autoboot(root: Path) -> Autoboot:
    """Read and parse ``autoboot.txt`` under ``root``."""
    path = root / AUTOBOOT
    try:
        return parse_autoboot(path.read_bytes()[:MAX_AUTOBOOT_BYTES + 1])
    except FileNotFoundError:
        raise TrybootError(f"no {path}: the A/B image's boot configuration partition is not mounted at /bootfs, "
                           "or this is not the A/B image") from None
    except OSError as error:
        raise TrybootError(f"cannot read {path}: {error.strerror}") from None


def read_state(root: Path) -> SlotState:
    """Read the state file (none yet: nothing waits, nothing is bad)."""
    path = root / STATE
    try:
        return parse_state(path.read_bytes()[:MAX_STATE_BYTES + 1])
    except FileNotFoundError:
        return SlotState()
    except OSError as error:
        raise TrybootError(f"cannot read {path}: {error.strerror}") from None


def run(argv: Sequence[str], root: Path = Path("/")) -> str | None:
    """Run one command under ``root``: read, decide (``handle``), write what changed; return the output."""
    from kiosk.provision import write_durably

    autoboot = read_autoboot(root)
    state = read_state(root)
    reply = handle(argv, autoboot, state, read_firmware(root).booted)
    try:
        if reply.autoboot is not None and reply.autoboot != autoboot:
            # The firmware's truth first: a crash before the state file is written is repaired by ``effective``.
            write_durably(root / AUTOBOOT, render_autoboot(reply.autoboot), AUTOBOOT_MODE)
        if reply.state is not None and reply.state != effective(state, autoboot):
            (root / STATE_DIR).mkdir(parents=True, exist_ok=True)
            write_durably(root / STATE, render_state(reply.state), STATE_MODE)
    except OSError as error:
        raise TrybootError(f"cannot write {error.filename}: {error.strerror}") from None
    return reply.output


def main(argv: Sequence[str] | None = None) -> int:
    """``python -I -m kiosk.update.tryboot [--root DIR] COMMAND [ARGS]`` (RAUC's custom backend)."""
    parser = argparse.ArgumentParser(prog="rauc-tryboot-backend", description=__doc__.splitlines()[0] if __doc__
                                     else None)
    parser.add_argument("--root", type=Path, default=Path("/"), help="work under this root (tests)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="get-primary | set-primary SLOT | get-state SLOT "
                        "| set-state SLOT good|bad | get-current")
    args = parser.parse_args(argv)
    try:
        output = run(args.command, args.root)
    except TrybootError as error:
        print(f"rauc-tryboot-backend: {error.message}", file=sys.stderr)
        return 1
    if output is not None:
        print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())

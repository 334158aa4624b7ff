"""The Pi's wheelhouse: every locked package for the target, downloaded once, hash-checked, for an offline install.

``scripts/wheelhouse [--dest DIR]`` (this module) reads ``requirements/kiosk.lock`` and ``requirements/build.lock``,
keeps the pins whose markers hold on the target (Raspberry Pi OS Trixie: CPython 3.13, aarch64, glibc 2.41),
and downloads them with ``pip download --require-hashes``: binary wheels for that platform only
(``--only-binary=:all:``, every manylinux tag the target's glibc runs), and the source of the packages that have
no Linux wheel (``SOURCE_ONLY``: PyAudio, built in the target against portaudio19-dev by image/install-kiosk.sh).
A pinned package without a wheel for the target fails here, on the build machine, not on build day of the image.
``LOCKS.sha256`` records which locks the wheelhouse was made from; install-kiosk.sh refuses a stale one.

The markers are evaluated here for the target (pip would evaluate them for the machine it runs on).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ("requirements/kiosk.lock", "requirements/build.lock")
DEFAULT_DEST = "out/wheelhouse-cp313-aarch64"
# No wheels for Linux on the index: built from the locked, hash-checked source in the target.
SOURCE_ONLY = frozenset({"pyaudio"})

# Raspberry Pi OS Trixie on a Pi 4/5 (64-bit).
TARGET_PYTHON = "3.13"
TARGET_GLIBC = (2, 41)
TARGET_MACHINE = "aarch64"


class LockError(ValueError):
    """A lock file line is not an exact, hashed pin."""


@dataclass(frozen=True)
class Pin:
    """One locked requirement: ``name==version ; marker`` with the SHA-256 of each acceptable file."""

    name: str  # canonical
    version: str
    marker: str | None
    hashes: tuple[str, ...]

    def line(self) -> str:
        """The requirement line pip reads (no marker: already decided for the target)."""
        return f"{self.name}=={self.version} " + " ".join(f"--hash={h}" for h in self.hashes)


def parse_lock(text: str) -> list[Pin]:
    """The pins of a ``--generate-hashes`` lock file; every line must be ``name==version`` with hashes."""
    pins: list[Pin] = []
    for number, line in enumerate(text.replace("\\\n", " ").splitlines(), start=1):
        body = line.strip()
        if not body or body.startswith("#"):
            continue
        if body.startswith("-"):
            raise LockError(f"line {number}: options and editable installs do not belong in a lock: {body[:60]}")
        requirement_text, *hash_parts = body.split(" --hash=")
        try:
            requirement = Requirement(requirement_text.strip())
        except InvalidRequirement as error:
            raise LockError(f"line {number}: {error}") from None
        specifiers = list(requirement.specifier)
        if len(specifiers) != 1 or specifiers[0].operator != "==" or requirement.url:
            raise LockError(f"line {number}: {requirement.name} is not pinned with ==")
        hashes = tuple(h.split()[0] for h in hash_parts)
        if not hashes or not all(h.startswith("sha256:") and len(h) == 71 for h in hashes):
            raise LockError(f"line {number}: {requirement.name} has no sha256 hash")
        pins.append(Pin(canonicalize_name(requirement.name), specifiers[0].version,
                        str(requirement.marker) if requirement.marker else None, hashes))
    return pins


def target_environment(python: str = TARGET_PYTHON, machine: str = TARGET_MACHINE) -> dict[str, str]:
    """The marker environment of CPython ``python`` on Linux ``machine``."""
    return {"implementation_name": "cpython", "implementation_version": f"{python}.0", "os_name": "posix",
            "platform_machine": machine, "platform_python_implementation": "CPython", "platform_release": "",
            "platform_system": "Linux", "platform_version": "", "python_full_version": f"{python}.0",
            "python_version": python, "sys_platform": "linux"}


def for_target(pins: Sequence[Pin], environment: Mapping[str, str]) -> list[Pin]:
    """The pins whose markers hold in ``environment`` (one per package, or ``LockError``)."""
    chosen: dict[str, Pin] = {}
    for pin in pins:
        if pin.marker is not None and not Marker(pin.marker).evaluate(dict(environment)):
            continue
        if pin.name in chosen and chosen[pin.name].version != pin.version:
            raise LockError(f"{pin.name} is pinned at both {chosen[pin.name].version} and {pin.version} for "
                            "this target")
        chosen[pin.name] = pin
    return sorted(chosen.values(), key=lambda p: p.name)


def manylinux_platforms(glibc: tuple[int, int] = TARGET_GLIBC, machine: str = TARGET_MACHINE) -> list[str]:
    """Every manylinux tag a glibc ``glibc`` system runs (pip's --platform takes them one by one)."""
    major, top = glibc
    return ["manylinux2014_" + machine, *(f"manylinux_{major}_{minor}_{machine}" for minor in range(17, top + 1))]


def _distribution(filename: str) -> tuple[str, str] | None:
    try:
        if filename.endswith(".whl"):
            name, version, *_ = parse_wheel_filename(filename)
        else:
            name, version = parse_sdist_filename(filename)
    except (InvalidWheelFilename, InvalidSdistFilename):
        return None
    return str(name), str(version)


def missing(pins: Sequence[Pin], directory: Path) -> list[str]:
    """The pins with no file of that name and version in ``directory``."""
    present = {d for f in directory.iterdir() if (d := _distribution(f.name)) is not None}
    return [f"{p.name}=={p.version}" for p in pins if (p.name, p.version) not in present]


def build(dest: Path, root: Path = ROOT, python: str = TARGET_PYTHON, glibc: tuple[int, int] = TARGET_GLIBC,
          machine: str = TARGET_MACHINE, pip: Sequence[str] = (sys.executable, "-m", "pip")) -> list[Pin]:
    """Download every locked package for the target into ``dest``; return the pins."""
    pins: list[Pin] = []
    for lock in LOCKS:
        pins += parse_lock((root / lock).read_text())
    wanted = for_target(pins, target_environment(python, machine))
    dest.mkdir(parents=True, exist_ok=True)
    binary = [p for p in wanted if p.name not in SOURCE_ONLY]
    source = [p for p in wanted if p.name in SOURCE_ONLY]
    common = [*pip, "download", "--no-deps", "--require-hashes", "--disable-pip-version-check", "--dest", str(dest)]
    requirements = dest / ".requirements-binary.txt"
    requirements.write_text("\n".join(p.line() for p in binary) + "\n")
    platforms = [arg for tag in manylinux_platforms(glibc, machine) for arg in ("--platform", tag)]
    abi = python.replace(".", "")
    subprocess.run([*common, "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
                    "--abi", f"cp{abi}", "--abi", "abi3", "--abi", "none", *platforms, "-r", str(requirements)],
                   check=True)
    if source:
        requirements = dest / ".requirements-source.txt"
        requirements.write_text("\n".join(p.line() for p in source) + "\n")
        subprocess.run([*common, "--no-binary=:all:", "--no-build-isolation", "-r", str(requirements)], check=True)
    lost = missing(wanted, dest)
    if lost:
        raise LockError(f"no file for the target in {dest} for: {', '.join(lost)}")
    record = "".join(f"{hashlib.sha256((root / lock).read_bytes()).hexdigest()}  {lock}\n" for lock in LOCKS)
    (dest / "LOCKS.sha256").write_text(record)
    return wanted


def main(argv: Sequence[str] | None = None) -> int:
    """``scripts/wheelhouse``."""
    parser = argparse.ArgumentParser(prog="scripts/wheelhouse", description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--dest", type=Path, default=ROOT / DEFAULT_DEST, help=f"where (default {DEFAULT_DEST})")
    parser.add_argument("--python", default=TARGET_PYTHON, help="the target's Python (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        pins = build(args.dest, python=args.python)
    except (LockError, subprocess.CalledProcessError) as error:
        print(f"wheelhouse: {error}", file=sys.stderr)
        return 1
    print(f"wheelhouse: {len(pins)} packages for CPython {args.python} on {TARGET_MACHINE} in {args.dest}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

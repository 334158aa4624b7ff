"""Provisioning from the card's boot partition: open on the first boot, operator-signed bundles after that.

An installer puts a *bundle* on the boot partition (the FAT partition any laptop shows), in a folder
``kiosk-provision/``:

    device-credential   the device credential (one line)
    delivery-credential the message endpoint's own credential (one line; optional)
    kiosk.toml          the site config (optional)
    kiosk.env           extra environment for kiosk.service: ``KIOSK_*=value`` lines only (optional)
    manifest            what the operator signed: a serial number and the SHA-256 of each file above
    manifest.sig        the operator's ed25519 signature of ``manifest`` (base64)

``kiosk-provision.service`` runs ``python -I -m kiosk.provision apply`` as root before the kiosk starts:

- **First boot** (no marker ``/etc/kiosk/provisioned`` and no identity installed yet): the card is still in
  the installer's hands, so an unsigned bundle is accepted. Whatever happens, the first boot closes that
  window: the marker is written, and every later bundle must be signed.
- **Later boots**: only a bundle whose ``manifest`` carries a valid signature by the operator's key
  (``/usr/share/kiosk/operator-key.pub``, put there by the image build) and a serial above the last one
  accepted (no replay of an older bundle); every file must match its SHA-256 and nothing unlisted may be there.
- ``kiosk.env`` may hold only ``KIOSK_[A-Z0-9_]+=value`` lines (no ``PYTHONPATH``, ``LD_PRELOAD``, no
  ``KIOSK_CONFIG``, no credential; values without quotes, backslashes, ``$`` or control characters); it is
  installed normalised, one ``NAME=value`` per line.
- The site config (with the bundle's environment) is validated by the kiosk's own settings loader, run as
  the ``kiosk`` user in a separate process (``check-config``): the root process never imports the settings
  code, and never parses the config itself.
- A bundle is applied whole or not at all. An accepted one is installed durably into ``/etc/kiosk``
  (``kiosk.toml`` and ``kiosk.env`` 0640 root:kiosk, the credential 0600 root in a 0700 directory) and
  removed from the card (the credential shredded first, as far as FAT allows). A rejected one stays on the
  card as ``kiosk-provision.rejected/`` (its credential removed), with the reasons in ``kiosk-provision.txt``.
- When no site config is installed, the image's default (``/usr/share/kiosk/kiosk.toml.default``) is.

The operator signs with ``kiosk bundle sign`` (the development tools, ``kiosk_dev.bundle``), on their own
machine: the private key never touches a kiosk. ``security_checks`` reports the state for
``kiosk doctor security``. This module imports only the standard library and PyNaCl, because it runs as root.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kiosk.checks import Check, Verdict
from kiosk.errors import KioskError

if TYPE_CHECKING:
    from kiosk.settings import Settings

_LOGGER = logging.getLogger("kiosk.provision")  # also when run as __main__

BUNDLE_DIR = "kiosk-provision"
REJECTED_DIR = "kiosk-provision.rejected"
REPORT_NAME = "kiosk-provision.txt"
CREDENTIAL_NAME = "device-credential"  # the session API's
DELIVERY_CREDENTIAL_NAME = "delivery-credential"  # the message endpoint's own (optional)
CREDENTIAL_NAMES = (CREDENTIAL_NAME, DELIVERY_CREDENTIAL_NAME)
CONFIG_NAME = "kiosk.toml"
ENV_NAME = "kiosk.env"
MANIFEST_NAME = "manifest"
SIGNATURE_NAME = "manifest.sig"
PAYLOAD_NAMES = (*CREDENTIAL_NAMES, CONFIG_NAME, ENV_NAME)
MANIFEST_HEADER = "kiosk-provision-bundle 1"

# Paths relative to the root (``--root`` in tests; ``/`` on a kiosk).
BOOT_DIRS = ("bootfs", "boot/firmware")  # the A/B image's boot metadata partition, the classic boot partition
ETC_DIR = "etc/kiosk"
CREDENTIALS_DIR = "etc/kiosk/credentials"
MARKER = "etc/kiosk/provisioned"
OPERATOR_KEY = "usr/share/kiosk/operator-key.pub"
DEFAULT_CONFIG = "usr/share/kiosk/kiosk.toml.default"
SERVICE_USER = "kiosk"

CONFIG_MODE = 0o640  # root:kiosk: the kiosk reads its config, cannot change it; nobody else reads it
CREDENTIAL_MODE = 0o600  # root only: systemd hands the kiosk a copy (LoadCredential=)
CREDENTIALS_DIR_MODE = 0o700
ETC_DIR_MODE = 0o750
MARKER_MODE = 0o644
MAX_FILE_BYTES = 64 * 1024
MAX_CREDENTIAL_BYTES = 4096
VALIDATE_TIMEOUT_SECONDS = 120.0

_ENV_LINE = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*=(?P<value>.*)")
_ENV_NAME = re.compile(r"KIOSK_[A-Z0-9_]+")
# systemd's EnvironmentFile= gives quotes, backslashes (also line continuations) meaning; $ and ` are
# refused so that no reader ever expands anything.
_ENV_VALUE = re.compile(r"[^\x00-\x1f\x7f\"'\\`$]*")
_CREDENTIAL = re.compile(r"[\x21-\x7e]+")
_MANIFEST_FILE = re.compile(r"sha256 (?P<digest>[0-9a-f]{64}) (?P<name>\S+)")
_MANIFEST_SERIAL = re.compile(r"serial (?P<serial>[1-9][0-9]{0,17})")


class BundleRejected(KioskError):
    """A provisioning bundle cannot be applied; the message says why and how to fix it."""

    def __init__(self, message: str) -> None:
        super().__init__("bundle_rejected", message)


class ProvisionError(KioskError):
    """Provisioning cannot run at all (no service user, /etc/kiosk not writable)."""

    def __init__(self, message: str) -> None:
        super().__init__("provision_failed", message)


# ------------------------------------------------------------------------------------------ the bundle
@dataclass(frozen=True)
class Manifest:
    """What the operator signed: a serial number (above the last one accepted) and each file's SHA-256."""

    serial: int
    files: dict[str, str]  # name -> lowercase hex SHA-256


def sha256_hex(data: bytes) -> str:
    """The lowercase hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def build_manifest(files: Mapping[str, bytes], serial: int) -> bytes:
    """The canonical manifest for ``files`` (name -> content): what ``kiosk bundle sign`` signs."""
    if serial < 1:
        raise BundleRejected(f"serial {serial}: a bundle's serial is a whole number from 1 up")
    unknown = sorted(set(files) - set(PAYLOAD_NAMES))
    if unknown or not files:
        raise BundleRejected(f"a bundle holds one or more of {', '.join(PAYLOAD_NAMES)}; got {sorted(files)}")
    lines = [MANIFEST_HEADER, f"serial {serial}"]
    lines += [f"sha256 {sha256_hex(files[name])} {name}" for name in sorted(files)]
    return ("\n".join(lines) + "\n").encode("ascii")


def parse_manifest(data: bytes) -> Manifest:
    """Parse a manifest strictly (the exact form ``build_manifest`` writes); ``BundleRejected`` otherwise."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise BundleRejected("manifest: not plain ASCII; write it with `kiosk bundle sign`") from None
    if not text.endswith("\n") or "\r" in text:
        raise BundleRejected("manifest: lines must end in a single newline; write it with `kiosk bundle sign`")
    lines = text[:-1].split("\n")
    if lines[0] != MANIFEST_HEADER:
        raise BundleRejected(f"manifest: the first line must be '{MANIFEST_HEADER}'")
    serial_match = _MANIFEST_SERIAL.fullmatch(lines[1]) if len(lines) > 1 else None
    if serial_match is None:
        raise BundleRejected("manifest: the second line must be 'serial N' (N a whole number from 1 up)")
    files: dict[str, str] = {}
    for number, line in enumerate(lines[2:], start=3):
        match = _MANIFEST_FILE.fullmatch(line)
        if match is None:
            raise BundleRejected(f"manifest line {number}: expected 'sha256 <64 hex digits> <file name>'")
        name = match["name"]
        if name not in PAYLOAD_NAMES:
            raise BundleRejected(f"manifest line {number}: '{name}' is not a bundle file "
                                 f"({', '.join(PAYLOAD_NAMES)})")
        if name in files:
            raise BundleRejected(f"manifest line {number}: '{name}' is listed twice")
        files[name] = match["digest"]
    if not files:
        raise BundleRejected("manifest: lists no file")
    return Manifest(int(serial_match["serial"]), files)


def decode_public_key(text: str) -> bytes:
    """An ed25519 public key written as base64 (32 bytes), comment lines (#) allowed."""
    body = "".join(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    try:
        key = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise BundleRejected("the operator key is not base64; write it with `kiosk bundle keygen`") from None
    if len(key) != 32:
        raise BundleRejected(f"the operator key has {len(key)} bytes, an ed25519 public key has 32")
    return key


def verify_signature(manifest: bytes, signature_text: bytes, public_key: bytes) -> None:
    """Check the operator's ed25519 signature over the manifest's exact bytes (PyNaCl/libsodium)."""
    from nacl.exceptions import BadSignatureError
    from nacl.signing import VerifyKey

    try:
        signature = base64.b64decode(signature_text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise BundleRejected(f"{SIGNATURE_NAME}: not base64; write it with `kiosk bundle sign`") from None
    if len(signature) != 64:
        raise BundleRejected(f"{SIGNATURE_NAME}: {len(signature)} bytes, an ed25519 signature has 64")
    try:
        VerifyKey(public_key).verify(manifest, signature)
    except BadSignatureError:
        raise BundleRejected("the signature does not match: the bundle was changed after signing, or signed "
                             "with another key than this kiosk's operator key; sign it again with "
                             "`kiosk bundle sign`") from None


def verify_bundle(contents: Mapping[str, bytes], public_key: bytes) -> Manifest:
    """A signed bundle's checks: the signature over the manifest, then each listed file's SHA-256.

    The files present must be exactly the ones the manifest lists (nothing added, nothing left out).
    """
    if MANIFEST_NAME not in contents or SIGNATURE_NAME not in contents:
        raise BundleRejected(f"a signed bundle needs both {MANIFEST_NAME} and {SIGNATURE_NAME}")
    verify_signature(contents[MANIFEST_NAME], contents[SIGNATURE_NAME], public_key)
    manifest = parse_manifest(contents[MANIFEST_NAME])
    payload = {name: data for name, data in contents.items() if name in PAYLOAD_NAMES}
    if set(payload) != set(manifest.files):
        raise BundleRejected(f"the files ({', '.join(sorted(payload)) or 'none'}) are not the ones the manifest "
                             f"lists ({', '.join(sorted(manifest.files))})")
    for name, digest in manifest.files.items():
        if sha256_hex(payload[name]) != digest:
            raise BundleRejected(f"{name} was changed after signing (its SHA-256 does not match the manifest)")
    return manifest


def parse_env(text: str) -> dict[str, str]:
    """The ``kiosk.env`` rule: only ``KIOSK_*=value`` lines (comments and blank lines allowed).

    Raises ``BundleRejected`` naming the first bad line; anything else an environment file could do
    (``LD_PRELOAD``, ``PYTHONPATH``, quoting tricks, redirecting the config file) is refused.
    """
    env: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        match = _ENV_LINE.fullmatch(line)
        if match is None:
            raise BundleRejected(f"{ENV_NAME} line {number}: expected NAME=value")
        name, value = match["name"], match["value"].strip()
        if not _ENV_NAME.fullmatch(name):
            raise BundleRejected(f"{ENV_NAME} line {number}: {name} is not a kiosk setting; only KIOSK_* "
                                 "variables (upper case, digits, _) are accepted")
        if name == "KIOSK_CONFIG":
            raise BundleRejected(f"{ENV_NAME} line {number}: KIOSK_CONFIG would move the site config out of "
                                 "/etc/kiosk; put the settings in kiosk.toml instead")
        if name.endswith("CREDENTIAL"):
            raise BundleRejected(f"{ENV_NAME} line {number}: {name}: credentials never travel in the environment; "
                                 "put them in device-credential and delivery-credential")
        if not _ENV_VALUE.fullmatch(value):
            raise BundleRejected(f"{ENV_NAME} line {number}: the value of {name} holds a quote, backslash, $, ` "
                                 "or control character; put such values in kiosk.toml")
        if name in env:
            raise BundleRejected(f"{ENV_NAME} line {number}: {name} is set twice")
        env[name] = value
    return env


def format_env(env: Mapping[str, str]) -> bytes:
    """The normalised ``kiosk.env`` that is installed: a header and one ``NAME=value`` per line."""
    lines = ["# Installed by kiosk-provision from the boot partition's bundle (KIOSK_* variables only)."]
    lines += [f"{name}={value}" for name, value in env.items()]
    return ("\n".join(lines) + "\n").encode()


def parse_credential(data: bytes, name: str = CREDENTIAL_NAME) -> bytes:
    """A credential file (``name``): one line of printable ASCII without spaces; returned with one newline."""
    text = data.decode("ascii", errors="replace").rstrip("\r\n")
    if not text:
        raise BundleRejected(f"{name}: the file is empty")
    if len(text) > MAX_CREDENTIAL_BYTES or not _CREDENTIAL.fullmatch(text):
        raise BundleRejected(f"{name}: must be one line of printable characters without spaces "
                             f"(at most {MAX_CREDENTIAL_BYTES})")
    return text.encode("ascii") + b"\n"


def read_bundle(directory: Path) -> dict[str, bytes]:
    """Every file of the bundle folder (name -> bytes), refusing what a bundle cannot hold.

    Hidden files (a laptop's ``.DS_Store``, ``._*``) are ignored; anything else unknown, a folder, a link or
    an oversized file rejects the bundle, so a misnamed file (``kiosk.toml.txt``) is reported, not skipped.
    """
    allowed = {*PAYLOAD_NAMES, MANIFEST_NAME, SIGNATURE_NAME}
    contents: dict[str, bytes] = {}
    for entry in sorted(directory.iterdir()):
        name = entry.name
        if name.startswith("."):
            continue
        if name not in allowed:
            raise BundleRejected(f"unknown file '{name}': a bundle holds only {', '.join(sorted(allowed))}")
        if entry.is_symlink() or not entry.is_file():
            raise BundleRejected(f"'{name}' is not a plain file")
        with entry.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise BundleRejected(f"'{name}' is larger than {MAX_FILE_BYTES // 1024} KiB")
        contents[name] = data
    return contents


# --------------------------------------------------------------------------------- validation as kiosk
Validator = Callable[[bytes, Mapping[str, str]], "str | None"]
"""Checks a site config (TOML bytes) with an environment; returns None when valid, else the reason."""


@dataclass(frozen=True)
class ServiceUserValidator:
    """Runs the kiosk's settings loader on a candidate config as the service user, in its own process.

    The root process hands over the TOML on stdin and the bundle's ``KIOSK_*`` variables as the child's
    only environment (with PATH and a locale); the child (``check-config``) exits 0, or 2 with the
    settings loader's message naming each bad field.
    """

    uid: int
    gid: int
    argv: tuple[str, ...] = ()
    timeout_seconds: float = VALIDATE_TIMEOUT_SECONDS

    def command(self) -> list[str]:
        """The child's command line: this Python, isolated when this process is."""
        if self.argv:
            return list(self.argv)
        flags = ["-I"] if sys.flags.isolated else []
        return [sys.executable, *flags, "-m", "kiosk.provision", "check-config"]

    def __call__(self, config: bytes, env: Mapping[str, str]) -> str | None:
        """Validate; None when the settings loader accepts the config, else its message."""
        child_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", **env}
        # Tests import the checkout through PYTHONPATH; the unit runs isolated (-I) and passes none.
        if not sys.flags.isolated and os.environ.get("PYTHONPATH"):
            child_env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        try:
            result = subprocess.run(self.command(), input=config, capture_output=True, env=child_env, cwd="/",
                                    user=self.uid, group=self.gid, extra_groups=[], umask=0o077,
                                    timeout=self.timeout_seconds, check=False)
        except (OSError, subprocess.SubprocessError) as error:
            return f"the config could not be checked as the {SERVICE_USER} user: {error}"
        if result.returncode == 0:
            return None
        message = (result.stderr or result.stdout).decode(errors="replace").strip()
        return message[-2000:] or f"the settings check exited with status {result.returncode}"


def check_config_main() -> int:
    """``check-config``: validate the TOML on stdin (with this process's KIOSK_* environment); exit 0 or 2."""
    from kiosk.errors import ConfigError
    from kiosk.settings import load_settings

    data = sys.stdin.buffer.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        print(f"the site config is larger than {MAX_FILE_BYTES // 1024} KiB", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="kiosk-check-") as scratch:
        path = Path(scratch) / CONFIG_NAME
        path.write_bytes(data)
        try:
            load_settings(path)
        except ConfigError as error:
            print(error.message, file=sys.stderr)
            return 2
    return 0


# ------------------------------------------------------------------------------------------ file work
def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes, mode: int, uid: int = 0, gid: int = 0) -> None:
    """Temporary file (owner and mode set before any byte is written), fsync, rename, fsync of the directory."""
    tmp = path.with_name(f".{path.name}.new")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_directory(path.parent)


def _shred(path: Path) -> None:
    """Overwrite, then remove (on FAT the new bytes may land elsewhere: best effort)."""
    try:
        size = path.stat().st_size
        with path.open("r+b") as handle:
            handle.write(os.urandom(size))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        _LOGGER.warning("could not overwrite %s before removing it: %s", path.name, error)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def service_ids(root: Path, user: str = SERVICE_USER) -> tuple[int, int]:
    """The service user's uid and primary gid from ``<root>/etc/passwd`` (a local account made by sysusers)."""
    passwd = root / "etc/passwd"
    try:
        lines = passwd.read_text().splitlines()
    except OSError as error:
        raise ProvisionError(f"cannot read {passwd}: {error}") from None
    for line in lines:
        fields = line.split(":")
        if len(fields) >= 4 and fields[0] == user and fields[2].isdigit() and fields[3].isdigit():
            return int(fields[2]), int(fields[3])
    raise ProvisionError(f"no '{user}' user in {passwd}: install systemd/kiosk.sysusers.conf "
                         "(systemd-sysusers) before provisioning")


def _mount_of(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> tuple[str, bool] | None:
    """The mount point holding ``path`` and whether it is mounted read-only."""
    target = str(path)
    best: tuple[str, bool] | None = None
    for line in mountinfo.read_text().splitlines():
        fields = line.split()
        if len(fields) < 6:
            continue
        point = fields[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):  # the last, deepest mount wins
            best = (point, "ro" in fields[5].split(","))
    return best


@dataclass
class _Writable:
    """Remount a read-only boot partition read-write while we work on it, and read-only again after."""

    boot: Path
    active: bool  # False under a scratch root (tests)
    remounted: str | None = None

    def __enter__(self) -> _Writable:
        if self.active:
            mount = _mount_of(self.boot)
            if mount is not None and mount[1]:
                subprocess.run(["mount", "-o", "remount,rw", mount[0]], check=True, capture_output=True,
                               timeout=60)
                self.remounted = mount[0]
        return self

    def __exit__(self, *exc: object) -> None:
        if self.remounted is not None:
            os.sync()
            result = subprocess.run(["mount", "-o", "remount,ro", self.remounted], capture_output=True,
                                    timeout=60, check=False)
            if result.returncode != 0:
                _LOGGER.error("could not remount %s read-only again: %s", self.remounted,
                              result.stderr.decode(errors="replace").strip())


# ------------------------------------------------------------------------------------------ the state
@dataclass
class Marker:
    """``/etc/kiosk/provisioned``: the first boot is over; the serial of the last signed bundle accepted."""

    serial: int = 0
    first_boot: str = ""

    @classmethod
    def read(cls, path: Path) -> Marker | None:
        """The marker, None when there is none; a damaged one counts as present (the window stays shut)."""
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            _LOGGER.error("%s is damaged (%s): treating the first boot as done", path, error)
            return cls(serial=0, first_boot="unknown (damaged marker)")
        serial = data.get("serial", 0) if isinstance(data, dict) else 0
        first = data.get("first_boot", "") if isinstance(data, dict) else ""
        return cls(serial=serial if isinstance(serial, int) else 0, first_boot=str(first))

    def write(self, path: Path) -> None:
        """Write the marker durably (root:root 0644: nothing secret in it)."""
        data = {"version": 1, "first_boot": self.first_boot, "serial": self.serial}
        write_durably(path, (json.dumps(data, indent=2) + "\n").encode(), MARKER_MODE)


@dataclass
class Outcome:
    """What happened to one boot partition's bundle."""

    boot: Path
    accepted: bool
    installed: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    signed: bool = False
    serial: int = 0


def _has_identity(root: Path) -> bool:
    credential = root / CREDENTIALS_DIR / CREDENTIAL_NAME
    try:
        has_credential = credential.stat().st_size > 0
    except OSError:
        has_credential = False
    return has_credential or (root / ETC_DIR / CONFIG_NAME).exists() or (root / ETC_DIR / ENV_NAME).exists()


@dataclass
class Provisioner:
    """Applies the boot partitions' bundles under ``root`` (``/`` on a kiosk)."""

    root: Path = Path("/")
    validator: Validator | None = None
    operator_key: bytes | None = None
    key_problem: str | None = None
    uid: int = 0
    gid: int = 0

    @classmethod
    def for_root(cls, root: Path, validator: Validator | None = None) -> Provisioner:
        """Read the service user and the operator key under ``root``."""
        uid, gid = service_ids(root)
        key: bytes | None = None
        problem: str | None = None
        key_path = root / OPERATOR_KEY
        try:
            key = decode_public_key(key_path.read_text())
        except FileNotFoundError:
            problem = (f"this kiosk has no operator key ({key_path.relative_to(root)}; build the image with "
                       "IGconf_kiosk_operator_key): after the first boot it cannot accept any bundle, reflash it")
        except (OSError, UnicodeDecodeError, BundleRejected) as error:
            problem = f"the operator key {key_path.relative_to(root)} cannot be used: {error}"
        return cls(root=root, validator=validator or ServiceUserValidator(uid, gid), operator_key=key,
                   key_problem=problem, uid=uid, gid=gid)

    # ---- paths
    @property
    def etc(self) -> Path:
        """``/etc/kiosk`` under the root."""
        return self.root / ETC_DIR

    def _prepare_etc(self) -> None:
        self.etc.mkdir(parents=True, exist_ok=True)
        os.chown(self.etc, 0, self.gid)
        self.etc.chmod(ETC_DIR_MODE)
        credentials = self.root / CREDENTIALS_DIR
        credentials.mkdir(exist_ok=True)
        os.chown(credentials, 0, 0)
        credentials.chmod(CREDENTIALS_DIR_MODE)

    def _read_installed(self, name: str) -> bytes | None:
        try:
            return (self.etc / name).read_bytes()
        except FileNotFoundError:
            return None

    # ---- the run
    def run(self) -> list[Outcome]:
        """Apply every boot partition's bundle; install the default config if none is in force."""
        self._prepare_etc()
        marker_path = self.root / MARKER
        marker = Marker.read(marker_path)
        if marker is None and _has_identity(self.root):
            # Provisioned before markers existed: its first boot is long over.
            marker = Marker(first_boot="before this version (migrated)")
            marker.write(marker_path)
        first_boot = marker is None
        state = marker or Marker()
        outcomes: list[Outcome] = []
        try:
            for boot_name in BOOT_DIRS:
                boot = self.root / boot_name
                if (boot / BUNDLE_DIR).is_dir():
                    outcomes.append(self._provision_from(boot, first_boot, state))
            if self._read_installed(CONFIG_NAME) is None:
                default = self.root / DEFAULT_CONFIG
                if default.is_file():
                    write_durably(self.etc / CONFIG_NAME, default.read_bytes(), CONFIG_MODE, 0, self.gid)
                    _LOGGER.info("installed the image's default site config")
        finally:
            if first_boot:
                if not outcomes:
                    state.first_boot = "no bundle on the card"
                else:
                    state.first_boot = "bundle accepted" if any(o.accepted for o in outcomes) else "bundle rejected"
                state.write(marker_path)
                _LOGGER.info("first boot done: later bundles must be signed with the operator's key")
            elif any(o.accepted and o.signed for o in outcomes):
                state.write(marker_path)
        return outcomes

    def _provision_from(self, boot: Path, first_boot: bool, state: Marker) -> Outcome:
        outcome = Outcome(boot=boot, accepted=False)
        try:
            with _Writable(boot, active=self.root == Path("/")):
                self._provision_bundle(boot, first_boot, state, outcome)
        except (OSError, subprocess.SubprocessError) as error:
            # A read-only card we cannot remount, or a file we cannot move: nothing is half-installed
            # (each file is written by rename), and the next boot tries again.
            outcome.reasons.append(f"the boot partition could not be worked on: {error}")
            _LOGGER.error("provisioning from %s failed: %s", boot, error)
        return outcome

    def _provision_bundle(self, boot: Path, first_boot: bool, state: Marker, outcome: Outcome) -> None:
        bundle = boot / BUNDLE_DIR
        try:
            contents = read_bundle(bundle)
            plan = self._check(contents, first_boot, state, outcome)
        except BundleRejected as error:
            outcome.reasons.append(error.message)
            plan = None
        if plan is not None:
            self._install(plan, outcome)
            state.serial = max(state.serial, outcome.serial)
            self._remove_bundle(bundle)
            outcome.accepted = True
        else:
            self._set_aside(bundle)
        self._report(boot, outcome, first_boot)

    def _check(self, contents: dict[str, bytes], first_boot: bool, state: Marker,
               outcome: Outcome) -> dict[str, bytes] | None:
        """Everything that decides: signature, serial, hashes, and each file's own rule. None: rejected."""
        payload = {name: data for name, data in contents.items() if name in PAYLOAD_NAMES}
        if MANIFEST_NAME in contents or SIGNATURE_NAME in contents:
            outcome.signed = True
            if self.operator_key is None:
                raise BundleRejected(self.key_problem or "this kiosk has no operator key")
            manifest = verify_bundle(contents, self.operator_key)
            if manifest.serial <= state.serial:
                raise BundleRejected(f"serial {manifest.serial} is not above {state.serial}, the last one this "
                                     "kiosk accepted (an old bundle cannot be replayed); sign it with a higher "
                                     "--serial")
            outcome.serial = manifest.serial
        elif not first_boot:
            raise BundleRejected("not signed: after the first boot a bundle must be signed with the operator's "
                                 f"key (`kiosk bundle sign DIR --key KEY --serial N` adds {MANIFEST_NAME} and "
                                 f"{SIGNATURE_NAME})")
        if not payload:
            raise BundleRejected(f"nothing to install: put {', '.join(PAYLOAD_NAMES)} in {BUNDLE_DIR}/")

        plan: dict[str, bytes] = {}
        reasons: list[str] = []
        for name in CREDENTIAL_NAMES:
            if name in payload:
                try:
                    plan[name] = parse_credential(payload[name], name)
                except BundleRejected as error:
                    reasons.append(error.message)
        env: dict[str, str] | None = None
        if ENV_NAME in payload:
            try:
                env = parse_env(payload[ENV_NAME].decode("utf-8"))
                plan[ENV_NAME] = format_env(env)
            except UnicodeDecodeError:
                reasons.append(f"{ENV_NAME}: not UTF-8 text")
            except BundleRejected as error:
                reasons.append(error.message)
        if CONFIG_NAME in payload or ENV_NAME in payload:
            config = payload.get(CONFIG_NAME)
            if config is None:
                config = self._read_installed(CONFIG_NAME) or self._default_config()
            if env is None:
                env = self._installed_env()
            if self.validator is not None and not reasons:
                problem = self.validator(config, env)
                if problem is not None:
                    reasons.append(f"the site config does not validate (checked as the {SERVICE_USER} user):\n"
                                   f"{problem}")
            if CONFIG_NAME in payload:
                plan[CONFIG_NAME] = payload[CONFIG_NAME]
        if reasons:
            outcome.reasons.extend(reasons)
            return None
        return plan

    def _default_config(self) -> bytes:
        try:
            return (self.root / DEFAULT_CONFIG).read_bytes()
        except OSError:
            return b""

    def _installed_env(self) -> dict[str, str]:
        data = self._read_installed(ENV_NAME)
        if data is None:
            return {}
        try:
            return parse_env(data.decode("utf-8"))
        except (UnicodeDecodeError, BundleRejected) as error:
            _LOGGER.warning("the installed %s does not follow the KIOSK_* rule (%s): ignored for validation",
                            ENV_NAME, error)
            return {}

    def _install(self, plan: dict[str, bytes], outcome: Outcome) -> None:
        for name in CREDENTIAL_NAMES:
            if name in plan:
                write_durably(self.root / CREDENTIALS_DIR / name, plan[name], CREDENTIAL_MODE)
                outcome.installed.append(name.replace("-", " "))
        if CONFIG_NAME in plan:
            write_durably(self.etc / CONFIG_NAME, plan[CONFIG_NAME], CONFIG_MODE, 0, self.gid)
            outcome.installed.append("site config")
        if ENV_NAME in plan:
            write_durably(self.etc / ENV_NAME, plan[ENV_NAME], CONFIG_MODE, 0, self.gid)
            outcome.installed.append("environment file")

    @staticmethod
    def _remove_bundle(bundle: Path) -> None:
        for name in CREDENTIAL_NAMES:
            credential = bundle / name
            if credential.exists():
                _shred(credential)
        shutil.rmtree(bundle, ignore_errors=True)
        with contextlib.suppress(OSError):
            _fsync_directory(bundle.parent)

    @staticmethod
    def _set_aside(bundle: Path) -> None:
        """Keep a rejected bundle for the installer to see, minus the credentials (secrets on a FAT card)."""
        for name in CREDENTIAL_NAMES:
            credential = bundle / name
            if credential.exists() and not credential.is_symlink():
                _shred(credential)
        rejected = bundle.parent / REJECTED_DIR
        if rejected.exists():
            shutil.rmtree(rejected, ignore_errors=True)
        os.replace(bundle, rejected)
        with contextlib.suppress(OSError):
            _fsync_directory(bundle.parent)

    def _report(self, boot: Path, outcome: Outcome, first_boot: bool) -> None:
        """``kiosk-provision.txt`` on the boot partition: what happened, never a secret."""
        kind = (f"signed (serial {outcome.serial})" if outcome.signed and outcome.serial
                else "signed" if outcome.signed else "unsigned")
        boot_kind = "first boot" if first_boot else "a later boot"
        lines = [f"kiosk-provision ran {time.monotonic():.0f} s after boot ({boot_kind}).", f"bundle: {kind}"]
        if outcome.accepted:
            lines.append("ACCEPTED: installed " + (", ".join(outcome.installed) or "nothing") +
                         "; the bundle was removed from the boot partition")
            _LOGGER.info("bundle accepted (%s): installed %s", kind, ", ".join(outcome.installed))
        else:
            lines.append(f"REJECTED: nothing was installed; the settings in force stay. The bundle is kept as "
                         f"{REJECTED_DIR}/ (without the device credential, which was removed). Why:")
            lines += [f"  - {reason}" for reason in outcome.reasons]
            _LOGGER.error("bundle rejected: %s", "; ".join(outcome.reasons))
        if first_boot:
            lines.append("This was the first boot: from now on only bundles signed with the operator's key are "
                         "accepted.")
        write_durably(boot / REPORT_NAME, ("\n".join(lines) + "\n").encode(), 0o644)


def apply(root: Path = Path("/"), validator: Validator | None = None) -> list[Outcome]:
    """Run provisioning under ``root`` (what ``kiosk-provision.service`` does at boot)."""
    return Provisioner.for_root(root, validator).run()


# ------------------------------------------------------------------------------ kiosk doctor security
Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)


UNIT_LIMITS = {"kiosk.service": 2.0, "kiosk-provision.service": 3.0, "kiosk-cooldown.service": 3.0,
               "kiosk-update-gate.service": 3.0, "kiosk-update-check.service": 3.0}
FIREWALL_TABLE = ("inet", "kiosk")


def _mode_check(path: Path, want_mode: int, want_uid: int, want_gids: set[int], label: str) -> str | None:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None
    problems = []
    if stat.S_ISLNK(info.st_mode):
        return f"{label} is a symbolic link"
    mode = stat.S_IMODE(info.st_mode)
    if mode & ~want_mode:
        problems.append(f"mode {mode:04o} (want {want_mode:04o} or less)")
    if info.st_uid != want_uid:
        problems.append(f"owner uid {info.st_uid} (want {want_uid})")
    if info.st_gid not in want_gids:
        problems.append(f"group gid {info.st_gid}")
    return f"{label}: " + ", ".join(problems) if problems else None


def security_checks(settings: Settings, root: Path = Path("/"), run: Runner = _run) -> list[Check]:
    """The appliance side of ``kiosk doctor security``: provisioning state, file modes, firewall, unit sandboxes."""
    checks: list[Check] = []
    area = "security"
    marker = Marker.read(root / MARKER)
    if marker is None:
        checks.append(Check(area, "first boot", Verdict.FAIL,
                            "provisioning has not run: the next boot accepts an unsigned bundle from anyone "
                            "holding the card",
                            "enable kiosk-provision.service and boot once (it closes the first-boot window)"))
    else:
        checks.append(Check(area, "first boot", Verdict.OK,
                            f"done ({marker.first_boot}); only operator-signed bundles are accepted",
                            figures={"last_serial": marker.serial}))

    key_path = root / OPERATOR_KEY
    try:
        decode_public_key(key_path.read_text())
        checks.append(Check(area, "operator key", Verdict.OK, f"present ({key_path})"))
    except FileNotFoundError:
        checks.append(Check(area, "operator key", Verdict.WARN,
                            "no operator key: no bundle can change the credential or config after the first boot",
                            "build the image with IGconf_kiosk_operator_key (kiosk bundle keygen) to allow "
                            "signed updates; until then, reflash to re-provision"))
    except (OSError, UnicodeDecodeError, BundleRejected) as error:
        checks.append(Check(area, "operator key", Verdict.FAIL, f"{key_path} cannot be used: {error}",
                            "rebuild the image with a valid IGconf_kiosk_operator_key"))

    try:
        uid, gid = service_ids(root)
        gids = {0, gid}
    except ProvisionError:
        gids = {0}
    problems = [p for p in (
        _mode_check(root / ETC_DIR / CONFIG_NAME, CONFIG_MODE, 0, gids, "kiosk.toml"),
        _mode_check(root / ETC_DIR / ENV_NAME, CONFIG_MODE, 0, gids, "kiosk.env"),
        _mode_check(root / CREDENTIALS_DIR, CREDENTIALS_DIR_MODE, 0, {0}, "credentials/"),
        _mode_check(root / CREDENTIALS_DIR / CREDENTIAL_NAME, CREDENTIAL_MODE, 0, {0}, "device-credential"),
        _mode_check(root / CREDENTIALS_DIR / DELIVERY_CREDENTIAL_NAME, CREDENTIAL_MODE, 0, {0}, "delivery-credential"),
    ) if p]
    if problems:
        checks.append(Check(area, "config files", Verdict.FAIL, "; ".join(problems),
                            "chown root:kiosk and chmod 0640 /etc/kiosk/kiosk.toml and kiosk.env; chmod 0600 the "
                            "credential and 0700 its directory (root:root)"))
    elif not (root / ETC_DIR).exists():
        checks.append(Check(area, "config files", Verdict.SKIP, f"no {root / ETC_DIR} here"))
    else:
        checks.append(Check(area, "config files", Verdict.OK,
                            "kiosk.toml and kiosk.env root:kiosk 0640 or tighter; the credential root 0600"))

    if shutil.which("nft") is None:
        checks.append(Check(area, "firewall", Verdict.SKIP, "nft is not installed here"))
    else:
        family, table = FIREWALL_TABLE
        result = run(["nft", "list", "chain", family, table, "input"])
        if result.returncode != 0:
            denied = "permission" in result.stderr.lower() or "not permitted" in result.stderr.lower()
            checks.append(Check(area, "firewall", Verdict.SKIP if denied else Verdict.FAIL,
                                "cannot read the ruleset (run as root)" if denied else
                                f"the kiosk's inbound firewall (table {family} {table}) is not loaded",
                                None if denied else "install image/nftables.conf as /etc/nftables.conf and "
                                "enable nftables.service"))
        elif "policy drop" not in result.stdout:
            checks.append(Check(area, "firewall", Verdict.FAIL, "the input chain does not drop by default",
                                "restore /etc/nftables.conf from the image and `systemctl restart nftables`"))
        else:
            checks.append(Check(area, "firewall", Verdict.OK, "inbound dropped by default (nftables)"))

    units = root / "etc/systemd/system"
    present = [units / name for name in UNIT_LIMITS if (units / name).is_file()]
    if shutil.which("systemd-analyze") is None or not present:
        checks.append(Check(area, "unit sandboxes", Verdict.SKIP,
                            "systemd-analyze or the installed units are not here"))
    else:
        weak = []
        figures: dict[str, float | int | str | bool | None] = {}
        for path in present:
            exposure = unit_exposure(path, run)
            figures[path.name] = exposure
            if exposure is None or exposure > UNIT_LIMITS[path.name]:
                weak.append(f"{path.name} {exposure if exposure is not None else '?'} "
                            f"(limit {UNIT_LIMITS[path.name]})")
        checks.append(Check(area, "unit sandboxes", Verdict.FAIL if weak else Verdict.OK,
                            ("exposure above the limit: " + ", ".join(weak)) if weak else
                            "every unit within its exposure limit (systemd-analyze security)",
                            "reinstall the units from systemd/ and `systemctl daemon-reload`" if weak else None,
                            figures))
    return checks


def unit_exposure(unit: Path, run: Runner = _run) -> float | None:
    """``systemd-analyze security --offline=true``'s overall exposure for a unit file (None if unreadable)."""
    result = run(["systemd-analyze", "security", "--offline=true", str(unit)])
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    return float(match.group(1)) if match else None


# ------------------------------------------------------------------------------------------ the command
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kiosk.provision apply [--root DIR]`` (the unit, as root) or ``check-config`` (the child)."""
    from kiosk.logs import setup_logging

    parser = argparse.ArgumentParser(prog="kiosk.provision", description=__doc__.splitlines()[0] if __doc__ else "")
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("apply", help="apply the boot partitions' bundles (root, at boot)")
    run_parser.add_argument("--root", type=Path, default=Path("/"), help="the root to work under (tests)")
    sub.add_parser("check-config", help="validate the TOML on stdin (run as the kiosk user by apply)")
    args = parser.parse_args(argv)
    setup_logging("INFO")
    if args.command == "check-config":
        return check_config_main()
    try:
        outcomes = apply(args.root)
    except KioskError as error:
        _LOGGER.error("%s", error)
        return 1
    return 0 if all(o.accepted for o in outcomes) else 3


if __name__ == "__main__":
    sys.exit(main())

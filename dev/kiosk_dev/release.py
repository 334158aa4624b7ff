r"""``kiosk release ca|build|verify``: the operator's side of A/B updates, on the operator's own machine.

Update bundles are RAUC bundles (``verity`` format) signed with an X.509 key made for code signing, issued by the
operator's update CA; the kiosks hold only the CA's certificate (RAUC's keyring, ``IGconf_kiosk_update_ca`` at
build time) and refuse any bundle it did not issue, a changed one, or one for another board. The private keys
never go near a kiosk. This tool wraps ``openssl`` and ``rauc`` (Debian packages ``openssl`` and ``rauc``)::

    kiosk release ca ~/kiosk-update                 # once: update-ca.pem (into the image build), the keys (0600)
    kiosk release build --boot work/.../boot.vfat --system work/.../system.erofs --version 2025.3.1 \
        --compatible voice-kiosk-pi5 --signer ~/kiosk-update --out kiosk-2025.3.1.raucb
    kiosk release verify kiosk-2025.3.1.raucb --keyring ~/kiosk-update/update-ca.pem

``verify`` checks what a kiosk checks before it writes anything: the signature chain to the CA (``rauc info``),
the compatible string and version, and the whole payload against the signed verity hash tree (``rauc extract``).
docs/fleet.md has the whole flow.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kiosk.errors import InputError
from kiosk.settings import Settings

CA_CERT = "update-ca.pem"  # public: the kiosks' keyring
CA_KEY = "update-ca.key"  # private: issues signing certificates; keep it offline
SIGNER_CERT = "signer.pem"
SIGNER_KEY = "signer.key"  # private: signs bundles
# The image build's rule for IGconf_kiosk_version (image/layer/voice-kiosk.yaml).
VERSION = re.compile(r"[0-9]+(\.[0-9]+){0,2}([.+~-][A-Za-z0-9]+)*")
COMPATIBLE = re.compile(r"voice-kiosk(-[a-z0-9]+)?")
BOOT_IMAGE = "boot.vfat"  # written into the boot slot (type vfat)
SYSTEM_IMAGE = "system.img"  # written raw into the system slot (erofs or ext4)
_LEAF_EXTENSIONS = ("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                    "extendedKeyUsage=critical,codeSigning\nsubjectKeyIdentifier=hash\n"
                    "authorityKeyIdentifier=keyid\n")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise InputError(f"{name} is not installed: install the Debian package {name} (scripts/bootstrap does)")
    return path


def _run(argv: list[str], what: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=3600, check=False)
    if result.returncode != 0:
        detail = "\n".join(line for line in (result.stderr or result.stdout).strip().splitlines()
                           if not line.startswith("rauc-Message"))
        raise InputError(f"{what} failed: {detail[-1500:]}")
    return result


def _private(path: Path) -> None:
    path.chmod(0o600)


def make_ca(directory: Path, *, name: str = "Voice kiosk updates", ca_days: int = 3650,
            signer_days: int = 825) -> tuple[Path, Path]:
    """Make the update CA and one signing key under ``directory``; return (CA certificate, signer certificate).

    EC P-256 keys. The signer's certificate is for code signing only (RAUC's ``check-purpose=codesign``).
    Existing files are never overwritten.
    """
    openssl = _tool("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / n for n in (CA_CERT, CA_KEY, SIGNER_CERT, SIGNER_KEY)]
    if any(p.exists() for p in paths):
        raise InputError(f"{directory} already holds update keys; choose an empty directory")
    ca_cert, ca_key, signer_cert, signer_key = paths
    old_umask = os.umask(0o077)
    try:
        _run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
              "-keyout", str(ca_key), "-out", str(ca_cert), "-days", str(ca_days), "-subj", f"/CN={name} CA",
              "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
             "making the update CA")
        with tempfile.TemporaryDirectory() as scratch:
            csr = Path(scratch) / "signer.csr"
            extensions = Path(scratch) / "leaf.ext"
            extensions.write_text(_LEAF_EXTENSIONS)
            _run([openssl, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                  "-keyout", str(signer_key), "-out", str(csr), "-subj", f"/CN={name} signer"],
                 "making the signing key")
            _run([openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
                  "-CAcreateserial", "-CAserial", str(Path(scratch) / "ca.srl"), "-out", str(signer_cert),
                  "-days", str(signer_days), "-extfile", str(extensions)], "issuing the signing certificate")
    finally:
        os.umask(old_umask)
    for private in (ca_key, signer_key):
        _private(private)
    ca_cert.chmod(0o644)
    signer_cert.chmod(0o644)
    return ca_cert, signer_cert


@contextlib.contextmanager
def _rauc_conf(keyring: Path, compatible: str) -> Iterator[Path]:
    """A system.conf for the operator's machine: the keyring and the kiosks' certificate purpose, no slots."""
    with tempfile.TemporaryDirectory(prefix="kiosk-release-") as scratch:
        conf = Path(scratch) / "system.conf"
        conf.write_text(f"[system]\ncompatible={compatible}\nbootloader=noop\nbundle-formats=-plain\n\n"
                        f"[keyring]\npath={keyring.resolve()}\ncheck-purpose=codesign\n")
        yield conf


def _check_version(version: str) -> None:
    if not VERSION.fullmatch(version):
        raise InputError(f"--version {version!r}: use the image's IGconf_kiosk_version, e.g. 2025.3.1")


def _check_compatible(compatible: str) -> None:
    if not COMPATIBLE.fullmatch(compatible):
        raise InputError(f"--compatible {compatible!r}: voice-kiosk-<device class>, e.g. voice-kiosk-pi5 (the "
                         "kiosk's /etc/rauc/system.conf says which)")


def _place(source: Path, target: Path) -> None:
    """Hard-link the (large) image into the bundle's content directory, copying only across file systems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def build_bundle(*, boot: Path, system: Path, version: str, compatible: str, cert: Path, key: Path,
                 keyring: Path, out: Path) -> Path:
    """Build and sign a verity bundle holding the boot and system images; verify it against ``keyring``."""
    rauc = _tool("rauc")
    _check_version(version)
    _check_compatible(compatible)
    for label, path in (("--boot", boot), ("--system", system), ("--cert", cert), ("--key", key),
                        ("--keyring", keyring)):
        if not path.is_file():
            raise InputError(f"{label} {path}: no such file")
    if out.exists():
        raise InputError(f"{out} exists: choose another --out (a bundle is never overwritten)")
    built = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    with tempfile.TemporaryDirectory(prefix="kiosk-bundle-", dir=out.parent if out.parent.exists() else None) \
            as scratch:
        content = Path(scratch) / "content"
        content.mkdir()
        _place(boot, content / BOOT_IMAGE)
        _place(system, content / SYSTEM_IMAGE)
        (content / "manifest.raucm").write_text(
            f"[update]\ncompatible={compatible}\nversion={version}\nbuild={built}\n"
            f"description=voice kiosk image {version}\n\n[bundle]\nformat=verity\n\n"
            f"[image.rootfs]\nfilename={SYSTEM_IMAGE}\n\n[image.boot]\nfilename={BOOT_IMAGE}\n")
        with _rauc_conf(keyring, compatible) as conf:
            _run([rauc, f"--conf={conf}", "bundle", f"--cert={cert}", f"--key={key}", f"--keyring={keyring}",
                  str(content), str(out)], "rauc bundle")
    return out


@dataclass(frozen=True)
class BundleInfo:
    """What ``verify`` found in a bundle that passed."""

    compatible: str
    version: str
    signer: str
    images: tuple[str, ...]


def verify_bundle(bundle: Path, keyring: Path, compatible: str | None = None, *, payload: bool = True) -> BundleInfo:
    """Check a bundle as a kiosk would: signature chain to ``keyring``, compatible, and (``payload``) every block.

    Raises ``InputError`` naming the problem: another CA's signature, a changed manifest or payload, another
    board's bundle.
    """
    rauc = _tool("rauc")
    if not bundle.is_file():
        raise InputError(f"{bundle}: no such file")
    if not keyring.is_file():
        raise InputError(f"--keyring {keyring}: no such file")
    with _rauc_conf(keyring, compatible or "voice-kiosk") as conf:
        info = _run([rauc, f"--conf={conf}", "info", "--output-format=json", str(bundle)],
                    "checking the signature (rauc info)")
        if payload:
            with tempfile.TemporaryDirectory(prefix="kiosk-verify-") as scratch:
                _run([rauc, f"--conf={conf}", "extract", str(bundle), str(Path(scratch) / "content")],
                     "checking the payload (rauc extract)")
    try:
        data = json.loads(info.stdout)
        images = tuple(name for image in data.get("images", []) for name in image)
        found = BundleInfo(str(data["compatible"]), str(data["version"]), _signer(info.stderr), images)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InputError(f"rauc info printed something unexpected for {bundle}: {info.stdout[:300]}") from None
    if compatible is not None and found.compatible != compatible:
        raise InputError(f"{bundle} is for '{found.compatible}', not '{compatible}': a kiosk refuses it")
    return found


def _signer(log: str) -> str:
    match = re.search(r"Verified (?:inline|detached) signature by '([^']*)'", log)
    return match.group(1) if match else "?"


def _cmd_release(args: argparse.Namespace, settings: Settings) -> int:
    if args.release_command == "ca":
        ca_cert, signer = make_ca(args.directory, name=args.name)
        print(f"update CA: {ca_cert} (build the image with IGconf_kiosk_update_ca={ca_cert.resolve()})")
        print(f"signing certificate: {signer}; private keys: {args.directory / CA_KEY} (keep it offline) and "
              f"{args.directory / SIGNER_KEY}")
        return 0
    if args.release_command == "build":
        signer = args.signer
        cert = args.cert or (signer / SIGNER_CERT if signer else None)
        key = args.key or (signer / SIGNER_KEY if signer else None)
        keyring = args.keyring or (signer / CA_CERT if signer else None)
        if cert is None or key is None or keyring is None:
            raise InputError("give --signer DIR (from `kiosk release ca`) or --cert, --key and --keyring")
        out = build_bundle(boot=args.boot, system=args.system, version=args.version, compatible=args.compatible,
                           cert=cert, key=key, keyring=keyring, out=args.out)
        info = verify_bundle(out, keyring, args.compatible)
        print(f"built {out}: {info.compatible} {info.version}, signed by {info.signer}, verified")
        return 0
    info = verify_bundle(args.bundle, args.keyring, args.compatible, payload=not args.signature_only)
    print(f"{args.bundle}: {info.compatible} {info.version}, images {', '.join(info.images)}, signed by "
          f"{info.signer}: " + ("signature verified" if args.signature_only else "signature and payload verified"))
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``kiosk release``."""
    release = subparsers.add_parser("release", help="operator: the update CA, signed update bundles (RAUC)",
                                    description=__doc__.splitlines()[0] if __doc__ else None)
    sub = release.add_subparsers(dest="release_command", metavar="ACTION", required=True)
    ca = sub.add_parser("ca", help="make the update CA and a code-signing key (once)")
    ca.add_argument("directory", type=Path, help="an empty directory for the certificates and keys")
    ca.add_argument("--name", default="Voice kiosk updates", help="the CA's common name")
    build = sub.add_parser("build", help="build and sign an update bundle from the image's boot and system images")
    build.add_argument("--boot", type=Path, required=True, help="the image's boot.vfat (rpi-image-gen's work dir)")
    build.add_argument("--system", type=Path, required=True, help="the image's system.erofs (or system.ext4)")
    build.add_argument("--version", required=True, help="the image's IGconf_kiosk_version")
    build.add_argument("--compatible", required=True, help="voice-kiosk-<device class>, e.g. voice-kiosk-pi5")
    build.add_argument("--signer", type=Path, default=None, help="the directory from `kiosk release ca`")
    build.add_argument("--cert", type=Path, default=None, help="the signing certificate (instead of --signer)")
    build.add_argument("--key", type=Path, default=None, help="the signing key (instead of --signer)")
    build.add_argument("--keyring", type=Path, default=None, help="the update CA (instead of --signer)")
    build.add_argument("--out", type=Path, required=True, help="the bundle to write (.raucb)")
    verify = sub.add_parser("verify", help="check a bundle as a kiosk would (signature, board, payload)")
    verify.add_argument("bundle", type=Path)
    verify.add_argument("--keyring", type=Path, required=True, help="the update CA's certificate")
    verify.add_argument("--compatible", default=None, help="also require this board, e.g. voice-kiosk-pi5")
    verify.add_argument("--signature-only", action="store_true", help="skip the payload check (a large bundle)")
    release.set_defaults(handler=_cmd_release)

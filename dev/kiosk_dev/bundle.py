"""``kiosk bundle keygen|sign|verify``: the operator's side of provisioning, on the operator's own machine.

A kiosk accepts an unsigned bundle on its first boot only (``kiosk.provision``); after that a bundle must
carry a ``manifest`` (a serial number and the SHA-256 of each file) and ``manifest.sig``, the manifest's
ed25519 signature by the operator's key. The private key never goes near a kiosk: the image holds the public
key (``IGconf_kiosk_operator_key``), and this tool signs on the operator's machine.

    kiosk bundle keygen operator.key          # writes operator.key (private, 0600), prints the public key
    kiosk bundle sign kiosk-provision --key operator.key --serial 2
    kiosk bundle verify kiosk-provision --public-key operator.key.pub

The manifest's format and the checks live in ``kiosk.provision`` (``build_manifest``, ``verify_signature``),
so signing and verifying cannot drift apart.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import sys
from pathlib import Path
from typing import Any

from kiosk.errors import InputError
from kiosk.provision import (
    MANIFEST_NAME,
    PAYLOAD_NAMES,
    SIGNATURE_NAME,
    BundleRejected,
    build_manifest,
    decode_public_key,
    read_bundle,
    verify_bundle,
)
from kiosk.settings import Settings

KEY_HEADER = "# kiosk operator signing key (ed25519 seed, base64). Keep it off the kiosks; anyone holding it " \
             "can re-provision them.\n"


def generate_key(path: Path) -> str:
    """Write a new private key to ``path`` (0600) and its public key to ``path.pub``; return the public key."""
    from nacl.signing import SigningKey

    key = SigningKey.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(KEY_HEADER + base64.b64encode(bytes(key)).decode() + "\n")
    public = base64.b64encode(bytes(key.verify_key)).decode()
    path.with_name(path.name + ".pub").write_text(public + "\n")
    return public


def load_signing_key(path: Path) -> Any:
    """The ``nacl.signing.SigningKey`` written by ``generate_key``."""
    from nacl.signing import SigningKey

    body = "".join(line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))
    try:
        seed = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{path} is not a key written by `kiosk bundle keygen`") from None
    if len(seed) != 32:
        raise InputError(f"{path} holds {len(seed)} bytes; an ed25519 key seed has 32")
    return SigningKey(seed)


def sign_bundle(directory: Path, key_path: Path, serial: int) -> bytes:
    """Write ``manifest`` and ``manifest.sig`` for the bundle files in ``directory``; return the manifest."""
    files = {name: (directory / name).read_bytes() for name in PAYLOAD_NAMES if (directory / name).is_file()}
    try:
        manifest = build_manifest(files, serial)
    except BundleRejected as error:
        raise InputError(error.message) from None
    key = load_signing_key(key_path)
    signature = key.sign(manifest).signature
    (directory / MANIFEST_NAME).write_bytes(manifest)
    (directory / SIGNATURE_NAME).write_text(base64.b64encode(signature).decode() + "\n")
    return bytes(manifest)


def check_signed(directory: Path, public_key_path: Path) -> list[str]:
    """Check a signed bundle as a kiosk would (signature, manifest, hashes); return what it installs."""
    try:
        manifest = verify_bundle(read_bundle(directory), decode_public_key(public_key_path.read_text()))
    except BundleRejected as error:
        raise InputError(error.message) from None
    return [f"serial {manifest.serial}", *sorted(manifest.files)]


def _cmd_bundle(args: argparse.Namespace, settings: Settings) -> int:
    if args.bundle_command == "keygen":
        if args.key.exists():
            raise InputError(f"{args.key} exists; keygen never overwrites a key")
        public = generate_key(args.key)
        print(public)
        print(f"private key: {args.key} (keep it off the kiosks); public key: {args.key}.pub -- build the image "
              f"with IGconf_kiosk_operator_key={public}", file=sys.stderr)
        return 0
    if args.bundle_command == "sign":
        manifest = sign_bundle(args.directory, args.key, args.serial)
        sys.stdout.write(manifest.decode())
        print(f"signed: {args.directory / MANIFEST_NAME}, {args.directory / SIGNATURE_NAME}", file=sys.stderr)
        return 0
    print("valid: " + ", ".join(check_signed(args.directory, args.public_key)))
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``kiosk bundle``."""
    bundle = subparsers.add_parser("bundle", help="operator: signing keys and signed provisioning bundles",
                                   description=__doc__.splitlines()[0] if __doc__ else None)
    sub = bundle.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)
    keygen = sub.add_parser("keygen", help="make the operator's signing key (private KEY, public KEY.pub)")
    keygen.add_argument("key", type=Path, help="where to write the private key")
    sign = sub.add_parser("sign", help="sign a kiosk-provision/ folder (writes manifest and manifest.sig)")
    sign.add_argument("directory", type=Path, help="the kiosk-provision folder")
    sign.add_argument("--key", type=Path, required=True, help="the private key from `kiosk bundle keygen`")
    sign.add_argument("--serial", type=int, required=True,
                      help="above every serial this kiosk accepted before (e.g. a date, 20250301)")
    verify = sub.add_parser("verify", help="check a signed folder as a kiosk would")
    verify.add_argument("directory", type=Path)
    verify.add_argument("--public-key", type=Path, required=True, help="the public key (KEY.pub)")
    bundle.set_defaults(handler=_cmd_bundle)

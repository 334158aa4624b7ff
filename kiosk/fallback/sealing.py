"""Sealed messages: a visitor's recording encrypted to the operator's public key before it touches the card.

A sealed message file is::

    KIOSKSB1                      8 bytes, the format and its version
    <recipient public key>        32 bytes, the operator's X25519 key it was sealed to (public)
    <sealed box>                  libsodium crypto_box_seal of the WAV file (16 kHz mono 16-bit):
                                  an ephemeral public key (32 bytes), the ciphertext, a MAC (16 bytes)

Only the holder of the operator's private key can open it: the kiosk has just the public key, so it cannot
read its own spool back, and neither can whoever takes the card. The box authenticates its content (a
changed byte fails to open) but not its sender: anyone who knows the public key can seal a message to it.
The operator opens a file with ``kiosk messages decrypt --key FILE`` or the PyNaCl one-liner in
docs/offline.md (skip the 40-byte header, open the rest with ``SealedBox(PrivateKey(key))``).

Keys travel as base64 (or hex) of their 32 raw bytes; a private key file holds one base64 line.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from kiosk.errors import KioskError

MAGIC = b"KIOSKSB1"
KEY_BYTES = 32
HEADER_BYTES = len(MAGIC) + KEY_BYTES
# crypto_box_seal adds an ephemeral public key and a Poly1305 tag.
BOX_OVERHEAD_BYTES = 32 + 16
OVERHEAD_BYTES = HEADER_BYTES + BOX_OVERHEAD_BYTES
# The spool's WAV files are written by kiosk.audio.format.encode_wav: a 44-byte PCM header, 2 bytes a sample.
WAV_HEADER_BYTES = 44
SUFFIX = ".sealed"


class SealError(KioskError):
    """A sealed message or a key cannot be used; the message names the problem and the fix."""


def parse_key(text: str, what: str = "key") -> bytes:
    """The 32 raw bytes of a key written as base64 (standard or URL-safe) or 64 hex digits.

    Raises ``ValueError`` naming the problem (settings turn it into a config error).
    """
    value = text.strip()
    raw: bytes | None = None
    if len(value) == 2 * KEY_BYTES and all(c in "0123456789abcdefABCDEF" for c in value):
        raw = bytes.fromhex(value)
    else:
        try:
            raw = base64.b64decode(value.replace("-", "+").replace("_", "/"), validate=True)
        except (binascii.Error, ValueError):
            raw = None
    if raw is None or len(raw) != KEY_BYTES:
        got = "not base64 or hex" if raw is None else f"{len(raw)} bytes"
        raise ValueError(f"the {what} must be 32 bytes written as base64 (44 characters) or hex (64 digits), "
                         f"got {got}")
    return raw


def check_public_key(raw: bytes) -> bytes:
    """``raw`` if messages can be sealed to it, else ``ValueError`` (e.g. an all-zero or low-order point)."""
    try:
        SealedBox(PublicKey(raw)).encrypt(b"probe")
    except (CryptoError, ValueError, TypeError):
        raise ValueError("it is not a usable X25519 public key (a low-order point such as all zeros): "
                         "generate a key pair with `kiosk messages keygen`") from None
    return raw


def encode_key(raw: bytes) -> str:
    """A key as standard base64 (how settings, export files and key files write it)."""
    return base64.b64encode(raw).decode("ascii")


def seal(plain: bytes, recipient: bytes) -> bytes:
    """``plain`` sealed to ``recipient`` (the operator's public key), with the format header."""
    return MAGIC + recipient + SealedBox(PublicKey(recipient)).encrypt(plain)


def recipient_of(sealed: bytes) -> bytes:
    """The public key a sealed message was sealed to; ``SealError`` if it is not a sealed message."""
    if len(sealed) < OVERHEAD_BYTES or not sealed.startswith(MAGIC):
        raise SealError("not_sealed", "not a sealed kiosk message (no KIOSKSB1 header, or cut short)")
    return sealed[len(MAGIC):HEADER_BYTES]


def unseal(sealed: bytes, private_key: bytes) -> bytes:
    """Open a sealed message with the operator's private key (on the operator's machine, never the kiosk's)."""
    recipient = recipient_of(sealed)
    key = PrivateKey(private_key)
    if bytes(key.public_key) != recipient:
        raise SealError("wrong_key", f"sealed to the public key {encode_key(recipient)}, not to this key's "
                        f"({encode_key(bytes(key.public_key))}): use the private key that belongs to it")
    try:
        return SealedBox(key).decrypt(sealed[HEADER_BYTES:])
    except CryptoError:
        raise SealError("message_corrupt", "the sealed message does not open with its key: it was altered or "
                        "damaged after sealing") from None


def samples_for_size(size_bytes: int) -> int | None:
    """Samples in a sealed spool WAV of ``size_bytes`` (None if no such file has that size)."""
    audio_bytes = size_bytes - OVERHEAD_BYTES - WAV_HEADER_BYTES
    if audio_bytes < 2 or audio_bytes % 2:
        return None
    return audio_bytes // 2


def generate_keypair() -> tuple[bytes, bytes]:
    """A new operator key pair: (private, public), 32 raw bytes each."""
    key = PrivateKey.generate()
    return bytes(key), bytes(key.public_key)


def write_private_key(path: Path, private_key: bytes) -> None:
    """Write a private key file (one base64 line, mode 0600); never overwrite an existing key."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise SealError("key_exists", f"{path} already exists: a key file is never overwritten (messages "
                        "sealed to it would be lost); choose another name") from None
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (encode_key(private_key) + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)


def read_private_key(path: Path) -> bytes:
    """A private key from its file (base64 or hex); ``SealError`` naming the file otherwise."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise SealError("key_unreadable", f"cannot read the private key {path} ({error})") from None
    try:
        return parse_key(text, "private key")
    except ValueError as error:
        raise SealError("key_invalid", f"{path}: {error}") from None


def public_key_for(private_key: bytes) -> bytes:
    """The public key that belongs to ``private_key``."""
    return bytes(PrivateKey(private_key).public_key)

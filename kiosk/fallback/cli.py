"""Staff commands: ``kiosk messages list|export|deliver|keygen|decrypt`` and ``kiosk cues check``.

``list``, ``export`` and ``deliver`` run on the kiosk; ``keygen`` and ``decrypt`` on the operator's own machine,
which holds the private key that opens visitors' messages.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

from kiosk.errors import InputError, KioskError
from kiosk.settings import Settings

_LOGGER = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``messages`` and ``cues`` with their subcommands."""
    messages = subparsers.add_parser(
        "messages", help="visitors' recorded messages: list, export, deliver; keygen and decrypt (the operator's)")
    verbs = messages.add_subparsers(dest="messages_command", metavar="VERB", required=True)
    listing = verbs.add_parser("list", help="list stored messages (id, time, duration, state, checksum)")
    listing.add_argument("--json", action="store_true", help="one JSON array, for programs")
    listing.set_defaults(handler=cmd_list)
    export = verbs.add_parser("export", help="copy messages (verified, still sealed) into a directory, 0600")
    export.add_argument("--all", action="store_true", help="every stored message")
    export.add_argument("items", nargs="+", metavar="ID|DIR",
                        help="ID DIR (a message id or a unique prefix of 8+ characters), or --all DIR")
    export.set_defaults(handler=cmd_export)
    deliver = verbs.add_parser("deliver", help="one delivery pass now (when the service is stopped)")
    deliver.set_defaults(handler=cmd_deliver)
    keygen = verbs.add_parser("keygen", help="operator: make a key pair; prints the public key for "
                              "spool.recipient_public_key, writes the private key (0600) to FILE")
    keygen.add_argument("key_file", type=Path, metavar="FILE", help="where to write the private key (never "
                        "overwritten); keep it on the operator's machine, never on a kiosk")
    keygen.set_defaults(handler=cmd_keygen)
    decrypt = verbs.add_parser("decrypt", help="operator: open exported .wav.sealed files with the private key")
    decrypt.add_argument("--key", type=Path, required=True, metavar="FILE", help="the private key file (keygen)")
    decrypt.add_argument("--out", type=Path, default=None, metavar="DIR",
                         help="where to write the WAV files (default: next to each sealed file)")
    decrypt.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                         help="sealed files, or directories holding them (an export directory)")
    decrypt.set_defaults(handler=cmd_decrypt)
    cues = subparsers.add_parser("cues", help="local spoken messages and tones")
    cue_verbs = cues.add_subparsers(dest="cues_command", metavar="VERB", required=True)
    check = cue_verbs.add_parser("check", help="check the operator's cue files and list what plays")
    check.set_defaults(handler=cmd_cues_check)


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    """Print the stored messages."""
    from kiosk.fallback.spool import Spool

    with Spool.from_settings(settings.spool, read_only=True) as spool:
        messages = spool.messages()
    if args.json:
        print(json.dumps([m.as_dict() for m in messages], indent=2))
        return 0
    if not messages:
        print(f"no messages in {settings.spool.directory}")
        return 0
    print(f"{'id':36}  {'time (UTC)':20}  {'duration':>8}  {'state':10}  {'tries':>5}  sha256")
    for m in messages:
        print(f"{m.id:36}  {m.recorded_at:20}  {m.duration_seconds:7.1f}s  {m.state.value:10}  "
              f"{m.attempts:5d}  {m.sha256[:16]}")
    return 0


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    """Copy one or every message out, verified against its checksum and still sealed (files 0600)."""
    from kiosk.fallback.spool import Spool

    if len(args.items) != (1 if args.all else 2):
        raise InputError("usage: kiosk messages export ID DIR, or kiosk messages export --all DIR "
                         "(ids: see `kiosk messages list`)")
    directory = Path(args.items[-1])
    with Spool.from_settings(settings.spool, read_only=True) as spool:
        chosen = spool.messages() if args.all else [spool.get(args.items[0])]
        for message in chosen:
            for path in spool.export(message, directory):
                print(path)
    if not chosen:
        print(f"no messages in {settings.spool.directory}")
    elif any(m.sealed for m in chosen):
        print(f"sealed to the operator's key: open them on the operator's machine with\n"
              f"  kiosk messages decrypt --key OPERATOR_KEY_FILE {directory}\n(docs/offline.md)", file=sys.stderr)
    return 0


def cmd_keygen(args: argparse.Namespace, settings: Settings) -> int:
    """Make an operator key pair: the private key to ``FILE`` (0600), the public key on standard output."""
    from kiosk.fallback.sealing import encode_key, generate_keypair, write_private_key

    private, public = generate_keypair()
    write_private_key(args.key_file, private)
    print(f"wrote the private key to {args.key_file} (keep it off the kiosk; without it no message can be "
          "opened)", file=sys.stderr)
    print(f'[spool]\nrecipient_public_key = "{encode_key(public)}"')
    return 0


def sealed_files(paths: list[Path]) -> list[Path]:
    """The ``*.sealed`` files named, or held by the directories named (sorted), in order."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.name.endswith(".sealed") and p.is_file())
        elif path.is_file():
            found.append(path)
        else:
            raise InputError(f"{path} does not exist: name exported .wav.sealed files or their directory")
    if not found:
        raise InputError(f"no .sealed files in {', '.join(map(str, paths))}: export them with "
                         "`kiosk messages export --all DIR` on the kiosk first")
    return found


def cmd_decrypt(args: argparse.Namespace, settings: Settings) -> int:
    """Open sealed messages with the operator's private key; write each as a WAV (0600). Exit 1 if any fails."""
    from kiosk.fallback.sealing import read_private_key, unseal
    from kiosk.fallback.spool import decode_message, write_private_file

    key = read_private_key(args.key)
    failed = 0
    for path in sealed_files(args.paths):
        name = path.name.removesuffix(".sealed")
        target = (args.out or path.parent) / (name if name.endswith(".wav") else name + ".wav")
        try:
            wav = unseal(path.read_bytes(), key)
            seconds = len(decode_message(wav)) / 16000
        except KioskError as error:
            print(f"{path}: not opened: {error.message}")
            failed += 1
            continue
        except OSError as error:
            print(f"{path}: not opened: {error.strerror}")
            failed += 1
            continue
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private_file(target, wav)
        print(f"{target}  {seconds:.1f} s")
    return 1 if failed else 0


def cmd_deliver(args: argparse.Namespace, settings: Settings) -> int:
    """One delivery pass; exit 0 if everything stored was delivered, 1 otherwise."""
    from kiosk.fallback.delivery import deliver_pass, uploader_from_settings
    from kiosk.fallback.spool import Spool

    uploader = uploader_from_settings(settings)  # delivery's own credential, never the session API's

    async def run(spool: Spool) -> int:
        try:
            results = await deliver_pass(spool, uploader.upload)
        finally:
            await uploader.aclose()
        for r in results:
            outcome = f"delivered (HTTP {r.status})" if r.acknowledged else f"kept: {r.error}"
            print(f"{r.message_id}  {outcome}")
        left = len(spool.messages())
        print(f"{sum(r.acknowledged for r in results)} delivered, {left} left")
        return 0 if left == 0 else 1

    with Spool.from_settings(settings.spool) as spool:
        return asyncio.run(run(spool))


def cmd_cues_check(args: argparse.Namespace, settings: Settings) -> int:
    """List each cue with where it comes from; report unusable operator files (exit 1 if any)."""
    from kiosk.audio.cues import CUE_NAMES, TONES, check_directory, cue_path, load_cue

    directory = settings.spool.cues_directory
    language = settings.spool.language
    for name in CUE_NAMES:
        override = cue_path(name, language, directory)
        source = str(override) if override.exists() else ("generated tone" if name in TONES else "shipped")
        seconds = len(load_cue(name, language, directory)) / 16000
        print(f"{name:18} {seconds:5.2f} s  {source}")
    problems = check_directory(directory)
    for problem in problems:
        print(f"problem: {problem}")
    return 1 if problems else 0

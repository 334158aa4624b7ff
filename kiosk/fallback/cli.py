"""Staff commands for visitors' messages: ``kiosk messages list|export|deliver``, and ``kiosk cues check``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from kiosk.errors import InputError
from kiosk.settings import Settings

_LOGGER = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``messages`` and ``cues`` with their subcommands."""
    messages = subparsers.add_parser("messages", help="visitors' recorded messages: list, export, deliver")
    verbs = messages.add_subparsers(dest="messages_command", metavar="VERB", required=True)
    listing = verbs.add_parser("list", help="list stored messages (id, time, duration, state, checksum)")
    listing.add_argument("--json", action="store_true", help="one JSON array, for programs")
    listing.set_defaults(handler=cmd_list)
    export = verbs.add_parser("export", help="copy messages (verified) as WAV files into a directory")
    export.add_argument("--all", action="store_true", help="every stored message")
    export.add_argument("items", nargs="+", metavar="ID|DIR",
                        help="ID DIR (a message id or a unique prefix of 8+ characters), or --all DIR")
    export.set_defaults(handler=cmd_export)
    deliver = verbs.add_parser("deliver", help="one delivery pass now (when the service is stopped)")
    deliver.set_defaults(handler=cmd_deliver)
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
    """Copy one or every message out, verified against its checksum."""
    from kiosk.fallback.spool import Spool

    if len(args.items) != (1 if args.all else 2):
        raise InputError("usage: kiosk messages export ID DIR, or kiosk messages export --all DIR "
                         "(ids: see `kiosk messages list`)")
    directory = Path(args.items[-1])
    with Spool.from_settings(settings.spool, read_only=True) as spool:
        chosen = spool.messages() if args.all else [spool.get(args.items[0])]
        for message in chosen:
            print(spool.export(message, directory))
    if not chosen:
        print(f"no messages in {settings.spool.directory}")
    return 0


def cmd_deliver(args: argparse.Namespace, settings: Settings) -> int:
    """One delivery pass; exit 0 if everything stored was delivered, 1 otherwise."""
    from kiosk.fallback.delivery import deliver_pass, uploader_from_settings
    from kiosk.fallback.spool import Spool

    uploader = uploader_from_settings(settings)

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

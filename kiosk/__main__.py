"""The ``kiosk`` command line.

Each area registers its own subcommands (``register(subparsers)`` in the modules listed in
``_COMMAND_MODULES``); a handler is ``handler(args, settings) -> exit status``. Handlers import what they
need lazily, so ``kiosk config`` stays fast and works without sound devices.

Development commands (the demo, the local stack, the benchmarks) are not part of the product: a package
that is installed beside it (``kiosk-dev``) adds them through the entry-point group ``kiosk.commands``,
each entry naming a module with the same ``register(subparsers)``. Without it, they are simply absent.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from kiosk.errors import ConfigError, InputError, KioskError
from kiosk.logs import setup_logging
from kiosk.settings import Settings, config_path, load_settings, redacted

_LOGGER = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace, Settings], int]

# Modules that add subcommands; each has ``register(subparsers: argparse._SubParsersAction) -> None``.
_COMMAND_MODULES = (
    "kiosk.app",  # run (the service's main job)
    "kiosk.audio.cli",  # audio process
    "kiosk.audio.devices",  # devices
    "kiosk.audio.selftest",  # selftest voice
    "kiosk.link.cli",  # link check
    "kiosk.fallback.cli",  # messages list|export|deliver, cues check
    "kiosk.doctor",  # doctor
    "kiosk.update.cli",  # update status|check
)
# Entry points of installed packages that add (development) commands.
COMMAND_ENTRY_POINTS = "kiosk.commands"

EXIT_CONFIG = 2


def _cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    """Print the effective settings, secrets redacted."""
    print(f"# from {config_path(args.config)} and KIOSK_* environment variables", file=sys.stderr)
    print(json.dumps(redacted(settings), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every area's subcommands."""
    parser = argparse.ArgumentParser(prog="kiosk", description="Voice kiosk appliance")
    parser.add_argument("--config", type=Path, default=None, help="TOML config file (default: $KIOSK_CONFIG "
                        "or /etc/kiosk/kiosk.toml)")
    parser.add_argument("--log-level", default=None, help="override log_level (DEBUG, INFO, ...)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    config = sub.add_parser("config", help="print the effective settings (secrets redacted)")
    config.set_defaults(handler=_cmd_config)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for entry in importlib.metadata.entry_points(group=COMMAND_ENTRY_POINTS):
        entry.load().register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, load settings (exit 2 with a message if broken), dispatch."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        # No subcommand: the service's main job (`kiosk run`), as systemd starts it.
        args = parser.parse_args([*(sys.argv[1:] if argv is None else argv), "run"])
    try:
        settings = load_settings(args.config)
    except ConfigError as error:
        print(f"kiosk: {error.message}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(args.log_level or settings.log_level)
    handler: Handler = args.handler
    try:
        return handler(args, settings)
    except (ConfigError, InputError) as error:
        print(f"kiosk: {error.message}", file=sys.stderr)
        return EXIT_CONFIG
    except KioskError as error:
        print(f"kiosk: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def run() -> NoReturn:
    """The ``kiosk`` program: ``main``, then leave without finalising the interpreter once the rtc SDK was loaded.

    The SDK's native threads (its tokio runtime; AEC3 is its audio processing module) can still call into
    Python while the interpreter finalises, and the process then aborts with a panic after its work is done:
    seen in the suite after ``kiosk audio process`` had written its output (exit status -6 instead of 0).
    Everything the commands opened is closed by the time ``main`` returns; the log handlers and standard
    streams are flushed here.
    """
    status = main()
    if "livekit.rtc" not in sys.modules:
        sys.exit(status)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    run()

"""Commands: ``kiosk update status`` (slot, version, the last trial) and ``kiosk update check`` (the health check)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kiosk.settings import Settings


def _cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from kiosk.update.status import format_status, read_status

    status = read_status(args.root)
    if args.json:
        print(json.dumps(status.to_json(), indent=2))
    else:
        sys.stdout.write(format_status(status))
    return 0


def _cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    from kiosk.update.check import run_check

    result = run_check(args.out, args.kiosk, doctor_timeout_seconds=args.doctor_timeout,
                       voice_timeout_seconds=args.voice_timeout)
    for name in ("doctor", "voice"):
        part = result[name]
        print(f"{name}: {part['outcome']}: {part['summary']}")
        for failed in part["failed"]:
            print(f"  - {failed}")
    return 0 if all(result[name]["outcome"] == "pass" for name in ("doctor", "voice")) else 1


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``update status`` and ``update check``."""
    from kiosk.update.check import DOCTOR_TIMEOUT_SECONDS, VOICE_TIMEOUT_SECONDS
    from kiosk.update.gate import CHECK_RESULT

    update = subparsers.add_parser("update", help="A/B updates: this kiosk's slot and version, the trial's check")
    sub = update.add_subparsers(dest="update_command", metavar="ACTION", required=True)
    status = sub.add_parser("status", help="the booted and committed slot, the image version, the last trial")
    status.add_argument("--json", action="store_true", help="print as JSON")
    status.add_argument("--root", type=Path, default=Path("/"), help=argparse.SUPPRESS)
    status.set_defaults(handler=_cmd_status)
    check = sub.add_parser("check", help="the trial boot's health check: kiosk doctor and the voice self-test "
                           "(kiosk-update-check.service runs it; stop kiosk.service first)")
    check.add_argument("--out", type=Path, default=CHECK_RESULT, help="where to write the result (JSON)")
    check.add_argument("--kiosk", default=None, help="the kiosk executable to run the checks with")
    check.add_argument("--doctor-timeout", type=float, default=DOCTOR_TIMEOUT_SECONDS, help="seconds")
    check.add_argument("--voice-timeout", type=float, default=VOICE_TIMEOUT_SECONDS, help="seconds")
    check.set_defaults(handler=_cmd_check)

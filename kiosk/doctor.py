"""``kiosk doctor``: on-site checks with a readable report (or JSON) and an exit status.

Each area checks itself next to the code it checks and returns ``kiosk.checks.Check`` lines:
``audio`` (``kiosk.audio.doctor``: devices, and a loopback measurement with a recommended interaction
mode), ``gpio`` (``kiosk.panel.doctor``: buttons and LEDs), ``network`` (``kiosk.link.doctor``: session
API, catalog, a session and a LiveKit connect), ``disk`` (``kiosk.fallback.doctor``: the spool's space,
persistence and writability), ``watchdog`` (``kiosk.health``: the unit's and the hardware watchdog) and
``security`` (``kiosk.security``: what docs/security.md promises, each area reporting its own part).
This module only runs the areas asked for and prints the report; after an audio area with sound it keeps the
loopback sweep's figures in ``metrics.doctor_record`` for the running kiosk's metrics (``keep_sweep``).

Exit status: 0 when no check failed (warnings and skipped checks allowed; with ``--strict`` warnings
count as failures), 1 when a check failed, 2 for a broken configuration (as every command).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kiosk.checks import Check, Report
from kiosk.settings import Settings

_LOGGER = logging.getLogger(__name__)

AREAS = ("audio", "gpio", "network", "disk", "watchdog", "security")


def run_doctor(settings: Settings, areas: Sequence[str], *, sound: bool = True, open_session: bool = True) -> Report:
    """Run the checks for ``areas`` (in the order of ``AREAS``) and build the report."""
    report = Report()
    for area in AREAS:
        if area not in areas:
            continue
        checks: list[Check]
        if area == "audio":
            from kiosk.audio.doctor import check_audio

            checks, report.recommendation = check_audio(settings, sound)
        elif area == "gpio":
            from kiosk.panel.doctor import check_panel

            checks = check_panel(settings)
        elif area == "network":
            from kiosk.link.doctor import check_network

            checks = check_network(settings, open_session)
        elif area == "disk":
            from kiosk.fallback.doctor import check_disk

            checks = check_disk(settings)
        elif area == "watchdog":
            from kiosk.health import check_watchdog

            checks = check_watchdog()
        else:
            from kiosk.security import check_security

            checks = check_security(settings)
        report.checks.extend(checks)
    return report


def keep_sweep(report: Report, settings: Settings, now_unix: float | None = None) -> Path | None:
    """Leave the audio area's loopback sweep in ``metrics.doctor_record`` for the running kiosk's metrics.

    Returns the path written, or None when no sweep was tried or the file could not be written (logged with the
    fix: the kiosk user owns /var/lib/kiosk). Never fails the doctor.
    """
    from kiosk.audio.doctor import sweep_record, write_sweep_record

    record = sweep_record(report.checks, report.recommendation, time.time() if now_unix is None else now_unix)
    if record is None:
        return None
    path = settings.metrics.doctor_record
    try:
        write_sweep_record(path, record)
    except OSError as error:
        _LOGGER.warning("the sweep's figures were not kept for the metrics (%s: %s); run the doctor as the kiosk "
                        "user (sudo -u kiosk kiosk doctor audio) or set metrics.doctor_record",
                        path, error.strerror or error)
        return None
    return path


def _cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    areas = AREAS if not args.areas or "all" in args.areas else tuple(args.areas)
    report = run_doctor(settings, areas, sound=not args.no_sound, open_session=not args.no_session)
    if "audio" in areas:
        keep_sweep(report, settings)
    if args.json:
        print(json.dumps(report.to_json(args.strict), indent=2))
    else:
        sys.stdout.write(report.to_text())
    return report.exit_status(args.strict)


def _area(value: str) -> str:
    if value not in ("all", *AREAS):
        raise argparse.ArgumentTypeError(f"'{value}' is not an area; use all, {', '.join(AREAS)}")
    return value


def register(subparsers: Any) -> None:
    """Add ``kiosk doctor``."""
    parser = subparsers.add_parser(
        "doctor", help="on-site checks: audio (with a loopback measurement), gpio, network, disk, watchdog, security",
        description="On-site checks. The audio check plays a short sweep and a noise burst on the speaker. "
                    "Exit status 0: nothing failed; 1: a check failed.")
    parser.add_argument("areas", nargs="*", type=_area, metavar="AREA",
                        help="all (default), audio, gpio, network, disk, watchdog, security")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-sound", action="store_true", help="skip the loopback measurement (no sound played)")
    parser.add_argument("--no-session", action="store_true",
                        help="skip opening a session and the LiveKit connect test")
    parser.add_argument("--strict", action="store_true", help="warnings count as failures in the exit status")
    parser.set_defaults(handler=_cmd_doctor)

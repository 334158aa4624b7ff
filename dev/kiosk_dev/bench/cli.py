"""Commands: ``kiosk bench audio`` and ``kiosk bench link`` (benchmarks that print figures against targets).

``kiosk bench audio`` measures the capture chain: echo cancellers, voice detection, barge-in through the
virtual room, and optionally a directory of the installer's own recordings; with ``--rooms N`` instead the
seeded room corpus (``kiosk_dev.rooms``), per room class with the baselines side by side. ``kiosk bench
link`` runs the local stack and measures the kiosk-added latency on the link (``kiosk_dev.bench.link``).
Each prints markdown (or ``--json``) and with ``--write`` replaces its section of docs/performance.md
(``## Audio``, ``## Rooms``, ``## Link``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from pathlib import Path

from kiosk.errors import InputError
from kiosk.settings import Settings
from kiosk_dev.bench import BenchSection, report


def _command(default: str) -> str:
    """The command line as typed, for the report's header."""
    return "kiosk " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else default


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bench audio`` and ``bench link``."""
    bench = subparsers.add_parser("bench", help="benchmarks that print figures and write docs/performance.md")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    bench_audio = bench_sub.add_parser(
        "audio", help="echo cancellation, voice detection and barge-in figures",
        description="Measure the capture chain: echo cancellers, voice detection, barge-in through the virtual "
                    "room, and optionally a directory of your own recordings.")
    bench_audio.add_argument("--quick", action="store_true", help="a smaller run (a minute or so)")
    bench_audio.add_argument("--recordings", type=Path, default=None,
                             help="directory of recordings: one subfolder each with mic.wav, ref.wav, "
                                  "optional near.wav and labels.json")
    bench_audio.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    bench_audio.add_argument("--no-live", action="store_true", help="skip the live barge-in run on the virtual "
                             "sound devices")
    bench_audio.add_argument("--rooms", type=int, default=None, metavar="N",
                             help="instead: the seeded room corpus, rooms 0..N-1 (80 in the docs; --quick: 16), per "
                                  "room class, the chain beside the AEC3 and speexdsp baselines (renders rooms not "
                                  "yet cached: a few seconds to half a minute each)")
    bench_audio.add_argument("--split", choices=("reporting", "tuning"), default=None,
                             help="with --rooms: the half reported (odd seeds, never tuned on; the default) or the "
                                  "half to tune on (even seeds)")
    bench_audio.add_argument("--jobs", type=int, default=1, metavar="J",
                             help="with --rooms: processes (rooms are independent; mind a shared machine)")
    bench_audio.add_argument("--write", type=Path, default=None, metavar="PATH",
                             help="replace the '## Audio' section (with --rooms: '## Rooms') of this markdown file "
                                  "(e.g. docs/performance.md)")
    bench_audio.set_defaults(handler=_cmd_bench_audio)

    bench_link = bench_sub.add_parser(
        "link", help="link latency on the local stack (capture, playout, pre-warm, cold session)",
        description="Run the local stack (private network, LiveKit server, stand-in API and agent) and measure "
                    "kiosk-added latency on the capture and playout paths, press-to-live with pre-warm and "
                    "cold session set-up. Needs root (private network namespace).")
    bench_link.add_argument("--quick", action="store_true", help="fewer sessions and turns (about 40 s)")
    bench_link.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    bench_link.add_argument("--write", type=Path, default=None, metavar="PATH",
                            help="replace the '## Link' section of this markdown file (e.g. docs/performance.md)")
    bench_link.set_defaults(handler=_cmd_bench_link)


def collect(settings: Settings, *, quick: bool, recordings: Path | None, live: bool) -> list[BenchSection]:
    """Run every audio benchmark part and return the sections in report order."""
    from kiosk_dev.bench import aec, vad

    sections: list[BenchSection] = [*aec.run(settings, quick=quick), *vad.run(settings, quick=quick)]
    if live:
        from kiosk_dev.bench import bargein

        sections += bargein.run(settings, quick=quick)
    else:
        sections.append(BenchSection(title="Not measured in this run", columns=["part"],
                                     rows=[["live barge-in through the virtual room skipped (--no-live)"]]))
    if recordings is not None:
        from kiosk_dev.bench import recordings as recordings_bench

        sections += recordings_bench.run(settings, recordings)
    return sections


def _cmd_bench_audio(args: argparse.Namespace, settings: Settings) -> int:
    """``kiosk bench audio``."""
    if args.recordings is not None and not args.recordings.is_dir():
        raise InputError(f"--recordings {args.recordings} is not a directory: give the folder that holds one "
                         "subfolder per recording")
    if args.rooms is None and (args.split is not None or args.jobs != 1):
        raise InputError("--split and --jobs go with --rooms N (the room corpus): add --rooms 80, or drop them")
    if args.rooms is not None and (args.rooms < 1 or args.jobs < 1):
        raise InputError(f"--rooms {args.rooms} --jobs {args.jobs}: both must be 1 or more (e.g. --rooms 80 --jobs 2)")
    if args.rooms is not None and args.recordings is not None:
        raise InputError("--rooms and --recordings are separate runs: give one of them")
    when = dt.datetime.now(dt.UTC)
    command = _command("kiosk bench audio")
    heading = report.AUDIO_HEADING
    if args.rooms is not None:
        from kiosk_dev.rooms import bench as rooms_bench

        heading = rooms_bench.ROOMS_HEADING
        sections = rooms_bench.run(settings, rooms=args.rooms, quick=args.quick, jobs=args.jobs,
                                   split=args.split or "reporting")
    else:
        sections = collect(settings, quick=args.quick, recordings=args.recordings, live=not args.no_live)
    if args.json:
        print(report.dumps(report.to_json(sections, command=command, when=when)))
    else:
        print(report.render_markdown(sections, command=command, when=when, heading=heading))
    if args.write is not None:
        report.write_markdown(args.write, sections, command=command, when=when, heading=heading)
    return 0


def _cmd_bench_link(args: argparse.Namespace, settings: Settings) -> int:
    """``kiosk bench link``."""
    from kiosk_dev.bench import link

    when = dt.datetime.now(dt.UTC)
    command = _command("kiosk bench link")
    sections = link.run(settings, quick=args.quick)
    if args.json:
        print(json.dumps(report.to_json(sections, command=command, when=when), indent=2, default=str))
    else:
        print(link.render_section(sections, command=command, when=when))
    if args.write is not None:
        link.write_section(args.write, link.render_section(sections, command=command, when=when))
        print(f"wrote the {link.SECTION_HEADING!r} section of {args.write}", file=sys.stderr)
    return 0

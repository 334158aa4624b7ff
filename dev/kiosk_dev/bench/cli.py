"""Commands: ``kiosk bench audio``, ``kiosk bench link`` and ``kiosk bench field`` (benchmarks with targets).

``kiosk bench audio`` measures the capture chain: echo cancellers, voice detection, barge-in through the
virtual room, and optionally a directory of the installer's own recordings; with ``--rooms N`` instead the
seeded room corpus (``kiosk_dev.rooms``), per room class with the baselines side by side. ``kiosk bench
link`` runs the local stack and measures the kiosk-added latency on the link (``kiosk_dev.bench.link``).
Each prints markdown (or ``--json``) and with ``--write`` replaces its section of docs/performance.md
(``## Audio``, ``## Rooms``, ``## Link``).
``kiosk bench field`` runs scripted visitors on the full local stack while faults fire, on a loaded machine
(``kiosk_dev.bench.field``), and writes the ``## Measured`` section of docs/field.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from kiosk.errors import InputError
from kiosk.settings import Settings
from kiosk_dev.bench import AudioPreset, BenchSection, report


def _command(default: str) -> str:
    """The command line as typed, for the report's header."""
    return "kiosk " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else default


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bench audio``, ``bench link``, ``bench sessions`` and ``bench field``."""
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

    bench_sessions = bench_sub.add_parser(
        "sessions", help="memory each session leaves behind in one process (local stack, root)",
        description="Open and close sessions in one process on the local stack and print the resident memory "
                    "kept per session (after a garbage collection and malloc_trim), threads and live FFI handles "
                    "(docs/field.md, 'Memory').")
    bench_sessions.add_argument("--mode", choices=("link", "connect", "publish", "subscribe"), default="link",
                                help="link: the kiosk's room link with a question and answer (the default); "
                                     "connect/publish/subscribe: a bare rtc.Room, with a microphone track, and "
                                     "receiving the agent's audio")
    bench_sessions.add_argument("--count", type=int, default=40, help="sessions (default 40)")
    bench_sessions.add_argument("--tracemalloc", action="store_true",
                                help="also print where Python's heap grew (slower)")
    bench_sessions.add_argument("--json", action="store_true", help="print JSON instead of text")
    bench_sessions.set_defaults(handler=_cmd_bench_sessions)

    from kiosk_dev.bench.field import FAULTS

    bench_field = bench_sub.add_parser(
        "field", help="scripted visitors on the local stack while faults fire, on a loaded machine (root)",
        description="Run the full local stack (LiveKit server, stand-in API and agent, virtual room and panel) "
                    "with the kiosk in a process of its own, restarted as systemd/kiosk.service says; scripted "
                    "visitors talk to it continuously while a fault injector fires at seeded random intervals and "
                    "a CPU hog runs on every core. Prints sessions lost, time to a usable kiosk per fault, "
                    "messages, resources and event-loop lag against the targets. Exit status 1 when an invariant "
                    "broke (a message lost or duplicated, a fault the kiosk did not recover from, a crash).")
    bench_field.add_argument("--minutes", type=float, default=120.0, help="how long visitors come (default 120)")
    bench_field.add_argument("--quick", action="store_true",
                             help="4 minutes with a short list of faults close together (the test suite's run)")
    bench_field.add_argument("--seed", type=int, default=1, help="seed for the faults, their timing and the visitors")
    bench_field.add_argument("--faults", default=None, metavar="KIND,...",
                             help="the fault kinds to use, or 'none' for a soak without faults (default: all; "
                                  "with --quick its list): " + ", ".join(FAULTS))
    bench_field.add_argument("--load", type=int, default=None, metavar="N",
                             help="busy processes loading the machine (default: one per core; 0: none)")
    bench_field.add_argument("--keep", type=Path, default=None, metavar="DIR",
                             help="keep the kiosk's log, the supervisor's socket and the spool in DIR")
    bench_field.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    bench_field.add_argument("--write", type=Path, default=None, metavar="PATH",
                             help="replace the '## Measured' section of this markdown file (e.g. docs/field.md)")
    bench_field.add_argument("--section", default="Measured", metavar="TITLE",
                             help="with --write: the '## TITLE' section to replace (default: Measured)")
    bench_field.add_argument("--from-json", type=Path, default=None, metavar="FILE",
                             help="run nothing: render a run kept with --json (with --write: into the docs)")
    bench_field.set_defaults(handler=_cmd_bench_field)


def collect(settings: Settings, *, quick: bool, recordings: Path | None, live: bool,
            preset: AudioPreset | None = None) -> list[BenchSection]:
    """Run every audio benchmark part and return the sections in report order (``preset`` over ``quick``)."""
    from kiosk_dev.bench import aec, vad

    sections: list[BenchSection] = [*aec.run(settings, quick=quick, preset=preset),
                                    *vad.run(settings, quick=quick, preset=preset)]
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


def _cmd_bench_sessions(args: argparse.Namespace, settings: Settings) -> int:
    """``kiosk bench sessions``."""
    from kiosk_dev.bench import sessions

    result = sessions.run(args.mode, args.count, trace=args.tracemalloc)
    print(sessions.to_json(result) if args.json else sessions.render(result))
    return 0


def _cmd_bench_field(args: argparse.Namespace, settings: Settings) -> int:
    """``kiosk bench field``."""
    import os

    from kiosk_dev.bench import field

    if args.from_json is not None:
        return _render_field_json(args)
    faults: tuple[str, ...] | None = None
    if args.faults is not None and args.faults.strip() == "none":
        faults = ()
    elif args.faults is not None:
        faults = tuple(f.strip() for f in args.faults.split(",") if f.strip())
        unknown = [f for f in faults if f not in field.FAULTS]
        if unknown or not faults:
            raise InputError(f"--faults: unknown {', '.join(unknown) or '(none given)'}; use some of "
                             + ", ".join(field.FAULTS))
    overrides: dict[str, object] = {"seed": args.seed, "run_dir": args.keep}
    if faults is not None:
        overrides["faults"] = faults
    if args.load is not None:
        if args.load < 0:
            raise InputError("--load: give a number of busy processes, 0 or more")
        overrides["load_processes"] = args.load
    if args.quick:
        config = field.FieldConfig.quick(**overrides)
    else:
        if args.minutes <= 0:
            raise InputError("--minutes: give a positive number of minutes")
        overrides.setdefault("load_processes", os.cpu_count() or 1)
        config = field.FieldConfig(duration_seconds=args.minutes * 60.0, **overrides)  # type: ignore[arg-type]
    when = dt.datetime.now(dt.UTC)
    command = _command("kiosk bench field")
    result = field.run(settings, config)
    summary = field.summarise(result)
    if args.json:
        data = field.as_json(result, summary)
        data["run"]["command"] = command
        print(report.dumps(data))
    return _field_report(args, result, summary, command=command, when=when)


def _render_field_json(args: argparse.Namespace) -> int:
    """``kiosk bench field --from-json FILE``: the report of a kept run, printed and optionally written."""
    from kiosk_dev.bench import field

    try:
        data = json.loads(args.from_json.read_text())
        result, summary = field.result_from_json(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise InputError(f"--from-json {args.from_json}: not a run printed by 'kiosk bench field --json' "
                         f"({error!r}); give the file that run's standard output went to") from error
    when = dt.datetime.fromtimestamp(args.from_json.stat().st_mtime, dt.UTC)
    command = data.get("run", {}).get("command") or "kiosk bench field (kept with --json)"
    return _field_report(args, result, summary, command=command, when=when, markdown=True)


def _field_report(args: argparse.Namespace, result: Any, summary: dict[str, Any], *, command: str,
                  when: dt.datetime, markdown: bool = False) -> int:
    """Print the markdown report (unless --json printed JSON), write it with --write; the exit status.

    1 when an invariant broke (a message lost or duplicated, a stuck fault, a crash, no final answer).
    """
    from kiosk_dev.bench import field

    heading = f"## {args.section}"
    text = field.render(result, summary, command=command, when=when, heading=heading)
    if markdown or not args.json:
        print(text)
    if args.write is not None:
        report.write_section(args.write, heading, text)
        print(f"wrote the {heading!r} section of {args.write}", file=sys.stderr)
    invariants = summary["invariants"]
    broken = (invariants["messages_lost"] or invariants["messages_duplicated"] or invariants["faults_stuck"]
              or invariants["unplanned_exits"] or invariants["unit_failed"]
              or not invariants["final_exchange_completed"])
    return 1 if broken else 0

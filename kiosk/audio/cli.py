"""Commands: ``kiosk audio process`` (the chain over recorded files) and ``kiosk bench audio`` (the benchmark)."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import logging
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiosk.bench import bench_subcommands
from kiosk.errors import InputError
from kiosk.settings import Settings

if TYPE_CHECKING:
    from kiosk.bench import BenchSection

_LOGGER = logging.getLogger(__name__)


def _channel(value: str) -> int | str:
    if value == "mix":
        return value
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a channel: use 0, 1, ... or mix") from None
    if number < 0:
        raise argparse.ArgumentTypeError("channels count from 0")
    return number


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``audio process`` and ``bench audio``."""
    audio = subparsers.add_parser("audio", help="audio tools (offline processing of recordings)")
    audio_sub = audio.add_subparsers(dest="audio_command", metavar="ACTION", required=True)
    process = audio_sub.add_parser(
        "process", help="run the configured capture chain over a recorded mic/ref pair",
        description="Run the configured capture chain (echo canceller, voice detection) over recorded files "
                    "exactly as it runs live, and write the cleaned 16 kHz mono WAV.")
    process.add_argument("--mic", type=Path, required=True, help="microphone recording (WAV)")
    process.add_argument("--ref", type=Path, required=True, help="what the speaker played meanwhile (WAV)")
    process.add_argument("--out", type=Path, required=True, help="cleaned output (16 kHz mono WAV)")
    process.add_argument("--vad", type=Path, default=None, help='speech intervals as JSON {"speech": [[s, e]]}')
    process.add_argument("--mic-channel", type=_channel, default=None, help="channel of a multi-channel mic "
                         "file (0-based) or mix")
    process.add_argument("--ref-channel", type=_channel, default=None, help="channel of a multi-channel ref "
                         "file (0-based) or mix")
    process.set_defaults(handler=_cmd_process)

    bench_sub = bench_subcommands(subparsers)
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
    bench_audio.add_argument("--write", type=Path, default=None, metavar="PATH",
                             help="replace the '## Audio' section of this markdown file (e.g. docs/performance.md)")
    bench_audio.set_defaults(handler=_cmd_bench_audio)


def _cmd_process(args: argparse.Namespace, settings: Settings) -> int:
    """``kiosk audio process``."""
    from kiosk.audio.offline import process_files

    result = process_files(settings, args.mic, args.ref, args.out, vad_path=args.vad,
                           mic_channel=args.mic_channel, ref_channel=args.ref_channel)
    seconds = len(result.cleaned) / 16000
    print(f"wrote {args.out} ({seconds:.1f} s); {len(result.speech)} speech segment(s)"
          + (f", intervals in {args.vad}" if args.vad else ""))
    return 0


def _optional_run(module: str, settings: Settings, **kwargs: Any) -> list[BenchSection] | str:
    """``module.run(settings, **kwargs)``, or why it could not run (module absent)."""
    try:
        bench = importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != module:
            raise
        return f"{module} is not available in this build"
    sections: list[BenchSection] = bench.run(settings, **kwargs)
    return sections


def collect(settings: Settings, *, quick: bool, recordings: Path | None, live: bool) -> list[BenchSection]:
    """Run every audio benchmark part and return the sections in report order."""
    from kiosk.bench import BenchSection
    from kiosk.bench import vad as vad_bench

    sections: list[BenchSection] = []
    skipped: list[str] = []
    aec = _optional_run("kiosk.bench.aec", settings, quick=quick)
    if isinstance(aec, str):
        skipped.append(aec)
    else:
        sections += aec
    sections += vad_bench.run(settings, quick=quick)
    if live:
        bargein = _optional_run("kiosk.bench.bargein", settings, quick=quick)
        if isinstance(bargein, str):
            skipped.append(bargein + " (live barge-in not measured)")
        else:
            sections += bargein
    else:
        skipped.append("live barge-in through the virtual room skipped (--no-live)")
    if recordings is not None:
        from kiosk.bench import recordings as recordings_bench

        sections += recordings_bench.run(settings, recordings)
    if skipped:
        sections.append(BenchSection(title="Not measured in this run", columns=["part"],
                                     rows=[[s] for s in skipped]))
    return sections


def _cmd_bench_audio(args: argparse.Namespace, settings: Settings) -> int:
    """``kiosk bench audio``."""
    from kiosk.bench import report

    if args.recordings is not None and not args.recordings.is_dir():
        raise InputError(f"--recordings {args.recordings} is not a directory: give the folder that holds one "
                         "subfolder per recording")
    when = dt.datetime.now(dt.UTC)
    command = "kiosk " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "kiosk bench audio"
    sections = collect(settings, quick=args.quick, recordings=args.recordings, live=not args.no_live)
    if args.json:
        print(report.dumps(report.to_json(sections, command=command, when=when)))
    else:
        print(report.render_markdown(sections, command=command, when=when))
    if args.write is not None:
        report.write_markdown(args.write, sections, command=command, when=when)
    return 0

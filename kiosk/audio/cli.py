"""Command: ``kiosk audio process`` (the configured capture chain over recorded files, exactly as live)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from kiosk.settings import Settings

_LOGGER = logging.getLogger(__name__)


def _channel(value: str) -> int | str:
    if value in ("mix", "beam"):
        return value
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a channel: use 0, 1, ..., mix or beam") from None
    if number < 0:
        raise argparse.ArgumentTypeError("channels count from 0")
    return number


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``audio process``."""
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
                         "file (0-based), mix, or beam (the fixed beamformer over the array's microphones, "
                         "audio.array_* settings)")
    process.add_argument("--ref-channel", type=_channel, default=None, help="channel of a multi-channel ref "
                         "file (0-based) or mix")
    process.set_defaults(handler=_cmd_process)


def _cmd_process(args: argparse.Namespace, settings: Settings) -> int:
    """``kiosk audio process``."""
    from kiosk.audio.offline import process_files

    result = process_files(settings, args.mic, args.ref, args.out, vad_path=args.vad,
                           mic_channel=args.mic_channel, ref_channel=args.ref_channel)
    seconds = len(result.cleaned) / 16000
    print(f"wrote {args.out} ({seconds:.1f} s); {len(result.speech)} speech segment(s)"
          + (f", intervals in {args.vad}" if args.vad else ""))
    return 0



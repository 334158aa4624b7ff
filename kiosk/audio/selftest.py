"""``kiosk selftest voice``: one loopback voice turn through the real devices.

A short spoken cue (``status_online``, in the kiosk's language, the operator's own file if there is one) is
played through the configured speaker and recorded through the configured microphone with the same duplex
recording as the doctor's loopback measurement (``kiosk.audio.doctor.play_and_record``). The recording then
runs through the configured capture chain offline (``kiosk.audio.offline.process_arrays``: the echo canceller,
the voice detector and the segmenter exactly as live) and the turn passes when the chain hears speech for at
least ``MIN_HEARD_SECONDS`` while the cue can be in the microphone (from its start to its end plus the echo
canceller's search range, ``aec.max_delay_ms``).

The chain gets a silent reference, not the cue: with the real one its echo canceller would (rightly) remove
the kiosk's own voice, and the barge-in logic would call what is left echo. With a silent reference the
question is the one a visitor asks: does the kiosk hear a voice in front of it?

Nothing of the recording is kept or logged (a bystander may be speaking): only the figures. Exit status 0
when the cue was heard, 1 when not (or the devices failed), 2 for a broken configuration. The health gate
of an update runs it on the trial boot (``kiosk update check``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from kiosk.audio.format import RATE_HZ, Pcm
from kiosk.checks import Check, Verdict
from kiosk.effects import Cue
from kiosk.settings import Settings

CUE = Cue.STATUS_ONLINE  # "The assistant is online": about 1.5 s of speech, shipped in every language
LEAD_SECONDS = 0.5  # silence before the cue: the streams settle, the detector learns the noise floor
MIN_HEARD_SECONDS = 0.3  # speech the chain must hear while the cue can be in the microphone
TAIL_MARGIN_SECONDS = 0.5  # recorded beyond the cue and the longest echo delay searched


@dataclass
class VoiceTurn:
    """What the voice self-test found (figures only, never audio)."""

    heard: bool
    heard_seconds: float  # speech the chain detected inside the cue's window
    cue_seconds: float
    first_speech_ms: float | None  # from the cue's first sample to the first detected speech
    peak_dbfs: float  # loudest 10 ms of the microphone inside the window
    layout: str = "recording"  # "duplex" or "two streams" live; "recording" when judged from arrays
    capture_rate: float = 1.0


def _peak_dbfs(pcm: Pcm) -> float:
    frame = RATE_HZ // 100
    n = len(pcm) // frame * frame
    if n == 0:
        return -120.0
    power = np.mean(np.square(pcm[:n].reshape(-1, frame).astype(np.float64) / 32768.0), axis=1)
    return round(10.0 * float(np.log10(max(float(power.max()), 1e-12))), 1)


def judge(settings: Settings, mic: Pcm, cue_start: int, cue_samples: int) -> VoiceTurn:
    """Run the capture chain over a recording (16 kHz int16) and judge whether it heard the cue.

    ``cue_start`` and ``cue_samples`` place the cue in the reference's time line; the window reaches
    ``aec.max_delay_ms`` past the cue's end (the echo path's delay).
    """
    from kiosk.audio.offline import process_arrays

    result = process_arrays(settings, mic, np.zeros_like(mic))
    window_start = cue_start / RATE_HZ
    window_end = (cue_start + cue_samples) / RATE_HZ + settings.aec.max_delay_ms / 1000.0
    heard_seconds = 0.0
    first: float | None = None
    for start, end in result.speech:
        overlap = min(end, window_end) - max(start, window_start)
        if overlap > 0:
            heard_seconds += overlap
            first = start if first is None else min(first, start)
    lo = cue_start
    hi = min(len(mic), int(window_end * RATE_HZ))
    return VoiceTurn(
        heard=heard_seconds >= MIN_HEARD_SECONDS, heard_seconds=round(heard_seconds, 2),
        cue_seconds=round(cue_samples / RATE_HZ, 2),
        first_speech_ms=None if first is None else round(max(0.0, first - window_start) * 1000.0, 0),
        peak_dbfs=_peak_dbfs(mic[lo:hi]))


def run_voice_turn(settings: Settings) -> VoiceTurn:
    """Play the cue through the configured speaker, record the microphone, judge (``OSError``: devices failed)."""
    from kiosk.audio.cues import load_cue
    from kiosk.audio.doctor import play_and_record

    cue = load_cue(CUE.value, settings.spool.language, settings.spool.cues_directory)
    lead = int(LEAD_SECONDS * RATE_HZ)
    play = np.concatenate([np.zeros(lead, dtype=np.int16), np.asarray(cue, dtype=np.int16)])
    tail = settings.aec.max_delay_ms / 1000.0 + TAIL_MARGIN_SECONDS
    mic, _ref, layout, capture_rate = play_and_record(settings, play, tail)
    mic16 = np.clip(np.rint(mic * 32768.0), -32768, 32767).astype(np.int16)
    turn = judge(settings, mic16, lead, len(cue))
    turn.layout = layout
    turn.capture_rate = capture_rate
    return turn


def voice_check(turn: VoiceTurn | None, error: str | None = None) -> Check:
    """The self-test as one report line."""
    if turn is None:
        return Check("audio", "voice turn", Verdict.FAIL, f"the voice self-test did not run: {error}",
                     "check the devices with `kiosk devices`; stop kiosk.service first")
    figures: dict[str, Any] = asdict(turn)
    if turn.heard:
        return Check("audio", "voice turn", Verdict.OK,
                     f"the capture chain heard the spoken cue ({turn.heard_seconds} s of speech, first after "
                     f"{turn.first_speech_ms:.0f} ms, peak {turn.peak_dbfs} dBFS)", figures=figures)
    return Check("audio", "voice turn", Verdict.FAIL,
                 f"the capture chain did not hear the spoken cue ({turn.heard_seconds} s of speech, needs "
                 f"{MIN_HEARD_SECONDS:g}; peak {turn.peak_dbfs} dBFS in the window)",
                 "turn the speaker on and up and face it to the microphone; check `kiosk doctor audio`", figures)


def _cmd_selftest(args: argparse.Namespace, settings: Settings) -> int:
    try:
        check = voice_check(run_voice_turn(settings))
    except (OSError, ValueError) as error:  # PyAudio raises both for devices that refuse the format
        check = voice_check(None, str(error))
    if args.json:
        print(json.dumps({"heard": check.status is Verdict.OK, **asdict(check)}, indent=2, default=str))
    else:
        sys.stdout.write(f"[{'ok' if check.status is Verdict.OK else 'FAIL'}] {check.name}: {check.summary}\n")
        if check.fix and check.status is not Verdict.OK:
            sys.stdout.write(f"       fix: {check.fix}\n")
    return 0 if check.status is Verdict.OK else 1


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``selftest voice``."""
    selftest = subparsers.add_parser("selftest", help="self-tests through the real devices (make a sound)")
    sub = selftest.add_subparsers(dest="selftest_command", metavar="TEST", required=True)
    voice = sub.add_parser("voice", help="play a spoken cue and check the capture chain hears speech in it",
                           description=__doc__.splitlines()[0] if __doc__ else None)
    voice.add_argument("--json", action="store_true", help="print the result as JSON")
    voice.set_defaults(handler=_cmd_selftest)

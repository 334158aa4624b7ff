"""Why interruptions are missed: the barge-in decision's reason per frame in the 300 ms after each onset.

``python -m kiosk_dev.rooms.why [--rooms N] [--split tuning|reporting|all] [--seeds 0,2,...] [--each]`` runs the
configured chain (``kiosk.audio.pipeline.CaptureChain``, microphone 0, as ``chain`` in the benchmark) over rooms
of the corpus and, for every interruption not reported within 300 ms, counts why each frame of that window
did not count as the visitor, in the order the decision tests them:

- ``detector, main path`` / ``detector, linear path``: the voice detector (webrtcvad) heard no speech in the
  canceller's output, while the output was the canceller's main path (the hybrid's AEC3, whose suppressor can
  remove a visitor quieter than the echo) or its linear filter's residual (the hybrid in double talk);
- ``level cue``: webrtcvad heard speech, but its level cues took it for a distant voice;
- ``attenuation``: the canceller took 12 dB or more off the microphone for it (echo it is still removing);
- ``leak, main path`` / ``leak, linear path``: the output did not stand ``vad.barge_in_margin_db`` above the
  expected residual echo (the learnt leak);
- ``echo veto``: the residual correlated with the reference (a moved echo path);
- ``counted``: the frame did count (the run was too short or broken before ``vad.min_speech_ms``).

It reads the chain's state after each frame (development only; the product never imports it). Use it on the
tuning half; the reporting half is for figures, not for looking at.
"""

from __future__ import annotations

import argparse
import collections
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kiosk.audio.format import frames as cut
from kiosk.audio.pipeline import _MAX_TALK_ATTENUATION_DB, CaptureChain
from kiosk.audio.vad import WebRtcVoiceDetector, frame_level_dbfs
from kiosk_dev.rooms import generate
from kiosk_dev.rooms.metrics import DETECT_S, FRAME, FRAME_S, room_labels

if TYPE_CHECKING:
    from kiosk.settings import Settings
    from kiosk_dev.rooms.generate import Room

REASONS = ("detector, main path", "detector, linear path", "level cue", "attenuation", "leak, main path",
           "leak, linear path", "echo veto", "counted")


@dataclass(frozen=True)
class Interruption:
    """One interruption of one room: whether it was reported within 300 ms, and why its frames did not count."""

    seed: int
    room_class: str
    ser_db: float
    caught: bool
    reasons: dict[str, int]


def _on_linear_path(chain: CaptureChain) -> bool:
    """The hybrid canceller returned its linear filter's residual for the last frame (double talk)."""
    backend = getattr(chain.echo_canceller, "backend", None)
    return bool(getattr(backend, "_speex_on", False))


def _reason(chain: CaptureChain, speech: bool, margin_db: float, leak_before_db: float) -> str:
    """Why the frame just processed did (not) count as the visitor, in the order the chain decides."""
    if speech:
        return "counted"
    detector = chain.detector
    path = "linear path" if _on_linear_path(chain) else "main path"
    if isinstance(detector, WebRtcVoiceDetector):
        if not detector.raw_speech:
            return f"detector, {path}"
        if not detector.near:
            return "level cue"
    out_dbfs = frame_level_dbfs(chain._out_power)
    if frame_level_dbfs(chain._mic_power) - out_dbfs >= _MAX_TALK_ATTENUATION_DB:
        return "attenuation"
    if out_dbfs - chain._echo_envelope_dbfs() <= leak_before_db + margin_db:
        return f"leak, {path}"
    return "echo veto"


def explain(room: Room, settings: Settings) -> list[Interruption]:
    """Run a fresh configured chain over ``room``; one ``Interruption`` per interruption."""
    labels = room_labels(room)
    chain = CaptureChain(settings)
    mic = cut(room.mics[0])
    ref = cut(room.ref)
    n = room.mics.shape[1] // FRAME
    margin = settings.vad.barge_in_margin_db
    reasons: list[str] = []
    open_after: list[bool] = []
    for k in range(n):
        leak = chain.leak_db
        frame = chain.process(mic[k], ref[k], k * FRAME_S)
        reasons.append(_reason(chain, frame.speech, margin, leak))
        open_after.append(chain.segmenter.in_speech)
    window = int(DETECT_S / FRAME_S)
    return [Interruption(seed=room.spec.seed, room_class=room.spec.room_class, ser_db=room.spec.ser_db,
                         caught=any(open_after[onset:onset + window]),
                         reasons=dict(collections.Counter(reasons[onset:onset + window])))
            for onset in labels.onsets]


def summary(found: Sequence[Interruption]) -> dict[str, int]:
    """Frames per reason over the windows of the interruptions that were missed."""
    total: collections.Counter[str] = collections.Counter()
    for item in found:
        if not item.caught:
            total.update(item.reasons)
    return {reason: total[reason] for reason in REASONS}


def main(argv: Sequence[str] | None = None) -> int:
    """Print the reasons per missed interruption (``--each``) and their sum."""
    from kiosk.settings import Settings

    parser = argparse.ArgumentParser(description="Why interruptions are missed (development only).")
    parser.add_argument("--rooms", type=int, default=80, help="rooms 0..N-1 (80)")
    parser.add_argument("--split", default="tuning", choices=("tuning", "reporting", "all"))
    parser.add_argument("--seeds", default="", help="comma-separated seeds instead of --rooms/--split")
    parser.add_argument("--each", action="store_true", help="one line per interruption")
    args = parser.parse_args(argv)
    seeds = ([int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds
             else generate.seeds_for(args.rooms, args.split))
    settings = Settings()
    found: list[Interruption] = []
    for seed in seeds:
        for item in explain(generate.load(seed), settings):
            found.append(item)
            if args.each:
                print(f"room {item.seed} {item.room_class} SER {item.ser_db:+.1f} dB "
                      f"{'caught' if item.caught else 'missed'}: {item.reasons}")
    missed = sum(not item.caught for item in found)
    print(f"{missed} of {len(found)} interruptions not reported within {DETECT_S * 1000:.0f} ms; "
          "frames of their windows by reason:")
    total = summary(found)
    frames_missed = max(sum(total.values()), 1)
    for reason, count in total.items():
        print(f"  {reason:24s} {count:6d}  {count / frames_missed:6.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

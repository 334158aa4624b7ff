"""CPU of the capture chain against one bare AEC3 call, measured in the same run on the same rooms.

``python -m kiosk_dev.rooms.cpu [--rooms 4] [--repeats 2] [--profile]``: process time per 10 ms frame of
each stage, run one after the other in this process over the same room audio (microphone 0 and the
reference), and the ratio of each to one bare AEC3 call through the livekit SDK (the best of the repeats).
``--profile`` adds a cProfile breakdown of the whole chain. Stages that need an optional package
(pywebrtc-audio; onnxruntime and silero-vad) are skipped with the line that installs it. Timings are
reported, never asserted.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from kiosk_dev.rooms import generate, onset
from kiosk_dev.rooms.systems import NATIVE_INSTALL, NativeAec3, bare_aec3

Pcm = npt.NDArray[np.int16]
Step = Callable[[Pcm, Pcm, float], Any]
BARE = "aec3 bare (SDK)"


def _frames(room: generate.Room) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.int16]]:
    from kiosk.audio.format import frames

    return frames(room.mics[0]), frames(room.ref)


def stages() -> dict[str, tuple[Callable[[], Step], tuple[str, ...], str]]:
    """Name -> (factory of a per-frame ``step(mic, ref, t)``, modules it needs, how to install them)."""
    from kiosk.audio.aec import AlignedEchoCanceller, HybridBackend, NoneBackend, PassThrough, WebRtcBackend
    from kiosk.audio.array import FixedBeamformer
    from kiosk.audio.pipeline import CaptureChain
    from kiosk.settings import AecBackend, Settings

    def canceller(make: Callable[[], Any]) -> Callable[[], Step]:
        def build() -> Step:
            backend = make()
            return lambda m, r, t: backend.process(m, r)
        return build

    def chain(backend: AecBackend | None = None, detector: bool = False) -> Callable[[], Step]:
        def build() -> Step:
            settings = Settings() if backend is None else Settings(aec={"backend": backend})
            check = onset.SileroCheckedDetector(_webrtc_detector(settings), threshold=0.25) if detector else None
            return CaptureChain(settings, detector=check).process
        return build

    def with_beam(make: Callable[[], Step]) -> Callable[[], Step]:
        def build() -> Step:
            bf = FixedBeamformer.toward(0.0)
            step = make()
            buf = np.zeros((4, 160), dtype=np.int16)

            def run(m: Pcm, r: Pcm, t: float) -> Any:
                buf[:] = m  # the same channel four times: the cost does not depend on the content
                return step(bf.process(buf), r, t)
            return run
        return build

    def beam_alone() -> Step:
        bf = FixedBeamformer.toward(0.0)
        buf = np.zeros((4, 160), dtype=np.int16)

        def run(m: Pcm, r: Pcm, t: float) -> Any:
            buf[:] = m
            return bf.process(buf)
        return run

    def no_canceller() -> Step:
        return CaptureChain(Settings(), echo_canceller=PassThrough()).process

    silero = (onset.NEEDS, onset.INSTALL)
    native = (("pywebrtc_audio",), NATIVE_INSTALL)
    return {
        BARE: (canceller(bare_aec3), (), ""),
        "aec3 + ns + hpf (SDK)": (canceller(lambda: WebRtcBackend(noise_suppression=True)), (), ""),
        "aec3 bare (pywebrtc-audio)": (canceller(NativeAec3), *native),
        "aec3 + ns + hpf (pywebrtc-audio)": (canceller(lambda: NativeAec3(noise_suppression=True)), *native),
        "hybrid backend alone": (canceller(lambda: HybridBackend(128, noise_suppression=True)), (), ""),
        "alignment alone (none backend)": (canceller(lambda: AlignedEchoCanceller(NoneBackend())), (), ""),
        "aligned hybrid (the canceller)": (
            canceller(lambda: AlignedEchoCanceller(HybridBackend(128, noise_suppression=True))), (), ""),
        "chain without canceller": (no_canceller, (), ""),
        "whole chain (configured)": (chain(), (), ""),
        "fixed beamformer (4 ch)": (beam_alone, (), ""),
        "whole chain, webrtc backend": (chain(AecBackend.WEBRTC), (), ""),
        "beamformer + whole chain (configured)": (with_beam(chain()), (), ""),
        "beamformer + whole chain, webrtc backend": (with_beam(chain(AecBackend.WEBRTC)), (), ""),
        "whole chain + silero check (0.25)": (chain(detector=True), *silero),
    }


def _webrtc_detector(settings: Any) -> Any:
    from kiosk.audio.vad import WebRtcVoiceDetector

    return WebRtcVoiceDetector(settings.vad)


def measure(seeds: Sequence[int], repeats: int = 1) -> tuple[dict[str, float], list[str]]:
    """Mean process time per frame (us) of every stage over the rooms (best of ``repeats``), and what was skipped."""
    import importlib.util

    rooms = [_frames(generate.load(s)) for s in seeds]
    result: dict[str, list[float]] = {}
    skipped: list[str] = []
    for name, (make, needs, install) in stages().items():
        absent = [m for m in needs if importlib.util.find_spec(m) is None]
        if absent:
            skipped.append(f"{name}: needs {' and '.join(absent)} ({install})")
            continue
        for _ in range(repeats):
            total = frames_n = 0.0
            for mic, ref in rooms:
                step = make()
                n = len(mic)
                t0 = time.process_time()
                for k in range(n):
                    step(mic[k], ref[k], k * 0.01)
                total += time.process_time() - t0
                frames_n += n
            result.setdefault(name, []).append(total / frames_n * 1e6)
    return {k: float(np.min(v)) for k, v in result.items()}, skipped


def profile(seed: int) -> str:
    """A profile of the whole chain over one room: the top functions by own time."""
    from kiosk.audio.pipeline import CaptureChain
    from kiosk.settings import Settings

    mic, ref = _frames(generate.load(seed))
    chain = CaptureChain(Settings())
    prof = cProfile.Profile()
    prof.enable()
    for k in range(len(mic)):
        chain.process(mic[k], ref[k], k * 0.01)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(22)
    return out.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    """Print the stages' CPU as a markdown table (and the profile)."""
    parser = argparse.ArgumentParser(description="CPU of the chain against one bare AEC3 call")
    parser.add_argument("--rooms", type=int, default=4, help="reporting rooms 1, 3, 5, ... (one class each)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    seeds = [2 * i + 1 for i in range(args.rooms)]
    figures, skipped = measure(seeds, args.repeats)
    bare = figures[BARE]
    print("| stage | us per frame | x bare AEC3 (SDK) |\n|---|---|---|")
    for name, us in figures.items():
        print(f"| {name} | {us:.0f} | {us / bare:.2f} |")
    for line in skipped:
        print(f"skipped: {line}", file=sys.stderr)
    if args.profile:
        print(profile(seeds[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The systems measured on the room corpus: the product's capture chain (and its variants) and the baselines.

Each system takes a rendered room and the settings and returns a ``RunOutput``: the cleaned output, the
frames that emitted VoiceStarted / VoiceStopped, the reported speech segments, the clean target for SDR
and the process time of the per-frame loop. The product chain runs exactly as ``kiosk audio process``
runs it (a fresh ``CaptureChain`` from the settings, frame times as ``now_seconds``, microphone 0 as
``audio.channel = 0`` takes it); array variants (``variants``) put a front end before it.

Baselines (as the issue names them):

- ``aec3+ns/webrtcvad``: WebRTC AEC3 with noise suppression and the high-pass filter
  (``livekit.rtc.AudioProcessingModule``, the product's ``WebRtcBackend``) on microphone 0 with the
  reference as rendered (AEC3's own delay estimator), then webrtcvad (``vad.mode``) per 10 ms frame through
  the same ``Segmenter`` settings;
- ``speex/webrtcvad``: speexdsp's MDF filter (256 ms) with its preprocessor (residual-echo and noise
  suppression) on the reference as rendered, then the same webrtcvad and segmenter;
- ``aec3 bare``: one AEC3 call per frame (no noise suppression, no VAD): the CPU yardstick;
- ``aec3 native bare``: the same through pywebrtc-audio's native binding (a CPU comparison only; needs
  ``pip install pywebrtc-audio``, not a dependency of the product or of the tests).
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from kiosk.audio.format import frames as cut
from kiosk.events import Event, VoiceStarted, VoiceStopped
from kiosk_dev.rooms.metrics import FRAME, FRAME_S, RunOutput

if TYPE_CHECKING:
    from kiosk.audio.aec import SpeexBackend, WebRtcBackend
    from kiosk.ports import EchoCanceller, VoiceDetector
    from kiosk.settings import Settings
    from kiosk_dev.rooms.generate import Room

Pcm = npt.NDArray[np.int16]
Float64 = npt.NDArray[np.float64]
System = Callable[["Room", "Settings"], RunOutput]


class FrameCanceller(Protocol):
    """What a baseline needs of a canceller: one 10 ms frame of microphone and reference in, output out."""

    def process(self, near: Pcm, far: Pcm) -> Pcm:
        """Cancel the echo of ``far`` in ``near``."""
        ...


@dataclass(frozen=True)
class SystemSpec:
    """A registered system: how to run it, what it needs installed, and whether it is a variant."""

    run: System
    needs: tuple[str, ...] = ()  # modules that must be importable
    install: str = ""  # how to install them (printed when they are missing)
    variant: bool = True  # variants depend on the array front end and the onset check (results hash)


SYSTEMS: dict[str, SystemSpec] = {}


def register(name: str, run: System, *, needs: Sequence[str] = (), install: str = "", variant: bool = True) -> None:
    """Add a system under ``name`` (a changed definition gets a new name: results are cached by name)."""
    SYSTEMS[name] = SystemSpec(run, tuple(needs), install, variant)


def missing(name: str) -> str | None:
    """Why system ``name`` cannot run here (unknown, or a module it needs is not installed), or None."""
    spec = SYSTEMS.get(name)
    if spec is None:
        return f"unknown system '{name}' (known: {', '.join(SYSTEMS)})"
    absent = [module for module in spec.needs if importlib.util.find_spec(module) is None]
    if absent:
        return (f"'{name}' needs {' and '.join(absent)}, which is not installed here (a benchmark variant only): "
                f"{spec.install}")
    return None


def settings_with(settings: Settings, *, aec: dict[str, Any] | None = None, **vad: Any) -> Settings:
    """``settings`` with some ``aec`` and ``vad`` fields changed (validated)."""
    from kiosk.settings import AecSettings, VadSettings

    update: dict[str, Any] = {}
    if aec:
        update["aec"] = AecSettings.model_validate({**settings.aec.model_dump(), **aec})
    if vad:
        update["vad"] = VadSettings.model_validate({**settings.vad.model_dump(), **vad})
    return settings.model_copy(update=update) if update else settings


def _segments_from(events: list[tuple[int, Event]], finish: Sequence[Event]
                   ) -> tuple[list[int], list[int], list[tuple[float, float]]]:
    """Frames of VoiceStarted / VoiceStopped and the segments (start, stop seconds) they report."""
    starts: list[int] = []
    stops: list[int] = []
    segs: list[tuple[float, float]] = []
    open_at: float | None = None
    for k, e in events + [(10 ** 9, e) for e in finish]:
        if isinstance(e, VoiceStarted):
            starts.append(k)
            open_at = e.at_seconds
        elif isinstance(e, VoiceStopped):
            stops.append(k)
            if open_at is not None:
                segs.append((open_at, e.at_seconds))
            open_at = None
    return starts, stops, segs


def visitor_target(room: Room) -> Float64:
    """The clean visitor at microphone 0 (the SDR target of single-microphone systems), full scale 1."""
    target: Float64 = room.visitor[0].astype(np.float64) / 32768.0
    return target


def run_chain(room: Room, mono: Pcm, target: Float64, settings: Settings, *,
              echo_canceller: EchoCanceller | None = None, detector: VoiceDetector | None = None,
              frontend: Callable[[int], Pcm] | None = None) -> RunOutput:
    """Feed ``mono`` (or a per-frame ``frontend``) and the reference through a fresh capture chain."""
    from kiosk.audio.pipeline import CaptureChain

    chain = CaptureChain(settings, echo_canceller=echo_canceller, detector=detector)
    ref = cut(room.ref)
    n = room.mics.shape[1] // FRAME
    mic = cut(mono)
    out = np.zeros(n * FRAME, dtype=np.int16)
    events: list[tuple[int, Event]] = []
    process = chain.process
    start = time.process_time()
    for k in range(n):
        frame = mic[k] if frontend is None else frontend(k)
        r = process(frame, ref[k], k * FRAME_S)
        out[k * FRAME:(k + 1) * FRAME] = r.pcm
        if r.events:
            events.extend((k, e) for e in r.events)
    cpu = time.process_time() - start
    starts, stops, segs = _segments_from(events, chain.finish())
    c = chain.counters
    extra = {"echo_vetoes": c.echo_vetoes, "coherence_checks": c.coherence_checks}
    return RunOutput(out=out, starts=starts, stops=stops, segments=segs, target=target, cpu_s=cpu, extra=extra)


class RawWebRtcVad:
    """``VoiceDetector``: webrtcvad alone, one call per 10 ms frame (the baselines' detector)."""

    def __init__(self, mode: int = 3) -> None:
        import webrtcvad

        self._vad = webrtcvad.Vad(mode)

    def is_speech(self, frame: Pcm) -> bool:
        """The decision of webrtcvad on one frame."""
        return bool(self._vad.is_speech(frame.tobytes(), 16000))

    def reset(self) -> None:
        """Nothing adaptive to forget."""
        return None


def run_baseline(room: Room, canceller: FrameCanceller, settings: Settings, *, vad: bool = True,
                 detector: VoiceDetector | None = None) -> RunOutput:
    """A canceller on microphone 0 with the raw reference, then a detector (webrtcvad) and the segmenter."""
    from kiosk.audio.vad import Segmenter

    seg = Segmenter.from_settings(settings.vad)
    voice = RawWebRtcVad(settings.vad.mode) if detector is None else detector
    mic = cut(room.mics[0])
    ref = cut(room.ref)
    n = room.mics.shape[1] // FRAME
    out = np.zeros(n * FRAME, dtype=np.int16)
    events: list[tuple[int, Event]] = []
    process = canceller.process
    start = time.process_time()
    for k in range(n):
        o = process(mic[k], ref[k])
        out[k * FRAME:(k + 1) * FRAME] = o
        if vad:
            e = seg.feed(voice.is_speech(o), k * FRAME_S)
            if e is not None:
                events.append((k, e))
    cpu = time.process_time() - start
    finish = seg.finish()
    starts, stops, segs = _segments_from(events, [] if finish is None else [finish])
    return RunOutput(out=out, starts=starts, stops=stops, segments=segs, target=visitor_target(room), cpu_s=cpu)


def bare_aec3() -> WebRtcBackend:
    """One AEC3 call per frame through the livekit SDK (no noise suppression, no high-pass filter)."""
    from kiosk.audio.aec import WebRtcBackend

    return WebRtcBackend(noise_suppression=False, high_pass_filter=False)


class NativeAec3:
    """AEC3 through pywebrtc-audio's native binding (an aarch64-wheel alternative to the SDK; CPU comparison)."""

    def __init__(self, noise_suppression: bool = False) -> None:
        import pywebrtc_audio

        self._processor = pywebrtc_audio.AudioProcessor(sample_rate=16000, echo_cancellation=True,
                                                        noise_suppression=noise_suppression,
                                                        high_pass_filter=noise_suppression)

    def process(self, near: Pcm, far: Pcm) -> Pcm:
        """One frame through the native AEC3."""
        return self._processor.process(near, far)


NATIVE_INSTALL = "pip install pywebrtc-audio"


def speex_baseline() -> SpeexBackend:
    """speexdsp: 256 ms MDF filter, residual-echo and noise suppression."""
    from kiosk.audio.aec import SpeexBackend

    return SpeexBackend(filter_ms=256, residual_suppression=True, noise_suppression=True)


def aec3_baseline() -> WebRtcBackend:
    """AEC3 with noise suppression and the high-pass filter."""
    from kiosk.audio.aec import WebRtcBackend

    return WebRtcBackend(noise_suppression=True)


def mixdown(room: Room) -> tuple[Pcm, Float64]:
    """The four microphones averaged (``audio.channel = "mix"``) and the visitor through the same mix."""
    mix = np.clip(np.rint(room.mics.astype(np.float64).mean(axis=0)), -32768, 32767).astype(np.int16)
    target: Float64 = room.visitor.astype(np.float64).mean(axis=0) / 32768.0
    return mix, target


def _chain(room: Room, settings: Settings) -> RunOutput:
    return run_chain(room, room.mics[0], visitor_target(room), settings)


def _chain_mix(room: Room, settings: Settings) -> RunOutput:
    mix, target = mixdown(room)
    return run_chain(room, mix, target, settings)


register("chain", _chain, variant=False)
register("chain mix", _chain_mix, variant=False)
register("aec3+ns/webrtcvad", lambda room, settings: run_baseline(room, aec3_baseline(), settings), variant=False)
register("speex/webrtcvad", lambda room, settings: run_baseline(room, speex_baseline(), settings), variant=False)
register("aec3 bare", lambda room, settings: run_baseline(room, bare_aec3(), settings, vad=False), variant=False)
register("aec3 native bare", lambda room, settings: run_baseline(room, NativeAec3(), settings, vad=False),
         needs=("pywebrtc_audio",), install=NATIVE_INSTALL, variant=False)

"""Array front ends and chain variants measured on the room corpus (registered into ``systems.SYSTEMS``).

Benchmark variants only; none of them is the configured chain:

- ``chain bf``: the superdirective fixed beamformer toward the kiosk's front (``kiosk.audio.array``, what
  ``audio.channel = "beam"`` runs), then the chain (one echo canceller after the beamformer); SDR against the
  visitor through the same beam; ``chain bf dsb`` / ``chain bf wide``: diagonal loading 10 (close to
  delay-and-sum) / 0.5;
- ``chain silero``, ``chain bf+silero [0.25]``: the configured detector confirmed by Silero VAD on candidate
  onsets (``onset``; needs onnxruntime and silero-vad, skipped with the install line when they are absent);
- ``chain [bf] margin N``: ``vad.barge_in_margin_db = N``;
- ``chain [bf] nolearn``: ``vad.barge_in_learn_talk = false`` (the leak gate);
- ``chain per-channel aec + bf``: one configured canceller per microphone, then the beamformer;
- ``chain bf doa``: an experimental direction-of-arrival gate on the detector;
- ``chain bf qQ sS``: the leak tracker's quantile and step changed (module constants of the pipeline);
- ``chain [bf] aec3-backend``: ``aec.backend = webrtc``;
- ``chain [bf] linear margin N [nolearn]``: ``vad.detect_on = "linear"`` (the hybrid's speex residual is
  judged) with ``vad.barge_in_margin_db = N`` [and ``vad.barge_in_learn_talk = false``]; ``... nolearn coherence
  every frame`` / ``0.3``: the residual-coherence check on every candidate frame / at a lower threshold.

Names are stable: results are cached per name, so a changed definition is registered under a new name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from unittest import mock

import numpy as np
import numpy.typing as npt

from kiosk.audio.array import FixedBeamformer, circular_array, steering_delays
from kiosk.audio.format import FRAME_SAMPLES
from kiosk.ports import AecStats, EchoCanceller, VoiceDetector
from kiosk_dev.rooms import onset
from kiosk_dev.rooms.metrics import FRAME, RunOutput
from kiosk_dev.rooms.systems import register, run_chain, settings_with, visitor_target

if TYPE_CHECKING:
    from kiosk.settings import Settings
    from kiosk_dev.rooms.generate import Room

Pcm = npt.NDArray[np.int16]
Float64 = npt.NDArray[np.float64]


def _beam(room: Room, loading: float) -> tuple[FixedBeamformer, Float64]:
    bf = FixedBeamformer.toward(0.0, loading=loading)
    target = bf.apply_offline(room.visitor.astype(np.float64) / 32768.0)
    return bf, target


def _silero(settings: Settings, threshold: float = 0.5) -> VoiceDetector:
    from kiosk.audio.vad import WebRtcVoiceDetector

    return onset.SileroCheckedDetector(WebRtcVoiceDetector(settings.vad), threshold=threshold)


def _chain_bf(room: Room, settings: Settings, loading: float = 0.05, *, silero: bool = False,
              threshold: float = 0.5, aec: dict[str, Any] | None = None, **vad: Any) -> RunOutput:
    bf, target = _beam(room, loading)
    mics = room.mics
    buf = np.zeros((mics.shape[0], FRAME), dtype=np.int16)

    def frontend(k: int) -> Pcm:
        buf[:] = mics[:, k * FRAME:(k + 1) * FRAME]
        return bf.process(buf)

    settings = settings_with(settings, aec=aec, **vad)
    return run_chain(room, mics[0], target, settings, frontend=frontend,
                     detector=_silero(settings, threshold) if silero else None)


def _chain(room: Room, settings: Settings, *, silero: bool = False, threshold: float = 0.5,
           aec: dict[str, Any] | None = None, **vad: Any) -> RunOutput:
    settings = settings_with(settings, aec=aec, **vad)
    return run_chain(room, room.mics[0], visitor_target(room), settings,
                     detector=_silero(settings, threshold) if silero else None)


def _with_silero(name: str, run: Callable[[Room, Settings], RunOutput]) -> None:
    register(name, run, needs=onset.NEEDS, install=onset.INSTALL)


register("chain bf", lambda room, settings: _chain_bf(room, settings))
register("chain bf dsb", lambda room, settings: _chain_bf(room, settings, loading=10.0))
register("chain bf wide", lambda room, settings: _chain_bf(room, settings, loading=0.5))
_with_silero("chain silero", lambda room, settings: _chain(room, settings, silero=True))
_with_silero("chain bf+silero", lambda room, settings: _chain_bf(room, settings, silero=True))
_with_silero("chain bf+silero 0.25", lambda room, settings: _chain_bf(room, settings, silero=True, threshold=0.25))
_with_silero("chain bf+silero margin 10",
             lambda room, settings: _chain_bf(room, settings, silero=True, barge_in_margin_db=10.0))
_with_silero("chain bf+silero 0.25 nolearn",
             lambda room, settings: _chain_bf(room, settings, silero=True, threshold=0.25, barge_in_learn_talk=False))
_with_silero("chain bf+silero 0.25 aec3-backend",
             lambda room, settings: _chain_bf(room, settings, silero=True, threshold=0.25,
                                              aec={"backend": "webrtc"}))


def _margin(margin_db: float, beam: bool, **vad: Any) -> Callable[[Room, Settings], RunOutput]:
    def run(room: Room, settings: Settings) -> RunOutput:
        if beam:
            return _chain_bf(room, settings, barge_in_margin_db=margin_db, **vad)
        return _chain(room, settings, barge_in_margin_db=margin_db, **vad)
    return run


for _m in (3.0, 10.0, 14.0):
    register(f"chain margin {_m:g}", _margin(_m, beam=False))
    register(f"chain bf margin {_m:g}", _margin(_m, beam=True))
register("chain aec3-backend", lambda room, settings: _chain(room, settings, aec={"backend": "webrtc"}))
register("chain bf aec3-backend", lambda room, settings: _chain_bf(room, settings, aec={"backend": "webrtc"}))
register("chain nolearn", lambda room, settings: _chain(room, settings, barge_in_learn_talk=False))
register("chain bf nolearn", lambda room, settings: _chain_bf(room, settings, barge_in_learn_talk=False))


# ------------------------------------------------------------------------------ per-channel cancellation
class _PerChannelCanceller:
    """``EchoCanceller``: one configured canceller per microphone, then the beamformer over their outputs.

    The chain hands it the beamformed microphone (for its level cues) and the reference; the front end sets
    the raw channels of the frame beforehand. Stats, ``settled`` and the delay come from channel 0's
    canceller; the linear residual is the beam of the channels' linear residuals.
    """

    name = "per-channel"

    def __init__(self, settings: Settings, loading: float = 0.05) -> None:
        from kiosk.audio.aec import make_echo_canceller

        self.cancellers = [make_echo_canceller(settings.aec) for _ in range(4)]
        self.beam = FixedBeamformer.toward(0.0, loading=loading)
        self.residual_beam = FixedBeamformer.toward(0.0, loading=loading)
        self.frames = np.zeros((4, FRAME), dtype=np.int16)
        self._out = np.zeros((4, FRAME), dtype=np.int16)
        self._lin = np.zeros((4, FRAME), dtype=np.int16)
        self.linear_residual: Pcm | None = None

    def process(self, near: Pcm, far: Pcm) -> Pcm:
        """Every channel's canceller, then the beam (``near``, the beamformed microphone, is not used)."""
        for c, canceller in enumerate(self.cancellers):
            self._out[c] = canceller.process(self.frames[c], far)
            lin = canceller.linear_residual
            self._lin[c] = self._out[c] if lin is None else lin
        self.linear_residual = self.residual_beam.process(self._lin)
        return self.beam.process(self._out)

    def reset(self) -> None:
        """Reset every channel's canceller."""
        for canceller in self.cancellers:
            canceller.reset()

    def stats(self) -> AecStats:
        """Channel 0's estimates."""
        return self.cancellers[0].stats()

    @property
    def settled(self) -> bool:
        """Every channel's canceller holds its path."""
        return all(c.settled for c in self.cancellers)


def _chain_per_channel(room: Room, settings: Settings) -> RunOutput:
    canceller = _PerChannelCanceller(settings)
    mic_beam = FixedBeamformer.toward(0.0)
    target = mic_beam.apply_offline(room.visitor.astype(np.float64) / 32768.0)
    mics = room.mics

    def frontend(k: int) -> Pcm:
        canceller.frames[:] = mics[:, k * FRAME:(k + 1) * FRAME]
        return mic_beam.process(canceller.frames)

    per_channel: EchoCanceller = canceller
    return run_chain(room, mics[0], target, settings, frontend=frontend, echo_canceller=per_channel)


register("chain per-channel aec + bf", _chain_per_channel)


# ------------------------------------------------------------------------------ direction of arrival
class _DirectionGate:
    """``VoiceDetector``, experimental: refuse speech whose direction of arrival is behind the kiosk.

    On frames the wrapped detector calls speech, every ``every`` frames, the last 512 samples of the four
    raw microphones are weighted per frequency by the canceller's own gain (output over microphone 0 power:
    near 1 where the visitor or a background dominates, near 0 where the echo does), and the steered
    response power (PHAT) is accumulated over a grid of azimuths for the current run of speech frames. Speech
    is refused while the accumulated peak lies more than ``behind_deg`` off the front axis.
    """

    def __init__(self, inner: VoiceDetector, *, every: int = 2, behind_deg: float = 90.0,
                 latency: int = 128) -> None:
        self.inner = inner
        self.every = every
        self.behind = behind_deg
        self.latency = latency
        self.n = 512
        self.mics_ring = np.zeros((4, self.n + latency + FRAME), dtype=np.float32)
        self.out_ring = np.zeros(self.n + FRAME, dtype=np.float32)
        freqs = np.fft.rfftfreq(self.n, 1 / 16000)
        self.band = (freqs >= 300) & (freqs <= 5000)
        f = freqs[self.band]
        self.grid = np.arange(-180, 180, 10)
        mics = circular_array()
        tau = np.stack([steering_delays(mics, float(a)) for a in self.grid])  # (G, 4)
        self.pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
        # Steering phase per grid point, microphone pair and bin.
        self.steer = np.stack([np.exp(2j * np.pi * f[None, :] * (tau[:, i] - tau[:, j])[:, None])
                               for i, j in self.pairs], axis=1)  # (G, P, F)
        self.win = np.hanning(self.n).astype(np.float32)
        self.acc = np.zeros(len(self.grid))
        self.run = 0
        self.quiet = 0
        self.refused = 0
        self.checks = 0

    def push_mics(self, frames: Pcm) -> None:
        """The raw channels of the frame about to be processed."""
        r = self.mics_ring
        r[:, :-FRAME] = r[:, FRAME:]
        r[:, -FRAME:] = frames

    def reset(self) -> None:
        """Reset the wrapped detector."""
        self.inner.reset()

    def is_speech(self, frame: Pcm) -> bool:
        """The wrapped detector's speech, unless its direction so far lies behind the kiosk."""
        o = self.out_ring
        o[:-FRAME] = o[FRAME:]
        o[-FRAME:] = frame
        raw = self.inner.is_speech(frame)
        if not raw:
            self.quiet += 1
            if self.quiet > 30:
                self.acc[:] = 0.0
                self.run = 0
            return False
        self.quiet = 0
        self.run += 1
        if self.run % self.every == 1 or self.every == 1:
            self.checks += 1
            end = self.mics_ring.shape[1] - self.latency
            x = np.fft.rfft(self.mics_ring[:, end - self.n:end] * self.win, axis=1)[:, self.band]
            y = np.fft.rfft(o[-self.n:] * self.win)[self.band]
            w = np.minimum(1.0, np.abs(y) ** 2 / (np.abs(x[0]) ** 2 + 1e-9))
            cross = np.stack([x[i] * np.conj(x[j]) for i, j in self.pairs])  # (P, F)
            cross = cross / (np.abs(cross) + 1e-9) * w[None, :]
            self.acc += np.real(np.einsum("gpf,pf->g", self.steer, cross))
        peak = float(self.grid[int(np.argmax(self.acc))])
        if abs(peak) > self.behind and self.acc.max() > 0:
            self.refused += 1
            return False
        return True


def _chain_bf_doa(room: Room, settings: Settings, *, behind: float = 90.0, **vad: Any) -> RunOutput:
    from kiosk.audio.vad import WebRtcVoiceDetector

    bf, target = _beam(room, 0.05)
    mics = room.mics
    buf = np.zeros((mics.shape[0], FRAME_SAMPLES), dtype=np.int16)
    settings = settings_with(settings, **vad)
    gate = _DirectionGate(WebRtcVoiceDetector(settings.vad), behind_deg=behind)

    def frontend(k: int) -> Pcm:
        buf[:] = mics[:, k * FRAME:(k + 1) * FRAME]
        gate.push_mics(buf)
        return bf.process(buf)

    run = run_chain(room, mics[0], target, settings, frontend=frontend, detector=gate)
    run.extra.update({"doa_checks": gate.checks, "doa_refused": gate.refused})
    return run


register("chain bf doa", lambda room, settings: _chain_bf_doa(room, settings))
register("chain bf doa nolearn", lambda room, settings: _chain_bf_doa(room, settings, barge_in_learn_talk=False))


# ------------------------------------------------------------------------------ the leak tracker's settings
def _with_constants(run: Callable[[Room, Settings], RunOutput], **constants: Any
                    ) -> Callable[[Room, Settings], RunOutput]:
    """``run`` with module constants of the pipeline changed (``_LEAK_QUANTILE=0.5``, ...)."""
    import kiosk.audio.pipeline as pipeline

    def changed(room: Room, settings: Settings) -> RunOutput:
        with mock.patch.multiple(pipeline, **constants):
            return run(room, settings)
    return changed


register("chain bf q0.5 s0.2", _with_constants(_chain_bf, _LEAK_QUANTILE=0.5, _LEAK_STEP_DB=0.2))
register("chain bf q0.5 s0.2 margin 9", _with_constants(_margin(9.0, beam=True), _LEAK_QUANTILE=0.5, _LEAK_STEP_DB=0.2))
register("chain bf q0.9 s0.3", _with_constants(_chain_bf, _LEAK_QUANTILE=0.9, _LEAK_STEP_DB=0.3))


# ------------------------------------------------------------------------------ detection on the linear residual
for _m in (3.0, 4.0, 5.0, 6.0):
    register(f"chain linear margin {_m:g}", _margin(_m, beam=False, detect_on="linear"))
    register(f"chain bf linear margin {_m:g}", _margin(_m, beam=True, detect_on="linear"))
_linear5_nolearn = _margin(5.0, beam=False, detect_on="linear", barge_in_learn_talk=False)
register("chain linear margin 5 nolearn", _linear5_nolearn)
register("chain bf linear margin 5 nolearn", _margin(5.0, beam=True, detect_on="linear", barge_in_learn_talk=False))
register("chain linear margin 5 nolearn coherence every frame",
         _with_constants(_linear5_nolearn, _COHERENCE_EVERY_FRAMES=1))
register("chain linear margin 5 nolearn coherence 0.3", _with_constants(_linear5_nolearn, _ECHO_COHERENCE=0.3))

"""The capture chain: echo cancellation, voice detection with a double-talk-aware barge-in decision, the gate.

``CaptureChain.process(mic, ref, now_seconds)`` takes one 10 ms frame of microphone audio and the far-end
reference rendered at the same nominal time, and returns a ``ChainFrame``: the cleaned frame, whether the
visitor at the kiosk speaks, the ``VoiceStarted``/``VoiceStopped`` events, and the frames the gate lets
through. The same class runs live (the audio engine calls it per frame from the asyncio side, never from
the PortAudio callback) and offline (``kiosk.audio.offline``), so a recording judges exactly what runs.

Barge-in while the agent speaks: residual echo that the canceller leaves must not count as the visitor.
The chain keeps the level envelope of the reference over the echo path's delay window, learns how much
of it leaks through the canceller (a quantile tracker of output level minus reference envelope, frozen
while the visitor talks), and while the reference is active accepts speech only when the output stands
``barge_in_margin_db`` above that expected residual.

That needs a canceller that still follows the echo path. When the path moves (a clock slip or an underrun
in the audio path shifts the echo by a few milliseconds) every canceller leaks for a second or two, and the
leak stands far above the learned residual, like a visitor. So the chain also learns how loud the echo is
in the microphone itself (the echo return loss against the reference envelope, learnt only while the
canceller reports its path ``settled`` and nobody talks). A frame that passes the output test but whose
microphone is not ``barge_in_margin_db`` above that expected echo could be such a leak: ``EchoCoherence``
then checks whether the canceller's linear residual is the reference's echo at some lag near the estimated
delay, and if it is, speech is refused for a while. A visitor's speech does not correlate with the agent's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from kiosk.audio.format import FRAME_SAMPLES, RATE_HZ, Pcm
from kiosk.audio.vad import SILENCE_DBFS, Gate, Segmenter, frame_level_dbfs, make_voice_detector
from kiosk.events import Event, VoiceStarted
from kiosk.ports import EchoCanceller, VoiceDetector

if TYPE_CHECKING:
    from kiosk.settings import Settings

_LOGGER = logging.getLogger(__name__)

# The reference counts as active (the agent or a cue is audible) above this envelope level.
FAR_ACTIVE_DBFS = -60.0
# Echo tail after the bulk delay that the reference envelope covers.
_ECHO_TAIL_MS = 200
# How often the canceller's own estimates (delay) are read; they change slowly.
_STATS_EVERY_FRAMES = 25
# Output level smoothing: about 30 ms, so single quiet or loud frames do not flip the decision.
_SMOOTH = math.exp(-10.0 / 30.0)
# Leak tracker: the 90th percentile of (output - reference envelope) over echo-only frames.
_LEAK_QUANTILE = 0.9
_LEAK_STEP_DB = 1.0
_LEAK_START_DB = 0.0  # before learning: assume the canceller removes nothing (no false barge-in)
_LEAK_CREEP_DB = 0.02  # per frame while "talking", so a rise of the residual is learned within seconds
_LEAK_MIN_DB = -90.0
_LEAK_MAX_DB = 20.0
# Frames a "louder than the echo" decision lasts: bridges dips inside a syllable, but short enough that an
# echo burst does not ride the detector's longer hold into a VoiceStarted.
_TALK_HOLD_FRAMES = 8
# A visitor passes through the canceller nearly unchanged, residual echo does not: when the output is this
# much quieter than the microphone, what is left is echo the canceller is still removing, not a visitor.
_MAX_TALK_ATTENUATION_DB = 12.0
# Echo return loss tracker (microphone level minus reference envelope over echo-only frames): the same
# 90th-percentile tracker.
_ERL_START_DB = 0.0  # before learning: the echo is as loud as the reference (no false barge-in)
_NO_EVENTS: tuple[Event, ...] = ()
# Residual coherence: the last _COHERENCE_MS of the canceller's (linear) residual against the reference
# from _COHERENCE_EARLY_MS before to _COHERENCE_LATE_MS after the estimated echo delay, at 8 kHz. A
# normalised correlation of _ECHO_COHERENCE or more means the residual is the reference's echo (the path
# moved): speech is then refused for _ECHO_VETO_FRAMES. Checked every _COHERENCE_EVERY_FRAMES frames, and
# only on frames that would otherwise count as a visitor quieter than the echo.
_COHERENCE_MS = 100
_COHERENCE_EARLY_MS = 60
_COHERENCE_LATE_MS = 200
_COHERENCE_RATE_HZ = 8000
_ECHO_COHERENCE = 0.4
_ECHO_VETO_FRAMES = 20
_COHERENCE_EVERY_FRAMES = 3
_PRE_EMPHASIS = 0.95


def _track_quantile(estimate_db: float, value_db: float) -> float:
    """One step of the 90th-percentile tracker (the leak and the echo return loss use it)."""
    if value_db > estimate_db:
        return min(_LEAK_MAX_DB, estimate_db + _LEAK_STEP_DB * _LEAK_QUANTILE)
    return max(_LEAK_MIN_DB, estimate_db - _LEAK_STEP_DB * (1.0 - _LEAK_QUANTILE))


class EchoCoherence:
    """Tells whether the canceller's residual is the echo of the reference at some lag near the echo delay.

    Keeps the residual and the reference, halved to 8 kHz, in preallocated rings. ``measure(delay)``
    returns the largest normalised cross-correlation (0..1) of the newest ``_COHERENCE_MS`` of residual with
    the reference over lags around ``delay`` (both pre-emphasised, so that speech's strong low frequencies do
    not dominate). A visitor's speech does not correlate with the reference; echo that the canceller fails
    to remove after the path moved by a few milliseconds does, at its new lag.
    """

    def __init__(self, max_delay_samples: int) -> None:
        per_ms = _COHERENCE_RATE_HZ // 1000
        self._window = _COHERENCE_MS * per_ms
        self._early = _COHERENCE_EARLY_MS * per_ms
        self._late = _COHERENCE_LATE_MS * per_ms
        self._step = RATE_HZ // _COHERENCE_RATE_HZ
        self._max_delay = max_delay_samples // self._step
        self._fft_size = 1 << (self._window + self._early + self._late).bit_length()
        size = self._window + self._max_delay + self._late + 2
        self._ref: npt.NDArray[np.float32] = np.zeros(size, dtype=np.float32)
        self._out: npt.NDArray[np.float32] = np.zeros(size, dtype=np.float32)
        self._half: npt.NDArray[np.float32] = np.zeros(FRAME_SAMPLES // self._step, dtype=np.float32)
        self._head = 0  # next write index in both rings

    def reset(self) -> None:
        """Forget the history."""
        self._ref.fill(0.0)
        self._out.fill(0.0)
        self._head = 0

    def _write(self, ring: npt.NDArray[np.float32], frame: Pcm) -> None:
        half = self._half
        np.sum(frame.reshape(-1, self._step), axis=1, out=half, dtype=np.float32)
        n = len(half)
        end = self._head + n
        if end <= len(ring):
            ring[self._head:end] = half
        else:
            split = len(ring) - self._head
            ring[self._head:] = half[:split]
            ring[:n - split] = half[split:]

    def push(self, out: Pcm, ref: Pcm) -> None:
        """Add one 10 ms frame of residual and reference (16 kHz)."""
        self._write(self._out, out)
        self._write(self._ref, ref)
        self._head = (self._head + len(self._half)) % len(self._ref)

    def _last(self, ring: npt.NDArray[np.float32], count: int, skip: int) -> npt.NDArray[np.float64]:
        """``count`` samples ending ``skip`` samples before the newest, oldest first, as float64."""
        idx = (self._head - skip - count + np.arange(count)) % len(ring)
        return ring[idx].astype(np.float64)

    def measure(self, delay_samples: int | None) -> float:
        """Largest normalised correlation of the newest residual with the reference near ``delay_samples``."""
        if delay_samples is None:
            lo, hi = 0, self._max_delay + self._late
        else:
            delay = delay_samples // self._step
            lo = min(max(delay - self._early, 0), self._max_delay)
            hi = min(delay + self._late, self._max_delay + self._late)
        w = self._window
        # Reference that can have produced the residual window at lags lo..hi (one more sample for the
        # pre-emphasis), and the window itself.
        ref_raw = self._last(self._ref, w + hi - lo + 1, lo)
        out_raw = self._last(self._out, w + 1, 0)
        ref = ref_raw[1:] - _PRE_EMPHASIS * ref_raw[:-1]
        out = out_raw[1:] - _PRE_EMPHASIS * out_raw[:-1]
        size = max(self._fft_size, 1 << len(ref).bit_length())
        spectrum = np.fft.rfft(ref, size) * np.conj(np.fft.rfft(out, size))
        corr = np.fft.irfft(spectrum, size)[: len(ref) - w + 1]
        energy = np.cumsum(ref * ref)
        ref_energy = energy[w - 1:] - np.concatenate(([0.0], energy[:-w]))
        out_energy = float(np.dot(out, out))
        # Lags where the reference was (nearly) silent cannot hold the echo: they score 0.
        floor = max(float(ref_energy.max()) * 1e-3, 1.0)
        norm = np.sqrt(np.maximum(ref_energy, floor) * max(out_energy, 1.0))
        return float(np.max(np.abs(corr) / norm))


@dataclass(slots=True)
class ChainFrame:
    """One frame through the chain."""

    pcm: Pcm  # cleaned 10 ms frame (valid until the next ``process``; copy to keep it)
    speech: bool  # the visitor at the kiosk speaks in this frame (after the barge-in decision)
    events: Sequence[Event]  # VoiceStarted / VoiceStopped caused by this frame
    stream: Sequence[Pcm]  # frames the gate lets through now (pre-roll first, on opening)
    far_active: bool = False  # the reference (agent or cue) is audible in the echo window


@dataclass(slots=True)
class ChainCounters:
    """Running counts, for metrics and the benchmark."""

    frames: int = 0
    speech_frames: int = 0
    streamed_frames: int = 0
    far_frames: int = 0
    echo_rejected_frames: int = 0  # the detector heard speech but it was under the expected echo
    coherence_checks: int = 0  # residual-against-reference correlations computed
    echo_vetoes: int = 0  # ... that found the echo of the reference (the path moved): speech refused a while
    voice_starts: int = 0


class CaptureChain:
    """Echo canceller -> voice detector -> barge-in decision -> segmenter -> gate, per 10 ms frame."""

    def __init__(self, settings: Settings, *, echo_canceller: EchoCanceller | None = None,
                 detector: VoiceDetector | None = None) -> None:
        if echo_canceller is None:
            from kiosk.audio.aec import make_echo_canceller

            echo_canceller = make_echo_canceller(settings.aec)
        self.echo_canceller: EchoCanceller = echo_canceller
        self.detector: VoiceDetector = detector if detector is not None else make_voice_detector(settings.vad)
        self.segmenter = Segmenter.from_settings(settings.vad)
        self.gate = Gate.from_settings(settings.vad)
        self.counters = ChainCounters()
        self._margin_db = settings.vad.barge_in_margin_db
        self._skip_talk_like = not settings.vad.barge_in_learn_talk
        self._judge_linear = settings.vad.detect_on == "linear"
        self._freeze_frames = settings.vad.speech_hold_ms // 10
        delay_ms = settings.aec.delay_ms if settings.aec.delay_ms is not None else settings.aec.max_delay_ms
        self._history_frames = int(max(delay_ms, settings.aec.max_delay_ms) // 10) + _ECHO_TAIL_MS // 10 + 1
        self._ref_levels: npt.NDArray[np.float64] = np.full(self._history_frames, SILENCE_DBFS)
        self._scratch: npt.NDArray[np.float32] = np.zeros(FRAME_SAMPLES, dtype=np.float32)
        self._fixed_delay_frames = None if settings.aec.delay_ms is None else int(settings.aec.delay_ms // 10)
        self._delay_frames: int | None = self._fixed_delay_frames
        self.coherence = EchoCoherence(int(max(delay_ms, settings.aec.max_delay_ms) * RATE_HZ / 1000))
        self._fixed_delay_samples = (None if settings.aec.delay_ms is None
                                     else int(settings.aec.delay_ms * RATE_HZ / 1000))
        self._echo_delay_samples: int | None = self._fixed_delay_samples
        self._reset_state()

    def _reset_state(self) -> None:
        self._ref_levels.fill(SILENCE_DBFS)
        self._head = 0  # index of the newest reference level
        self._out_power = 0.0
        self._mic_power = 0.0
        self.leak_db = _LEAK_START_DB
        self.erl_db = _ERL_START_DB
        self._echo_veto = 0
        self._since_coherence = _COHERENCE_EVERY_FRAMES
        self._talk_hold = 0
        self._freeze = 0
        self._frames_since_stats = _STATS_EVERY_FRAMES

    def reset(self) -> None:
        """Forget everything adaptive (route change): canceller, detector, segmenter, echo estimates."""
        self.echo_canceller.reset()
        self.detector.reset()
        self.segmenter.reset()
        self.gate.close()
        self._delay_frames = self._fixed_delay_frames
        self._echo_delay_samples = self._fixed_delay_samples
        self.coherence.reset()
        self._reset_state()

    def restart_voice(self) -> None:
        """Start voice segmentation afresh, without an event: speech that goes on is reported again.

        For a recording that starts as its tone ends: voice already active then is the tone's echo or a visitor
        who began at once; the first fades before a new segment reaches the minimum speech, the second is
        reported anew as ``VoiceStarted`` (the state machine counts only voice that starts once recording runs).
        """
        self.segmenter.reset()

    def open_gate(self, *, preroll: bool = True) -> None:
        """Start streaming cleaned frames (the controller decides; pre-roll goes out first unless dropped)."""
        self.gate.open(preroll=preroll)

    def close_gate(self) -> None:
        """Stop streaming."""
        self.gate.close()

    def _echo_envelope_dbfs(self) -> float:
        """Loudest reference level over the window where its echo can still be in the microphone."""
        n = self._history_frames
        if self._delay_frames is None:
            return float(self._ref_levels.max())
        # Window: from two frames before the bulk delay to the end of the echo tail (ring, newest at head).
        newest = min(max(self._delay_frames - 2, 0), n - 1)
        oldest = min(self._delay_frames + _ECHO_TAIL_MS // 10, n - 1)
        lo = (self._head - oldest) % n
        hi = (self._head - newest) % n
        if lo <= hi:
            return float(self._ref_levels[lo:hi + 1].max())
        return float(max(self._ref_levels[lo:].max(), self._ref_levels[:hi + 1].max()))

    def _refresh_stats(self) -> None:
        self._frames_since_stats = 0
        if self._fixed_delay_frames is not None:
            return
        stats = self.echo_canceller.stats()
        delay_ms = stats.delay_ms
        if delay_ms is None or delay_ms < 0:
            self._echo_delay_samples = self._delay_frames = None
            return
        self._echo_delay_samples = int(delay_ms * RATE_HZ / 1000)
        self._delay_frames = int(delay_ms // 10) if stats.converged else None

    def process(self, mic: Pcm, ref: Pcm, now_seconds: float) -> ChainFrame:
        """Run one 10 ms frame (``mic`` and ``ref`` are 160 int16 samples) captured at ``now_seconds``."""
        counters = self.counters
        counters.frames += 1
        out = self.echo_canceller.process(mic, ref)

        # Reference envelope over the echo window.
        scratch = self._scratch
        np.copyto(scratch, ref, casting="unsafe")
        self._head = (self._head + 1) % self._history_frames
        self._ref_levels[self._head] = frame_level_dbfs(float(np.dot(scratch, scratch)))
        self._frames_since_stats += 1
        if self._frames_since_stats >= _STATS_EVERY_FRAMES:
            self._refresh_stats()
        envelope = self._echo_envelope_dbfs()
        far_active = envelope > FAR_ACTIVE_DBFS

        linear = self.echo_canceller.linear_residual
        # What the detector and the levels below judge (``vad.detect_on``); ``out`` is what is streamed.
        judged = linear if self._judge_linear and linear is not None else out
        np.copyto(scratch, judged, casting="unsafe")
        self._out_power = _SMOOTH * self._out_power + (1.0 - _SMOOTH) * float(np.dot(scratch, scratch))
        out_dbfs = frame_level_dbfs(self._out_power)
        np.copyto(scratch, mic, casting="unsafe")
        self._mic_power = _SMOOTH * self._mic_power + (1.0 - _SMOOTH) * float(np.dot(scratch, scratch))

        self.coherence.push(out if linear is None else linear, ref)
        detected = self.detector.is_speech(judged)
        speech = detected
        if far_active:
            counters.far_frames += 1
            excess = out_dbfs - envelope
            mic_dbfs = frame_level_dbfs(self._mic_power)
            attenuation = mic_dbfs - out_dbfs
            mic_excess = mic_dbfs - envelope
            candidate = excess > self.leak_db + self._margin_db and attenuation < _MAX_TALK_ATTENUATION_DB
            if candidate and mic_excess <= self.erl_db + self._margin_db:
                # Louder than the canceller usually leaves, but not louder than the echo alone: is what
                # came through the echo itself, at a lag the canceller has not caught up with?
                self._since_coherence += 1
                if self._since_coherence >= _COHERENCE_EVERY_FRAMES:
                    self._since_coherence = 0
                    counters.coherence_checks += 1
                    if self.coherence.measure(self._echo_delay_samples) >= _ECHO_COHERENCE:
                        self._echo_veto = _ECHO_VETO_FRAMES
                        counters.echo_vetoes += 1
                candidate = self._echo_veto == 0
            if self._echo_veto > 0:
                self._echo_veto -= 1
            if candidate:
                self._talk_hold = _TALK_HOLD_FRAMES + 1
                self._freeze = self._freeze_frames + 1
                # Creep up even while frozen: a residual that grew (drift, a moved speaker) is not a visitor.
                self.leak_db = min(_LEAK_MAX_DB, self.leak_db + _LEAK_CREEP_DB)
            elif self._freeze == 0 and not self.segmenter.in_speech and not (
                    self._skip_talk_like and detected and attenuation < _MAX_TALK_ATTENUATION_DB):
                # Echo-only frame (as far as we can tell): learn how much of the reference leaks through.
                # With ``vad.barge_in_learn_talk`` off, a frame the detector hears as speech and the canceller
                # barely attenuated is not taken for echo: it is what a visitor quieter than the learned leak
                # looks like, and learning from it raises the leak to the visitor's level (docs/vad.md, "Barge-in
                # in rooms it was never tuned on").
                self.leak_db = _track_quantile(self.leak_db, excess)
                if self.echo_canceller.settled:
                    # Only while the canceller holds the path: its collapse is also what a visitor causes.
                    self.erl_db = _track_quantile(self.erl_db, mic_excess)
            if self._freeze > 0:
                self._freeze -= 1
            if self._talk_hold > 0:
                self._talk_hold -= 1
            else:
                speech = False
                if detected:
                    counters.echo_rejected_frames += 1
        else:
            self._talk_hold = 0
            self._freeze = 0

        event = self.segmenter.feed(speech, now_seconds)
        events: Sequence[Event] = _NO_EVENTS if event is None else (event,)
        if isinstance(event, VoiceStarted):
            counters.voice_starts += 1
        if speech:
            counters.speech_frames += 1
        stream = self.gate.process(out)
        counters.streamed_frames += len(stream)
        return ChainFrame(pcm=out, speech=speech, events=events, stream=stream, far_active=far_active)

    def finish(self) -> Sequence[Event]:
        """End of input (offline): close open speech."""
        event = self.segmenter.finish()
        return _NO_EVENTS if event is None else (event,)

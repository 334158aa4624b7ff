"""Echo cancellation: the ``EchoCanceller`` port, its backends, and the alignment around them.

A backend (speexdsp's MDF filter with the speex preprocessor, WebRTC's AEC3 through
``livekit.rtc.AudioProcessingModule``, or ``none``) only cancels well when the far-end reference it is
given lines up with the echo in the microphone within its filter and does not slide. Real kiosks give
neither: the bulk delay between what was rendered and what the microphone hears is unknown (tens to
hundreds of milliseconds, and it steps when an audio path re-buffers), and the playback and capture
clocks drift apart (tens to hundreds of ppm between two USB devices).

``AlignedEchoCanceller`` therefore wraps a backend with:

- a bulk-delay estimator (GCC-PHAT of the far-end reference against the microphone over a window of
  about a second, searched up to ``max_delay_ms``, re-run every half second; sub-sample peak);
- a model of the delay over time (a line: the intercept is the bulk delay, the slope the drift),
  refitted on every estimate; a delay that jumps away from the line starts a new segment (a step);
- a reference delay line read by the speex resampler at a ratio of ``1 - slope`` plus a small
  correction, so that the reference the backend sees keeps a fixed alignment with the echo.

Frames are 10 ms (160 samples of 16 kHz int16). ``process(near, far)`` takes the microphone frame and
the far-end samples rendered at the same nominal time (same duplex callback, or the same file offset).
All per-frame work uses preallocated buffers; the estimator runs twice a second and allocates then
(its cost is in the benchmark's CPU figure).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from kiosk.audio.format import FRAME_SAMPLES, RATE_HZ
from kiosk.audio.speex import EchoState, Preprocessor, Resampler
from kiosk.errors import KioskError
from kiosk.ports import AecStats, EchoCanceller, Pcm
from kiosk.settings import AecBackend, AecSettings

_LOGGER = logging.getLogger(__name__)

_FRAME = FRAME_SAMPLES
_SAMPLES_PER_MS = RATE_HZ / 1000.0


class AecError(KioskError):
    """The echo canceller cannot be built with these settings."""

    def __init__(self, message: str) -> None:
        super().__init__("aec_error", message)


# ------------------------------------------------------------------------------------- backends
class _Backend(Protocol):
    name: str
    linear_residual: Pcm | None  # the linear filter's residual of the last frame, where the backend has one

    def process(self, near: Pcm, ref: Pcm) -> Pcm: ...

    def reset(self) -> None: ...

    def set_delay_hint_ms(self, delay_ms: float) -> None: ...


class NoneBackend:
    """Pass-through: the microphone unchanged (headset route, or to measure without cancellation)."""

    name = "none"
    linear_residual: Pcm | None = None

    def __init__(self) -> None:
        self._out: Pcm = np.zeros(_FRAME, dtype=np.int16)

    def process(self, near: Pcm, ref: Pcm) -> Pcm:
        """Copy ``near``."""
        self._out[:] = near
        return self._out

    def reset(self) -> None:
        """Nothing to forget."""

    def set_delay_hint_ms(self, delay_ms: float) -> None:
        """Unused."""


class SpeexBackend:
    """speexdsp's MDF echo canceller, then (optionally) the preprocessor's residual-echo and noise suppression."""

    linear_residual: Pcm | None = None

    def __init__(self, filter_ms: int = 128, residual_suppression: bool = True, noise_suppression: bool = True,
                 echo_suppress_db: int = -40, echo_suppress_active_db: int = -15) -> None:
        self.filter_samples = int(filter_ms * _SAMPLES_PER_MS)
        self._echo = EchoState(_FRAME, self.filter_samples, RATE_HZ)
        self._pre: Preprocessor | None = None
        if residual_suppression or noise_suppression:
            self._pre = Preprocessor(_FRAME, RATE_HZ, echo=self._echo if residual_suppression else None,
                                     denoise=noise_suppression, echo_suppress_db=echo_suppress_db,
                                     echo_suppress_active_db=echo_suppress_active_db)
        self._args = (filter_ms, residual_suppression, noise_suppression, echo_suppress_db, echo_suppress_active_db)
        parts = [f"speex {filter_ms} ms"]
        if residual_suppression:
            parts.append("residual")
        if noise_suppression:
            parts.append("ns")
        self.name = " + ".join(parts)

    def process(self, near: Pcm, ref: Pcm) -> Pcm:
        """Cancel, then suppress."""
        out = self._echo.cancel(near, ref)
        if self._pre is not None:
            out = self._pre.run(out)
        return out

    def reset(self) -> None:
        """Rebuild the filter and the preprocessor (the preprocessor has no reset of its own)."""
        self.__init__(*self._args)  # type: ignore[misc]

    def set_delay_hint_ms(self, delay_ms: float) -> None:
        """Unused: the wrapper aligns the reference."""


class WebRtcBackend:
    """WebRTC AEC3 (with its suppressor, and optionally noise suppression) via livekit's AudioProcessingModule."""

    linear_residual: Pcm | None = None

    def __init__(self, noise_suppression: bool = True, high_pass_filter: bool = True) -> None:
        from livekit import rtc

        self._rtc = rtc
        self._ns = noise_suppression
        self._hpf = high_pass_filter
        self._apm = rtc.AudioProcessingModule(echo_cancellation=True, noise_suppression=noise_suppression,
                                              high_pass_filter=high_pass_filter)
        self._near_frame = rtc.AudioFrame(bytearray(_FRAME * 2), RATE_HZ, 1, _FRAME)
        self._far_frame = rtc.AudioFrame(bytearray(_FRAME * 2), RATE_HZ, 1, _FRAME)
        self._near: Pcm = np.frombuffer(self._near_frame.data, dtype=np.int16)
        self._far: Pcm = np.frombuffer(self._far_frame.data, dtype=np.int16)
        self._out: Pcm = np.zeros(_FRAME, dtype=np.int16)
        self.name = "webrtc aec3" + (" + ns" if noise_suppression else "")

    def process(self, near: Pcm, ref: Pcm) -> Pcm:
        """Render side first, then the capture side, as the module expects."""
        self._far[:] = ref
        self._apm.process_reverse_stream(self._far_frame)
        self._near[:] = near
        self._apm.process_stream(self._near_frame)
        self._out[:] = self._near
        return self._out

    def reset(self) -> None:
        """A fresh module (it has no reset call)."""
        self._apm = self._rtc.AudioProcessingModule(echo_cancellation=True, noise_suppression=self._ns,
                                                    high_pass_filter=self._hpf)

    def set_delay_hint_ms(self, delay_ms: float) -> None:
        """Tell AEC3 the remaining delay between the reference and the echo."""
        self._apm.set_stream_delay_ms(int(round(delay_ms)))


def _power(frame: Pcm, scratch: npt.NDArray[np.float64]) -> float:
    """Sum of squares of an int16 frame, through a preallocated float buffer (int16 would overflow)."""
    np.copyto(scratch, frame, casting="unsafe")
    return float(np.dot(scratch, scratch))


class HybridBackend:
    """AEC3 while only the agent talks; speex's linear filter while the visitor talks too (double talk).

    AEC3 cancels far deeper than speex (its suppressor removes what its linear filter leaves) but ducks
    the visitor by several dB in double talk; speex's MDF filter keeps the visitor intact but leaves
    30-40 dB of residual echo. Both run on every frame with the same aligned reference. A frame counts
    as double talk when AEC3's output is closer to the microphone's level than it is with echo alone
    (its recent echo-only level + ``MARGIN_DB``, clamped to [``DOUBLE_TALK_DB``, ``MAX_THRESHOLD_DB``]):
    something other than echo survived the cancellation. Double talk is held for ``HANGOVER_FRAMES``
    after the last such frame so a visitor's short pauses do not switch back and forth. Switching
    crossfades over one frame. The speex path is delayed by AEC3's processing latency so that the two
    outputs line up sample for sample.
    """

    # AEC3 through livekit's AudioProcessingModule returns its input 128 samples (8 ms) later at 16 kHz
    # (measured; tests/unit/test_audio_aec.py checks it).
    AEC3_LATENCY_SAMPLES = 128
    DOUBLE_TALK_DB = -45.0  # the lowest threshold (AEC3 converged)
    MAX_THRESHOLD_DB = -12.0  # the highest (AEC3 just started)
    MARGIN_DB = 25.0  # above AEC3's echo-only level
    BASELINE_ALPHA = 0.02
    # Speex's echo-only ERLE before its output is used. In double talk speex leaves the visitor about
    # (ERLE - 4) dB above its residual echo (the echo is 4 dB louder than a visitor at the microphone),
    # while AEC3's ducking gives about 2 dB: from 10 dB on, speex is the better of the two.
    SPEEX_READY_DB = 10.0
    SPEEX_CONFIRM_DB = 6.0  # speex's output this far above its echo-only residual confirms double talk
    ECHO_DOMINATED_DB = -25.0  # AEC3 output this far under the microphone: the frame is mostly echo
    FLOOR_DBFS = -60.0
    HANGOVER_FRAMES = 100
    ONSET_FRAMES = 2  # consecutive double-talk frames before switching to a speex filter under ...
    SPEEX_TRUSTED_DB = 20.0  # ... this echo-only ERLE (above it, one frame switches)
    # After the reference was realigned both filters leak until they re-adapt, which looks exactly like double
    # talk and would latch the (still misadapted) speex output for a whole hangover: no switch for this long.
    REALIGN_SETTLE_FRAMES = 50

    def __init__(self, filter_ms: int = 128, noise_suppression: bool = True) -> None:
        self._filter_ms = filter_ms
        self._ns = noise_suppression
        self._echo = EchoState(_FRAME, int(filter_ms * _SAMPLES_PER_MS), RATE_HZ)
        self._aec3 = WebRtcBackend(noise_suppression=noise_suppression)
        lat = self.AEC3_LATENCY_SAMPLES
        self._delay: Pcm = np.zeros(lat + _FRAME, dtype=np.int16)  # speex output, delayed by ``lat``
        self._mic_delay: Pcm = np.zeros(lat + _FRAME, dtype=np.int16)
        self._out: Pcm = np.zeros(_FRAME, dtype=np.int16)
        # Speex's linear residual of the frame just returned (no suppression: linear in the echo path).
        self.linear_residual: Pcm | None = np.zeros(_FRAME, dtype=np.int16)
        self._linear: Pcm = self.linear_residual
        self._mix = np.zeros(_FRAME, dtype=np.float64)
        self._ramp = (np.arange(_FRAME, dtype=np.float64) + 0.5) / _FRAME
        self._baseline_db = 0.0
        self._speex_erle_db = 0.0
        self._floor = (10 ** (self.FLOOR_DBFS / 20) * 32768.0) ** 2
        self._hold = 0
        self._talk_run = 0
        self._speex_on = False  # AEC3's output first
        self._settle = 0  # frames left in which a realignment, not a visitor, explains a leak
        self._power_buf = np.zeros(_FRAME, dtype=np.float64)
        self.double_talk_frames = 0
        self.name = f"hybrid (aec3{' + ns' if noise_suppression else ''} / speex {filter_ms} ms)"

    def process(self, near: Pcm, ref: Pcm) -> Pcm:
        """Run both cancellers, pick (and crossfade) per frame."""
        lat = self.AEC3_LATENCY_SAMPLES
        linear = self._echo.cancel(near, ref)
        self._delay[lat:] = linear
        self._mic_delay[lat:] = near
        a = self._aec3.process(near, ref)
        s = self._delay[:_FRAME]
        self._linear[:] = s
        mic = self._mic_delay[:_FRAME]
        a_power = _power(a, self._power_buf)
        mic_power = _power(mic, self._power_buf)
        talk = False
        if mic_power > self._floor * _FRAME:
            ratio_db = 10.0 * math.log10((a_power + 1.0) / (mic_power + 1.0))
            # Double talk: more survived AEC3 than it usually leaves of the echo alone. The threshold
            # follows AEC3's recent echo-only level, so a still-converging AEC3 is not taken for a visitor.
            threshold = min(max(self._baseline_db + self.MARGIN_DB, self.DOUBLE_TALK_DB), self.MAX_THRESHOLD_DB)
            s_power = _power(s, self._power_buf)
            speex_db = 10.0 * math.log10((mic_power + 1.0) / (s_power + 1.0))
            # Speex must agree: a visitor raises its output well above its usual residual too, while a
            # momentary lapse of AEC3 alone (it happens while AEC3 re-adapts) does not.
            talk = (a_power > self._floor * _FRAME and ratio_db > threshold
                    and speex_db < self._speex_erle_db - self.SPEEX_CONFIRM_DB and self._settle == 0)
            if not talk and self._hold == 0:
                self._baseline_db += self.BASELINE_ALPHA * (ratio_db - self._baseline_db)
                if ratio_db < self.ECHO_DOMINATED_DB:
                    # Judge speex only where the microphone is mostly echo (AEC3 removed most of it):
                    # in noise or distant talk its ratio says nothing about its filter.
                    self._speex_erle_db += self.BASELINE_ALPHA * (speex_db - self._speex_erle_db)
        # While speex is still weak, one frame of leakage is more likely a transient both filters have
        # not learnt yet than a visitor (who lasts longer), and a false switch would let its echo out.
        self._talk_run = self._talk_run + 1 if talk else 0
        self._settle = max(self._settle - 1, 0)
        onset = 1 if self._speex_erle_db >= self.SPEEX_TRUSTED_DB else self.ONSET_FRAMES
        if talk and (self._hold > 0 or self._talk_run >= onset):
            self._hold = self.HANGOVER_FRAMES
            self.double_talk_frames += 1
        elif self._hold > 0:
            self._hold -= 1
        # The speex path only helps once its filter has converged; until then AEC3's ducking is better.
        use_speex = self._hold > 0 and self._speex_erle_db >= self.SPEEX_READY_DB
        if use_speex == self._speex_on:
            self._out[:] = s if use_speex else a
        else:
            # Crossfade over this frame from the path in use to the other.
            new, old = (s, a) if use_speex else (a, s)
            np.multiply(new, self._ramp, out=self._mix)
            self._mix += old * (1.0 - self._ramp)
            np.rint(self._mix, out=self._mix)
            self._out[:] = self._mix
            self._speex_on = use_speex
        # Shift the delay lines by one frame (the oldest frame has been used).
        self._delay[:lat] = self._delay[_FRAME:]
        self._mic_delay[:lat] = self._mic_delay[_FRAME:]
        return self._out

    def reset(self) -> None:
        """Forget both filters."""
        self._echo.reset()
        self._aec3.reset()
        self._delay[:] = 0
        self._mic_delay[:] = 0
        self._hold = 0
        self._talk_run = 0
        self._settle = 0
        self._speex_on = False
        self._baseline_db = 0.0
        self._speex_erle_db = 0.0

    def set_delay_hint_ms(self, delay_ms: float) -> None:
        """The reference was realigned: pass the remaining delay to AEC3 and relearn its echo-only level.

        AEC3 re-converges for a moment after the reference moves; with the level reset to "unknown" the
        detector does not take that for a visitor.
        """
        self._aec3.set_delay_hint_ms(delay_ms)
        self._baseline_db = 0.0
        self._hold = 0  # what looked like double talk was most likely the misaligned echo
        self._settle = self.REALIGN_SETTLE_FRAMES


# --------------------------------------------------------------------------------- estimation
class _History:
    """A growing signal with absolute sample indices, kept in a preallocated buffer (bounded lookback)."""

    def __init__(self, keep_samples: int) -> None:
        self._keep = keep_samples
        self._buf = np.zeros(2 * keep_samples + 4 * _FRAME, dtype=np.int16)
        self._fill = 0  # samples in _buf
        self.end = 0  # absolute index one past the newest sample

    def append(self, frame: Pcm) -> None:
        n = len(frame)
        if self._fill + n > len(self._buf):
            # Drop the oldest: only the last ``keep`` samples are ever read again.
            self._buf[: self._keep] = self._buf[self._fill - self._keep: self._fill]
            self._fill = self._keep
        self._buf[self._fill: self._fill + n] = frame
        self._fill += n
        self.end += n

    @property
    def start(self) -> int:
        """Absolute index of the oldest sample still held."""
        return self.end - self._fill

    def view(self, start: int, stop: int) -> Pcm:
        """Samples [start, stop) by absolute index (clipped to what is held)."""
        a = max(start, self.start) - self.start
        b = max(min(stop, self.end) - self.start, a)
        return self._buf[a:b]

    def clear(self) -> None:
        self._fill = 0
        self.end = 0


@dataclass(frozen=True)
class DelayEstimate:
    """One GCC-PHAT measurement."""

    delay_samples: float  # echo behind reference, sub-sample
    confidence: float  # peak height over the correlation's spread (higher is surer)


def preload() -> None:
    """Import scipy.fft, which the delay estimate needs; run it on a thread once the kiosk is ready.

    Importing it costs 0.2-0.4 s of CPU (numpy's own FFT, cheap to import, runs this estimate 2.5 times
    slower). With the module, that delayed every start of the kiosk, so a visitor waited longer after a
    restart (docs/field.md); at the first estimate, it took 280 ms of the loop thread at the first session's
    first echo (the field bench's loop-callback timing). On a thread after READY it costs neither.
    """
    import scipy.fft  # noqa: F401


def estimate_delay(far: npt.NDArray[Any], near: npt.NDArray[Any], max_lag_samples: int) -> DelayEstimate:
    """GCC-PHAT: the lag (0..max_lag) at which ``near`` best matches ``far``.

    ``far`` holds ``max_lag_samples`` more samples than ``near`` and ends at the same instant, so
    ``near[i]`` lines up with ``far[i + max_lag_samples - lag]``.
    """
    from scipy import fft  # loaded by ``preload`` by now (see there)

    x = np.asarray(far, dtype=np.float32)
    y = np.asarray(near, dtype=np.float32)
    nfft = fft.next_fast_len(len(x) + len(y), real=True)
    spec = fft.rfft(x, nfft) * np.conj(fft.rfft(y, nfft))
    # PHAT weighting (whitening) with a floor, so silent bands do not amplify noise.
    mag = np.abs(spec)
    spec /= np.maximum(mag, 1e-3 * float(np.max(mag)) + 1e-12)
    corr = fft.irfft(spec, nfft)[: max_lag_samples + 1].astype(np.float64)
    k = int(np.argmax(corr))
    peak = float(corr[k])
    frac = 0.0
    if 0 < k < max_lag_samples:
        a, b, c = float(corr[k - 1]), peak, float(corr[k + 1])
        denom = a - 2 * b + c
        if denom < 0:
            frac = 0.5 * (a - c) / denom
    spread = float(np.std(corr)) + 1e-12
    return DelayEstimate(delay_samples=max_lag_samples - (k + frac), confidence=peak / spread)


class _DelayModel:
    """Delay over time as a line (bulk delay + drift), refitted on each measurement; steps start anew."""

    def __init__(self, step_samples: float, fit_span_samples: int, fixed_samples: float | None,
                 track_drift: bool, confirm_after_step_samples: int = 2 * RATE_HZ) -> None:
        self._step = step_samples
        self._span_after_step = confirm_after_step_samples
        self._span = fit_span_samples
        self._fixed = fixed_samples
        self._track = track_drift
        self._points: list[tuple[float, float]] = []  # (time in samples, delay in samples), this segment
        self._pending: tuple[float, float] | None = None  # a possible step awaiting confirmation
        self.slope = 0.0  # delay samples per sample (drift)
        self.intercept = fixed_samples  # delay at time ref_time
        self.ref_time = 0.0
        self.steps = 0
        self._jumped_at: float | None = None  # time of the last step

    @property
    def known(self) -> bool:
        return self.intercept is not None

    def line(self) -> tuple[float, float, float] | None:
        """(intercept, slope, ref_time) of the current segment, or None before the first measurement."""
        return None if self.intercept is None else (self.intercept, self.slope, self.ref_time)

    @property
    def pending(self) -> bool:
        """A measurement off the line is waiting for confirmation."""
        return self._pending is not None

    def at(self, time: float) -> float:
        """The modelled delay at ``time`` (samples)."""
        if self.intercept is None:
            return 0.0
        return self.intercept + self.slope * (time - self.ref_time)

    def add(self, time: float, delay: float, confidence: float, strong: float) -> bool:
        """Take a measurement; returns True when the model jumped (a new segment)."""
        if self._fixed is not None:
            if self._track:
                self._points.append((time, delay))
                self._trim(time)
                self._fit_slope_only(time)
            return False
        if self.intercept is None:
            self._points = [(time, delay)]
            self.intercept, self.ref_time = delay, time
            return True
        predicted = self.at(time)
        if abs(delay - predicted) > self._step:
            pending = self._pending
            self._pending = (time, delay)
            agrees = pending is not None and abs(delay - (pending[1] + self.slope * (time - pending[0]))) < self._step
            # Soon after a step, one strong measurement is not enough to step again: a window that still holds
            # the old path, or speech that repeats itself, can peak at the old delay once.
            settled = self._jumped_at is None or time - self._jumped_at > self._span_after_step
            if (confidence >= strong and settled) or agrees:
                self._pending = None
                self._points = [(time, delay)] if not agrees or pending is None else [pending, (time, delay)]
                self.intercept, self.ref_time = delay, time
                self.steps += 1
                self._jumped_at = time
                return True
            return False
        self._pending = None
        self._points.append((time, delay))
        self._trim(time)
        self._fit(time)
        return False

    def _trim(self, time: float) -> None:
        while len(self._points) > 2 and time - self._points[0][0] > self._span:
            self._points.pop(0)

    def _fit(self, time: float) -> None:
        pts = np.array(self._points)
        if len(pts) >= 3 and pts[-1, 0] - pts[0, 0] >= 2 * RATE_HZ and self._track:
            slope, icpt = np.polyfit(pts[:, 0] - time, pts[:, 1], 1)
            self.slope = float(np.clip(slope, -1e-3, 1e-3))
            self.intercept, self.ref_time = float(icpt), time
        else:
            # Too few points for a slope: keep the slope, re-centre the line on the measurements.
            self.intercept = float(np.mean(pts[:, 1] - self.slope * (pts[:, 0] - time)))
            self.ref_time = time

    def _fit_slope_only(self, time: float) -> None:
        pts = np.array(self._points)
        if len(pts) >= 3 and pts[-1, 0] - pts[0, 0] >= 2 * RATE_HZ:
            self.slope = float(np.clip(np.polyfit(pts[:, 0], pts[:, 1], 1)[0], -1e-3, 1e-3))
            first = self._points[0][0]
            # The fixed delay holds at the first measurement; drift moves it from there.
            self.intercept = float(self._fixed or 0.0) + self.slope * (time - first) if self._fixed is not None \
                else self.intercept
            self.ref_time = time


# ------------------------------------------------------------------------------------- wrapper
class AlignedEchoCanceller:
    """A backend plus bulk-delay estimation, a reference delay line and drift compensation."""

    # Reference kept this far ahead of the echo's direct path, so estimator error and the response's
    # onset stay causal for the adaptive filter.
    MARGIN_MS = 4.0
    WINDOW_MS = 1000
    INTERVAL_MS = 500
    RESAMPLER_QUALITY = 5
    # Drift line fitted over this much history.
    FIT_SPAN_SECONDS = 30.0
    # A measurement this far from the line (and confirmed, or very confident) is a delay step.
    STEP_MS = 0.6
    MIN_CONFIDENCE = 8.0
    STRONG_CONFIDENCE = 20.0
    # Position error of the reference corrected over this long (a gentle loop: sudden moves hurt the filter).
    CORRECTION_SECONDS = 2.0
    ERLE_GOOD_DB = 18.0
    FIRST_INTERVAL_FRAMES = 10
    FIRST_WINDOW_SAMPLES = RATE_HZ // 4
    GIVE_UP_FRAMES = 500  # far-end frames without a confident first estimate before using delay 0
    # Collapse watch: once the echo path has held (slow ERLE >= ERLE_GOOD_DB), a fast ERLE (about 3
    # far-end frames) under COLLAPSE_DB for COLLAPSE_FRAMES in a row means the path moved (or a visitor
    # talks). Then the delay is re-estimated every FIRST_INTERVAL_FRAMES on the last QUICK_WINDOW_MS for
    # QUICK_FRAMES, instead of once per INTERVAL_MS on a whole WINDOW_MS that still holds the old path.
    COLLAPSE_DB = 6.0
    COLLAPSE_FRAMES = 3
    QUICK_WINDOW_MS = 400
    QUICK_FRAMES = 150
    COLLAPSE_DB_RATIO = 10 ** (COLLAPSE_DB / 10)
    # After a step the backend has spent the time until the re-alignment adapting to a reference that no
    # longer lined up with the echo, and it needs a second or more to unlearn it (how long depends on the
    # speech it hears). So the last RETRAIN_SECONDS of (microphone, reference) are fed to it again at once,
    # the reference aligned as it should have been: the old delay before the step, the new one after.
    RETRAIN_SECONDS = 1.0

    def __init__(self, backend: _Backend, *, delay_ms: float | None = None, max_delay_ms: float = 400.0,
                 drift_compensation: bool = True) -> None:
        self.backend = backend
        self.name = backend.name
        self._max_lag = int(max_delay_ms * _SAMPLES_PER_MS)
        self._window = int(self.WINDOW_MS * _SAMPLES_PER_MS)
        self._quick_window = int(self.QUICK_WINDOW_MS * _SAMPLES_PER_MS)
        self._interval_frames = int(self.INTERVAL_MS / 10)
        self._margin = self.MARGIN_MS * _SAMPLES_PER_MS
        self._fixed = None if delay_ms is None else delay_ms * _SAMPLES_PER_MS
        self._drift = drift_compensation
        self._far = _History(self._window + self._max_lag + 8 * _FRAME)
        self._near = _History(self._window + 2 * _FRAME)
        self._resampler = Resampler(1, 1, RATE_HZ, quality=self.RESAMPLER_QUALITY, max_in_samples=4 * _FRAME,
                                    max_out_samples=4 * _FRAME)
        self._latency = self._resampler.input_latency_samples
        self._ref: Pcm = np.zeros(_FRAME, dtype=np.int16)
        self._scratch: Pcm = np.zeros(2 * self._latency + _FRAME, dtype=np.int16)
        self._zero: Pcm = np.zeros(_FRAME, dtype=np.int16)
        self._power_buf = np.zeros(_FRAME, dtype=np.float64)
        self._init_state()

    def _init_state(self) -> None:
        self._model = _DelayModel(self.STEP_MS * _SAMPLES_PER_MS, int(self.FIT_SPAN_SECONDS * RATE_HZ),
                                  self._fixed, self._drift)
        self._frames = 0
        self._since_estimate = 0
        self._anchored = False
        self._unanchored_far_frames = 0
        self._pos = 0.0  # absolute far index of the next reference sample (fractional)
        self._feed = 0  # absolute far index of the next sample handed to the resampler
        self._ratio = 1.0
        self._mic_power = 1e-9
        self._out_power = 1e-9
        self._good_frames = 0
        self._converged = False
        self._held = False  # the path held since the last alignment (slow ERLE reached ERLE_GOOD_DB)
        self._fast_mic = 1e-9
        self._fast_out = 1e-9
        self._low_frames = 0
        self._good_at = 0.0  # absolute index of the newest frame the backend still cancelled well
        self.retrains = 0
        self._quick_frames = 0  # frames of quick re-estimation left after a collapse
        self.collapses = 0
        self._far.clear()
        self._near.clear()
        if self._fixed is not None:
            self._anchor(0.0)

    # ---- the port
    def process(self, near: Pcm, far: Pcm) -> Pcm:
        """Align the reference, run the backend, update the estimates."""
        now = float(self._frames * _FRAME)  # the absolute index of this frame's first sample
        self._far.append(far)
        self._near.append(near)
        self._frames += 1
        self._since_estimate += 1
        if self._fixed is None or self._drift:
            self._maybe_estimate(now)
        if not self._anchored:
            self._unanchored_far_frames += int(bool(far.any()))
            if self._unanchored_far_frames > self.GIVE_UP_FRAMES:
                # No confident delay after seconds of far-end sound: cancel with the reference as
                # rendered (delay 0) rather than not at all; estimation keeps trying.
                self._anchor(now)
        # Zero-fill until the first alignment: an unaligned reference would teach the backend an echo
        # path it must unlearn when the reference moves (AEC3 loses about half a second over it).
        ref = self._reference(now) if self._anchored else self._zero
        out = self.backend.process(near, ref)
        self._track_erle(near, ref, out)
        return out

    def reset(self) -> None:
        """Forget the echo path, the delay and the drift."""
        self.backend.reset()
        self._resampler.reset()
        self._init_state()

    def stats(self) -> AecStats:
        """The current estimates."""
        now = float(self._frames * _FRAME)
        delay = self._model.at(now) / _SAMPLES_PER_MS if self._model.known else None
        erle = 10.0 * math.log10(self._mic_power / self._out_power)
        return AecStats(delay_ms=delay, drift_ppm=self._model.slope * 1e6, erle_db=erle,
                        converged=self._converged, frames=self._frames)

    @property
    def linear_residual(self) -> Pcm | None:
        """The backend's linear-filter residual of the last frame, if it has one (hybrid)."""
        return self.backend.linear_residual

    @property
    def settled(self) -> bool:
        """The echo path held since the last alignment and no collapse is being re-estimated.

        False from a reset until ERLE has held, and from the moment the removed echo collapses (a moved
        path, or a visitor talking over the agent) until it holds again: then the output may be echo the
        canceller no longer removes. Cheap: read per frame by the capture chain.
        """
        return self._held and self._quick_frames == 0

    # ---- internals
    def _maybe_estimate(self, now: float) -> None:
        # Far-end activity over the window, so silence does not produce measurements.
        # Until the delay is known, try every 100 ms on what there is (from a quarter second on), so the
        # canceller starts early; then once per interval on the full window.
        known = self._model.known
        quick = self._quick_frames > 0
        if quick:
            self._quick_frames -= 1
        interval = self._interval_frames if known and not quick else self.FIRST_INTERVAL_FRAMES
        held = self._near.end - self._near.start
        window = min(self._quick_window if quick else self._window, held)
        if self._since_estimate < interval or window < self.FIRST_WINDOW_SAMPLES:
            return
        self._since_estimate = 0
        end = self._near.end
        far = self._far.view(end - window - self._max_lag, end)
        near = self._near.view(end - window, end)
        if len(far) < window + self._max_lag:
            # Zero-fill: at start-up there is no reference older than the first frame; it was silence.
            far = np.concatenate([np.zeros(window + self._max_lag - len(far), dtype=np.int16), far])
        active = far[self._max_lag:].astype(np.float64)
        if float(np.mean(active * active)) < 1e4:  # about -50 dBFS: not enough far-end sound
            return
        est = estimate_delay(far, near, self._max_lag)
        if est.confidence < (self.MIN_CONFIDENCE if known else self.STRONG_CONFIDENCE):
            return
        # The window's measurement describes its middle.
        mid = float(end - window // 2)
        before = self._model.line() if self._anchored else None
        jumped = self._model.add(mid, est.delay_samples, est.confidence, self.STRONG_CONFIDENCE)
        if jumped or not self._anchored:
            self._quick_frames = 0
            self._anchor(now)
            if jumped and before is not None:
                self._retrain(now, before)
        else:
            self._steer(now)
            if self._model.pending:
                # A possible step: confirm it soon rather than a whole interval later.
                self._since_estimate = self._interval_frames - self.FIRST_INTERVAL_FRAMES

    def _retrain(self, now: float, before: tuple[float, float, float]) -> None:
        """Feed the backend the last ``RETRAIN_SECONDS`` again with the reference aligned as it should have been.

        Frames up to the last one the backend still cancelled well get the old line's delay, later ones the
        new model's. The outputs are discarded. Costs up to 100 backend calls once per step (the benchmark's
        CPU figure includes it).
        """
        intercept, slope, ref_time = before
        end = int(now)
        start = max(self._near.start, end - int(self.RETRAIN_SECONDS * RATE_HZ))
        start += (end - start) % _FRAME
        for t in range(start, end, _FRAME):
            delay = intercept + slope * (t - ref_time) if t < self._good_at else self._model.at(t)
            at = round(t - max(delay - self._margin, 0.0))
            near = self._near.view(t, t + _FRAME)
            far = self._far.view(at, at + _FRAME)
            if len(near) == _FRAME and len(far) == _FRAME:
                self.backend.process(near, far)
        # The replay ran through the misaligned stretch, which looks like double talk to a hybrid backend:
        # tell it again that the reference moved, so it does not hold on to that.
        self.backend.set_delay_hint_ms(self._margin / _SAMPLES_PER_MS)
        self.retrains += 1

    def _target(self, now: float) -> float:
        """Where the reference should read for the frame starting at ``now``: the echo's delay less a margin."""
        return now - max(self._model.at(now) - self._margin, 0.0)

    def _anchor(self, now: float) -> None:
        """Jump the delay line to the model (first estimate, or a delay step)."""
        target = self._target(now)
        self._resampler.reset()
        self._resampler.set_ratio(1, 1)
        self._ratio = 1.0
        # The resampler's output lags its input by ``latency`` samples: feed it from ``latency`` before the
        # target (so its filter memory holds real audio) and drop the first ``2 * latency`` outputs.
        start = math.floor(target)
        self._feed = start - self._latency
        self._pos = float(start)
        dropped = 0
        while dropped < 2 * self._latency:
            block = self._feed_block()
            if len(block) == 0:
                break
            consumed, made = self._resampler.process(block, self._scratch[: 2 * self._latency - dropped])
            self._feed += consumed
            dropped += made
            if consumed == 0 and made == 0:
                break
        self._anchored = True
        self._held = False
        self._low_frames = 0
        self.backend.set_delay_hint_ms(self._margin / _SAMPLES_PER_MS)
        _LOGGER.info("echo delay %.1f ms (drift %.0f ppm)", self._model.at(now) / _SAMPLES_PER_MS,
                     self._model.slope * 1e6)
        self._steer(now)

    def _steer(self, now: float) -> None:
        """Set the resampler's ratio: the drift, plus a gentle correction of the position error."""
        if not self._drift:
            return
        error = self._target(now) - self._pos
        correction = error / (self.CORRECTION_SECONDS * RATE_HZ)
        ratio = 1.0 - self._model.slope + float(np.clip(correction, -2e-4, 2e-4))
        # The resampler takes the ratio as a fraction whose denominator must stay below 2**16 (it rescales
        # its phase by the old and new denominators in 32 bits); the best such fraction is within 1e-9.
        frac = Fraction(ratio).limit_denominator(60000)
        self._resampler.set_ratio(frac.numerator, frac.denominator)
        self._ratio = float(frac)

    def _feed_block(self) -> Pcm:
        """The far-end samples from the resampler's read position on (zeros before the first frame)."""
        if self._feed < self._far.start:
            # Zero-fill: nothing was rendered before the stream started (or it is older than the history).
            return self._zero[: min(self._far.start - self._feed, _FRAME)]
        return self._far.view(self._feed, self._far.end)[: 4 * _FRAME]

    def _reference(self, now: float) -> Pcm:
        produced = 0
        while produced < _FRAME:
            block = self._feed_block()
            if len(block) == 0:
                break
            consumed, made = self._resampler.process(block, self._ref[produced:])
            self._feed += consumed
            produced += made
            if consumed == 0 and made == 0:
                break
        if produced < _FRAME:
            # Zero-fill: the reference has not been rendered that far yet (a delay shorter than the margin).
            self._ref[produced:] = 0
        self._pos += _FRAME * self._ratio
        return self._ref

    def _track_erle(self, near: Pcm, ref: Pcm, out: Pcm) -> None:
        far_power = _power(ref, self._power_buf) / _FRAME
        if far_power < 1e4:  # no far-end sound in this frame: ERLE is undefined, keep the estimate
            return
        mic = _power(near, self._power_buf) / _FRAME
        res = _power(out, self._power_buf) / _FRAME
        alpha = 0.05  # about 200 ms of far-end activity
        self._mic_power += alpha * (mic + 1.0 - self._mic_power)
        self._out_power += alpha * (res + 1.0 - self._out_power)
        erle = 10.0 * math.log10(self._mic_power / self._out_power)
        self._good_frames = self._good_frames + 1 if erle >= self.ERLE_GOOD_DB else 0
        if self._good_frames >= 100:
            self._converged = True
        if self._good_frames >= 30:
            self._held = True
        self._watch_collapse(mic, res)

    def _watch_collapse(self, mic: float, res: float) -> None:
        """Start quick re-estimation when the removed echo collapses after the path had held."""
        fast = 0.3  # about 3 far-end frames: a delay step shows within 30-50 ms
        self._fast_mic += fast * (mic + 1.0 - self._fast_mic)
        self._fast_out += fast * (res + 1.0 - self._fast_out)
        if not self._held or self._fixed is not None or self._quick_frames > 0:
            return
        if self._fast_mic < self.COLLAPSE_DB_RATIO * self._fast_out:
            self._low_frames += 1
        else:
            self._low_frames = 0
            self._good_at = float(self._near.end)
        if self._low_frames >= self.COLLAPSE_FRAMES:
            # The echo the canceller removes collapsed: the path moved, or a visitor talks. Re-estimate at
            # once on a short window; a visitor leaves the delay where it is (the estimates agree with the
            # line), a moved path is confirmed by two agreeing estimates 100 ms apart.
            self._low_frames = 0
            self._held = False
            self._quick_frames = self.QUICK_FRAMES
            self._since_estimate = self.FIRST_INTERVAL_FRAMES
            self.collapses += 1


class PassThrough:
    """An ``EchoCanceller`` that leaves the microphone as it is and knows nothing of an echo path.

    For measuring a chain without cancellation (no far end at all, as in the voice-detection benchmark).
    """

    name = "pass-through"
    settled = True  # nothing to lose track of
    linear_residual: Pcm | None = None

    def __init__(self) -> None:
        self._frames = 0

    def process(self, near: Pcm, far: Pcm) -> Pcm:
        """``near`` itself."""
        self._frames += 1
        return near

    def reset(self) -> None:
        """Nothing to forget but the count."""
        self._frames = 0

    def stats(self) -> AecStats:
        """No delay known, nothing removed."""
        return AecStats(delay_ms=None, drift_ppm=0.0, erle_db=0.0, converged=False, frames=self._frames)


def make_echo_canceller(settings: AecSettings) -> EchoCanceller:
    """The configured echo canceller: a backend wrapped in delay estimation and drift compensation."""
    backend: _Backend
    if settings.backend is AecBackend.SPEEX:
        backend = SpeexBackend(settings.filter_ms, settings.residual_suppression, settings.noise_suppression)
    elif settings.backend is AecBackend.HYBRID:
        backend = HybridBackend(settings.filter_ms, noise_suppression=settings.noise_suppression)
    elif settings.backend is AecBackend.WEBRTC:
        backend = WebRtcBackend(noise_suppression=settings.noise_suppression)
    elif settings.backend is AecBackend.NONE:
        backend = NoneBackend()
    else:  # pragma: no cover - the enum is closed
        raise AecError(f"unknown aec.backend {settings.backend!r}: use webrtc, speex or none")
    return AlignedEchoCanceller(backend, delay_ms=settings.delay_ms, max_delay_ms=settings.max_delay_ms,
                                drift_compensation=settings.drift_compensation)

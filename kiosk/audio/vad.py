"""Voice detection: the ``VoiceDetector`` port's webrtcvad adapter, a pure ``Segmenter`` and the streaming ``Gate``.

Per 10 ms frame the detector says "speech at the kiosk" or not. The webrtcvad decision is combined with
two level cues that reject a distant voice (another visitor a few metres away, a television): the
short-term peak level must reach ``min_level_dbfs`` and stand ``noise_margin_db`` above a tracked noise
floor. A short hold (``speech_hold_ms``) bridges weak word endings.

The ``Segmenter`` turns the per-frame flags into ``VoiceStarted``/``VoiceStopped`` events (minimum speech,
hangover); it is clock-free: each frame brings its own time in seconds. The ``Gate`` keeps a preallocated
pre-roll ring while closed and, when the controller opens it, releases the pre-roll first so the first
syllable reaches the agent. The VAD never opens the gate itself: that is the controller's decision.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from kiosk.audio.format import FRAME_SAMPLES, RATE_HZ, Pcm
from kiosk.errors import ConfigError
from kiosk.events import VoiceStarted, VoiceStopped
from kiosk.ports import VoiceDetector
from kiosk.settings import VadSettings

_LOGGER = logging.getLogger(__name__)

FRAME_SECONDS = FRAME_SAMPLES / RATE_HZ
SILENCE_DBFS = -100.0
# Noise floor tracker: falls fast towards quieter frames, creeps up slowly so speech does not lift it.
_FLOOR_FALL = 0.2  # share of the gap closed per frame when a frame is quieter than the floor
_FLOOR_RISE_DB = 0.02  # per frame (2 dB per second) when a frame is louder
# Peak hold for the level cues: word tails stay "near" for about 300 ms after a loud syllable.
_PEAK_DECAY_DB = 0.5  # per frame
_FULL_SCALE_POWER = 32768.0 * 32768.0 * FRAME_SAMPLES
_SILENCE_POWER = _FULL_SCALE_POWER * 10.0 ** (SILENCE_DBFS / 10.0)


def frame_level_dbfs(power_sum: float) -> float:
    """Level of a 160-sample frame in dBFS (RMS re full scale) from its sum of squared int16 samples.

    At or below the silence floor it is the floor. A smoothed power that decays through a long run of digital
    zeros reaches denormal values whose quotient by full scale underflows to 0.0 (log10 then raised, and the
    audio reader failed on every frame, 70 s into a muted stream).
    """
    if power_sum <= _SILENCE_POWER:
        return SILENCE_DBFS
    return 10.0 * math.log10(power_sum / _FULL_SCALE_POWER)


class WebRtcVoiceDetector:
    """``VoiceDetector`` on webrtcvad plus level cues against distant voices.

    Attributes after each frame (for diagnostics and the benchmark): ``raw_speech`` (webrtcvad alone),
    ``near`` (level cues passed), ``level_dbfs``, ``noise_floor_dbfs``, ``peak_dbfs``.
    """

    def __init__(self, settings: VadSettings) -> None:
        import webrtcvad  # lazy: keeps `kiosk config` free of native modules

        self._settings = settings
        self._vad = webrtcvad.Vad(settings.mode)
        self._block_frames = settings.frame_ms // 10
        if not webrtcvad.valid_rate_and_frame_length(RATE_HZ, self._block_frames * FRAME_SAMPLES):
            raise ConfigError(f"vad.frame_ms: {settings.frame_ms} is not usable by webrtcvad; use 10, 20 or 30")
        self._hold_frames = settings.speech_hold_ms // 10
        self._block: Pcm = np.zeros(self._block_frames * FRAME_SAMPLES, dtype=np.int16)
        self._scratch: npt.NDArray[np.float32] = np.zeros(FRAME_SAMPLES, dtype=np.float32)
        self._filled = 0
        self._hold = 0
        self.raw_speech = False
        self.near = False
        self.level_dbfs = SILENCE_DBFS
        self.noise_floor_dbfs: float | None = None
        self.peak_dbfs = SILENCE_DBFS

    def reset(self) -> None:
        """Forget the noise floor, the hold and the partial analysis block."""
        self._filled = 0
        self._hold = 0
        self.raw_speech = False
        self.near = False
        self.noise_floor_dbfs = None
        self.peak_dbfs = SILENCE_DBFS

    def is_speech(self, frame: Pcm) -> bool:
        """Feed one 10 ms frame; True while speech at the kiosk is detected (or held)."""
        np.copyto(self._scratch, frame, casting="unsafe")
        level = frame_level_dbfs(float(np.dot(self._scratch, self._scratch)))
        self.level_dbfs = level
        floor = self.noise_floor_dbfs
        if floor is None:
            floor = level
        elif level < floor:
            floor += _FLOOR_FALL * (level - floor)
        else:
            floor += _FLOOR_RISE_DB
        self.noise_floor_dbfs = floor
        self.peak_dbfs = max(level, self.peak_dbfs - _PEAK_DECAY_DB)

        start = self._filled * FRAME_SAMPLES
        self._block[start:start + FRAME_SAMPLES] = frame
        self._filled += 1
        if self._filled == self._block_frames:
            self._filled = 0
            # One webrtcvad call per analysis block; frames inside a block keep the previous decision.
            self.raw_speech = bool(self._vad.is_speech(self._block.tobytes(), RATE_HZ))

        settings = self._settings
        self.near = (self.peak_dbfs >= settings.min_level_dbfs
                     and self.peak_dbfs >= floor + settings.noise_margin_db)
        if self.raw_speech and self.near:
            self._hold = self._hold_frames + 1
        if self._hold > 0:
            self._hold -= 1
            return True
        return False


def make_voice_detector(settings: VadSettings) -> VoiceDetector:
    """The configured detector (webrtcvad with level cues)."""
    return WebRtcVoiceDetector(settings)


class Segmenter:
    """Per-frame speech flags in, ``VoiceStarted``/``VoiceStopped`` out; pure and clock-free.

    ``feed(is_speech, now_seconds)`` takes the flag of the frame that starts at ``now_seconds`` (each frame
    lasts ``frame_seconds``). Speech starts after ``min_speech_ms`` of consecutive speech frames;
    ``VoiceStarted.at_seconds`` is the start of the first of them, moved back by ``onset_lookback_ms`` (webrtcvad
    flags a word's first tens of milliseconds late) but never into the previous segment. Speech stops after
    ``hangover_ms`` without a speech frame; ``VoiceStopped.at_seconds`` is the end of the last speech frame.
    The look-back only dates the segment: the event is emitted when the minimum speech is reached, as without it.
    """

    def __init__(self, *, min_speech_ms: float, hangover_ms: float, onset_lookback_ms: float = 0.0,
                 frame_seconds: float = FRAME_SECONDS) -> None:
        self._min_speech_seconds = min_speech_ms / 1000.0
        self._hangover_seconds = hangover_ms / 1000.0
        self._lookback_seconds = onset_lookback_ms / 1000.0
        self._frame_seconds = frame_seconds
        # Half a frame of slack so float sums of 10 ms steps compare as intended.
        self._eps = frame_seconds / 2
        self.in_speech = False
        self._run_start: float | None = None
        self._last_speech_end = 0.0
        self._last_stop: float | None = None

    @classmethod
    def from_settings(cls, settings: VadSettings) -> Segmenter:
        """A segmenter with the configured minimum speech, hangover and onset look-back."""
        return cls(min_speech_ms=settings.min_speech_ms, hangover_ms=settings.hangover_ms,
                   onset_lookback_ms=settings.onset_lookback_ms)

    def reset(self) -> None:
        """Back to silence without an event (the controller already knows)."""
        self.in_speech = False
        self._run_start = None

    def feed(self, is_speech: bool, now_seconds: float) -> VoiceStarted | VoiceStopped | None:
        """Feed one frame's flag; returns the event this frame causes, if any."""
        end = now_seconds + self._frame_seconds
        if is_speech:
            self._last_speech_end = end
            if self.in_speech:
                return None
            if self._run_start is None:
                self._run_start = now_seconds
            if end - self._run_start + self._eps >= self._min_speech_seconds:
                self.in_speech = True
                started = self._run_start - self._lookback_seconds
                if self._last_stop is not None:
                    started = max(started, self._last_stop)
                self._run_start = None
                return VoiceStarted(at_seconds=max(started, 0.0))
            return None
        if self.in_speech:
            if end - self._last_speech_end + self._eps >= self._hangover_seconds:
                self.in_speech = False
                self._last_stop = self._last_speech_end
                return VoiceStopped(at_seconds=self._last_speech_end)
            return None
        # A silent frame breaks a run that has not reached the minimum yet.
        self._run_start = None
        return None

    def finish(self) -> VoiceStopped | None:
        """End of input: close open speech at the end of its last speech frame."""
        self._run_start = None
        if not self.in_speech:
            return None
        self.in_speech = False
        self._last_stop = self._last_speech_end
        return VoiceStopped(at_seconds=self._last_speech_end)


_NOTHING: tuple[Pcm, ...] = ()


class Gate:
    """Decides which cleaned frames are streamed; opened and closed by the controller only.

    While closed, the newest ``preroll_frames`` frames are kept in a preallocated ring. ``open()`` makes
    the next ``process`` return the pre-roll (oldest first) followed by the current frame, so the first
    syllable, spoken before the controller heard ``VoiceStarted``, is not lost. While open, each frame is
    returned as it comes.
    """

    def __init__(self, preroll_frames: int, frame_samples: int = FRAME_SAMPLES) -> None:
        if preroll_frames < 0:
            raise ValueError("preroll_frames must be 0 or more")
        self._ring: Pcm = np.zeros((max(preroll_frames, 1), frame_samples), dtype=np.int16)
        self._capacity = preroll_frames
        self._next = 0
        self._count = 0
        self._release = False
        self.is_open = False

    @classmethod
    def from_settings(cls, settings: VadSettings) -> Gate:
        """A gate with the configured pre-roll."""
        return cls(settings.preroll_ms // 10)

    def open(self, *, preroll: bool = True) -> None:
        """Start streaming; the pre-roll goes out with the next frame (``preroll=False``: it is dropped)."""
        if not self.is_open:
            if not preroll:
                # Dropped, not sent: audio from before this opening must not reach the room (the AI notice).
                self._count = 0
                self._next = 0
            self.is_open = True
            self._release = True

    def close(self) -> None:
        """Stop streaming; the pre-roll starts afresh (nothing already streamed is sent twice)."""
        self.is_open = False
        self._release = False
        self._count = 0
        self._next = 0

    def process(self, frame: Pcm) -> Sequence[Pcm]:
        """Feed one frame; returns the frames to stream now (none while closed)."""
        if not self.is_open:
            if self._capacity:
                # Drop-oldest: the ring overwrites the oldest pre-roll frame; only the newest are released.
                self._ring[self._next] = frame
                self._next = (self._next + 1) % self._capacity
                self._count = min(self._count + 1, self._capacity)
            return _NOTHING
        if self._release:
            self._release = False
            first = (self._next - self._count) % self._capacity if self._capacity else 0
            order = [(first + i) % self._capacity for i in range(self._count)]
            # Copies: the ring is reused once the gate closes again; the pre-roll leaves once per opening.
            out = [self._ring[i].copy() for i in order]
            out.append(frame)
            self._count = 0
            self._next = 0
            return out
        return (frame,)

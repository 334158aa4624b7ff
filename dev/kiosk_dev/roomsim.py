"""The offline room: deterministic (seeded) echo scenarios at 16 kHz, and a streaming form for live use.

A scenario is what a kiosk microphone hears: the agent's speech played by the speaker and returned by
the room (a room impulse response from pyroomacoustics, a bulk delay, and clock drift between playback
and capture), the visitor at the kiosk, and the booth's background (steady noise, music, babble, or a
distant talker: a voice a few metres away, convolved with a long reverberant response at a low level).

Clock drift convention: ``drift_ppm > 0`` means the capture clock runs faster than the playback clock,
so the echo arrives later and later (the delay grows by ``drift_ppm`` microseconds per second).

``StreamingRoom`` does the same to blocks read live (the virtual room reads the speaker sink's monitor,
processes each block and plays the result into the "room" sink).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.signal import fftconvolve, lfilter

from kiosk_dev.inputs import Arrays, recorded
from kiosk_dev.speech import SENTENCES, corpus, espeak, normalise

_LOGGER = logging.getLogger(__name__)

RATE_HZ = 16000
Signal = npt.NDArray[np.float32]

# Windowed-sinc interpolator for fractional reads (clock drift): taps and Kaiser beta.
_SINC_TAPS = 48
_SINC_BETA = 9.0


def rms_dbfs(audio: npt.NDArray[Any]) -> float:
    """RMS level in dBFS (full scale = 1.0); -inf-safe (floors at -200)."""
    power = float(np.mean(np.square(audio, dtype=np.float64))) if len(audio) else 0.0
    return 10.0 * float(np.log10(max(power, 1e-20)))


@functools.lru_cache(maxsize=16)
def _rir_cached(seed: int, rt60_seconds: float, distance_m: float, room_m: tuple[float, float, float],
                length_samples: int) -> bytes:
    import pyroomacoustics as pra

    rng = np.random.default_rng(seed)
    dims = np.array(room_m)
    absorption, max_order = pra.inverse_sabine(rt60_seconds, list(dims))
    room = pra.ShoeBox(list(dims), fs=RATE_HZ, materials=pra.Material(absorption), max_order=min(max_order, 24))
    source = np.array([rng.uniform(1.0, dims[0] - 1.0), rng.uniform(1.0, dims[1] - 1.0), rng.uniform(1.0, 1.6)])
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    mic = np.clip(source + distance_m * direction, 0.2, dims - 0.2)
    room.add_source(list(source))
    room.add_microphone(list(mic))
    room.compute_rir()
    rir = np.asarray(room.rir[0][0], dtype=np.float64)
    out = np.zeros(length_samples, dtype=np.float32)
    n = min(len(rir), length_samples)
    out[:n] = rir[:n]
    # Normalise to unit peak so levels are set by the scenario, not by the geometry.
    out /= float(np.max(np.abs(out)))
    return out.tobytes()


def room_impulse_response(seed: int = 0, *, rt60_seconds: float = 0.35, distance_m: float = 0.15,
                          room_m: tuple[float, float, float] = (6.0, 5.0, 3.0),
                          length_samples: int = 6000) -> Signal:
    """A shoebox room response from speaker to microphone (unit peak), deterministic for a seed.

    The defaults are a kiosk: speaker and microphone 15 cm apart in a modestly reverberant 6 x 5 x 3 m
    room. A distant talker uses ``distance_m`` of a few metres and a longer ``rt60_seconds``.
    """
    data = _rir_cached(seed, rt60_seconds, distance_m, room_m, length_samples)
    return np.frombuffer(data, dtype=np.float32).copy()


def _kaiser_sinc(fractions: npt.NDArray[np.float64], taps: int = _SINC_TAPS,
                 beta: float = _SINC_BETA) -> npt.NDArray[np.float64]:
    """Interpolation weights, shape (len(fractions), taps), for reads between samples."""
    half = taps // 2
    offsets = np.arange(-half + 1, half + 1, dtype=np.float64)  # taps relative to floor(position)
    x = offsets[None, :] - fractions[:, None]
    # Evaluate the Kaiser window continuously: i0(beta*sqrt(1-(x/half)^2))/i0(beta).
    arg = np.clip(1.0 - (x / (half + 0.5)) ** 2, 0.0, 1.0)
    w = np.i0(beta * np.sqrt(arg)) / np.i0(beta)
    weights: npt.NDArray[np.float64] = np.sinc(x) * w
    return weights


def fractional_read_channels(audio: npt.NDArray[Any], positions: npt.NDArray[np.float64], *,
                             taps: int = _SINC_TAPS, beta: float = _SINC_BETA) -> npt.NDArray[np.float64]:
    """Band-limited reads of every channel of ``audio`` (C, N) at fractional ``positions``, in float64 (C, P).

    A windowed-sinc interpolator of ``taps`` taps (Kaiser window, ``beta``); zero outside the signal. The room
    corpus (``kiosk_dev.rooms``) reads its four microphones' echo with 32 taps, beta 8.
    """
    half = taps // 2
    channels = np.asarray(audio, dtype=np.float64)
    padded = np.concatenate([np.zeros((len(channels), half + 1)), channels, np.zeros((len(channels), half + 1))],
                            axis=1)
    out = np.zeros((len(channels), len(positions)), dtype=np.float64)
    offsets = np.arange(-half + 1, half + 1)
    for start in range(0, len(positions), 8192):
        pos = positions[start:start + 8192]
        base = np.floor(pos)
        weights = _kaiser_sinc(pos - base, taps, beta)
        index = base.astype(np.int64)[:, None] + offsets[None, :] + half + 1
        index = np.clip(index, 0, padded.shape[1] - 1)
        for c in range(len(channels)):
            out[c, start:start + len(pos)] = np.sum(padded[c][index] * weights, axis=1)
    return out


def fractional_read(audio: npt.NDArray[Any],
                    positions: npt.NDArray[np.float64]) -> Signal:
    """Band-limited reads of ``audio`` at fractional sample ``positions`` (zero outside the signal)."""
    out: Signal = fractional_read_channels(np.asarray(audio)[None, :], positions)[0].astype(np.float32)
    return out


def render_echo(far: Signal, rir: Signal, delay_ms: float = 0.0, drift_ppm: float = 0.0) -> Signal:
    """The echo the microphone records of ``far`` (same length): convolution, bulk delay, clock drift."""
    wet = fftconvolve(np.asarray(far, dtype=np.float64), np.asarray(rir, dtype=np.float64))[: len(far)]
    delay_samples = delay_ms * RATE_HZ / 1000.0
    n = np.arange(len(far), dtype=np.float64)
    # Capture sample n is taken at playback time n / (1 + drift), minus the bulk delay.
    positions = n / (1.0 + drift_ppm * 1e-6) - delay_samples
    if drift_ppm == 0.0 and float(delay_samples).is_integer():
        d = int(delay_samples)
        out = np.zeros(len(far), dtype=np.float32)
        out[d:] = wet[: len(far) - d]
        return out
    return fractional_read(wet, positions)


# ----------------------------------------------------------------------------------- backgrounds
def white_noise(samples: int, seed: int = 0) -> Signal:
    """Gaussian white noise, unit variance."""
    return np.random.default_rng(seed).standard_normal(samples).astype(np.float32)


def pink_noise_f64(samples: int, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """1/f noise (Kellet's filter on white noise from ``rng``), unit variance, float64."""
    white = rng.standard_normal(samples + 4000)
    b = [0.049922035, -0.095993537, 0.050612699, -0.004408786]
    a = [1.0, -2.494956002, 2.017265875, -0.522189400]
    pink = np.asarray(lfilter(b, a, white), dtype=np.float64)[4000:]
    out: npt.NDArray[np.float64] = pink / np.std(pink)
    return out


def pink_noise(samples: int, seed: int = 0) -> Signal:
    """1/f noise (Kellet's filter on white noise), unit variance."""
    return pink_noise_f64(samples, np.random.default_rng(seed)).astype(np.float32)


def music_like(samples: int, seed: int = 0) -> Signal:
    """Music-like background: chords of harmonic tones changing every half second, plus a soft beat."""
    rng = np.random.default_rng(seed)
    out = np.zeros(samples, dtype=np.float64)
    note = RATE_HZ // 2
    t = np.arange(note) / RATE_HZ
    envelope = np.minimum(1.0, t / 0.02) * np.exp(-t * 3.0)
    for start in range(0, samples, note):
        chunk = np.zeros(note)
        for _ in range(3):
            f0 = 110.0 * 2 ** (int(rng.integers(0, 24)) / 12)
            for h in range(1, 6):
                chunk += np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 2 * np.pi)) / h
        chunk *= envelope
        beat = rng.standard_normal(note) * np.exp(-t * 40.0) * 0.5
        n = min(note, samples - start)
        out[start:start + n] = (chunk + beat)[:n]
    return (out / np.std(out)).astype(np.float32)


def speech_track(samples: int, seed: int, offset: int = 0, *, voice: str | None = None,
                 speed_wpm: int = 160) -> Signal:
    """Utterances back to back with short pauses, to fill ``samples``.

    From the corpus (several voices) by default; with ``voice``, the corpus's sentences in that espeak-ng voice at
    ``speed_wpm`` (to check that a result does not hang on one synthesiser's exact speech).
    """
    rng = np.random.default_rng(seed)
    items = corpus() if voice is None else []

    def utterance(k: int) -> Signal:
        if voice is None:
            return items[k % len(items)].audio
        return espeak(SENTENCES[k % len(SENTENCES)], voice, speed_wpm)

    out = np.zeros(samples, dtype=np.float32)
    pos = int(rng.integers(0, RATE_HZ // 2))
    k = offset
    while pos < samples:
        utt = normalise(utterance(k), -20.0)
        n = min(len(utt), samples - pos)
        out[pos:pos + n] = utt[:n]
        pos += n + int(rng.integers(RATE_HZ // 10, RATE_HZ // 2))
        k += 1
    return out


def distant_talker(samples: int, seed: int = 0, distance_m: float = 3.0) -> Signal:
    """A voice a few metres away in a reverberant hall (unit variance): it must not count as the visitor."""
    rir = room_impulse_response(seed + 1000, rt60_seconds=0.8, distance_m=distance_m, room_m=(12.0, 9.0, 4.0),
                                length_samples=16000)
    voice = speech_track(samples, seed, offset=3 + seed)
    wet = np.asarray(fftconvolve(voice, rir), dtype=np.float64)[:samples]
    return (wet / max(float(np.std(wet)), 1e-9)).astype(np.float32)


def babble(samples: int, seed: int = 0, talkers: int = 4) -> Signal:
    """Several distant talkers at once (a busy floor), unit variance."""
    mix = sum(distant_talker(samples, seed + 17 * i, distance_m=2.5 + i) for i in range(talkers))
    mix = np.asarray(mix, dtype=np.float64)
    return (mix / max(float(np.std(mix)), 1e-9)).astype(np.float32)


NOISE_KINDS = ("white", "pink", "music", "babble", "distant_talker")


@recorded("background")
def background(kind: str, samples: int, seed: int = 0) -> Signal:
    """A background of the given kind (one of ``NOISE_KINDS``), unit variance."""
    makers = {"white": white_noise, "pink": pink_noise, "music": music_like, "babble": babble,
              "distant_talker": distant_talker}
    if kind not in makers:
        raise ValueError(f"unknown background '{kind}'; use one of {', '.join(NOISE_KINDS)}")
    return makers[kind](samples, seed)


# -------------------------------------------------------------------------------------- scenario
@dataclass
class Scenario:
    """One simulated recording at 16 kHz: the parts and the microphone signal they sum to."""

    far: Signal  # what the speaker played (the AEC reference)
    echo: Signal  # the speaker's sound at the microphone
    near: Signal  # the visitor at the microphone (clean, for SDR and VAD labels)
    noise: Signal  # background at the microphone
    mic: Signal  # echo + near + noise (+ the microphone's self-noise)
    delay_ms: float
    drift_ppm: float
    near_spans: list[tuple[float, float]] = field(default_factory=list)  # visitor speech, seconds


def _scenario_arrays(scenario: Scenario) -> Arrays:
    spans = np.asarray(scenario.near_spans, dtype=np.float64).reshape(-1, 2)
    return {"far": scenario.far, "echo": scenario.echo, "near": scenario.near, "noise": scenario.noise,
            "mic": scenario.mic, "delay_ms": np.array(scenario.delay_ms), "drift_ppm": np.array(scenario.drift_ppm),
            "near_spans": spans}


def _scenario_from_arrays(arrays: Arrays) -> Scenario:
    return Scenario(far=arrays["far"], echo=arrays["echo"], near=arrays["near"], noise=arrays["noise"],
                    mic=arrays["mic"], delay_ms=float(arrays["delay_ms"]), drift_ppm=float(arrays["drift_ppm"]),
                    near_spans=[(float(a), float(b)) for a, b in arrays["near_spans"]])


@recorded("scenario", encode=_scenario_arrays, decode=_scenario_from_arrays)
def make_scenario(seed: int = 0, *, seconds: float = 20.0, delay_ms: float = 40.0, drift_ppm: float = 0.0,
                  echo_dbfs: float = -22.0, visitor_dbfs: float = -26.0,
                  visitor_spans: list[tuple[float, float]] | None = None, noise_kind: str | None = None,
                  noise_dbfs: float = -60.0, self_noise_dbfs: float = -85.0, far_active: bool = True,
                  rir: Signal | None = None) -> Scenario:
    """A deterministic scenario: agent speech throughout, the visitor in ``visitor_spans`` (seconds).

    Levels are RMS over the active speech: the echo at ``echo_dbfs`` (a speaker close to the microphone),
    the visitor at ``visitor_dbfs``, the background at ``noise_dbfs``, the microphone's own noise at
    ``self_noise_dbfs``.
    """
    samples = int(seconds * RATE_HZ)
    far = normalise(speech_track(samples, seed), -20.0) if far_active else np.zeros(samples, np.float32)
    path = room_impulse_response(seed) if rir is None else rir
    echo = render_echo(far, path, delay_ms, drift_ppm)
    if far_active:
        echo = normalise(echo, echo_dbfs)
    near = np.zeros(samples, dtype=np.float32)
    spans = list(visitor_spans or [])
    items = corpus()
    for i, (start_s, end_s) in enumerate(spans):
        a, b = int(start_s * RATE_HZ), min(samples, int(end_s * RATE_HZ))
        voice = normalise(items[(seed + 5 + i) % len(items)].audio, visitor_dbfs)
        reps = int(np.ceil((b - a) / len(voice)))
        near[a:b] = np.tile(voice, reps)[: b - a]
    noise = np.zeros(samples, dtype=np.float32)
    if noise_kind is not None:
        noise = background(noise_kind, samples, seed + 1) * np.float32(10 ** (noise_dbfs / 20))
    hiss = white_noise(samples, seed + 2) * np.float32(10 ** (self_noise_dbfs / 20))
    mic = (echo + near + noise + hiss).astype(np.float32)
    return Scenario(far=far, echo=echo, near=near, noise=noise, mic=mic, delay_ms=delay_ms, drift_ppm=drift_ppm,
                    near_spans=spans)


# ------------------------------------------------------------------------------------- streaming
class StreamingRoom:
    """The room, block by block: ``process(far_block) -> mic_block`` of the same length.

    Overlap-add convolution with ``rir``, then a bulk delay line, then clock drift by band-limited
    resampling (a fractional read pointer advancing ``1 / (1 + drift)`` per output sample). Delay and
    drift can be changed while running (``set_delay_ms``; a step is what a real audio path does).
    """

    def __init__(self, rir: Signal, delay_ms: float = 0.0, drift_ppm: float = 0.0,
                 max_delay_ms: float = 2000.0) -> None:
        self._rir = np.asarray(rir, dtype=np.float64)
        self._tail = np.zeros(len(self._rir) - 1, dtype=np.float64)
        self._step = 1.0 / (1.0 + drift_ppm * 1e-6)
        history = int((max_delay_ms / 1000.0 + 2.0) * RATE_HZ)
        self._history = np.zeros(history, dtype=np.float64)  # wet signal, newest at the end
        self._written = 0  # wet samples written in total
        self._delay_samples = delay_ms * RATE_HZ / 1000.0
        self._read = -self._delay_samples  # position (in wet-sample time) of the next output sample
        self.drift_ppm = drift_ppm

    def set_delay_ms(self, delay_ms: float) -> None:
        """Change the bulk delay at once (a step, as a re-buffering audio path makes)."""
        new = delay_ms * RATE_HZ / 1000.0
        self._read -= new - self._delay_samples
        self._delay_samples = new

    def process(self, far_block: Signal) -> Signal:
        """The microphone's echo for one block of speaker output (same length, float32)."""
        n = len(far_block)
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        chunk = len(self._history) // 4
        if n > chunk:
            # Long blocks (offline use) go through in pieces the history can hold.
            return np.concatenate([self.process(far_block[i:i + chunk]) for i in range(0, n, chunk)])
        full = fftconvolve(np.asarray(far_block, dtype=np.float64), self._rir)
        full[: len(self._tail)] += self._tail
        wet = full[:n]
        self._tail = full[n:].copy()
        # Shift the history left and append (bounded: the oldest wet audio is no longer reachable).
        h = len(self._history)
        if n >= h:
            self._history[:] = wet[-h:]
        else:
            self._history[:-n] = self._history[n:]
            self._history[-n:] = wet
        self._written += n
        positions = self._read + self._step * np.arange(n, dtype=np.float64)
        self._read += self._step * n
        # Map absolute wet positions to history indices; positions before the start read as zeros.
        local = positions - (self._written - h)
        out = fractional_read(self._history, local)
        # Zero-fill: reads before any audio (start-up) or beyond the written audio have no signal yet.
        valid = (positions >= 0) & (positions <= self._written - 1)
        out[~valid] = 0.0
        return out

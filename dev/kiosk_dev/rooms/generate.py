"""A seeded corpus of kiosk rooms the capture chain was never tuned on, rendered for a 4-microphone array.

Each room is one 40 s recording of what a ReSpeaker-style USB array (four microphones on a 32 mm circle, at
the corners of a square: the product's default ``audio.array_*`` geometry, ``kiosk.audio.array``) hears at a
kiosk: the agent's speech from the kiosk's own loudspeaker (10-60 cm from the array; a bulk delay of
10-200 ms that may step, clock drift up to +-200 ppm, a loudspeaker that may clip), a visitor 0.5-2.5 m in
front of the kiosk interrupting the agent five times, and one class of background (point sources always
farther away than the visitor; the diffuse noise of the quiet, pink and white classes comes from several
sources anywhere in the room):

==========  ===================================================================================
quiet       room tone only (pink, 30-40 dB under the visitor)
pink        diffuse pink noise (six uncorrelated sources around the room)
white       diffuse white noise (ventilation hiss)
babble      2-6 talkers (several languages, real and synthetic voices), 0.5-5 m behind the visitor
tv          a television 3-8 m away: speech plus music through a band-limited speaker
machinery   a machine 1-6 m away: mains hum with harmonics plus bursts of hiss
music       a music loudspeaker 1-7 m away
talker      one talker farther than the visitor, anywhere around (often behind or beside)
==========  ===================================================================================

Spread (uniform unless said): RT60 0.2-1.0 s, rooms 4-12 x 3-10 x 2.5-4 m; signal-to-echo ratio (the
visitor's speech level over the echo's, both at microphone 0) +6 to -12 dB; SNR (visitor over background
at microphone 0) 20 to 0 dB; echo level at the array -32 to -16 dBFS; voices in eight languages,
code-switched sentences, and real recorded speech (alsa-utils' voice prompts and pyannote.audio's sample
conversation, when installed).

Room acoustics: pyroomacoustics' image source model up to order 25 for every source-microphone pair, and
beyond it a synthetic late tail decaying at the room's RT60: a diffuse field (a sum of 32 plane waves
from random directions, so the four microphones see the coherence of a real diffuse field, high at low
frequencies), scaled to continue the image-source energy.

Seeds decide everything (``np.random.default_rng([GENERATOR_SEED, seed])``). Room ``seed`` belongs to class
``CLASSES[(seed // 2) % 8]`` and to the *tuning* half when ``seed`` is even, the *reporting* half when odd:
any prefix of 16 seeds covers every class in both halves. The same seed gives the same samples, given the
same speech material (``voices.corpus_tag``: rooms rendered without alsa-utils' or pyannote.audio's
recordings go to a folder of their own).

Rendered rooms are cached as ``~/.cache/kiosk/rooms/v<GENERATOR_VERSION>/room-<seed>.npz`` (int16 arrays;
``$KIOSK_ROOMS_CACHE`` moves the folder) with a JSON of labels beside it; a changed generator gets a new
version and never reads old rooms. ``python -m kiosk_dev.rooms.generate --rooms 80 --jobs 2`` renders them
(about 3-30 s a room); ``--wav DIR`` also writes each room's ``mic.wav`` (4 channels), ``ref.wav``,
``near.wav`` and ``labels.json``, which ``kiosk audio process`` and ``kiosk bench audio --recordings`` read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.signal import butter, fftconvolve, sosfilt

from kiosk.audio.array import ArrayGeometry
from kiosk.audio.format import FRAME_SAMPLES, RATE_HZ, write_wav
from kiosk_dev import roomsim
from kiosk_dev.rooms import voices
from kiosk_dev.speech import Utterance

# Bump on any change to what a seed renders: the cache is keyed by it.
GENERATOR_VERSION = "1"
GENERATOR_SEED = 20261206
FRAME = FRAME_SAMPLES
SECONDS = 40.0
C_SOUND = 343.0
CLASSES = ("quiet", "pink", "white", "babble", "tv", "machinery", "music", "talker")
INTERRUPTIONS_PER_ROOM = 5
MICS = ArrayGeometry().channels
ARRAY_RADIUS_M = ArrayGeometry().radius_m
# As ``kiosk.audio.array.circular_array`` places them: microphone k at (k + 0.5) * 360 / MICS degrees off the
# kiosk's front axis (45, 135, 225, 315: the corners of a square).
MIC_ANGLES_DEG = tuple((k + 0.5) * 360.0 / MICS for k in range(MICS))
ISM_MAX_ORDER = 25
TAIL_DIRECTIONS = 32
# The echo's fractional read (bulk delay, steps, drift): a 32-tap windowed sinc, Kaiser beta 8.
ECHO_READ_TAPS = 32
ECHO_READ_BETA = 8.0
Float64 = npt.NDArray[np.float64]


def room_class(seed: int) -> str:
    """The background class of room ``seed`` (balanced: every 16 consecutive seeds hold each class twice)."""
    return CLASSES[(seed // 2) % len(CLASSES)]


def room_split(seed: int) -> str:
    """``tuning`` (even seeds) or ``reporting`` (odd seeds)."""
    return "tuning" if seed % 2 == 0 else "reporting"


def seeds_for(rooms: int, split: str | None = None) -> list[int]:
    """The first ``rooms`` seeds, optionally only those of one half (``tuning`` or ``reporting``)."""
    return [s for s in range(rooms) if split is None or split == "all" or room_split(s) == split]


def cache_dir() -> Path:
    """Where rendered rooms live (one folder per generator version and speech material)."""
    path = voices.cache_base() / f"v{GENERATOR_VERSION}{voices.corpus_tag()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------------ the room spec
@dataclass
class Source:
    """One background source: where it stands and what it plays."""

    kind: str  # "talker", "tv", "machine", "music", "noise"
    position: list[float]
    distance_m: float
    azimuth_deg: float  # relative to the kiosk's front axis (0: straight ahead, +-180: behind)


@dataclass
class RoomSpec:
    """Everything drawn for one room (the labels a report can group by)."""

    seed: int
    room_class: str
    split: str
    seconds: float
    rt60_s: float
    dims_m: list[float]
    array_center: list[float]
    front_deg: float  # the kiosk's front axis, in room coordinates
    speaker_position: list[float]
    speaker_distance_m: float
    visitor_position: list[float]
    visitor_distance_m: float
    visitor_azimuth_deg: float
    sources: list[Source]
    echo_dbfs: float  # active RMS of the echo at microphone 0
    ser_db: float  # visitor over echo at microphone 0
    snr_db: float  # visitor over background at microphone 0
    self_noise_dbfs: float
    bulk_delay_ms: float
    delay_steps: list[tuple[float, float]]  # (time s, new bulk delay ms)
    drift_ppm: float
    clipping: str  # "none", "soft" or "hard"
    clip_below_peak_db: float
    speaker_highpass_hz: float
    agent_language: str
    interruptions: list[dict[str, Any]] = field(default_factory=list)


def _unit(azimuth_deg: float, elevation_deg: float = 0.0) -> Float64:
    a, e = math.radians(azimuth_deg), math.radians(elevation_deg)
    return np.array([math.cos(a) * math.cos(e), math.sin(a) * math.cos(e), math.sin(e)])


def _inside(p: Float64, dims: Float64, margin: float = 0.25) -> bool:
    return bool(np.all(p > margin) and np.all(p < dims - margin))


def _place(rng: np.random.Generator, center: Float64, dims: Float64, front: float,
           dist: tuple[float, float], az: tuple[float, float], height: tuple[float, float],
           tries: int = 400) -> tuple[Float64, float, float] | None:
    """A position at a horizontal distance and azimuth (relative to the front axis) inside the room."""
    for _ in range(tries):
        d = rng.uniform(*dist)
        a = rng.uniform(*az)
        z = rng.uniform(*height)
        p = center + d * _unit(front + a)
        p[2] = z
        if _inside(p, dims):
            return p, float(np.linalg.norm(p - center)), float(a)
    return None


def draw_spec(seed: int) -> RoomSpec:
    """Draw a room's parameters from its seed (no audio yet)."""
    rng = np.random.default_rng([GENERATOR_SEED, seed])
    cls = room_class(seed)
    rt60 = float(rng.uniform(0.2, 1.0))
    big = cls in ("tv", "babble", "talker", "music", "machinery")
    for _attempt in range(50):
        dims = np.array([rng.uniform(6.0 if big else 4.0, 12.0), rng.uniform(5.0 if big else 3.0, 10.0),
                         rng.uniform(2.5, 4.0)])
        # The kiosk stands 0.6-1.5 m in front of a wall (x = 0), facing into the room.
        center = np.array([rng.uniform(0.6, 1.5), rng.uniform(1.0, dims[1] - 1.0), rng.uniform(1.1, 1.5)])
        front = float(rng.uniform(-30.0, 30.0))
        # Loudspeaker: 10-60 cm from the array, anywhere around it, mostly below.
        sp_d = rng.uniform(0.10, 0.60)
        speaker = center + sp_d * _unit(front + rng.uniform(-180, 180), rng.uniform(-60, 10))
        if not _inside(speaker, dims, 0.1):
            continue
        visitor = _place(rng, center, dims, front, (0.5, 2.5), (-50.0, 50.0), (1.2, 1.8))
        if visitor is None:
            continue
        v_pos, v_dist, v_az = visitor
        sources: list[Source] = []
        ok = True

        def add(kind: str, dist: tuple[float, float], az: tuple[float, float] = (-180.0, 180.0),
                height: tuple[float, float] = (1.4, 1.85)) -> None:
            nonlocal ok
            # Called within the same iteration that defines it: the loop variables are the current ones.
            placed = _place(rng, center, dims, front, dist, az, height)  # noqa: B023
            if placed is None or placed[1] <= v_dist + 0.3:  # noqa: B023
                ok = False
                return
            sources.append(Source(kind, [float(x) for x in placed[0]], placed[1], placed[2]))  # noqa: B023

        if cls == "babble":
            for _ in range(int(rng.integers(2, 7))):
                add("talker", (v_dist + 0.5, v_dist + 5.0))
        elif cls == "talker":
            add("talker", (v_dist + 0.5, v_dist + 3.0))
        elif cls == "tv":
            add("tv", (max(3.0, v_dist + 1.0), 8.0), height=(1.0, 2.0))
        elif cls == "machinery":
            add("machine", (max(1.0, v_dist + 0.5), 6.0), height=(0.3, 1.5))
        elif cls == "music":
            add("music", (max(1.0, v_dist + 0.5), 7.0), height=(1.0, 2.5))
        else:  # diffuse noise: several uncorrelated sources anywhere in the room
            for _ in range(6 if cls != "quiet" else 4):
                p = rng.uniform([0.3, 0.3, 0.3], dims - 0.3)
                d = float(np.linalg.norm(p - center))
                rel = math.degrees(math.atan2(p[1] - center[1], p[0] - center[0])) - front
                sources.append(Source("noise", [float(x) for x in p], d, (rel + 180) % 360 - 180))
        if not ok:
            continue
        break
    else:  # pragma: no cover - 50 draws always found a room so far
        raise RuntimeError(f"room {seed}: no geometry found")
    steps: list[tuple[float, float]] = []
    bulk = float(rng.uniform(10.0, 200.0))
    if rng.random() < 0.35:
        current = bulk
        for t in sorted(rng.uniform(8.0, SECONDS - 4.0, size=int(rng.integers(1, 3)))):
            current = float(np.clip(current + rng.choice([-1, 1]) * rng.uniform(2.0, 60.0), 5.0, 250.0))
            steps.append((float(t), current))
    drift = float(rng.uniform(-200.0, 200.0)) if rng.random() < 0.7 else 0.0
    clip_draw = rng.random()
    clipping = "none" if clip_draw < 0.7 else ("soft" if clip_draw < 0.85 else "hard")
    return RoomSpec(
        seed=seed, room_class=cls, split=room_split(seed), seconds=SECONDS, rt60_s=rt60,
        dims_m=[float(x) for x in dims], array_center=[float(x) for x in center], front_deg=front,
        speaker_position=[float(x) for x in speaker], speaker_distance_m=float(sp_d),
        visitor_position=[float(x) for x in v_pos], visitor_distance_m=v_dist, visitor_azimuth_deg=v_az,
        sources=sources, echo_dbfs=float(rng.uniform(-32.0, -16.0)), ser_db=float(rng.uniform(-12.0, 6.0)),
        snr_db=float(rng.uniform(30.0, 40.0) if cls == "quiet" else rng.uniform(0.0, 20.0)),
        self_noise_dbfs=float(rng.uniform(-88.0, -78.0)), bulk_delay_ms=bulk, delay_steps=steps,
        drift_ppm=drift, clipping=clipping, clip_below_peak_db=float(rng.uniform(2.0, 10.0)),
        speaker_highpass_hz=float(rng.uniform(100.0, 300.0)),
        agent_language=str(rng.choice(["en", "en", "de", "fr", "es", "it"])),
    )


def mic_positions(spec: RoomSpec) -> Float64:
    """Microphone positions, shape (3, MICS)."""
    center = np.array(spec.array_center)
    return np.stack([center + ARRAY_RADIUS_M * _unit(spec.front_deg + a) for a in MIC_ANGLES_DEG], axis=1)


# ------------------------------------------------------------------------------------ acoustics
def _diffuse_noise(rng: np.random.Generator, mics: Float64, samples: int) -> Float64:
    """(MICS, samples) of white noise with a diffuse field's inter-microphone coherence (plane-wave sum)."""
    n_fft = 1 << int(math.ceil(math.log2(samples + 64)))
    freqs = np.fft.rfftfreq(n_fft, 1.0 / RATE_HZ)
    dirs = rng.normal(size=(TAIL_DIRECTIONS, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    rel = mics - mics.mean(axis=1, keepdims=True)  # (3, M)
    delays = dirs @ rel / C_SOUND  # (K, M) seconds
    spectra = np.fft.rfft(rng.standard_normal((TAIL_DIRECTIONS, n_fft)), axis=1)  # (K, F)
    phase = np.exp(-2j * np.pi * delays[:, :, None] * freqs[None, None, :])  # (K, M, F)
    mixed = np.einsum("kf,kmf->mf", spectra, phase) / math.sqrt(TAIL_DIRECTIONS)
    return np.fft.irfft(mixed, n_fft, axis=1)[:, :samples]


def room_responses(spec: RoomSpec, positions: list[list[float]],
                   rng: np.random.Generator) -> list[Float64]:
    """(MICS, length) impulse responses from each position to the array: image sources plus a diffuse tail."""
    import pyroomacoustics as pra

    dims = list(spec.dims_m)
    rt60 = spec.rt60_s
    for _ in range(20):
        try:
            absorption, order = pra.inverse_sabine(rt60, dims)
            break
        except ValueError:
            rt60 *= 1.05  # a big room cannot be that dry with these materials: the nearest feasible RT60
    order = min(order, ISM_MAX_ORDER)
    room = pra.ShoeBox(dims, fs=RATE_HZ, materials=pra.Material(absorption), max_order=order)
    for p in positions:
        room.add_source(p)
    mics = mic_positions(spec)
    room.add_microphone_array(mics)
    room.compute_rir()
    length = int(max(rt60, 0.25) * RATE_HZ) + 400
    # Until when the image sources are complete: every image of order > ``order`` is farther than this.
    complete = (order + 1) * min(dims) / C_SOUND
    out = []
    block = 80  # 5 ms
    for s, p in enumerate(positions):
        rirs = np.zeros((MICS, length))
        for m in range(MICS):
            r = np.asarray(room.rir[m][s], dtype=np.float64)[:length]
            rirs[m, : len(r)] = r
        direct = float(np.linalg.norm(mics[:, 0] - np.array(p))) / C_SOUND
        t0 = int((direct + 0.025) * RATE_HZ) + 40  # pra's fractional-delay filters start 40 samples early
        t1 = int(complete * RATE_HZ) + 40
        if t1 < t0 + 6 * block or t1 >= length - block:
            out.append(rirs)
            continue
        # Energy decay of the image-source part at mic 0 between t0 and t1, fitted with the RT60's slope.
        e = np.array([np.mean(rirs[0, a:a + block] ** 2) for a in range(t0, t1 - block, block)]) + 1e-20
        t = (np.arange(len(e)) * block + t0 + block / 2) / RATE_HZ
        slope = -60.0 / rt60  # dB per second
        intercept = float(np.mean(10 * np.log10(e) - slope * t))
        tt = np.arange(length) / RATE_HZ
        envelope = 10 ** ((intercept + slope * tt) / 20)
        tail = _diffuse_noise(rng, mics, length) * envelope[None, :]
        fade = np.clip((np.arange(length) - (t1 - 2 * block)) / (2 * block), 0.0, 1.0)
        out.append(rirs * (1.0 - fade)[None, :] + tail * fade[None, :])
    return out


# ------------------------------------------------------------------------------------ signals
def music(rng: np.random.Generator, samples: int) -> Float64:
    """Music-like: chords of harmonic tones with a tempo, a bass line and a beat (unit variance)."""
    out = np.zeros(samples)
    bpm = rng.uniform(80, 140)
    note = int(RATE_HZ * 60 / bpm)
    t = np.arange(note) / RATE_HZ
    env = np.minimum(1.0, t / 0.015) * np.exp(-t * rng.uniform(1.5, 5.0))
    root = 110.0 * 2 ** (int(rng.integers(0, 12)) / 12)
    for start in range(0, samples, note):
        chunk = np.zeros(note)
        chord = root * 2 ** (np.array([0, 4, 7] if rng.random() < 0.6 else [0, 3, 7]) / 12)
        chord *= 2 ** (int(rng.choice([0, 5, 7, -5])) / 12)
        for f0 in chord:
            for h in range(1, 7):
                chunk += np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 2 * np.pi)) / h ** 1.3
        chunk += 1.5 * np.sin(2 * np.pi * chord[0] / 2 * t)
        chunk *= env
        beat = rng.standard_normal(note) * np.exp(-t * 35.0) * 0.8
        n = min(note, samples - start)
        out[start:start + n] = (chunk + beat)[:n]
    return out / np.std(out)


def machinery(rng: np.random.Generator, samples: int) -> Float64:
    """Mains hum with harmonics plus bursts of hiss (compressed air, a conveyor), unit variance."""
    t = np.arange(samples) / RATE_HZ
    mains = 50.0 if rng.random() < 0.5 else 60.0
    hum = sum(rng.uniform(0.1, 1.0) / k * np.sin(2 * np.pi * mains * k * t + rng.uniform(0, 6.3))
              for k in range(1, 9))
    hum = np.asarray(hum) / np.std(hum)
    hiss = rng.standard_normal(samples)
    sos = butter(4, [rng.uniform(1500, 3000), 7000], btype="bandpass", fs=RATE_HZ, output="sos")
    hiss = sosfilt(sos, hiss)
    hiss /= np.std(hiss)
    gate = np.zeros(samples)
    pos = int(rng.uniform(0, 2) * RATE_HZ)
    while pos < samples:
        length = int(rng.uniform(0.2, 2.0) * RATE_HZ)
        ramp = np.minimum(1.0, np.minimum(np.arange(length), np.arange(length)[::-1]) / 320.0)
        end = min(samples, pos + length)
        gate[pos:end] = ramp[: end - pos] * rng.uniform(0.5, 1.5)
        pos = end + int(rng.uniform(0.5, 4.0) * RATE_HZ)
    mix = hum * rng.uniform(0.5, 1.0) + hiss * gate * rng.uniform(0.7, 2.0)
    out: Float64 = mix / np.std(mix)
    return out


def speech_track(rng: np.random.Generator, samples: int, pool: Sequence[Utterance],
                 pause: tuple[float, float] = (0.15, 0.8), start: float | None = None
                 ) -> tuple[Float64, list[tuple[float, float, str]]]:
    """Utterances from ``pool`` back to back with pauses; returns the track and its (start, end, name) spans."""
    out = np.zeros(samples)
    spans: list[tuple[float, float, str]] = []
    pos = int((rng.uniform(0.0, 1.0) if start is None else start) * RATE_HZ)
    while pos < samples:
        u = pool[int(rng.integers(len(pool)))]
        audio = u.audio / max(voices.active_rms(u.audio), 1e-6) * 0.1
        n = min(len(audio), samples - pos)
        out[pos:pos + n] = audio[:n]
        spans.append((pos / RATE_HZ, (pos + n) / RATE_HZ, u.name))
        pos += n + int(rng.uniform(*pause) * RATE_HZ)
    return out, spans


# ------------------------------------------------------------------------------------ rendering
@dataclass(frozen=True)
class Pools:
    """The speech a room is made of: what visitors and background talkers say, and what the agent says."""

    visitor: tuple[Utterance, ...]
    agent: tuple[Utterance, ...]

    @classmethod
    def corpus(cls) -> Pools:
        """The corpus' own material (``voices.visitor_pool`` and ``voices.agent_pool``)."""
        return cls(voices.visitor_pool(), voices.agent_pool())


@dataclass
class Room:
    """One rendered room: int16 microphone channels and reference, the parts the metrics need, the labels."""

    spec: RoomSpec
    mics: npt.NDArray[np.int16]  # (MICS, N): what the array captures
    ref: npt.NDArray[np.int16]  # (N,): what was rendered to the loudspeaker (the AEC reference)
    visitor: npt.NDArray[np.int16]  # (MICS, N): the visitor alone at each microphone (for SDR)
    echo0: npt.NDArray[np.int16]  # (N,): the loudspeaker's sound alone at microphone 0
    noise0: npt.NDArray[np.int16]  # (N,): background plus self-noise at microphone 0
    labels: dict[str, Any]

    @property
    def seed(self) -> int:
        """The room's seed."""
        return self.spec.seed


def render(spec: RoomSpec, pools: Pools | None = None, *,
           first_interruption_s: tuple[float, float] = (6.0, 8.0)) -> Room:
    """Render a room's audio from its spec (deterministic for the spec, the pools and the arguments).

    The first interruption starts ``first_interruption_s`` into the room (drawn uniformly; the canceller has
    converged by then); the tests render short rooms with an earlier one and a small pool.
    """
    pools = Pools.corpus() if pools is None else pools
    rng = np.random.default_rng([GENERATOR_SEED, spec.seed, 1])
    n = int(spec.seconds * RATE_HZ)
    # --- the agent: the far end, and the loudspeaker's version of it
    agent_pool = tuple(u for u in pools.agent if u.language == spec.agent_language) or pools.agent
    far, agent_spans = speech_track(rng, n, agent_pool, pause=(0.2, 1.2), start=float(rng.uniform(0.3, 1.0)))
    far *= 10 ** (-20 / 20) / max(voices.active_rms(far), 1e-9)  # -20 dBFS active
    drive = far.copy()
    if spec.clipping != "none":
        level = float(np.max(np.abs(drive))) * 10 ** (-spec.clip_below_peak_db / 20)
        drive = level * np.tanh(drive / level) if spec.clipping == "soft" else np.clip(drive, -level, level)
    sos = butter(2, spec.speaker_highpass_hz, btype="highpass", fs=RATE_HZ, output="sos")
    drive = sosfilt(sos, drive)
    # --- the visitor: five interruptions over the agent's speech
    pool = pools.visitor
    real = [u for u in pool if u.source.startswith("real:")]
    synth = [u for u in pool if not u.source.startswith("real:")]
    far_active = np.repeat(np.sqrt(np.mean(far.reshape(-1, FRAME) ** 2, axis=1)) > 10 ** (-50 / 20), FRAME)
    delay_at_start = spec.bulk_delay_ms / 1000.0
    visitor = np.zeros(n)
    interruptions: list[dict[str, Any]] = []
    t = float(rng.uniform(*first_interruption_s))
    for _ in range(INTERRUPTIONS_PER_ROOM):
        choice = real if (real and rng.random() < 0.45) else synth
        u = choice[int(rng.integers(len(choice)))]
        audio = u.audio / max(voices.active_rms(u.audio), 1e-9) * 0.1
        # Start while the agent is audible at the array (its echo lags the reference by the bulk delay).
        for _try in range(200):
            a = int((t + delay_at_start) * RATE_HZ)
            if a + len(audio) < n and far_active[max(0, a - int((delay_at_start + 0.05) * RATE_HZ)):a].mean() > 0.8:
                break
            t += 0.05
        a = int(t * RATE_HZ)
        if a + len(audio) >= n:
            break
        visitor[a:a + len(audio)] += audio
        interruptions.append({"start_s": a / RATE_HZ, "end_s": (a + len(audio)) / RATE_HZ, "utterance": u.name,
                              "language": u.language, "source": u.source})
        t = (a + len(audio)) / RATE_HZ + float(rng.uniform(2.5, 4.5))
    spec.interruptions = interruptions
    # --- background sources
    bg_signals: list[Float64] = []
    talker_pool = tuple(u for u in pool if u.name not in {i["utterance"] for i in interruptions})
    for s in spec.sources:
        if s.kind == "talker":
            bg_signals.append(speech_track(rng, n, talker_pool, pause=(0.1, 1.0))[0])
        elif s.kind == "tv":
            voice = speech_track(rng, n, talker_pool + pools.agent, pause=(0.05, 0.6))[0]
            tune = music(rng, n) * np.std(voice) * 10 ** (rng.uniform(-8, 2) / 20)
            tv = voice + tune
            tv = sosfilt(butter(2, [150, 6000], btype="bandpass", fs=RATE_HZ, output="sos"), tv)
            bg_signals.append(tv)
        elif s.kind == "machine":
            bg_signals.append(machinery(rng, n))
        elif s.kind == "music":
            bg_signals.append(music(rng, n))
        else:
            bg_signals.append(rng.standard_normal(n) if spec.room_class == "white" else roomsim.pink_noise_f64(n, rng))
    # --- room responses: loudspeaker, visitor, backgrounds
    rirs = room_responses(spec, [spec.speaker_position, spec.visitor_position] + [s.position for s in spec.sources],
                          rng)
    wet = np.stack([fftconvolve(drive, rirs[0][m])[:n] for m in range(MICS)])
    # Capture sample k is taken at playback time k / (1 + drift) minus the bulk delay (which may step).
    k = np.arange(n, dtype=np.float64)
    delay = np.full(n, spec.bulk_delay_ms)
    for t_step, new in spec.delay_steps:
        delay[int(t_step * RATE_HZ):] = new
    echo = roomsim.fractional_read_channels(wet, k / (1.0 + spec.drift_ppm * 1e-6) - delay * RATE_HZ / 1000.0,
                                            taps=ECHO_READ_TAPS, beta=ECHO_READ_BETA)
    near = np.stack([fftconvolve(visitor, rirs[1][m])[:n] for m in range(MICS)])
    background = np.zeros((MICS, n))
    for sig, rir in zip(bg_signals, rirs[2:], strict=True):
        background += np.stack([fftconvolve(sig, rir[m])[:n] for m in range(MICS)])
    # --- levels at microphone 0
    echo *= 10 ** (spec.echo_dbfs / 20) / max(voices.active_rms(echo[0]), 1e-12)
    visitor_dbfs = spec.echo_dbfs + spec.ser_db
    v_rms = math.sqrt(np.mean(np.concatenate([near[0, int(i["start_s"] * RATE_HZ):int(i["end_s"] * RATE_HZ)]
                                              for i in interruptions]) ** 2)) if interruptions else 0.0
    near *= 10 ** (visitor_dbfs / 20) / max(v_rms, 1e-12)
    # Speech-like backgrounds are measured on their active frames, steady ones over the whole room.
    bg_level = (voices.active_rms(background[0]) if spec.room_class in ("babble", "talker", "tv")
                else float(np.sqrt(np.mean(background[0] ** 2))))
    background *= 10 ** ((visitor_dbfs - spec.snr_db) / 20) / max(bg_level, 1e-12)
    hiss = rng.standard_normal((MICS, n)) * 10 ** (spec.self_noise_dbfs / 20)
    mic = echo + near + background + hiss
    peak = float(np.max(np.abs(mic)))
    gain = min(1.0, 0.95 / peak)  # the array's gain is set so that it does not clip
    labels = {
        "generator_version": GENERATOR_VERSION,
        "spec": asdict(spec),
        "agent_spans": [(a, b) for a, b, _ in agent_spans],
        "agent_utterances": [name for _, _, name in agent_spans],
        "interruptions": interruptions,
        "capture_gain_db": 20 * math.log10(gain),
        "visitor_dbfs": visitor_dbfs + 20 * math.log10(gain),
        "sources_used": voices.sources_summary(pools.visitor),
    }

    def q(x: Float64) -> npt.NDArray[np.int16]:
        return np.clip(np.rint(x * gain * 32768.0), -32768, 32767).astype(np.int16)

    return Room(spec=spec, mics=q(mic), ref=np.clip(np.rint(far * 32768.0), -32768, 32767).astype(np.int16),
                visitor=q(near), echo0=q(echo[0]), noise0=q(background[0] + hiss[0]), labels=labels)


def load(seed: int, *, render_missing: bool = True) -> Room:
    """Room ``seed`` from the cache, rendering (and caching) it if it is not there."""
    base = cache_dir() / f"room-{seed}"
    npz, meta = base.with_suffix(".npz"), base.with_suffix(".json")
    if npz.exists() and meta.exists():
        labels = json.loads(meta.read_text())
        spec_d = dict(labels["spec"])
        spec_d["sources"] = [Source(**s) for s in spec_d["sources"]]
        spec_d["delay_steps"] = [tuple(x) for x in spec_d["delay_steps"]]
        spec = RoomSpec(**spec_d)
        with np.load(npz) as data:
            return Room(spec=spec, mics=data["mics"], ref=data["ref"], visitor=data["visitor"], echo0=data["echo0"],
                        noise0=data["noise0"], labels=labels)
    if not render_missing:
        raise FileNotFoundError(npz)
    room = render(draw_spec(seed))
    tmp = base.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, mics=room.mics, ref=room.ref, visitor=room.visitor, echo0=room.echo0, noise0=room.noise0)
    tmp.replace(npz)
    tmp_meta = base.with_suffix(f".tmp{os.getpid()}.json")
    tmp_meta.write_text(json.dumps(room.labels, indent=1))
    tmp_meta.replace(meta)
    return room


def write_wavs(room: Room, folder: Path) -> None:
    """``mic.wav`` (4 channels), ``ref.wav``, ``near.wav`` (the visitor at microphone 0) and ``labels.json``.

    The layout ``kiosk bench audio --recordings`` reads (it takes the configured ``audio.channel`` of the
    4-channel microphone, ``beam`` included) and ``kiosk audio process --mic-channel N|mix|beam`` takes.
    """
    folder.mkdir(parents=True, exist_ok=True)
    write_wav(folder / "mic.wav", room.mics.T)
    write_wav(folder / "ref.wav", room.ref)
    write_wav(folder / "near.wav", room.visitor[0])
    (folder / "labels.json").write_text(json.dumps(
        {"speech": [[i["start_s"], i["end_s"]] for i in room.labels["interruptions"]], "room": room.labels["spec"]}))


def _load_quiet(seed: int) -> int:
    with contextlib.suppress(OSError):
        os.nice(10)
    load(seed)
    return seed


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kiosk_dev.rooms.generate [--rooms N] [--jobs J] [--wav DIR]``: render (and cache) the corpus."""
    parser = argparse.ArgumentParser(description="Render (and cache) the seeded room corpus.")
    parser.add_argument("--rooms", type=int, default=80, help="rooms 0..N-1 (80)")
    parser.add_argument("--jobs", type=int, default=1, help="processes (rooms are independent)")
    parser.add_argument("--wav", type=Path, default=None, help="also write each room's WAVs to this folder")
    args = parser.parse_args(argv)
    start = time.monotonic()
    seeds = list(range(args.rooms))
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            list(pool.map(_load_quiet, seeds))
    for seed in seeds:
        room = load(seed)
        s = room.spec
        print(f"room {seed:3d} {s.room_class:9s} {s.split:9s} RT60 {s.rt60_s:.2f} SER {s.ser_db:+5.1f} SNR "
              f"{s.snr_db:4.1f} delay {s.bulk_delay_ms:5.1f}{'+steps' if s.delay_steps else ''} drift "
              f"{s.drift_ppm:+6.1f} clip {s.clipping:4s} visitor {s.visitor_distance_m:.2f} m "
              f"{s.visitor_azimuth_deg:+4.0f} deg; {len(s.interruptions)} interruptions")
        if args.wav is not None:
            write_wavs(room, args.wav / f"room-{seed}")
    print(f"{len(seeds)} rooms in {time.monotonic() - start:.0f} s (cache {cache_dir()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

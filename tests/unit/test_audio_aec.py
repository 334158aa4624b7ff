from __future__ import annotations

import functools

import numpy as np
import pytest

from kiosk.audio import aec
from kiosk.audio.format import to_int16
from kiosk.settings import AecBackend, AecSettings
from kiosk_dev import roomsim
from kiosk_dev.bench.aec import sdr_db

RATE = 16000


@functools.cache
def _scenario(seed: int, seconds: float, delay_ms: float, drift_ppm: float,
              spans: tuple[tuple[float, float], ...] = ()) -> roomsim.Scenario:
    return roomsim.make_scenario(seed, seconds=seconds, delay_ms=delay_ms, drift_ppm=drift_ppm,
                                 visitor_spans=list(spans))


def _run(canceller: aec.EchoCanceller, mic: np.ndarray, far: np.ndarray) -> np.ndarray:
    mic16, far16 = to_int16(mic), to_int16(far)
    out = np.zeros_like(mic16)
    for i in range(0, len(mic16) - 159, 160):
        out[i:i + 160] = canceller.process(mic16[i:i + 160], far16[i:i + 160])
    return out.astype(np.float64) / 32768.0


def _erle(mic: np.ndarray, out: np.ndarray, start_s: float) -> float:
    a = int(start_s * RATE)
    return float(10 * np.log10(np.sum(mic[a:].astype(np.float64) ** 2) / np.sum(out[a:] ** 2)))


def _true_delay_ms(seed: int, delay_ms: float) -> float:
    # The echo's direct path: the bulk delay plus the response's own peak.
    return delay_ms + int(np.argmax(np.abs(roomsim.room_impulse_response(seed)))) / 16.0


def test_gcc_phat_finds_the_delay() -> None:
    sc = _scenario(0, 8.0, 40.0, 0.0)
    far, mic = to_int16(sc.far), to_int16(sc.mic)
    end, window, lag = 6 * RATE, RATE, 400 * 16
    est = aec.estimate_delay(far[end - window - lag:end], mic[end - window:end], lag)
    assert est.delay_samples / 16 == pytest.approx(_true_delay_ms(0, 40.0), abs=0.5)
    assert est.confidence > aec.AlignedEchoCanceller.STRONG_CONFIDENCE


@pytest.mark.parametrize("delay_ms", [5.0, 40.0, 160.0, 350.0])
def test_delay_estimate_within_a_millisecond(delay_ms: float) -> None:
    sc = _scenario(0, 6.0, delay_ms, 0.0)
    canceller = aec.make_echo_canceller(AecSettings(backend=AecBackend.NONE))
    _run(canceller, sc.mic, sc.far)
    stats = canceller.stats()
    assert stats.delay_ms is not None
    assert stats.delay_ms == pytest.approx(_true_delay_ms(0, delay_ms), abs=1.0)
    assert abs(stats.drift_ppm) < 5.0


@pytest.mark.parametrize("drift_ppm", [100.0, -60.0])
def test_drift_is_tracked(drift_ppm: float) -> None:
    sc = _scenario(1, 12.0, 40.0, drift_ppm)
    canceller = aec.make_echo_canceller(AecSettings(backend=AecBackend.NONE))
    _run(canceller, sc.mic, sc.far)
    stats = canceller.stats()
    assert stats.drift_ppm == pytest.approx(drift_ppm, abs=5.0)
    # The delay has grown with the drift: 12 s at the given ppm.
    expected = _true_delay_ms(1, 40.0) + drift_ppm * 1e-6 * 12.0 * 1000.0
    assert stats.delay_ms == pytest.approx(expected, abs=0.5)


def test_fixed_delay_is_honoured() -> None:
    sc = _scenario(0, 6.0, 40.0, 0.0)
    canceller = aec.make_echo_canceller(AecSettings(backend=AecBackend.SPEEX, delay_ms=43.0,
                                                    drift_compensation=False))
    out = _run(canceller, sc.mic, sc.far)
    assert canceller.stats().delay_ms == pytest.approx(43.0)
    assert _erle(sc.mic, out, 3.0) > 20.0


# ERLE floors on the fixed seeded room, second half of 10 s of agent speech. Measured: speex 128 ms
# about 31 dB, speex + residual about 36 dB, AEC3 about 64 dB, hybrid about 75 dB.
@pytest.mark.parametrize(("settings", "floor_db"), [
    (AecSettings(backend=AecBackend.SPEEX, residual_suppression=False, noise_suppression=False), 25.0),
    (AecSettings(backend=AecBackend.SPEEX), 30.0),
    (AecSettings(backend=AecBackend.WEBRTC, noise_suppression=False), 50.0),
    (AecSettings(backend=AecBackend.HYBRID), 50.0),
])
def test_erle_floor(settings: AecSettings, floor_db: float) -> None:
    sc = _scenario(0, 10.0, 40.0, 0.0)
    canceller = aec.make_echo_canceller(settings)
    out = _run(canceller, sc.mic, sc.far)
    assert _erle(sc.mic, out, 5.0) >= floor_db
    assert canceller.stats().converged


def test_none_backend_passes_through() -> None:
    sc = _scenario(0, 4.0, 40.0, 0.0)
    canceller = aec.make_echo_canceller(AecSettings(backend=AecBackend.NONE))
    out = _run(canceller, sc.mic, sc.far)
    assert abs(_erle(sc.mic, out, 1.0)) < 0.01
    assert not canceller.stats().converged


def test_drift_compensation_keeps_speex_cancelling() -> None:
    sc = _scenario(1, 12.0, 40.0, 100.0)
    base = dict(backend=AecBackend.SPEEX, filter_ms=128, residual_suppression=False, noise_suppression=False)
    compensated = _run(aec.make_echo_canceller(AecSettings(**base)), sc.mic, sc.far)
    fixed = _run(aec.make_echo_canceller(AecSettings(**base, delay_ms=0.0, drift_compensation=False)),
                 sc.mic, sc.far)
    assert _erle(sc.mic, compensated, 8.0) >= 25.0
    assert _erle(sc.mic, compensated, 8.0) >= _erle(sc.mic, fixed, 8.0) + 8.0


def test_delay_step_is_followed() -> None:
    rir = roomsim.room_impulse_response(0)
    sc = _scenario(0, 12.0, 40.0, 0.0)
    room = roomsim.StreamingRoom(rir, delay_ms=40.0)
    half = 6 * RATE
    echo = np.concatenate([room.process(sc.far[:half]), np.zeros(0, np.float32)])
    room.set_delay_ms(160.0)
    echo = np.concatenate([echo, room.process(sc.far[half:])])
    scale = np.max(np.abs(sc.echo)) / np.max(np.abs(echo[: half]))
    mic = (echo * scale).astype(np.float32)
    canceller = aec.make_echo_canceller(AecSettings(backend=AecBackend.SPEEX))
    out = _run(canceller, mic, sc.far)
    assert canceller.stats().delay_ms == pytest.approx(_true_delay_ms(0, 160.0), abs=1.0)
    assert _erle(mic, out, 9.0) >= 25.0  # the filter survives the realignment


def _stepped_echo(seed: int, before_ms: float, after_ms: float, voice: str | None = None,
                  speed_wpm: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """Mic and far end of a 10 s scenario whose bulk delay jumps at 6 s (the agent in ``voice``, or the corpus)."""
    far = roomsim.normalise(roomsim.speech_track(10 * RATE, seed, voice=voice, speed_wpm=speed_wpm), -20.0)
    room = roomsim.StreamingRoom(roomsim.room_impulse_response(seed), delay_ms=before_ms)
    half = 6 * RATE
    echo = np.concatenate([room.process(far[:half]), (room.set_delay_ms(after_ms), room.process(far[half:]))[1]])
    echo = roomsim.normalise(echo, -22.0) + roomsim.white_noise(len(echo), seed + 2) * np.float32(10 ** (-85 / 20))
    return echo.astype(np.float32), far


# The recovery must not hang on the exact speech the canceller hears: one synthesiser version's voice realigned at
# once while the next version's (same text, same voice name) left 9 dB for a second. So: several voices and rates.
_STEPS = [(0, 40.0, 160.0), (1, 100.0, 60.0), (2, 60.0, 200.0)]
_VOICES = [(None, 160), ("en-us", 140), ("en-gb", 180), ("en-gb-scotland", 160), ("en-us+m7", 180)]


@pytest.mark.parametrize(("voice", "speed_wpm"), _VOICES, ids=[f"{v or 'corpus'}-{w}" for v, w in _VOICES])
@pytest.mark.parametrize(("seed", "before_ms", "after_ms"), _STEPS)
def test_a_delay_step_is_recovered_within_half_a_second(seed: int, before_ms: float, after_ms: float,
                                                        voice: str | None, speed_wpm: int) -> None:
    mic, far = _stepped_echo(seed, before_ms, after_ms, voice, speed_wpm)
    canceller = aec.make_echo_canceller(AecSettings(backend=AecBackend.HYBRID))
    out = _run(canceller, mic, far)
    a, b = int(6.5 * RATE), int(7.0 * RATE)
    erle = float(10 * np.log10(np.sum(mic[a:b].astype(np.float64) ** 2) / np.sum(out[a:b] ** 2)))
    # Measured: 55-80 dB from 0.5 s after the step. Without the replay of the last second into the realigned
    # backend, and the hybrid's settling after a realignment, 2-20 dB in a quarter of these cases (the backend
    # unlearning the misaligned second, and the hybrid latching its misadapted speex path as double talk).
    assert erle >= 40.0
    assert isinstance(canceller, aec.AlignedEchoCanceller)
    assert canceller.collapses >= 1
    assert canceller.retrains == 1
    assert canceller.stats().delay_ms == pytest.approx(_true_delay_ms(seed, after_ms), abs=1.0)


def test_no_collapse_without_a_step_and_no_step_from_a_visitor() -> None:
    steady = _scenario(0, 12.0, 40.0, 0.0)
    canceller = aec.make_echo_canceller(AecSettings(backend=AecBackend.HYBRID))
    _run(canceller, steady.mic, steady.far)
    assert isinstance(canceller, aec.AlignedEchoCanceller)
    assert canceller.collapses == 0
    talk = _scenario(1, 12.0, 40.0, 0.0, ((6.0, 8.5), (9.0, 11.0)))
    canceller = aec.make_echo_canceller(AecSettings(backend=AecBackend.HYBRID))
    _run(canceller, talk.mic, talk.far)
    assert isinstance(canceller, aec.AlignedEchoCanceller)
    # A visitor makes the removed echo look collapsed; the quick estimates agree with the line, no step.
    assert canceller._model.steps == 0
    assert canceller.stats().delay_ms == pytest.approx(_true_delay_ms(1, 40.0), abs=1.0)


def test_aec3_latency_is_what_the_hybrid_assumes() -> None:
    backend = aec.WebRtcBackend(noise_suppression=False, high_pass_filter=False)
    noise = (np.random.default_rng(0).standard_normal(RATE * 2) * 2000).astype(np.int16)
    silent = np.zeros(160, dtype=np.int16)
    out = np.concatenate([backend.process(noise[i:i + 160], silent).copy() for i in range(0, len(noise), 160)])
    x, y = noise[RATE:].astype(np.float64), out[RATE:].astype(np.float64)
    corr = [float(np.dot(x[: len(x) - k], y[k:])) for k in range(300)]
    assert int(np.argmax(corr)) == aec.HybridBackend.AEC3_LATENCY_SAMPLES


@pytest.mark.parametrize("noise_kind", [None, "babble"])
def test_hybrid_keeps_the_visitor_in_double_talk(noise_kind: str | None) -> None:
    spans = ((6.0, 8.5), (9.0, 11.0))
    if noise_kind is None:
        sc = _scenario(1, 12.0, 40.0, 0.0, spans)
    else:  # other people talking a few metres away must not stop the speex path from being trusted
        sc = roomsim.make_scenario(1, seconds=12.0, visitor_spans=list(spans), noise_kind=noise_kind,
                                   noise_dbfs=-50.0)
    ranges = [(int(a * RATE), int(b * RATE)) for a, b in spans]
    near = sc.near.astype(np.float64)
    hybrid = _run(aec.make_echo_canceller(AecSettings(backend=AecBackend.HYBRID)), sc.mic, sc.far)
    aec3 = _run(aec.make_echo_canceller(AecSettings(backend=AecBackend.WEBRTC)), sc.mic, sc.far)
    hybrid_sdr, hybrid_level = sdr_db(near, hybrid, ranges)
    aec3_sdr, aec3_level = sdr_db(near, aec3, ranges)
    # Measured: hybrid about 16 dB and -0.3 dB; AEC3 alone about 2 dB, ducking the visitor by about 5 dB.
    assert hybrid_sdr >= 10.0
    assert hybrid_sdr >= aec3_sdr + 6.0
    assert hybrid_level > -2.0 > aec3_level


def test_reset_forgets_the_path() -> None:
    sc = _scenario(0, 4.0, 40.0, 0.0)
    canceller = aec.make_echo_canceller(AecSettings(backend=AecBackend.SPEEX))
    _run(canceller, sc.mic, sc.far)
    assert canceller.stats().delay_ms is not None
    canceller.reset()
    stats = canceller.stats()
    assert (stats.delay_ms, stats.frames, stats.converged) == (None, 0, False)


def test_default_backend_is_the_hybrid() -> None:
    assert AecSettings().backend is AecBackend.HYBRID
    assert "hybrid" in aec.make_echo_canceller(AecSettings()).name


def test_bench_sdr_forgives_a_fixed_filter_but_not_ducking() -> None:
    rng = np.random.default_rng(3)
    clean = np.zeros(RATE * 4)
    clean[RATE: 3 * RATE] = rng.standard_normal(2 * RATE) * 0.05
    spans = [(RATE, 3 * RATE)]
    delayed = np.concatenate([np.zeros(128), clean[:-128]]) * 0.7  # latency and gain: forgiven
    sdr, level = sdr_db(clean, delayed, spans)
    assert sdr > 40.0 and level == pytest.approx(20 * np.log10(0.7), abs=0.1)
    gains = np.where((np.arange(len(clean)) // 1600) % 2 == 0, 1.0, 0.3)  # ducked every other 100 ms
    sdr_ducked, _ = sdr_db(clean, clean * gains, spans)
    assert sdr_ducked < 10.0


def test_bench_convergence_time() -> None:
    from kiosk_dev.bench.aec import convergence_seconds

    mic = np.ones(RATE * 6)
    out = np.where(np.arange(len(mic)) < int(1.3 * RATE), 0.5, 0.01)  # 6 dB, then 40 dB from 1.3 s
    # Counted to the end of the first good 250 ms block (1.5-1.75 s): the conservative reading.
    assert convergence_seconds(mic, out, np.ones(len(mic), dtype=bool)) == pytest.approx(1.75)
    assert convergence_seconds(mic, np.full(len(mic), 0.5), np.ones(len(mic), dtype=bool)) is None


@pytest.mark.parametrize("seed", [0, 2])
def test_hybrid_takes_no_echo_for_double_talk(seed: int) -> None:
    # Seed 2 has a moment where AEC3 alone lets echo through while it re-adapts (about 2.5 s in); speex
    # does not confirm it, so the hybrid stays on AEC3 (switching would let the less converged speex echo out).
    sc = _scenario(seed, 10.0, 40.0, 0.0)
    canceller = aec.make_echo_canceller(AecSettings(backend=AecBackend.HYBRID))
    assert isinstance(canceller, aec.AlignedEchoCanceller)
    out = _run(canceller, sc.mic, sc.far)
    backend = canceller.backend
    assert isinstance(backend, aec.HybridBackend)
    assert backend.double_talk_frames == 0
    assert _erle(sc.mic, out, 1.0) >= 50.0

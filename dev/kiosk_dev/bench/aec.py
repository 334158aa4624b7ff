"""Echo-cancellation benchmark: every backend and setting on the same seeded simulated rooms.

Figures, per configuration:

- steady-state ERLE: after convergence, no drift, a 40 ms bulk delay;
- ERLE with 100 ppm clock drift, and with the bulk delay 120 ms longer (160 ms);
- convergence: the time from the start until the ERLE stays at 20 dB or more (for 2 s);
- double-talk SDR: the output against the clean visitor speech while agent and visitor talk at once
  (as BSS Eval: the target is the visitor through the best fixed 512-tap filter, so latency and fixed
  colouring are forgiven; residual echo and time-varying ducking of the visitor are not), with the
  visitor's level change in dB beside it;
- CPU microseconds per 10 ms frame (process time, this machine).

ERLE is ``10 log10(E[mic^2] / E[out^2])`` over far-end-only periods (frames where the echo is active
and the visitor silent), as the issue defines it. Run it with ``python -m kiosk_dev.bench.aec [--quick]``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from kiosk.settings import AecBackend, AecSettings, Settings
from kiosk_dev.bench import FULL, QUICK, AudioPreset, BenchSection, TargetCheck
from kiosk_dev.inputs import recorded

_LOGGER = logging.getLogger(__name__)

RATE_HZ = 16000
FRAME = 160
ERLE_STEADY_DB = 45.0
ERLE_DRIFT_DB = 40.0
CONVERGENCE_SECONDS = 1.0
DOUBLE_TALK_SDR_DB = 10.0
CONVERGED_DB = 20.0
Float = npt.NDArray[np.float64]


@dataclass
class AecFigures:
    """One configuration's measured figures."""

    name: str
    erle_steady_db: float
    erle_drift_db: float
    erle_delay_db: float
    convergence_seconds: float | None
    double_talk_sdr_db: float
    visitor_level_db: float
    cpu_us_per_frame: float
    delay_estimate_ms: float | None
    drift_estimate_ppm: float
    step_recovery_seconds: float | None = None  # after the bulk delay steps by +120 ms mid-run


def erle_db(mic: Float, out: Float, mask: npt.NDArray[np.bool_]) -> float:
    """ERLE over the masked samples: 10 log10(E[mic^2] / E[out^2])."""
    m = float(np.sum(mic[mask] ** 2))
    o = float(np.sum(out[mask] ** 2))
    return 10.0 * math.log10(max(m, 1e-12) / max(o, 1e-12))


def convergence_seconds(mic: Float, out: Float, echo_active: npt.NDArray[np.bool_], *,
                        threshold_db: float = CONVERGED_DB, block_seconds: float = 0.25,
                        hold_seconds: float = 2.0) -> float | None:
    """The time from which every block with echo keeps ERLE >= threshold for ``hold_seconds``."""
    block = int(block_seconds * RATE_HZ)
    count = len(mic) // block
    good = []
    for b in range(count):
        sl = slice(b * block, (b + 1) * block)
        if np.mean(echo_active[sl]) < 0.3:
            good.append(True)  # too little echo to judge: neither passes nor fails
            continue
        good.append(erle_db(mic[sl], out[sl], echo_active[sl]) >= threshold_db)
    hold = int(hold_seconds / block_seconds)
    for b in range(count - hold + 1):
        if all(good[b:b + hold]) and np.mean(echo_active[b * block:(b + 1) * block]) >= 0.3:
            return (b + 1) * block_seconds
    return None


def sdr_db(clean: Float, out: Float, spans: list[tuple[int, int]], filter_taps: int = 512) -> tuple[float, float]:
    """(SDR, level change in dB) of ``out`` against ``clean`` over the visitor's ``spans`` (sample ranges).

    As in BSS Eval, the target is ``clean`` through the best time-invariant filter of ``filter_taps``
    taps (latency, high-pass and fixed colouring are forgiven); everything else in the output over the
    spans (residual echo, noise, time-varying suppression of the visitor) is distortion.
    """
    from scipy.linalg import solve_toeplitz
    from scipy.signal import fftconvolve, lfilter

    region = np.zeros(len(out), dtype=bool)
    source = np.zeros(len(clean))
    for a, b in spans:
        region[a:min(len(out), b + filter_taps)] = True
        source[a:b] = clean[a:b]
    n = len(source)
    auto = fftconvolve(source, source[::-1])[n - 1: n - 1 + filter_taps]
    masked_out = np.where(region, out, 0.0)
    cross = fftconvolve(masked_out, source[::-1])[n - 1: n - 1 + filter_taps]
    auto[0] *= 1.0 + 1e-9
    h = solve_toeplitz(auto, cross)
    target = lfilter(h, [1.0], source)
    error = masked_out - np.where(region, target, 0.0)
    t_energy = float(np.sum(target[region] ** 2))
    sdr = 10.0 * math.log10(max(t_energy, 1e-12) / max(float(np.sum(error ** 2)), 1e-12))
    level = 10.0 * math.log10(max(t_energy, 1e-12) / max(float(np.sum(source ** 2)), 1e-12))
    return sdr, level


def _frame_mask(signal: Float, level_dbfs: float) -> npt.NDArray[np.bool_]:
    """Per-sample mask of the 10 ms frames whose power is above ``level_dbfs``."""
    frames = len(signal) // FRAME
    power = np.mean(signal[: frames * FRAME].reshape(frames, FRAME) ** 2, axis=1)
    active = power > 10 ** (level_dbfs / 10)
    mask = np.zeros(len(signal), dtype=bool)
    mask[: frames * FRAME] = np.repeat(active, FRAME)
    return mask


def _run(make: Callable[[], object], mic: Float, far: Float) -> tuple[Float, float, object]:
    from kiosk.audio.format import to_int16

    canceller = make()
    mic16 = to_int16(mic.astype(np.float32))
    far16 = to_int16(far.astype(np.float32))
    out = np.zeros(len(mic16), dtype=np.int16)
    frames = len(mic16) // FRAME
    process = canceller.process  # type: ignore[attr-defined]
    start = time.process_time()
    for i in range(frames):
        sl = slice(i * FRAME, (i + 1) * FRAME)
        out[sl] = process(mic16[sl], far16[sl])
    cpu_us = (time.process_time() - start) / max(frames, 1) * 1e6
    return out.astype(np.float64) / 32768.0, cpu_us, canceller


def configurations(quick: bool = False) -> list[tuple[str, AecSettings, bool]]:
    """(label, settings, aligned) for every configuration measured; aligned=False feeds the raw reference."""
    s = AecSettings
    configs = [
        ("none", s(backend=AecBackend.NONE), True),
        ("speex 128 ms", s(backend=AecBackend.SPEEX, filter_ms=128, residual_suppression=False,
                            noise_suppression=False), True),
        ("speex 256 ms", s(backend=AecBackend.SPEEX, filter_ms=256, residual_suppression=False,
                            noise_suppression=False), True),
        ("speex 128 ms + residual + ns", s(backend=AecBackend.SPEEX, filter_ms=128), True),
        ("speex 256 ms + residual + ns", s(backend=AecBackend.SPEEX, filter_ms=256), True),
        ("webrtc aec3", s(backend=AecBackend.WEBRTC, noise_suppression=False), True),
        ("webrtc aec3 + ns", s(backend=AecBackend.WEBRTC, noise_suppression=True), True),
        ("hybrid aec3 / speex 128 ms", s(backend=AecBackend.HYBRID, filter_ms=128, noise_suppression=False), True),
        ("hybrid aec3 + ns / speex 128 ms", s(backend=AecBackend.HYBRID, filter_ms=128), True),
    ]
    if not quick:
        configs += [
            ("speex 256 ms + residual + ns, unaligned", s(backend=AecBackend.SPEEX, filter_ms=256, delay_ms=0.0,
                                                         drift_compensation=False), False),
            ("webrtc aec3 + ns, unaligned", s(backend=AecBackend.WEBRTC, delay_ms=0.0,
                                              drift_compensation=False), False),
        ]
    return configs


@functools.lru_cache(maxsize=32)
def _scenario(seed: int, seconds: float, delay_ms: float, drift_ppm: float,
              spans: tuple[tuple[float, float], ...] = ()) -> Any:
    from kiosk_dev import roomsim

    return roomsim.make_scenario(seed, seconds=seconds, delay_ms=delay_ms, drift_ppm=drift_ppm,
                                 visitor_spans=list(spans))


@functools.lru_cache(maxsize=8)
@recorded("stepped_echo")
def _stepped_echo(seed: int, seconds: float) -> Any:
    from kiosk_dev import roomsim

    sc = _scenario(seed, seconds, 40.0, 0.0)
    room = roomsim.StreamingRoom(roomsim.room_impulse_response(seed), delay_ms=40.0)
    half = int(seconds / 2 * RATE_HZ)
    first = room.process(sc.far[:half])
    room.set_delay_ms(160.0)
    echo = np.concatenate([first, room.process(sc.far[half:])])
    # Same level as the scenario's echo (the scenario normalised its echo).
    gain = float(np.std(sc.echo[:half])) / max(float(np.std(first)), 1e-12)
    return (echo * gain).astype(np.float32)


def measure(settings: AecSettings, *, seconds: float = 20.0, seed: int = 0) -> AecFigures:
    """All figures for one configuration on the scenarios of one seed."""
    from kiosk.audio.aec import make_echo_canceller

    def make() -> object:
        return make_echo_canceller(settings)

    settle = seconds / 2  # steady state: the second half
    start = int(settle * RATE_HZ)

    def steady(delay_ms: float, drift_ppm: float) -> tuple[float, float, float | None, object, float]:
        sc = _scenario(seed, seconds, delay_ms, drift_ppm)
        mic = sc.mic.astype(np.float64)
        out, cpu, canceller = _run(make, mic, sc.far.astype(np.float64))
        echo_active = _frame_mask(sc.echo.astype(np.float64), -50.0)
        mask = echo_active.copy()
        mask[:start] = False
        conv = convergence_seconds(mic, out, echo_active)
        return erle_db(mic, out, mask), cpu, conv, canceller, 0.0

    erle_steady, cpu, conv, canceller, _ = steady(40.0, 0.0)
    stats = canceller.stats()  # type: ignore[attr-defined]
    erle_drift, _, _, drift_canceller, _ = steady(40.0, 100.0)
    erle_delay, _, _, _, _ = steady(160.0, 0.0)
    # A +120 ms step halfway (an audio path re-buffering): the time until ERLE is back at 20 dB.
    sc0 = _scenario(seed, seconds, 40.0, 0.0)
    mic_step = _stepped_echo(seed, seconds) + (sc0.mic - sc0.echo)
    out_step, _, _ = _run(make, mic_step.astype(np.float64), sc0.far.astype(np.float64))
    active_step = _frame_mask(mic_step.astype(np.float64), -50.0)
    step_recovery = convergence_seconds(mic_step[start:].astype(np.float64), out_step[start:], active_step[start:])
    # Double talk: the visitor speaks twice in the second half, while the agent keeps talking.
    spans = ((seconds * 0.5, seconds * 0.65), (seconds * 0.75, seconds * 0.9))
    sc = _scenario(seed + 1, seconds, 40.0, 0.0, spans)
    out, _, _ = _run(make, sc.mic.astype(np.float64), sc.far.astype(np.float64))
    sdr, level = sdr_db(sc.near.astype(np.float64), out,
                        [(int(a * RATE_HZ), int(b * RATE_HZ)) for a, b in spans])
    drift_stats = drift_canceller.stats()  # type: ignore[attr-defined]
    return AecFigures(name="", erle_steady_db=erle_steady, erle_drift_db=erle_drift, erle_delay_db=erle_delay,
                      convergence_seconds=conv, double_talk_sdr_db=sdr, visitor_level_db=level,
                      cpu_us_per_frame=cpu, delay_estimate_ms=stats.delay_ms,
                      drift_estimate_ppm=drift_stats.drift_ppm, step_recovery_seconds=step_recovery)


def worst(runs: list[AecFigures]) -> AecFigures:
    """The worst of each figure over several seeded rooms (the mean for CPU; the estimates of the first)."""
    convergence = [r.convergence_seconds for r in runs]
    sdr = min(runs, key=lambda r: r.double_talk_sdr_db)
    return AecFigures(
        name=runs[0].name,
        erle_steady_db=min(r.erle_steady_db for r in runs),
        erle_drift_db=min(r.erle_drift_db for r in runs),
        erle_delay_db=min(r.erle_delay_db for r in runs),
        convergence_seconds=_worst_time(convergence),
        double_talk_sdr_db=sdr.double_talk_sdr_db,
        visitor_level_db=sdr.visitor_level_db,
        cpu_us_per_frame=float(np.mean([r.cpu_us_per_frame for r in runs])),
        delay_estimate_ms=runs[0].delay_estimate_ms,
        drift_estimate_ppm=runs[0].drift_estimate_ppm,
        step_recovery_seconds=_worst_time([r.step_recovery_seconds for r in runs]),
    )


def _worst_time(times: list[float | None]) -> float | None:
    return None if None in times else max(t for t in times if t is not None)


def run(settings: Settings, *, quick: bool = False, preset: AudioPreset | None = None) -> list[BenchSection]:
    """Measure every configuration; the target checks are for the configured default (``settings.aec``).

    ``preset`` says how much (``kiosk_dev.bench.FULL``, ``QUICK``, ``TARGET``); without it ``quick`` chooses.
    """
    preset = preset or (QUICK if quick else FULL)
    seconds = preset.aec_seconds
    section = BenchSection(
        title="Echo cancellation (simulated room, seeded)",
        columns=["configuration", "ERLE steady dB", "ERLE 100 ppm dB", "ERLE +120 ms dB", "to 20 dB s",
                 "step +120 ms: s to 20 dB", "double-talk SDR dB", "visitor level dB", "CPU us/frame", "delay est. ms",
                 "drift est. ppm"],
    )
    default_label = "configured"
    default_figures: AecFigures | None = None
    seeds = preset.aec_seeds
    chosen = configurations(quick=not preset.aec_unaligned)
    if preset.aec_configurations is not None:
        chosen = [c for c in chosen if c[0] in preset.aec_configurations]
    for label, aec, _aligned in chosen:
        figures = worst([measure(aec, seconds=seconds, seed=seed) for seed in seeds])
        figures.name = label
        section.rows.append(_row(label, figures))
        if default_figures is None and _same_config(aec, settings.aec):
            default_label, default_figures = label, figures
    if default_figures is None:
        default_figures = worst([measure(settings.aec, seconds=seconds, seed=seed) for seed in seeds])
        default_label = "configured"
        section.rows.append(_row(default_label, default_figures))
    f = default_figures
    conv = f.convergence_seconds
    section.targets = [
        TargetCheck(f"ERLE steady, default ({default_label})", f.erle_steady_db, f">= {ERLE_STEADY_DB:.0f} dB",
                    f.erle_steady_db >= ERLE_STEADY_DB),
        TargetCheck("ERLE at 100 ppm drift, default", f.erle_drift_db, f">= {ERLE_DRIFT_DB:.0f} dB",
                    f.erle_drift_db >= ERLE_DRIFT_DB),
        TargetCheck("convergence to 20 dB, default", conv if conv is not None else float("inf"),
                    f"<= {CONVERGENCE_SECONDS:.0f} s", conv is not None and conv <= CONVERGENCE_SECONDS),
        TargetCheck("double-talk SDR, default", f.double_talk_sdr_db, f">= {DOUBLE_TALK_SDR_DB:.0f} dB",
                    f.double_talk_sdr_db >= DOUBLE_TALK_SDR_DB),
    ]
    section.notes = [
        f"Worst of {len(seeds)} seeded room(s) (seeds {', '.join(map(str, seeds))}; CPU is the mean). "
        f"{seconds:.0f} s scenarios at 16 kHz: espeak-ng agent speech at -22 dBFS echo through a pyroomacoustics "
        "room (6 x 5 x 3 m, RT60 0.35 s, speaker 15 cm from the microphone), 40 ms bulk delay unless stated; "
        f"visitor at -26 dBFS in double talk (two turns of {0.15 * seconds:.1f} s); microphone self-noise "
        "-85 dBFS. 'delay est.' is the first room's estimate (true: 40 ms plus the response's direct path, about "
        f"3 ms); 'drift est.' is the estimate after {seconds:.0f} s at 100 ppm.",
        "ERLE = 10 log10(E[mic^2]/E[out^2]) over echo-active frames of the second half (far end only).",
        "Convergence: time until every 250 ms block with echo keeps ERLE >= 20 dB for 2 s (the chain starts "
        "with no delay estimate; the first comes after about 0.25 s of far-end speech).",
        "Double-talk SDR: as BSS Eval, the visitor's clean speech through the best fixed 512-tap filter is the "
        "target (latency and fixed colouring forgiven); residual echo and time-varying suppression of the "
        "visitor over the visitor's turns are the distortion.",
        "Step: the bulk delay jumps from 40 to 160 ms halfway through; the column is the time from the step "
        "until ERLE stays >= 20 dB for 2 s ('-': not within the run).",
        "'unaligned' rows feed the backend the raw reference (no delay estimation, no drift compensation).",
    ]
    missed = [t.name for t in section.targets if not t.met]
    if missed:
        section.notes.append("NOT MET with the default configuration: " + "; ".join(missed) + ".")
    return [section]


def _row(label: str, f: AecFigures) -> list[str | float | int | None]:
    return [label, f.erle_steady_db, f.erle_drift_db, f.erle_delay_db, f.convergence_seconds,
            f.step_recovery_seconds, f.double_talk_sdr_db, f.visitor_level_db, f.cpu_us_per_frame,
            f.delay_estimate_ms, f.drift_estimate_ppm]


def _same_config(a: AecSettings, b: AecSettings) -> bool:
    if a.backend != b.backend or a.delay_ms != b.delay_ms or a.drift_compensation != b.drift_compensation:
        return False
    if a.backend is AecBackend.SPEEX:
        return (a.filter_ms, a.residual_suppression, a.noise_suppression) == (
            b.filter_ms, b.residual_suppression, b.noise_suppression)
    if a.backend is AecBackend.WEBRTC:
        return a.noise_suppression == b.noise_suppression
    if a.backend is AecBackend.HYBRID:
        return (a.filter_ms, a.noise_suppression) == (b.filter_ms, b.noise_suppression)
    return True


def main(argv: list[str] | None = None) -> int:
    """Print the benchmark as markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="shorter scenarios, fewer configurations")
    args = parser.parse_args(argv)
    for section in run(Settings(), quick=args.quick):
        print(section.to_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

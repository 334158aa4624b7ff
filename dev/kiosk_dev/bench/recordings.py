"""The benchmark over an installer's own recordings: the same figures, per recording, from a real booth.

A directory holds one subfolder per recording with ``mic.wav`` (the kiosk's microphone; a multi-channel file
is taken as ``audio.channel`` says: a channel, the mix or the beam), ``ref.wav`` (what
its speaker played meanwhile), optionally ``near.wav`` (the visitor alone, e.g. recorded with the speaker
muted, time-aligned with ``mic.wav``) and ``labels.json`` (``{"speech": [[start_s, end_s], ...]}``, the
visitor's speech). Each recording runs through the configured chain exactly as ``kiosk audio process``
does; figures that need a missing file are left empty.

- ERLE: microphone level over output level on far-only frames (reference active, no visitor speech);
- SDR: the output against ``near.wav`` (best gain) over the visitor's speech;
- VAD precision/recall/F1: the chain's per-frame speech flag against ``labels.json``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from kiosk.audio.format import FRAME_SAMPLES, RATE_HZ, Pcm, resample, to_int16
from kiosk.errors import InputError
from kiosk_dev.bench import BenchSection

if TYPE_CHECKING:
    from kiosk.settings import Settings

_LOGGER = logging.getLogger(__name__)

FRAME_SECONDS = FRAME_SAMPLES / RATE_HZ
_NEAR_ACTIVE_DBFS = -55.0  # near.wav frames above this count as the visitor speaking (no labels given)
_MAX_LAG_SAMPLES = 800  # latency of the output behind the visitor searched for the SDR (50 ms)


@dataclass
class RecordingFigures:
    """Figures of one recording (None where the needed file is missing or nothing qualified)."""

    name: str
    seconds: float
    erle_db: float | None
    sdr_db: float | None
    precision: float | None
    recall: float | None
    f1: float | None
    segments: int
    delay_ms: float | None
    drift_ppm: float | None


def read_labels(path: Path, frames: int) -> npt.NDArray[np.bool_]:
    """Per-frame speech flags from ``labels.json``; ``InputError`` if it is malformed."""
    try:
        data = json.loads(path.read_text())
        spans = [(float(s), float(e)) for s, e in data["speech"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"{path} is not a labels file ({error}): write {{\"speech\": [[start_s, end_s], ...]}}"
                          ) from None
    flags = np.zeros(frames, dtype=bool)
    for start, end in spans:
        flags[max(0, int(start / FRAME_SECONDS)):max(0, int(np.ceil(end / FRAME_SECONDS)))] = True
    return flags


def _frame_power(pcm: Pcm, frames: int) -> npt.NDArray[np.float64]:
    # Zero-fill: the last partial frame counts with silence, as the chain's own framing does.
    padded = np.zeros(frames * FRAME_SAMPLES, dtype=np.float64)
    n = min(len(pcm), len(padded))
    padded[:n] = pcm[:n]
    power: npt.NDArray[np.float64] = np.mean(padded.reshape(frames, FRAME_SAMPLES) ** 2, axis=1)
    return power


def output_lag_samples(out: Pcm, near: Pcm, max_lag_samples: int = _MAX_LAG_SAMPLES) -> int:
    """How many samples the output trails the clean visitor (the canceller's latency), 0 to the maximum."""
    from scipy.signal import correlate

    n = min(len(out), len(near))
    corr = correlate(out[:n].astype(np.float64), near[:n].astype(np.float64), mode="full", method="fft")
    zero = n - 1  # index of lag 0
    window = np.abs(corr[zero:zero + max_lag_samples + 1])
    return int(np.argmax(window)) if window.size else 0


def sdr_db(out: Pcm, near: Pcm, mask: npt.NDArray[np.bool_]) -> float:
    """Output against the clean visitor over ``mask`` (samples): best gain, the output's latency forgiven."""
    lag = output_lag_samples(out, near)
    # The canceller's own latency shifts the output; compare it with the visitor at that lag.
    shifted = np.zeros(len(near), dtype=np.float64)
    shifted[: len(near) - lag] = out[lag:len(near)]
    target = near[mask[: len(near)]].astype(np.float64)
    estimate = shifted[mask[: len(near)]]
    gain = float(np.dot(estimate, target) / max(float(np.dot(target, target)), 1e-9))
    error = estimate - gain * target
    return float(10 * np.log10((gain**2 * float(np.dot(target, target)) + 1e-9) / (float(np.dot(error, error)) + 1e-9)))


def measure(settings: Settings, folder: Path) -> RecordingFigures:
    """Run the chain over one recording folder and compute its figures."""
    from kiosk.audio.array import ArrayGeometry
    from kiosk.audio.offline import load_pair, process_arrays, read_input
    from kiosk.audio.pipeline import CaptureChain

    mic_path, ref_path = folder / "mic.wav", folder / "ref.wav"
    # A multi-channel mic.wav (an array's every microphone) is taken as capture takes it: audio.channel.
    mic, ref = load_pair(mic_path, ref_path, mic_channel=settings.audio.channel,
                         array=ArrayGeometry.from_settings(settings.audio))
    chain = CaptureChain(settings)
    result = process_arrays(settings, mic, ref, echo_canceller=chain.echo_canceller)
    frames = len(result.speech_flags)
    mic_power = _frame_power(mic, frames)
    out_power = _frame_power(result.cleaned, frames)

    labels: npt.NDArray[np.bool_] | None = None
    if (folder / "labels.json").exists():
        labels = read_labels(folder / "labels.json", frames)
    near: Pcm | None = None
    if (folder / "near.wav").exists():
        audio, rate = read_input(folder / "near.wav", role="near")
        # Zero-fill: a near.wav shorter than mic.wav means the visitor was silent for the rest.
        near = np.zeros(len(mic), dtype=np.int16)
        converted = to_int16(resample(audio, rate))[: len(mic)]
        near[: len(converted)] = converted
    visitor = labels
    if visitor is None and near is not None:
        level = 10 * np.log10(_frame_power(near, frames) / 32768.0**2 + 1e-12)
        visitor = level > _NEAR_ACTIVE_DBFS

    far_only = result.far_flags.copy() if visitor is None else result.far_flags & ~visitor
    erle = None
    if far_only.sum() >= 50:
        erle = float(10 * np.log10((mic_power[far_only].sum() + 1e-9) / (out_power[far_only].sum() + 1e-9)))

    sdr = None
    if near is not None and visitor is not None and visitor.any():
        sdr = sdr_db(result.cleaned, near, np.repeat(visitor, FRAME_SAMPLES)[: len(mic)])

    precision = recall = f1 = None
    if labels is not None:
        detected = result.speech_flags
        tp = float(np.sum(detected & labels))
        precision = tp / max(float(detected.sum()), 1.0)
        recall = tp / max(float(labels.sum()), 1.0)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0

    stats = chain.echo_canceller.stats()
    delay = getattr(stats, "delay_ms", None)
    drift = getattr(stats, "drift_ppm", None)
    return RecordingFigures(
        name=folder.name, seconds=len(mic) / RATE_HZ, erle_db=erle, sdr_db=sdr, precision=precision,
        recall=recall, f1=f1, segments=len(result.speech),
        delay_ms=float(delay) if isinstance(delay, int | float) else None,
        drift_ppm=float(drift) if isinstance(drift, int | float) else None)


def run(settings: Settings, directory: Path) -> list[BenchSection]:
    """One section with a row per recording subfolder of ``directory``."""
    folders = sorted(p for p in directory.iterdir() if p.is_dir() and (p / "mic.wav").exists())
    if not folders:
        raise InputError(f"{directory} holds no recordings: make one subfolder per recording with mic.wav and "
                         "ref.wav (optionally near.wav and labels.json)")
    section = BenchSection(
        title=f"Your recordings ({directory.name}, {settings.aec.backend} echo canceller)",
        columns=["recording", "seconds", "ERLE dB", "SDR dB", "VAD precision", "VAD recall", "VAD F1",
                 "segments", "delay ms", "drift ppm"])
    for folder in folders:
        try:
            f = measure(settings, folder)
        except InputError as error:
            section.notes.append(f"{folder.name}: skipped: {error.message}")
            continue
        section.rows.append([f.name, f.seconds, f.erle_db, f.sdr_db, f.precision, f.recall, f.f1, f.segments,
                             f.delay_ms, f.drift_ppm])
    section.notes.append("ERLE over far-only frames; SDR against near.wav over the visitor's speech; VAD against "
                         "labels.json per 10 ms frame. '-': the file needed for that figure is missing.")
    return [section]

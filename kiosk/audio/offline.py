"""Offline processing: run the configured capture chain over recorded files exactly as it runs live.

``process_files`` reads a microphone and a reference WAV, resamples them to 16 kHz, feeds them through
``CaptureChain`` frame by frame with frame times as ``now_seconds`` (the chain estimates delay and drift
itself, as live), and writes the cleaned 16 kHz mono WAV and, optionally, the detected speech intervals
as JSON (``{"speech": [[start_s, end_s], ...]}``). Files that cannot be used raise ``InputError`` with
the problem and the fix.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from kiosk.audio.array import ArrayGeometry
from kiosk.audio.format import (
    FRAME_SAMPLES,
    NO_WAV_HEADER,
    RATE_HZ,
    Pcm,
    WavError,
    frames,
    read_wav,
    resample,
    to_int16,
    write_wav,
)
from kiosk.errors import InputError
from kiosk.events import VoiceStarted, VoiceStopped

if TYPE_CHECKING:
    from kiosk.audio.pipeline import CaptureChain
    from kiosk.ports import EchoCanceller, VoiceDetector
    from kiosk.settings import Settings

_LOGGER = logging.getLogger(__name__)

FRAME_SECONDS = FRAME_SAMPLES / RATE_HZ
# Recordings made by two separate devices differ a little in length (clock drift, start/stop timing).
_LENGTH_SLACK_SECONDS = 0.05
_LENGTH_SLACK_SHARE = 0.005

Channel = int | str  # a 0-based channel number, "mix", or "beam" (the microphone only)
# Sample rates a recording may have: what sound devices record at (a header outside this is damaged).
MIN_RATE_HZ = 8000
MAX_RATE_HZ = 192000


@dataclass
class OfflineResult:
    """What one offline run produced."""

    cleaned: Pcm  # 16 kHz mono int16, same length as the microphone input
    speech: list[tuple[float, float]]  # detected speech intervals, seconds
    speech_flags: npt.NDArray[np.bool_]  # per 10 ms frame: the chain's speech decision
    far_flags: npt.NDArray[np.bool_]  # per 10 ms frame: the reference was active
    counters: dict[str, int] = field(default_factory=dict)


def read_input(path: Path, *, role: str, channel: Channel | None = None,
               array: ArrayGeometry | None = None) -> tuple[npt.NDArray[np.float32], int]:
    """Read a WAV as float32 mono and its rate; ``InputError`` names the file, the problem and the fix.

    Integer PCM (8/16/24/32-bit) and 32/64-bit float files are accepted. A file with more than one channel
    needs ``channel``: a number, ``"mix"``, or ``"beam"`` (the array's microphones through the fixed
    beamformer, as ``audio.channel = "beam"`` runs it live: at the file's rate, on 16-bit samples; ``array``
    gives the geometry, by default four microphones on a 32 mm circle from channel 0).
    """
    if not path.exists():
        raise InputError(f"{role} file {path} does not exist: check the path")
    try:
        wav = read_wav(path)
    except OSError as error:
        raise InputError(f"{role} file {path} cannot be read ({error.strerror}): check its permissions") from None
    except WavError as error:
        kind = "a WAV file" if str(error) == NO_WAV_HEADER else "a readable WAV file"
        raise InputError(f"{role} file {path} is not {kind} ({error}): record or convert it to PCM WAV") from None
    if not MIN_RATE_HZ <= wav.rate_hz <= MAX_RATE_HZ:
        raise InputError(f"{role} file {path} says its sample rate is {wav.rate_hz} Hz: record at 8000 to 192000 Hz, "
                         "or repair the file's header (e.g. `sox in.wav -r 16000 out.wav`)")
    data = wav.samples
    if channel == "beam":
        return _beam(path, data, wav.rate_hz, ArrayGeometry() if array is None else array), wav.rate_hz
    if data.shape[1] > 1:
        if channel is None:
            raise InputError(f"{role} file {path} has {data.shape[1]} channels; the chain takes mono: pass "
                             f"--{role}-channel N (0 to {data.shape[1] - 1}), --{role}-channel mix"
                             + (" or --mic-channel beam" if role == "mic" else ""))
        if channel == "mix":
            mono = data.mean(axis=1)
        else:
            index = int(channel)
            if not 0 <= index < data.shape[1]:
                raise InputError(f"{role} file {path} has no channel {index}: use 0 to {data.shape[1] - 1} or mix")
            mono = data[:, index]
    else:
        mono = data[:, 0]
    if len(mono) == 0:
        raise InputError(f"{role} file {path} holds no audio: record at least a few seconds")
    return np.asarray(mono, dtype=np.float32), wav.rate_hz


def _beam(path: Path, data: npt.NDArray[np.float64], rate_hz: int, array: ArrayGeometry) -> npt.NDArray[np.float32]:
    """The array's channels of a recording through the fixed beamformer, block by block as live."""
    if data.shape[1] <= array.last_channel:
        raise InputError(f"mic file {path} has {data.shape[1]} channel(s) but the beam reads channels "
                         f"{array.first_channel} to {array.last_channel}: record every microphone of the array, "
                         "or set audio.array_channels / audio.array_first_channel to match the file")
    if len(data) == 0:
        raise InputError(f"mic file {path} holds no audio: record at least a few seconds")
    block = rate_hz // 100
    beam = array.beamformer(rate_hz, max_block_samples=block)
    pcm = to_int16(data[:, array.first_channel:array.last_channel + 1])
    out = np.zeros(len(pcm), dtype=np.float32)
    for start in range(0, len(pcm), block):
        piece = pcm[start:start + block]
        out[start:start + len(piece)] = beam.process(piece.T)
    out *= np.float32(1.0 / 32768.0)
    return out


def load_pair(mic_path: Path, ref_path: Path, *, mic_channel: Channel | None = None,
              ref_channel: Channel | None = None, array: ArrayGeometry | None = None) -> tuple[Pcm, Pcm]:
    """Microphone and reference at 16 kHz int16, the reference fitted to the microphone's length."""
    if ref_channel == "beam":
        raise InputError(f"ref file {ref_path}: the beam is for the microphone array; the reference is what the "
                         "speaker played: pass --ref-channel N or mix")
    mic, mic_rate = read_input(mic_path, role="mic", channel=mic_channel, array=array)
    ref, ref_rate = read_input(ref_path, role="ref", channel=ref_channel)
    mic_seconds, ref_seconds = len(mic) / mic_rate, len(ref) / ref_rate
    slack = max(_LENGTH_SLACK_SECONDS, _LENGTH_SLACK_SHARE * mic_seconds)
    if abs(mic_seconds - ref_seconds) > slack:
        raise InputError(f"mic file {mic_path} lasts {mic_seconds:.3f} s but ref file {ref_path} lasts "
                         f"{ref_seconds:.3f} s: record both at once, from the same start to the same end")
    return fit_pair(to_int16(resample(mic, mic_rate)), to_int16(resample(ref, ref_rate)))


def fit_pair(mic: Pcm, ref: Pcm) -> tuple[Pcm, Pcm]:
    """Trim or zero-fill the reference to the microphone's length."""
    if len(ref) >= len(mic):
        return mic, ref[: len(mic)]
    # Zero-fill: the reference ended a few milliseconds early; nothing was played then.
    padded = np.zeros(len(mic), dtype=np.int16)
    padded[: len(ref)] = ref
    return mic, padded


def run_chain(chain: CaptureChain, mic: Pcm, ref: Pcm) -> OfflineResult:
    """Feed whole recordings through ``chain`` frame by frame, as the live engine does."""
    mic_frames = frames(mic)
    ref_frames = frames(ref)
    count = len(mic_frames)
    cleaned = np.zeros((count, FRAME_SAMPLES), dtype=np.int16)
    speech_flags = np.zeros(count, dtype=bool)
    far_flags = np.zeros(count, dtype=bool)
    spans: list[tuple[float, float]] = []
    start: float | None = None
    for k in range(count):
        result = chain.process(mic_frames[k], ref_frames[k], k * FRAME_SECONDS)
        cleaned[k] = result.pcm
        speech_flags[k] = result.speech
        far_flags[k] = result.far_active
        for event in result.events:
            start = _collect(event, start, spans)
    for event in chain.finish():
        start = _collect(event, start, spans)
    counters = chain.counters
    return OfflineResult(
        cleaned=cleaned.reshape(-1)[: len(mic)], speech=spans, speech_flags=speech_flags, far_flags=far_flags,
        counters={"frames": counters.frames, "speech_frames": counters.speech_frames,
                  "far_frames": counters.far_frames, "echo_rejected_frames": counters.echo_rejected_frames,
                  "voice_starts": counters.voice_starts})


def _collect(event: object, start: float | None, spans: list[tuple[float, float]]) -> float | None:
    if isinstance(event, VoiceStarted):
        return event.at_seconds
    if isinstance(event, VoiceStopped) and start is not None:
        spans.append((round(start, 3), round(event.at_seconds, 3)))
        return None
    return start


def process_arrays(settings: Settings, mic: Pcm, ref: Pcm, *, echo_canceller: EchoCanceller | None = None,
                   detector: VoiceDetector | None = None) -> OfflineResult:
    """Run a fresh configured chain over 16 kHz int16 arrays (the reference fitted to the microphone)."""
    from kiosk.audio.pipeline import CaptureChain

    mic, ref = fit_pair(mic, ref)
    chain = CaptureChain(settings, echo_canceller=echo_canceller, detector=detector)
    return run_chain(chain, mic, ref)


def process_files(settings: Settings, mic_path: Path, ref_path: Path, out_path: Path, *,
                  vad_path: Path | None = None, mic_channel: Channel | None = None,
                  ref_channel: Channel | None = None, echo_canceller: EchoCanceller | None = None) -> OfflineResult:
    """``kiosk audio process``: read, run the chain, write the cleaned WAV (and the speech JSON).

    ``mic_channel="beam"`` runs the configured array's beamformer (``audio.array_*``) over the microphone file.
    """
    mic, ref = load_pair(mic_path, ref_path, mic_channel=mic_channel, ref_channel=ref_channel,
                         array=ArrayGeometry.from_settings(settings.audio))
    result = process_arrays(settings, mic, ref, echo_canceller=echo_canceller)
    try:
        write_wav(out_path, result.cleaned)
        if vad_path is not None:
            vad_path.parent.mkdir(parents=True, exist_ok=True)
            vad_path.write_text(json.dumps({"speech": [list(span) for span in result.speech]}) + "\n")
    except OSError as error:
        raise InputError(f"cannot write {error.filename or out_path} ({error.strerror}): choose a writable "
                         "place for --out and --vad") from None
    _LOGGER.info("processed %s: %.1f s, %d speech segments", mic_path, len(mic) / RATE_HZ, len(result.speech))
    return result

"""Local cues: short spoken messages and tones the kiosk plays without the network.

Spoken cues are rendered at build time by ``scripts/render-cues`` (``kiosk_dev.cues``, espeak-ng) into
``kiosk/data/cues/<language>/<name>.wav`` (16 kHz mono 16-bit) and shipped with the package; tones
are generated here. The names are ``kiosk.effects.Cue``. An operator replaces any cue by dropping
``<cues_directory>/<language>/<name>.wav`` (a 16-bit PCM WAV, mono or stereo, any rate): that file is
checked first. A file that cannot be used
is reported with the reason and the fix, and the shipped cue plays instead, so a bad file never leaves
the visitor with silence.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kiosk.audio.format import RATE_HZ, Pcm, WavError, read_wav, resample, to_int16
from kiosk.effects import Cue
from kiosk.errors import KioskError

_LOGGER = logging.getLogger(__name__)

DEFAULT_LANGUAGE = "en"

# Tones: a list of (frequency_hz, duration_ms) notes, generated in code (language-independent).
TONES: dict[str, tuple[tuple[float, int], ...]] = {
    "recording_tone": ((880.0, 300),),
    "session_start": ((660.0, 90), (880.0, 120)),
    "session_end": ((880.0, 90), (660.0, 120)),
}

CUE_NAMES: tuple[str, ...] = tuple(cue.value for cue in Cue)
# The cues shipped as spoken WAV files (rendered by ``kiosk_dev.cues``), one per language.
SPOKEN_NAMES: tuple[str, ...] = tuple(name for name in CUE_NAMES if name not in TONES)

_TONE_LEVEL_DBFS = -12.0
# 60 s of 192 kHz stereo 16-bit is 46 MB: a larger file is no cue (and is not read into memory).
_MAX_CUE_BYTES = 48_000_000
_FADE_MS = 8


class CueError(KioskError):
    """A cue is unknown, or a cue file cannot be used (the message names the file and the fix)."""

    def __init__(self, message: str, code: str = "cue_invalid") -> None:
        super().__init__(code, message)


def shipped_directory() -> Path:
    """Where the shipped cues live inside the package (``kiosk/data/cues``)."""
    return Path(str(importlib.resources.files("kiosk").joinpath("data", "cues")))


def tone(notes: Sequence[tuple[float, int]], level_dbfs: float = _TONE_LEVEL_DBFS) -> Pcm:
    """A sequence of sine notes at 16 kHz, each with short raised-cosine fades (no clicks)."""
    parts = []
    amplitude = 10 ** (level_dbfs / 20)
    fade = RATE_HZ * _FADE_MS // 1000
    ramp = (0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, fade))).astype(np.float32)
    for frequency_hz, duration_ms in notes:
        n = RATE_HZ * duration_ms // 1000
        t = np.arange(n, dtype=np.float64) / RATE_HZ
        note = (amplitude * np.sin(2 * np.pi * frequency_hz * t)).astype(np.float32)
        note[:fade] *= ramp
        note[-fade:] *= ramp[::-1]
        parts.append(note)
    return to_int16(np.concatenate(parts))


def read_cue_file(path: Path) -> Pcm:
    """Read a cue WAV as 16 kHz mono int16; raise ``CueError`` naming the problem and the fix.

    Accepted: 16-bit PCM, mono or stereo (mixed down), any rate (resampled), 0.05 to 60 seconds.
    """
    fix = "save it as a 16-bit PCM WAV, mono, 16000 Hz (e.g. `sox in.wav -b 16 -c 1 -r 16000 out.wav`)"
    try:
        wav = read_wav(path, max_bytes=_MAX_CUE_BYTES)
    except WavError as error:
        raise CueError(f"cue file {path} is not a PCM WAV file ({error}): {fix}") from None
    except OSError as error:
        raise CueError(f"cue file {path} cannot be read ({error.strerror}): check its permissions") from None
    if wav.is_float or wav.sample_bits != 16:
        kind = "float" if wav.is_float else "integer"
        raise CueError(f"cue file {path} has {wav.sample_bits}-bit {kind} samples, the kiosk needs 16-bit: {fix}")
    if wav.channels not in (1, 2):
        raise CueError(f"cue file {path} has {wav.channels} channels, the kiosk needs mono (or stereo): {fix}")
    if not 8000 <= wav.rate_hz <= 192000:
        raise CueError(f"cue file {path} has a sample rate of {wav.rate_hz} Hz: {fix}")
    if not 0.05 <= wav.seconds <= 60.0:
        raise CueError(f"cue file {path} lasts {wav.seconds:.2f} s; a cue must last 0.05 to 60 s: shorten or "
                       "re-record it")
    if wav.channels == 1 and wav.rate_hz == RATE_HZ:
        return wav.mono_pcm()
    mono = wav.samples.mean(axis=1).astype(np.float32)
    return to_int16(resample(mono, wav.rate_hz, RATE_HZ))


def cue_path(name: str, language: str, directory: Path) -> Path:
    """The file a cue would be read from under ``directory`` (``<language>/<name>.wav``)."""
    return directory / language / f"{name}.wav"


def load_cue(name: str, language: str = DEFAULT_LANGUAGE, override_directory: Path | None = None) -> Pcm:
    """The cue ``name`` in ``language`` as 16 kHz mono int16 (read-only array; cached per process).

    Order: the operator's ``override_directory/<language>/<name>.wav``; then the shipped cue in
    ``language``; then the shipped English cue (logged: better understood by most than silence); tones
    are generated when no override exists. Unknown names raise ``CueError``.
    """
    return _load_cue(name, language, override_directory)


@functools.lru_cache(maxsize=128)
def _load_cue(name: str, language: str, override_directory: Path | None) -> Pcm:
    if name not in CUE_NAMES:
        raise CueError(f"there is no cue named '{name}'; the cues are {', '.join(CUE_NAMES)}", "cue_unknown")
    pcm: Pcm | None = None
    if override_directory is not None:
        path = cue_path(name, language, override_directory)
        if path.exists():
            try:
                pcm = read_cue_file(path)
                _LOGGER.info("cue %s (%s): using the operator's file %s", name, language, path)
            except CueError as error:
                _LOGGER.warning("%s; playing the shipped cue instead", error.message)
    if pcm is None and name in TONES:
        pcm = tone(TONES[name])
    if pcm is None:
        shipped = shipped_directory()
        path = cue_path(name, language, shipped)
        if not path.exists():
            _LOGGER.warning("no shipped cue %s in language '%s'; playing the English one (add "
                            "%s to the cues directory, or render it with scripts/render-cues)",
                            name, language, cue_path(name, language, Path("<cues_directory>")))
            path = cue_path(name, DEFAULT_LANGUAGE, shipped)
        pcm = read_cue_file(path)
    pcm.flags.writeable = False  # cached and shared: nobody may change it
    return pcm


def check_directory(directory: Path) -> list[str]:
    """Problems with the operator's cue files under ``directory`` (empty: all usable or none present)."""
    problems: list[str] = []
    if not directory.is_dir():
        return problems
    for path in sorted(directory.glob("*/*.wav")):
        if path.stem not in CUE_NAMES:
            problems.append(f"{path}: no cue is named '{path.stem}' (the cues are {', '.join(CUE_NAMES)})")
            continue
        try:
            read_cue_file(path)
        except CueError as error:
            problems.append(error.message)
    return problems

"""Local cues: short spoken messages and tones the kiosk plays without the network.

Spoken cues are rendered at build time by ``scripts/render-cues`` (espeak-ng) into
``kiosk/data/cues/<language>/<name>.wav`` (16 kHz mono 16-bit) and shipped with the package; tones
are generated here. An operator replaces any cue by dropping ``<cues_directory>/<language>/<name>.wav``
(a 16-bit PCM WAV, mono or stereo, any rate): that file is checked first. A file that cannot be used
is reported with the reason and the fix, and the shipped cue plays instead, so a bad file never leaves
the visitor with silence.
"""

from __future__ import annotations

import functools
import importlib.resources
import io
import logging
import sys
import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kiosk.audio.format import RATE_HZ, Pcm, resample, to_float, to_int16
from kiosk.errors import KioskError

_LOGGER = logging.getLogger(__name__)

DEFAULT_LANGUAGE = "en"

# What each spoken cue says, per language. Plain words a visitor understands: no "credits", no codes.
SPOKEN: dict[str, dict[str, str]] = {
    "en": {
        "offline": "Sorry, the assistant is offline at the moment.",
        "maintenance": "Sorry, the assistant is down for maintenance at the moment.",
        "credits_exhausted": "Sorry, the assistant is not available at the moment. Please ask a member of staff.",
        "budget_cap": "Sorry, the assistant has reached its limit for today. "
                      "Please try again later, or ask a member of staff.",
        "leave_message": "You can leave a message. Press the button, speak after the tone, "
                         "and pause when you are done.",
        "message_stored": "Thank you. Your message has been saved and will be passed on.",
        "message_failed": "Sorry, your message could not be saved. Please ask a member of staff.",
        "consent_notice": "This assistant uses artificial intelligence. "
                          "What you say is processed to answer you.",
        "error": "Sorry, something went wrong. Please try again in a moment.",
        # Status, spoken to staff on a long hold: the preamble, then one of each group.
        "status_preamble": "Kiosk status.",
        "status_online": "The assistant is online.",
        "status_route_array": "Using the microphone array.",
        "status_route_headset": "Using the headset.",
        "status_route_none": "No microphone is working.",
        "status_no_error": "No errors.",
        "status_last_error": "There was an error recently. Please check the logs.",
    },
    "de": {
        "offline": "Entschuldigung, der Assistent ist gerade nicht erreichbar.",
        "maintenance": "Entschuldigung, der Assistent wird gerade gewartet.",
        "credits_exhausted": "Entschuldigung, der Assistent ist im Moment nicht verfügbar. "
                             "Bitte wenden Sie sich an unser Personal.",
        "budget_cap": "Entschuldigung, der Assistent hat für heute sein Limit erreicht. "
                      "Bitte versuchen Sie es später noch einmal, oder wenden Sie sich an unser Personal.",
        "leave_message": "Sie können eine Nachricht hinterlassen. Drücken Sie die Taste, sprechen Sie nach "
                         "dem Ton, und machen Sie eine Pause, wenn Sie fertig sind.",
        "message_stored": "Danke. Ihre Nachricht wurde gespeichert und wird weitergegeben.",
        "message_failed": "Entschuldigung, Ihre Nachricht konnte nicht gespeichert werden. "
                          "Bitte wenden Sie sich an unser Personal.",
        "consent_notice": "Dieser Assistent nutzt künstliche Intelligenz. "
                          "Was Sie sagen, wird verarbeitet, um Ihnen zu antworten.",
        "error": "Entschuldigung, etwas ist schiefgelaufen. Bitte versuchen Sie es gleich noch einmal.",
        "status_preamble": "Statusbericht.",
        "status_online": "Der Assistent ist online.",
        "status_route_array": "Das Mikrofon-Array ist in Betrieb.",
        "status_route_headset": "Das Headset ist in Betrieb.",
        "status_route_none": "Kein Mikrofon funktioniert.",
        "status_no_error": "Keine Fehler.",
        "status_last_error": "Vor kurzem ist ein Fehler aufgetreten. Bitte prüfen Sie die Protokolle.",
    },
}
# espeak-ng voice per language.
ESPEAK_VOICES = {"en": "en-us", "de": "de"}

# Tones: a list of (frequency_hz, duration_ms) notes, generated in code (language-independent).
TONES: dict[str, tuple[tuple[float, int], ...]] = {
    "recording_tone": ((880.0, 300),),
    "session_start": ((660.0, 90), (880.0, 120)),
    "session_end": ((880.0, 90), (660.0, 120)),
}

CUE_NAMES: tuple[str, ...] = (*SPOKEN[DEFAULT_LANGUAGE], *TONES)

_TONE_LEVEL_DBFS = -12.0
_FADE_MS = 8
_SPOKEN_PEAK_DBFS = -3.0


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
        with wave.open(str(path), "rb") as wav:
            channels = wav.getnchannels()
            width = wav.getsampwidth()
            rate_hz = wav.getframerate()
            raw = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as error:
        raise CueError(f"cue file {path} is not a PCM WAV file ({error}): {fix}") from None
    except OSError as error:
        raise CueError(f"cue file {path} cannot be read ({error.strerror}): check its permissions") from None
    if width != 2:
        raise CueError(f"cue file {path} has {8 * width}-bit samples, the kiosk needs 16-bit: {fix}")
    if channels not in (1, 2):
        raise CueError(f"cue file {path} has {channels} channels, the kiosk needs mono (or stereo): {fix}")
    if not 8000 <= rate_hz <= 192000:
        raise CueError(f"cue file {path} has a sample rate of {rate_hz} Hz: {fix}")
    samples = np.frombuffer(raw, dtype="<i2").reshape(-1, channels)
    seconds = len(samples) / rate_hz
    if not 0.05 <= seconds <= 60.0:
        raise CueError(f"cue file {path} lasts {seconds:.2f} s; a cue must last 0.05 to 60 s: shorten or re-record it")
    if channels == 1 and rate_hz == RATE_HZ:
        return samples[:, 0].astype(np.int16)
    mono = to_float(samples.astype(np.int16)).mean(axis=1).astype(np.float32)
    return to_int16(resample(mono, rate_hz, RATE_HZ))


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


def write_wav(path: Path, pcm: Pcm, rate_hz: int = RATE_HZ) -> None:
    """Write mono int16 samples as a 16-bit PCM WAV."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate_hz)
        wav.writeframes(pcm.astype("<i2").tobytes())
    path.write_bytes(buffer.getvalue())


def render_spoken(text: str, voice: str, speed_wpm: int = 150) -> Pcm:
    """Render ``text`` with espeak-ng at 16 kHz, silence trimmed, peak-normalised (build time only)."""
    from kiosk.dev.speech import espeak

    audio = espeak(text, voice, speed_wpm)
    loud = np.flatnonzero(np.abs(audio) > 10 ** (-50 / 20))
    if loud.size:
        pad = RATE_HZ // 20  # keep 50 ms around the speech
        audio = audio[max(0, loud[0] - pad): loud[-1] + pad]
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak > 0:
        audio = audio * np.float32(10 ** (_SPOKEN_PEAK_DBFS / 20) / peak)
    return to_int16(audio)


def render_all(directory: Path, languages: Sequence[str] | None = None) -> list[Path]:
    """Render every spoken cue for ``languages`` (default: all) into ``directory/<language>/``."""
    written = []
    for language in languages or sorted(SPOKEN):
        if language not in SPOKEN:
            raise CueError(f"no cue texts for language '{language}'; add them to SPOKEN in kiosk/audio/cues.py")
        (directory / language).mkdir(parents=True, exist_ok=True)
        for name, text in SPOKEN[language].items():
            path = cue_path(name, language, directory)
            write_wav(path, render_spoken(text, ESPEAK_VOICES.get(language, language)))
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kiosk.audio.cues [DIR] [LANG ...]``: render the spoken cues (used by scripts/render-cues)."""
    args = list(sys.argv[1:] if argv is None else argv)
    directory = Path(args[0]) if args else shipped_directory()
    for path in render_all(directory, args[1:] or None):
        print(f"{path}: {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build-time rendering of the shipped spoken cues with espeak-ng (``scripts/render-cues``).

``python -m kiosk_dev.cues [DIR [LANGUAGE ...]]`` writes ``DIR/<language>/<name>.wav`` (16 kHz mono
16-bit; default: the package's ``kiosk/data/cues``) for every spoken cue (``kiosk.audio.cues.SPOKEN_NAMES``)
from the texts below.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kiosk.audio.cues import CueError, cue_path, shipped_directory
from kiosk.audio.format import RATE_HZ, Pcm, to_int16, write_wav
from kiosk_dev.speech import espeak

_SPOKEN_PEAK_DBFS = -3.0

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


def render_spoken(text: str, voice: str, speed_wpm: int = 150) -> Pcm:
    """Render ``text`` with espeak-ng at 16 kHz, silence trimmed, peak-normalised."""
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
            raise CueError(f"no cue texts for language '{language}'; add them to SPOKEN in kiosk_dev/cues.py")
        (directory / language).mkdir(parents=True, exist_ok=True)
        for name, text in SPOKEN[language].items():
            path = cue_path(name, language, directory)
            write_wav(path, render_spoken(text, ESPEAK_VOICES.get(language, language)))
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kiosk_dev.cues [DIR] [LANG ...]``: render the spoken cues."""
    args = list(sys.argv[1:] if argv is None else argv)
    directory = Path(args[0]) if args else shipped_directory()
    for path in render_all(directory, args[1:] or None):
        print(f"{path}: {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())

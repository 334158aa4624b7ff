"""Test speech: sentences rendered by espeak-ng (several voices) and the recorded voices alsa-utils ships.

Everything comes back as 16 kHz mono float32 in [-1, 1] (the internal rate), so the room simulator,
the tests and the benchmarks share one corpus. The room corpus (``kiosk_dev.rooms.voices``) builds its
multilingual material on the same primitives (``espeak`` with SSML, ``alsa_voices``, ``read_wav_mono``).
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from kiosk.audio.format import WavError, read_wav, resample
from kiosk.errors import KioskError
from kiosk_dev.inputs import recorded

RATE_HZ = 16000
ALSA_SOUNDS = Path("/usr/share/sounds/alsa")
# Recorded human voices in alsa-utils ("Front Left", ...); Noise.wav is pink noise, not a voice.
ALSA_VOICE_FILES = ("Front_Center.wav", "Front_Left.wav", "Front_Right.wav", "Rear_Center.wav",
                    "Rear_Left.wav", "Rear_Right.wav", "Side_Left.wav", "Side_Right.wav")
ESPEAK_VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb-scotland", "en-us+m7", "en-gb+f4")
SENTENCES = (
    "Hello, where can I find the registration desk for the conference?",
    "Could you tell me when the next product demonstration starts?",
    "I would like to know more about your pricing for small teams.",
    "Is there a place nearby where I can charge my phone?",
    "What time does the keynote begin this afternoon?",
    "Can you explain how the warranty works if the device breaks?",
    "Please repeat that, I did not quite catch the last part.",
    "Which aisle has the replacement parts for the conveyor belt?",
)

Signal = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Utterance:
    """One test utterance at 16 kHz, with its language and where it came from."""

    name: str
    audio: Signal
    language: str = "en"  # "en", "de", ...; "en+switch" for a code-switched sentence
    source: str = "espeak"  # "espeak", "espeak-ssml", "real:alsa", "real:pyannote"


def read_wav_mono(path: Path) -> tuple[Signal, int]:
    """Read a WAV (``kiosk.audio.format.read_wav``) as float32 mono (channels averaged) and its rate."""
    try:
        wav = read_wav(path)
    except WavError as error:
        raise KioskError("wav_format", f"{path}: {error}") from None
    return wav.samples.mean(axis=1).astype(np.float32), wav.rate_hz


def to_rate(audio: Signal, rate_hz: int, target_hz: int = RATE_HZ) -> Signal:
    """Resample with a polyphase filter (exact for the common ratios)."""
    return resample(audio, rate_hz, target_hz)


@functools.lru_cache(maxsize=64)
@recorded("espeak")
def espeak(text: str, voice: str = "en-us", speed_wpm: int = 160, *, ssml: bool = False) -> Signal:
    """Render ``text`` with espeak-ng and return it at 16 kHz (cached per process).

    ``ssml``: ``text`` is the body of an SSML document (``<voice xml:lang="de">...</voice>`` switches language
    inside one utterance).
    """
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise KioskError("espeak_missing", "espeak-ng is not installed: run scripts/bootstrap")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "speech.wav"
        body = f"<speak>{text}</speak>" if ssml else text
        subprocess.run([exe, "-v", voice, "-s", str(speed_wpm), "-w", str(out), *(["-m"] if ssml else []), body],
                       check=True, capture_output=True, timeout=60)
        audio, rate = read_wav_mono(out)
    return to_rate(audio, rate)


def alsa_voices() -> Iterator[Utterance]:
    """The recorded voices shipped by alsa-utils, at 16 kHz (none if alsa-utils is absent)."""
    for name in ALSA_VOICE_FILES:
        path = ALSA_SOUNDS / name
        if path.exists():
            audio, rate = read_wav_mono(path)
            yield Utterance(f"alsa:{name}", to_rate(audio, rate), "en", "real:alsa")


def corpus(count: int | None = None) -> list[Utterance]:
    """A fixed, deterministic list of utterances: espeak-ng sentences over several voices, then alsa voices."""
    items = [Utterance(f"espeak:{ESPEAK_VOICES[i % len(ESPEAK_VOICES)]}:{i}",
                       espeak(text, ESPEAK_VOICES[i % len(ESPEAK_VOICES)]))
             for i, text in enumerate(SENTENCES)]
    items += list(alsa_voices())
    return items if count is None else items[:count]


def normalise(audio: Signal, rms_dbfs: float) -> Signal:
    """Scale to the given RMS level in dBFS over the active (non-silent) part."""
    active = audio[np.abs(audio) > 1e-4]
    rms = float(np.sqrt(np.mean(active.astype(np.float64) ** 2))) if active.size else 0.0
    if rms == 0.0:
        return audio
    return (audio * (10 ** (rms_dbfs / 20) / rms)).astype(np.float32)

"""Speech material for the room corpus: several languages, code-switching, and real recorded voices.

Built on ``kiosk_dev.speech`` (espeak-ng, alsa-utils' voices, the WAV reader and resampler of
``kiosk.audio.format``); all of it 16 kHz mono float32:

- espeak-ng sentences in eight languages (en, de, fr, es, it, nl, pt, pl) with several voice variants,
  and code-switched sentences (a sentence in one language with a phrase in another, rendered with
  espeak-ng's SSML ``<voice xml:lang=..>`` switch, so the switch happens inside one utterance);
- real recorded human speech shipped by packages: the eight voice prompts of alsa-utils
  (one speaker, short phrases) and the 30 s two-speaker conversation in pyannote.audio's wheel
  (``pyannote/audio/sample/sample.wav``, cut into single-speaker turns with its own RTTM labels, found
  without importing pyannote, which needs torch). Either is left out when its package is not installed;
  ``corpus_tag`` says so, and the rendered rooms go to a cache folder of their own then.

Rendered espeak-ng audio is cached on disk (``<rooms cache>/speech-<SPEECH_VERSION>``) so that rendering
rooms in several processes does not call espeak-ng again.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt

from kiosk.audio.format import RATE_HZ
from kiosk_dev import speech
from kiosk_dev.speech import Signal, Utterance

SPEECH_VERSION = "1"

# Sentences a visitor (or an agent) says at a kiosk, per language.
SENTENCES: dict[str, tuple[str, ...]] = {
    "en": ("Sorry, can I ask something about the opening hours?",
           "Wait, that is not what I meant at all.",
           "Where do I find the registration desk for the workshop?",
           "Stop please, I need the way to the train station.",
           "Could you repeat the price for the family ticket?"),
    "de": ("Entschuldigung, wo finde ich den Ausgang zum Parkhaus?",
           "Moment bitte, das habe ich nicht verstanden.",
           "Gibt es hier auch eine Toilette im Erdgeschoss?",
           "Halt, ich wollte eigentlich etwas anderes wissen."),
    "fr": ("Excusez-moi, où se trouve l'accueil s'il vous plaît?",
           "Attendez, je voudrais parler à quelqu'un du service client.",
           "Est-ce que le musée est ouvert le dimanche matin?",
           "Non non, ce n'est pas ma question."),
    "es": ("Perdone, ¿dónde está la salida más cercana?",
           "Espera un momento, tengo otra pregunta.",
           "¿Cuánto cuesta la entrada para estudiantes?",
           "No, eso no es lo que quería saber."),
    "it": ("Scusi, dove posso comprare i biglietti per la mostra?",
           "Aspetta, vorrei sapere un'altra cosa.",
           "C'è un ascensore per il secondo piano?"),
    "nl": ("Pardon, waar is de ingang van de tentoonstelling?",
           "Wacht even, dat bedoelde ik niet.",
           "Hoe laat gaat de winkel vanavond dicht?"),
    "pt": ("Desculpe, onde fica a farmácia mais próxima?",
           "Espere, eu tenho uma pergunta diferente."),
    "pl": ("Przepraszam, gdzie jest najbliższy przystanek autobusowy?",
           "Chwileczkę, mam jeszcze jedno pytanie."),
}
# Code-switched sentences: (base language, SSML body). The switch happens mid-utterance.
CODE_SWITCHED: tuple[tuple[str, str], ...] = (
    ("en", 'Excuse me, <voice xml:lang="de">wo ist der Ausgang</voice>, I mean the exit, please?'),
    ("de", 'Ich suche das <voice xml:lang="en">customer service desk</voice>, wo ist das bitte?'),
    ("es", 'Perdona, ¿dónde está el <voice xml:lang="en">meeting point</voice> para el tour?'),
    ("fr", 'Attendez, je cherche le <voice xml:lang="en">check in</voice> pour le congrès.'),
    ("en", 'Sorry, <voice xml:lang="fr">une petite question</voice>, is the cafe still open?'),
    ("it", 'Scusi, il <voice xml:lang="en">shuttle bus</voice> parte da qui o dall\'altra parte?'),
)
# espeak-ng voice for each language, and variants that change the speaker (pitch, formants).
ESPEAK_LANG = {"en": "en-us", "de": "de", "fr": "fr-fr", "es": "es", "it": "it", "nl": "nl", "pt": "pt",
               "pl": "pl"}
VARIANTS = ("", "+f3", "+m3", "+f2", "+m7", "+f4")
# The agent (the far end): longer sentences, as an assistant answers.
AGENT_SENTENCES: dict[str, tuple[str, ...]] = {
    "en": ("The exhibition is open every day from ten in the morning until six in the evening, and on "
           "Thursdays until nine.",
           "You can find the registration desk on the ground floor, right next to the main entrance and "
           "opposite the cloakroom.",
           "Tickets for families cost twenty four euros and include two adults and up to three children.",
           "If you would like, I can also show you the way to the nearest train station on the map."),
    "de": ("Die Ausstellung ist täglich von zehn bis achtzehn Uhr geöffnet, donnerstags sogar bis "
           "einundzwanzig Uhr.",
           "Den Ausgang zum Parkhaus finden Sie am Ende des Ganges auf der linken Seite neben dem Aufzug."),
    "fr": ("Le musée est ouvert tous les jours sauf le lundi, de neuf heures à dix-sept heures trente.",
           "Vous trouverez l'accueil au rez-de-chaussée, juste à côté de l'entrée principale."),
    "es": ("La salida más cercana está al final del pasillo, a la derecha, junto a la cafetería.",
           "Las entradas para estudiantes cuestan ocho euros con el carné de estudiante válido."),
    "it": ("I biglietti per la mostra si comprano alla cassa al piano terra oppure online.",),
}


def cache_base() -> Path:
    """The room corpus' cache folder (``$KIOSK_ROOMS_CACHE``, else ``~/.cache/kiosk/rooms``)."""
    return Path(os.environ.get("KIOSK_ROOMS_CACHE", Path.home() / ".cache" / "kiosk" / "rooms"))


def _speech_cache() -> Path:
    path = cache_base() / f"speech-{SPEECH_VERSION}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def trim(audio: Signal, threshold: float = 1e-3, pad_samples: int = 800) -> Signal:
    """Cut leading and trailing silence, keeping ``pad_samples`` of it on each side."""
    loud = np.flatnonzero(np.abs(audio) > threshold)
    if loud.size == 0:
        return audio
    a = max(0, int(loud[0]) - pad_samples)
    b = min(len(audio), int(loud[-1]) + pad_samples)
    out: Signal = audio[a:b].astype(np.float32)
    return out


def rendered(text: str, voice: str, *, ssml: bool = False, speed_wpm: int = 165) -> Signal:
    """``kiosk_dev.speech.espeak``, trimmed, cached on disk by text, voice, SSML and speed."""
    key = hashlib.sha1(f"{voice}|{speed_wpm}|{int(ssml)}|{text}".encode()).hexdigest()[:20]
    cached = _speech_cache() / f"{key}.npy"
    if cached.exists():
        loaded: Signal = np.load(cached)
        return loaded
    audio = trim(speech.espeak(text, voice, speed_wpm, ssml=ssml))
    tmp_path = cached.with_suffix(f".{os.getpid()}.npy")
    np.save(tmp_path, audio)
    tmp_path.replace(cached)
    return audio


def pyannote_sample_path() -> Path | None:
    """Where pyannote.audio's wheel put its sample conversation (found without importing pyannote)."""
    try:
        spec = importlib.util.find_spec("pyannote.audio")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "sample" / "sample.wav"
        if path.exists():
            return path
    return None


def pyannote_turns(min_seconds: float = 0.9) -> list[Utterance]:
    """Single-speaker turns of pyannote.audio's sample conversation (real recorded speech, two speakers).

    The RTTM next to the WAV labels who speaks when; a turn is kept from where nobody else talks, cut to
    at most 3.5 s (longer turns give several utterances).
    """
    path = pyannote_sample_path()
    if path is None:
        return []
    audio, rate = speech.read_wav_mono(path)
    audio = speech.to_rate(audio, rate)
    turns: list[tuple[float, float, str]] = []
    for line in path.with_suffix(".rttm").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 8 and parts[0] == "SPEAKER":
            start, dur = float(parts[3]), float(parts[4])
            turns.append((start, start + dur, parts[7]))
    out = []
    for i, (first, last, who) in enumerate(turns):
        start, end = first, last
        # Remove overlaps with any other turn.
        for j, (s2, e2, _) in enumerate(turns):
            if j == i:
                continue
            if s2 <= start < e2 or (start < s2 < start + 1.0 and e2 < end):
                start = max(start, e2)  # another speaker at (or just after) the start: begin after them
            elif start < s2 < end:
                end = min(end, s2)
        t = start
        k = 0
        while end - t >= min_seconds:
            piece_end = min(end, t + 3.5)
            if end - piece_end < min_seconds:
                piece_end = end if end - t <= 4.5 else piece_end
            seg = audio[int(t * RATE_HZ):int(piece_end * RATE_HZ)]
            out.append(Utterance(f"pyannote:{who}:{i}.{k}", seg.astype(np.float32), "en", "real:pyannote"))
            t = piece_end
            k += 1
    return out


def alsa_voices() -> list[Utterance]:
    """alsa-utils' recorded voice prompts (real speech, one English speaker), trimmed."""
    return [Utterance(u.name, trim(u.audio), u.language, u.source) for u in speech.alsa_voices()]


def corpus_tag() -> str:
    """``""`` with every real-speech source present, else which are missing (rooms rendered without them differ)."""
    missing = []
    if not all((speech.ALSA_SOUNDS / name).exists() for name in speech.ALSA_VOICE_FILES):
        missing.append("alsa")
    if pyannote_sample_path() is None:
        missing.append("pyannote")
    return "".join(f"-no-{name}" for name in missing)


@functools.lru_cache(maxsize=1)
def visitor_pool() -> tuple[Utterance, ...]:
    """Everything a visitor (or a background talker) may say: all languages, code-switched, real voices."""
    items: list[Utterance] = []
    for lang, sentences in SENTENCES.items():
        for i, text in enumerate(sentences):
            variant = VARIANTS[(i + len(lang)) % len(VARIANTS)]
            items.append(Utterance(f"espeak:{lang}{variant}:{i}",
                                   rendered(text, ESPEAK_LANG[lang] + variant, speed_wpm=150 + 10 * (i % 4)),
                                   lang, "espeak"))
    for i, (lang, body) in enumerate(CODE_SWITCHED):
        variant = VARIANTS[(i + 2) % len(VARIANTS)]
        items.append(Utterance(f"espeak-ssml:{lang}{variant}:{i}",
                               rendered(body, ESPEAK_LANG[lang] + variant, ssml=True, speed_wpm=160),
                               f"{lang}+switch", "espeak-ssml"))
    items += alsa_voices()
    items += pyannote_turns()
    return tuple(items)


@functools.lru_cache(maxsize=1)
def agent_pool() -> tuple[Utterance, ...]:
    """What the agent says (the far end): longer answers in five languages, two voices each."""
    items = []
    for lang, sentences in AGENT_SENTENCES.items():
        for i, text in enumerate(sentences):
            for variant in ("", "+f3"):
                items.append(Utterance(f"agent:{lang}{variant}:{i}",
                                       rendered(text, ESPEAK_LANG[lang] + variant, speed_wpm=170), lang, "espeak"))
    return tuple(items)


def sources_summary(pool: tuple[Utterance, ...]) -> dict[str, int]:
    """How many utterances each source gave (so a report can say whether real speech was used)."""
    counts: dict[str, int] = {}
    for u in pool:
        counts[u.source] = counts.get(u.source, 0) + 1
    return counts


def active_rms(audio: npt.NDArray[np.floating], rel_db: float = -40.0) -> float:
    """RMS over the 10 ms frames within ``rel_db`` of the loudest frame (the speech, not its pauses)."""
    n = len(audio) // 160
    if n == 0:
        return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if len(audio) else 0.0
    power = np.mean(np.square(audio[: n * 160].astype(np.float64)).reshape(n, 160), axis=1)
    keep = power > power.max() * 10 ** (rel_db / 10)
    return float(np.sqrt(np.mean(power[keep]))) if keep.any() else 0.0

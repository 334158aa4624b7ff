"""VAD benchmark: precision, recall and F1 per noise type and SNR, distant-talker rejection, CPU per frame.

The corpus is fixed and seeded: every test utterance (``kiosk_dev.speech``) at -26 dBFS with 0.8 s of
silence between them, and a background from ``kiosk_dev.roomsim`` (white, pink, music, babble, a distant
talker) scaled to the SNR. Frame labels come from the clean speech: a 10 ms frame is speech when its
level is within 25 dB of the speech's active level, with pauses up to 200 ms inside speech filled (a
pause between words is still speech to a listener).

Three views are reported: the detector per frame (the flag the chain computes); the speech segments the
chain reports (``VoiceStarted`` to ``VoiceStopped``, as ``kiosk audio process --vad`` writes them), which
are the VAD's output and what the targets are judged on; and what the gate would stream if the controller
followed those events (pre-roll and hangover included), which is what reaches the agent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from kiosk.audio.aec import PassThrough
from kiosk.audio.format import FRAME_SAMPLES, RATE_HZ, Pcm, to_int16
from kiosk_dev.bench import FULL, QUICK, AudioPreset, BenchSection, TargetCheck

if TYPE_CHECKING:
    from kiosk.audio.pipeline import CaptureChain
    from kiosk.ports import VoiceDetector
    from kiosk.settings import Settings, VadSettings
    from kiosk_dev.roomsim import Scenario

_LOGGER = logging.getLogger(__name__)

VISITOR_DBFS = -26.0
GAP_SECONDS = 0.8
LABEL_BELOW_ACTIVE_DB = 25.0
LABEL_FILL_FRAMES = 20
SNRS_DB = (20.0, 10.0, 5.0, 0.0)
NOISES = ("white", "pink", "music", "babble", "distant_talker")
TARGET_NOISES = ("white", "pink")  # the targets are checked on steady noise, as in the issue
DISTANT_DBFS = (-40.0, -36.0)  # a voice a few metres away: 10-14 dB under the visitor at the kiosk
_SEED = 7

Flags = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Corpus:
    """Clean visitor speech at 16 kHz float and its frame labels."""

    clean: npt.NDArray[np.float32]
    labels: Flags


@dataclass(frozen=True)
class Scores:
    """Frame-level precision, recall and F1."""

    precision: float
    recall: float
    f1: float


def fill_gaps(flags: Flags, max_gap_frames: int) -> Flags:
    """Mark as speech the non-speech runs of at most ``max_gap_frames`` between two speech frames."""
    out = flags.copy()
    idx = np.flatnonzero(flags)
    for a, b in zip(idx[:-1], idx[1:], strict=True):
        if 1 < b - a <= max_gap_frames + 1:
            out[a:b] = True
    return out


def labels_from_clean(clean: npt.NDArray[np.float32], active_dbfs: float) -> Flags:
    """Speech labels per 10 ms frame from clean speech (see the module docstring)."""
    count = len(clean) // FRAME_SAMPLES
    power = np.mean(clean[: count * FRAME_SAMPLES].reshape(count, FRAME_SAMPLES).astype(np.float64) ** 2, axis=1)
    level = 10 * np.log10(power + 1e-12)
    return fill_gaps(level > active_dbfs - LABEL_BELOW_ACTIVE_DB, LABEL_FILL_FRAMES)


def build_corpus(count: int | None = None) -> Corpus:
    """The fixed visitor corpus: each utterance at -26 dBFS between 0.8 s silences."""
    from kiosk_dev.speech import corpus, normalise

    gap = np.zeros(int(GAP_SECONDS * RATE_HZ), dtype=np.float32)
    parts = [gap]
    for utterance in corpus(count):
        parts += [normalise(utterance.audio, VISITOR_DBFS), gap]
    clean = np.concatenate(parts)
    clean = clean[: len(clean) // FRAME_SAMPLES * FRAME_SAMPLES]
    return Corpus(clean=clean, labels=labels_from_clean(clean, VISITOR_DBFS))


def mix(clean: npt.NDArray[np.float32], noise_kind: str, snr_db: float, seed: int = _SEED) -> Pcm:
    """Visitor plus a background at ``snr_db`` below the visitor's active level, as int16."""
    from kiosk_dev.roomsim import background

    noise = background(noise_kind, len(clean), seed) * np.float32(10 ** ((VISITOR_DBFS - snr_db) / 20))
    return _to_pcm(clean + noise)


def _to_pcm(audio: npt.NDArray[np.float32]) -> Pcm:
    return to_int16(audio)


def score(detected: Flags, labels: Flags) -> Scores:
    """Frame-level precision, recall and F1 of ``detected`` against ``labels``."""
    n = min(len(detected), len(labels))
    detected, labels = detected[:n], labels[:n]
    tp = float(np.sum(detected & labels))
    precision = tp / max(float(detected.sum()), 1.0)
    recall = tp / max(float(labels.sum()), 1.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return Scores(precision, recall, f1)


class RawWebRtc:
    """webrtcvad alone on 10 ms frames (the baseline the detector is compared with)."""

    def __init__(self, mode: int) -> None:
        import webrtcvad

        self._vad = webrtcvad.Vad(mode)

    def is_speech(self, frame: Pcm) -> bool:
        """The decision of webrtcvad for this frame."""
        return bool(self._vad.is_speech(frame.tobytes(), RATE_HZ))

    def reset(self) -> None:
        """Nothing to forget."""


def run_detector(make: Callable[[], VoiceDetector], pcm: Pcm) -> Flags:
    """Per-frame flags of a fresh detector over ``pcm``."""
    is_speech = make().is_speech
    count = len(pcm) // FRAME_SAMPLES
    frames = pcm[: count * FRAME_SAMPLES].reshape(count, FRAME_SAMPLES)
    return np.fromiter((bool(is_speech(frame)) for frame in frames), dtype=bool, count=count)


def segments(settings: Settings, pcm: Pcm) -> Flags:
    """Frames inside the speech segments the chain reports (what ``kiosk audio process --vad`` writes)."""
    from kiosk.audio.offline import process_arrays

    count = len(pcm) // FRAME_SAMPLES
    result = process_arrays(settings, pcm, np.zeros_like(pcm), echo_canceller=PassThrough())
    out = np.zeros(count, dtype=bool)
    for start, end in result.speech:
        out[round(start * RATE_HZ / FRAME_SAMPLES):round(end * RATE_HZ / FRAME_SAMPLES)] = True
    return out


def streamed(settings: Settings, pcm: Pcm) -> Flags:
    """Frames the gate streams when the controller follows VoiceStarted/VoiceStopped (pass-through AEC)."""
    from kiosk.audio.pipeline import CaptureChain
    from kiosk.events import VoiceStarted, VoiceStopped

    chain = CaptureChain(settings, echo_canceller=PassThrough())
    count = len(pcm) // FRAME_SAMPLES
    frames = pcm[: count * FRAME_SAMPLES].reshape(count, FRAME_SAMPLES)
    silence = np.zeros(FRAME_SAMPLES, dtype=np.int16)
    out = np.zeros(count, dtype=bool)
    preroll = settings.vad.preroll_ms // 10
    for k, frame in enumerate(frames):
        result = chain.process(frame, silence, k * FRAME_SAMPLES / RATE_HZ)
        for event in result.events:
            if isinstance(event, VoiceStarted):
                chain.open_gate()
            elif isinstance(event, VoiceStopped):
                chain.close_gate()
        if result.stream:
            # The stream holds the pre-roll (older frames) and this frame.
            first = max(0, k - len(result.stream) + 1, k - preroll)
            out[first:k + 1] = True
    return out


def _configs(settings: Settings, alternatives: bool) -> list[tuple[str, Callable[[], VoiceDetector]]]:
    from kiosk.audio.vad import WebRtcVoiceDetector

    vad = settings.vad
    configured = f"detector mode {vad.mode}, {vad.frame_ms} ms (configured)"
    items: list[tuple[str, Callable[[], VoiceDetector]]] = [
        (configured, lambda: WebRtcVoiceDetector(vad)),
        (f"webrtcvad mode {vad.mode} alone", lambda: RawWebRtc(vad.mode)),
    ]
    if alternatives:
        alt_mode = 2 if vad.mode != 2 else 3
        alt_frame = 30 if vad.frame_ms != 30 else 10
        items += [
            (f"detector mode {alt_mode}", lambda: WebRtcVoiceDetector(vad.model_copy(update={"mode": alt_mode}))),
            (f"detector {alt_frame} ms frames",
             lambda: WebRtcVoiceDetector(vad.model_copy(update={"frame_ms": alt_frame}))),
        ]
    return items


def _cpu_us_per_frame(step: Callable[[int], object], frames: int) -> float:
    start = time.process_time()
    for k in range(frames):
        step(k)
    return (time.process_time() - start) / frames * 1e6


def accuracy_section(settings: Settings, corpus: Corpus, *, preset: AudioPreset) -> BenchSection:
    """Precision/recall/F1 per noise type and SNR for the configured detector and alternatives."""
    section = BenchSection(
        title="Voice detection: precision / recall / F1 per frame",
        columns=["noise", "SNR dB", "detector", "precision", "recall", "F1", "streamed recall",
                 "streamed precision"])
    snrs = preset.vad_snrs_db or SNRS_DB
    noises = preset.vad_noises or NOISES
    configs = _configs(settings, preset.vad_alternatives)
    segments_at10: list[Scores] = []
    frames_at10: list[Scores] = []
    streamed_at10: list[Scores] = []
    for noise in noises:
        for snr in snrs:
            pcm = mix(corpus.clean, noise, snr)
            target = snr == 10.0 and noise in TARGET_NOISES
            sg = score(segments(settings, pcm), corpus.labels)
            st = score(streamed(settings, pcm), corpus.labels)
            section.rows.append([noise, snr, "speech segments, configured (the VAD's output)", sg.precision,
                                 sg.recall, sg.f1, st.recall, st.precision])
            if target:
                segments_at10.append(sg)
                streamed_at10.append(st)
            for i, (name, make) in enumerate(configs):
                s = score(run_detector(make, pcm), corpus.labels)
                section.rows.append([noise, snr, name, s.precision, s.recall, s.f1, None, None])
                if target and i == 0:
                    frames_at10.append(s)
    if segments_at10:
        worst_recall = min(s.recall for s in segments_at10)
        worst_f1 = min(s.f1 for s in segments_at10)
        section.targets += [
            TargetCheck("VAD recall at 10 dB (speech segments; white, pink; worst)", worst_recall, ">= 0.98",
                        worst_recall >= 0.98),
            TargetCheck("VAD F1 at 10 dB (speech segments; white, pink; worst)", worst_f1, ">= 0.93",
                        worst_f1 >= 0.93),
        ]
    if frames_at10:
        section.notes.append(
            f"Per-frame detector flags at 10 dB (white, pink; worst), for comparison: recall "
            f"{min(s.recall for s in frames_at10):.3f}, F1 {min(s.f1 for s in frames_at10):.3f}.")
    if streamed_at10:
        worst = min(s.recall for s in streamed_at10)
        section.targets.append(TargetCheck("speech streamed at 10 dB (white, pink; worst)", worst, ">= 0.98",
                                           worst >= 0.98))
    section.notes += [
        f"Visitor at {VISITOR_DBFS:.0f} dBFS; labels from the clean speech (frames within "
        f"{LABEL_BELOW_ACTIVE_DB:.0f} dB of the active level, pauses up to {LABEL_FILL_FRAMES * 10} ms filled).",
        "'speech segments': frames from each VoiceStarted.at_seconds (the first detected frame less "
        f"vad.onset_lookback_ms = {settings.vad.onset_lookback_ms} ms) to the following VoiceStopped.at_seconds "
        "(the last speech frame), exactly the intervals `kiosk audio process --vad` writes.",
        "'streamed' columns: the frames the gate sends when the controller opens it at VoiceStarted and closes "
        "it at VoiceStopped (pre-roll and hangover included) - what the agent hears and what is billed.",
        "Per-frame recall is limited by the first frames of each word (the detector is causal) and by weak "
        "consonants under the noise; segments bridge the pauses inside an utterance and date the onset back, "
        "and the pre-roll recovers the onset for the stream.",
    ]
    return section


def distant_section(settings: Settings, *, preset: AudioPreset) -> BenchSection:
    """How often a voice a few metres away (reverberant, quieter) counts as the visitor."""
    from kiosk.audio.vad import Segmenter, WebRtcVoiceDetector
    from kiosk.events import VoiceStarted
    from kiosk_dev.roomsim import background, white_noise

    seconds = preset.distant_seconds
    samples = int(seconds * RATE_HZ)
    talker = background("distant_talker", samples, _SEED)
    hiss = white_noise(samples, _SEED + 1) * np.float32(10 ** (-70 / 20))
    section = BenchSection(
        title="Distant talker: share of frames counted as the visitor, and false VoiceStarted per minute",
        columns=["distant level dBFS", "detector", "speech frames", "VoiceStarted per minute"])
    vad = settings.vad
    variants: list[tuple[str, VadSettings | None]] = [
        (f"webrtcvad mode {vad.mode} alone", None),
        (f"detector, level floor {vad.min_level_dbfs:.0f} dBFS (configured)", vad),
    ]
    if preset.vad_alternatives:
        for floor in (-45.0, -33.0):
            variants.append((f"detector, level floor {floor:.0f} dBFS", vad.model_copy(
                update={"min_level_dbfs": floor})))
    configured_rates: list[float] = []
    for level in DISTANT_DBFS:
        pcm = _to_pcm(talker * np.float32(10 ** (level / 20)) + hiss)
        for name, variant in variants:
            if variant is None:
                flags = run_detector(lambda: RawWebRtc(vad.mode), pcm)
            else:
                flags = run_detector(lambda v=variant: WebRtcVoiceDetector(v), pcm)  # type: ignore[misc]
            segmenter = Segmenter.from_settings(vad)
            starts = sum(1 for k, f in enumerate(flags)
                         if isinstance(segmenter.feed(bool(f), k * FRAME_SAMPLES / RATE_HZ), VoiceStarted))
            share = float(flags.mean())
            section.rows.append([level, name, share, starts / (seconds / 60.0)])
            if variant is vad:
                configured_rates.append(share)
    section.notes += [
        "The distant talker is a voice 3 m away in a reverberant hall (roomsim), 10-14 dB under the visitor "
        f"({VISITOR_DBFS:.0f} dBFS). No target is set; the figure to watch is the configured row.",
        "The level cues (peak level floor and margin over the noise floor) cut distant speech; a louder "
        "neighbour than the floor still counts. Raising vad.min_level_dbfs trades soft visitors for fewer "
        "distant triggers; see docs/vad.md.",
    ]
    return section


def cpu_section(settings: Settings, corpus: Corpus, *, preset: AudioPreset) -> BenchSection:
    """CPU microseconds per 10 ms frame: webrtcvad, the detector, and the whole chain."""
    from kiosk.audio.pipeline import CaptureChain
    from kiosk.audio.vad import WebRtcVoiceDetector

    frames_n = preset.cpu_frames
    pcm = mix(corpus.clean, "pink", 10.0)
    count = min(frames_n, len(pcm) // FRAME_SAMPLES)
    frames = pcm[: count * FRAME_SAMPLES].reshape(count, FRAME_SAMPLES)
    raw = RawWebRtc(settings.vad.mode)
    detector = WebRtcVoiceDetector(settings.vad)
    section = BenchSection(title="CPU per 10 ms frame (process time)", columns=["stage", "us per frame"])
    section.rows.append([f"webrtcvad mode {settings.vad.mode}", _cpu_us_per_frame(
        lambda k: raw.is_speech(frames[k]), count)])
    section.rows.append(["detector (webrtcvad + level cues)", _cpu_us_per_frame(
        lambda k: detector.is_speech(frames[k]), count)])
    # The whole chain on what it meets at a booth: agent speech with its echo, the visitor in double talk.
    from kiosk.audio.format import frames as cut
    from kiosk_dev.roomsim import make_scenario

    scenario = make_scenario(9, seconds=count / 100.0, visitor_spans=[(count / 300.0, count / 150.0)])
    mic = cut(to_int16(scenario.mic))[:count]
    ref = cut(to_int16(scenario.far))[:count]
    passthrough = CaptureChain(settings, echo_canceller=PassThrough())
    section.rows.append(["chain without echo canceller", _cpu_us_per_frame(
        lambda k: passthrough.process(mic[k], ref[k], k / 100.0), count)])
    try:
        chain = CaptureChain(settings)
        canceller = CaptureChain(settings).echo_canceller
    except ImportError as error:
        section.notes.append(f"configured echo canceller not available here ({error}); whole chain not measured")
        return section
    section.rows.append([f"{settings.aec.backend} echo canceller alone", _cpu_us_per_frame(
        lambda k: canceller.process(mic[k], ref[k]), count)])
    whole = _cpu_us_per_frame(lambda k: chain.process(mic[k], ref[k], k / 100.0), count)
    section.rows.append([f"whole chain ({settings.aec.backend} echo canceller)", whole])
    section.targets.append(TargetCheck("whole chain CPU per 10 ms frame (us)", whole, "<= 200", whole <= 200.0))
    section.notes.append("Process time of this process (all its threads) per frame; the chain runs a simulated "
                         "room with agent speech and a visitor in double talk for its middle third.")
    return section


BARGE_IN_SPANS = ((4.0, 6.0), (9.0, 11.5), (14.0, 16.0))
BARGE_IN_ROOMS = (("40 ms", 40.0, 0.0), ("40 ms, 100 ppm", 40.0, 100.0), ("160 ms", 160.0, 0.0))


def _starts(chain: CaptureChain, scenario: Scenario) -> list[float]:
    """Frame times at which the chain emits VoiceStarted over a scenario."""
    from kiosk.audio.format import frames as cut
    from kiosk.events import VoiceStarted

    mic = cut(to_int16(scenario.mic))
    ref = cut(to_int16(scenario.far))
    out: list[float] = []
    for k in range(len(mic)):
        if any(isinstance(e, VoiceStarted) for e in chain.process(mic[k], ref[k], k * 0.01).events):
            out.append(k * 0.01)
    return out


def _onsets(scenario: Scenario) -> list[float]:
    """The first audible frame of each visitor span."""
    from kiosk.audio.format import frames as cut

    near = cut(to_int16(scenario.near)).astype(np.float64)
    level = 10 * np.log10(np.mean(near**2, axis=1) / 32768.0**2 + 1e-12)
    onsets = []
    for start, _ in scenario.near_spans:
        k = int(start * 100)
        while k < len(level) - 1 and level[k] < -50.0:
            k += 1
        onsets.append(k * 0.01)
    return onsets


def duration_text(seconds: float) -> str:
    """A run's length for a row label: whole minutes as minutes ("3 min"), else seconds ("20 s")."""
    return f"{seconds / 60:.0f} min" if seconds >= 60 and seconds % 60 == 0 else f"{seconds:.0f} s"


def barge_in_section(settings: Settings, *, preset: AudioPreset) -> BenchSection:
    """Barge-in through the whole chain on offline rooms: interruptions caught, latency, false starts."""
    from kiosk.audio.pipeline import CaptureChain
    from kiosk_dev.roomsim import make_scenario

    section = BenchSection(
        title=f"Barge-in through the chain, offline rooms ({settings.aec.backend} echo canceller)",
        columns=["room", "interruptions", "caught <= 300 ms", "caught at all", "median latency s",
                 "worst latency s", "false VoiceStarted"])
    seeds = preset.barge_in_seeds
    rooms = [r for r in BARGE_IN_ROOMS if preset.barge_in_rooms is None or r[0] in preset.barge_in_rooms]
    total = caught_300 = false_total = 0
    for label, delay_ms, drift_ppm in rooms:
        latencies: list[float] = []
        false = 0
        for seed in seeds:
            scenario = make_scenario(seed, seconds=20.0, visitor_spans=list(BARGE_IN_SPANS), delay_ms=delay_ms,
                                     drift_ppm=drift_ppm)
            starts = _starts(CaptureChain(settings), scenario)
            for onset in _onsets(scenario):
                after = [s - onset for s in starts if s >= onset]
                latencies.append(min(after) if after else float("inf"))
            false += sum(1 for s in starts
                         if not any(a <= s <= b + settings.vad.hangover_ms / 1000 for a, b in BARGE_IN_SPANS))
        finite = [x for x in latencies if x != float("inf")]
        within = sum(1 for x in latencies if x <= 0.3)
        section.rows.append([label, len(latencies), within, len(finite),
                             float(np.median(finite)) if finite else None, max(finite) if finite else None,
                             false])
        total += len(latencies)
        caught_300 += within
        false_total += false
    # Agent speech with nobody at the kiosk: every VoiceStarted is a false barge-in.
    echo_seconds = preset.barge_in_alone_seconds
    echo_only = make_scenario(5, seconds=echo_seconds, visitor_spans=[], delay_ms=40.0, drift_ppm=100.0)
    idle_false = len(_starts(CaptureChain(settings), echo_only))
    section.rows.append([f"agent alone {duration_text(echo_seconds)}, 100 ppm", 0, None, None, None, None,
                         idle_false])
    share = caught_300 / max(total, 1)
    section.targets += [
        TargetCheck("interruptions caught within 300 ms (offline rooms)", share, ">= 0.9", share >= 0.9),
        TargetCheck("false barge-ins (offline rooms, incl. agent alone)", float(false_total + idle_false), "= 0",
                    false_total + idle_false == 0),
    ]
    section.notes += [
        "Rooms from kiosk_dev.roomsim: agent speech echoed at -22 dBFS, the visitor at -26 dBFS speaking over it "
        "three times per 20 s; latency from the visitor's first audible frame to the frame that emits "
        "VoiceStarted (150 ms minimum speech included).",
        "Live figures through the virtual sound devices are in the live barge-in section when it ran.",
    ]
    return section


def run(settings: Settings, *, quick: bool = False, preset: AudioPreset | None = None) -> list[BenchSection]:
    """All VAD figures as report sections; ``preset`` says how much (without it ``quick`` chooses)."""
    preset = preset or (QUICK if quick else FULL)
    corpus = build_corpus(preset.vad_utterances)
    sections = [accuracy_section(settings, corpus, preset=preset), distant_section(settings, preset=preset),
                barge_in_section(settings, preset=preset)]
    if preset.cpu_frames:
        sections.append(cpu_section(settings, corpus, preset=preset))
    return sections

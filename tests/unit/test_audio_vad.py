from __future__ import annotations

import numpy as np
import pytest

from kiosk.audio.format import FRAME_SAMPLES
from kiosk.audio.vad import Gate, Segmenter, WebRtcVoiceDetector, frame_level_dbfs
from kiosk.events import VoiceStarted, VoiceStopped
from kiosk.settings import Settings, VadSettings
from kiosk_dev import roomsim
from kiosk_dev.bench.vad import Corpus, RawWebRtc, build_corpus, mix, run_detector, score, segments


def _run(flags: str, *, min_speech_ms: float, hangover_ms: float, finish: bool = False,
         onset_lookback_ms: float = 0.0) -> list[tuple[str, float]]:
    """Feed a flag string ('1' speech, '0' silence; one char per 10 ms frame) and list the events."""
    seg = Segmenter(min_speech_ms=min_speech_ms, hangover_ms=hangover_ms, onset_lookback_ms=onset_lookback_ms)
    out: list[tuple[str, float]] = []
    for k, c in enumerate(flags):
        event = seg.feed(c == "1", 100.0 + k * 0.01)  # an arbitrary clock origin: only differences matter
        if event is not None:
            out.append((type(event).__name__, round(event.at_seconds - 100.0, 3)))
    if finish:
        event = seg.finish()
        if event is not None:
            out.append((type(event).__name__, round(event.at_seconds - 100.0, 3)))
    return out


@pytest.mark.parametrize(
    ("flags", "min_speech_ms", "hangover_ms", "expected"),
    [
        # Too short a burst is ignored.
        ("0011000000", 30, 20, []),
        # Exactly the minimum: starts at the first speech frame, stops at the end of the last one.
        ("0011100000", 30, 20, [("VoiceStarted", 0.02), ("VoiceStopped", 0.05)]),
        # A gap shorter than the hangover keeps the segment open.
        ("1110111000", 30, 20, [("VoiceStarted", 0.0), ("VoiceStopped", 0.07)]),
        # A gap as long as the hangover closes it; the second burst opens a new one.
        ("1110011100000", 30, 20,
         [("VoiceStarted", 0.0), ("VoiceStopped", 0.03), ("VoiceStarted", 0.05), ("VoiceStopped", 0.08)]),
        # A silent frame breaks a run below the minimum: neither part counts.
        ("11011000", 30, 20, []),
        # No minimum: the first speech frame starts; no hangover: the first silent frame stops.
        ("0100", 0, 0, [("VoiceStarted", 0.01), ("VoiceStopped", 0.02)]),
        # Never stops within the input while the hangover has not run out.
        ("111100", 30, 50, [("VoiceStarted", 0.0)]),
    ],
)
def test_segmenter_table(flags: str, min_speech_ms: float, hangover_ms: float,
                         expected: list[tuple[str, float]]) -> None:
    assert _run(flags, min_speech_ms=min_speech_ms, hangover_ms=hangover_ms) == expected


def test_segmenter_dates_onsets_back_but_not_into_the_previous_segment() -> None:
    # The first segment moves 30 ms back (not before 0); the second would reach into the first: it starts
    # where the first stopped. The events still come when the minimum speech is reached.
    assert _run("0000011100011100000", min_speech_ms=30, hangover_ms=20, onset_lookback_ms=30) == [
        ("VoiceStarted", 0.02), ("VoiceStopped", 0.08), ("VoiceStarted", 0.08), ("VoiceStopped", 0.14)]
    # Recordings start at 0 s: no segment is dated before that.
    seg = Segmenter(min_speech_ms=30, hangover_ms=20, onset_lookback_ms=50)
    started = [seg.feed(True, k * 0.01) for k in range(3)][-1]
    assert isinstance(started, VoiceStarted) and started.at_seconds == 0.0


def test_segmenter_finish_closes_open_speech_at_its_last_frame() -> None:
    assert _run("0111100", min_speech_ms=30, hangover_ms=500, finish=True) == [
        ("VoiceStarted", 0.01), ("VoiceStopped", 0.05)]
    assert _run("0000", min_speech_ms=30, hangover_ms=500, finish=True) == []


def test_segmenter_with_default_settings_needs_150_ms() -> None:
    settings = VadSettings()
    seg = Segmenter.from_settings(settings)
    events = [seg.feed(True, k * 0.01) for k in range(14)]
    assert all(e is None for e in events)
    started = seg.feed(True, 0.14)
    assert isinstance(started, VoiceStarted) and started.at_seconds == pytest.approx(0.0)
    stops = [seg.feed(False, 0.15 + k * 0.01) for k in range(settings.hangover_ms // 10)]
    assert isinstance(stops[-1], VoiceStopped) and stops[-1].at_seconds == pytest.approx(0.15)
    assert all(e is None for e in stops[:-1])


def _frame(value: int) -> np.ndarray:
    return np.full(FRAME_SAMPLES, value, dtype=np.int16)


def test_gate_releases_the_preroll_oldest_first_then_streams() -> None:
    gate = Gate(preroll_frames=3)
    for v in range(1, 6):  # frames 1..5 while closed: the ring keeps 3, 4, 5
        assert list(gate.process(_frame(v))) == []
    gate.open()
    out = gate.process(_frame(6))
    assert [int(f[0]) for f in out] == [3, 4, 5, 6]
    assert [int(f[0]) for f in gate.process(_frame(7))] == [7]
    gate.close()
    assert list(gate.process(_frame(8))) == []
    gate.open()
    # Only what came after the close is pre-roll: nothing is streamed twice.
    assert [int(f[0]) for f in gate.process(_frame(9))] == [8, 9]


def test_gate_preroll_is_a_copy_and_zero_preroll_works() -> None:
    gate = Gate(preroll_frames=2)
    source = _frame(1)
    gate.process(source)
    source[:] = 99  # the caller reuses its buffer
    gate.open()
    assert [int(f[0]) for f in gate.process(_frame(2))] == [1, 2]
    bare = Gate(preroll_frames=0)
    bare.process(_frame(1))
    bare.open()
    assert [int(f[0]) for f in bare.process(_frame(2))] == [2]


def test_gate_can_open_without_its_preroll() -> None:
    """After the AI notice nothing said before the opening may reach the room."""
    gate = Gate(preroll_frames=3)
    for v in range(1, 5):
        gate.process(_frame(v))
    gate.open(preroll=False)
    assert [int(f[0]) for f in gate.process(_frame(5))] == [5]
    gate.close()
    gate.process(_frame(6))
    gate.open()  # the next opening has its pre-roll again
    assert [int(f[0]) for f in gate.process(_frame(7))] == [6, 7]


def test_gate_open_twice_does_not_release_twice() -> None:
    gate = Gate.from_settings(VadSettings(preroll_ms=20))
    gate.process(_frame(1))
    gate.open()
    assert len(gate.process(_frame(2))) == 2
    gate.open()
    assert len(gate.process(_frame(3))) == 1


def test_frame_level() -> None:
    full = np.full(FRAME_SAMPLES, 32767, dtype=np.float64)
    assert frame_level_dbfs(float(np.dot(full, full))) == pytest.approx(0.0, abs=0.01)
    assert frame_level_dbfs(0.0) == -100.0


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return build_corpus(8)


@pytest.mark.parametrize("noise", ["white", "pink"])
def test_detector_quality_floor_at_10_db(corpus: Corpus, noise: str) -> None:
    # Fixed seeded corpus (espeak-ng sentences at -26 dBFS) with a background 10 dB under it.
    pcm = mix(corpus.clean, noise, 10.0)
    ours = score(run_detector(lambda: WebRtcVoiceDetector(VadSettings()), pcm), corpus.labels)
    raw = score(run_detector(lambda: RawWebRtc(3), pcm), corpus.labels)
    assert ours.recall >= 0.94
    assert ours.f1 >= 0.95
    # The hold and level cues must beat webrtcvad alone on recall, not just match it.
    assert ours.recall >= raw.recall + 0.05


@pytest.mark.parametrize("noise", ["white", "pink"])
def test_speech_segments_meet_the_targets_at_10_db(corpus: Corpus, noise: str) -> None:
    # The VAD's output (the intervals `kiosk audio process --vad` writes) on the fixed corpus: the issue's
    # targets, recall >= 0.98 with F1 >= 0.93 at 10 dB SNR.
    pcm = mix(corpus.clean, noise, 10.0)
    ours = score(segments(Settings(), pcm), corpus.labels)
    assert ours.recall >= 0.98
    assert ours.f1 >= 0.93
    # Without the onset look-back the same detector misses the targets' recall: the look-back is doing work.
    settings = Settings()
    bare = settings.model_copy(update={"vad": settings.vad.model_copy(update={"onset_lookback_ms": 0})})
    assert score(segments(bare, pcm), corpus.labels).recall < ours.recall


def test_detector_ignores_silence_and_hiss() -> None:
    detector = WebRtcVoiceDetector(VadSettings())
    hiss = (roomsim.white_noise(16000 * 3, 1) * 32768 * 10 ** (-70 / 20)).astype(np.int16)
    flags = [detector.is_speech(hiss[i:i + FRAME_SAMPLES]) for i in range(0, len(hiss), FRAME_SAMPLES)]
    assert sum(flags) == 0


def test_distant_talker_is_not_the_visitor() -> None:
    # A voice 3 m away in a reverberant hall, 20 dB under the visitor's -26 dBFS: webrtcvad alone calls a good
    # share of it speech; the detector's level cues must reject it, and no VoiceStarted may follow.
    samples = 16000 * 20
    talker = roomsim.background("distant_talker", samples, 11) * np.float32(10 ** (-46 / 20))
    hiss = roomsim.white_noise(samples, 3) * np.float32(10 ** (-70 / 20))
    pcm = np.clip(np.rint((talker + hiss) * 32768), -32768, 32767).astype(np.int16)
    settings = VadSettings()
    ours = run_detector(lambda: WebRtcVoiceDetector(settings), pcm)
    raw = run_detector(lambda: RawWebRtc(settings.mode), pcm)
    assert raw.mean() > 0.15
    assert ours.mean() < 0.01
    seg = Segmenter.from_settings(settings)
    assert not any(isinstance(seg.feed(bool(f), k * 0.01), VoiceStarted) for k, f in enumerate(ours))


def test_the_same_voice_close_by_is_detected() -> None:
    # The counterpart of the distant-talker test: the level floor must not cost the visitor at the kiosk.
    from kiosk_dev.speech import corpus as speech_corpus
    from kiosk_dev.speech import normalise

    voice = normalise(speech_corpus(1)[0].audio, -32.0)  # a soft visitor, 6 dB under the usual level
    pcm = np.clip(np.rint(voice * 32768), -32768, 32767).astype(np.int16)
    flags = run_detector(lambda: WebRtcVoiceDetector(VadSettings()), pcm)
    assert flags.mean() > 0.5


@pytest.mark.parametrize("frame_ms", [20, 30])
def test_longer_analysis_blocks_hold_their_decision(frame_ms: int) -> None:
    from kiosk_dev.speech import corpus as speech_corpus
    from kiosk_dev.speech import normalise

    voice = normalise(speech_corpus(2)[1].audio, -26.0)
    audio = np.concatenate([np.zeros(8000, np.float32), voice])
    pcm = np.clip(np.rint(audio * 32768), -32768, 32767).astype(np.int16)
    detector = WebRtcVoiceDetector(VadSettings(frame_ms=frame_ms))
    flags, raw = [], []
    for i in range(0, len(pcm) - FRAME_SAMPLES + 1, FRAME_SAMPLES):
        flags.append(detector.is_speech(pcm[i:i + FRAME_SAMPLES]))
        raw.append(detector.raw_speech)
    block = frame_ms // 10
    assert not any(flags[:50])  # the leading half second of silence
    assert np.mean(flags) > 0.3
    # webrtcvad runs once per analysis block: its decision can only change where a block completes.
    changes = np.flatnonzero(np.diff(np.array(raw, dtype=int))) + 1
    assert changes.size and all((c + 1) % block == 0 for c in changes)

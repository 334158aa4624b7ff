"""The room corpus (kiosk_dev.rooms): seeded, labelled consistently, and its harness's figures right.

Fast and deterministic: rooms of 10 s from a small speech pool (the generator's own code, only shorter and
with less to say), the spec of every corpus room (no audio), and constructed cases for the metrics. No
timing is asserted.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from kiosk.audio.aec import PassThrough
from kiosk.audio.format import FRAME_SAMPLES, RATE_HZ, Pcm
from kiosk.audio.offline import load_pair
from kiosk.settings import Settings
from kiosk_dev import speech
from kiosk_dev.rooms import bench, generate, metrics, systems, voices
from kiosk_dev.rooms.generate import Pools, Room

SECONDS = 10.0
SEEDS = (15, 9)  # a talker room and a television room, both in the reporting half


@pytest.fixture(scope="module")
def pools() -> Pools:
    said = [("Wait, where is the exit please?", "en-us", "en"),
            ("Moment bitte, wo ist der Ausgang?", "de", "de"),
            ("Excusez-moi, une petite question.", "fr-fr", "fr")]
    visitor = [speech.Utterance(f"test:{i}", voices.trim(speech.espeak(text, voice)), lang, "espeak")
               for i, (text, voice, lang) in enumerate(said)]
    visitor += voices.alsa_voices()[:2]  # real speech where alsa-utils is installed
    agent = speech.Utterance("test:agent", voices.trim(speech.espeak(
        "The exhibition is open every day from ten in the morning until six in the evening.", "en-us")))
    return Pools(tuple(visitor), (agent,))


def tiny_room(seed: int, pools: Pools) -> Room:
    spec = dataclasses.replace(generate.draw_spec(seed), seconds=SECONDS)
    return generate.render(spec, pools, first_interruption_s=(1.0, 1.5))


@pytest.fixture(scope="module")
def rooms(pools: Pools) -> dict[int, Room]:
    return {seed: tiny_room(seed, pools) for seed in SEEDS}


# ------------------------------------------------------------------------------------------ seeded
def test_the_same_seed_renders_the_same_samples(rooms: dict[int, Room], pools: Pools) -> None:
    again = tiny_room(SEEDS[0], pools)
    first = rooms[SEEDS[0]]
    for part in ("mics", "ref", "visitor", "echo0", "noise0"):
        assert np.array_equal(getattr(first, part), getattr(again, part)), part
    assert again.labels == first.labels
    other = rooms[SEEDS[1]]
    assert not np.array_equal(first.ref, other.ref)
    assert first.mics.shape == (generate.MICS, int(SECONDS * RATE_HZ)) and first.mics.dtype == np.int16


def test_the_spec_of_every_corpus_room_is_seeded_and_split_by_parity() -> None:
    for seed in range(80):
        spec = generate.draw_spec(seed)
        assert spec == generate.draw_spec(seed)
        assert spec.split == ("tuning" if seed % 2 == 0 else "reporting")
        assert spec.room_class == generate.CLASSES[(seed // 2) % 8]
    assert generate.seeds_for(16, "reporting") == list(range(1, 16, 2))
    assert generate.seeds_for(16, "tuning") == list(range(0, 16, 2))
    # Any 16 consecutive seeds hold every class in both halves.
    assert {(generate.room_class(s), generate.room_split(s)) for s in range(16)} == {
        (c, h) for c in generate.CLASSES for h in ("tuning", "reporting")}


def test_backgrounds_stand_farther_away_than_the_visitor_and_everything_is_inside_the_room() -> None:
    for seed in range(80):
        spec = generate.draw_spec(seed)
        dims = np.array(spec.dims_m)
        assert 0.5 <= spec.visitor_distance_m <= 2.5 * 1.05  # horizontal distance drawn, plus the height
        for point in [spec.visitor_position, spec.speaker_position, *(s.position for s in spec.sources)]:
            assert np.all(np.array(point) > 0) and np.all(np.array(point) < dims)
        assert spec.sources
        for source in spec.sources:
            if source.kind != "noise":  # point sources: talkers, a television, a machine, a music speaker
                assert source.distance_m > spec.visitor_distance_m + 0.3, (seed, source)
            else:
                assert spec.room_class in ("quiet", "pink", "white")


# ------------------------------------------------------------------------------------------ labels
def test_interruption_onsets_lie_inside_the_visitors_speech(rooms: dict[int, Room]) -> None:
    for room in rooms.values():
        interruptions = room.labels["interruptions"]
        assert len(interruptions) >= 2
        labels = metrics.room_labels(room)
        assert len(labels.onsets) == len(interruptions)
        visitor = room.visitor[0].astype(np.float64)
        first = int(interruptions[0]["start_s"] * RATE_HZ)
        assert not visitor[:first].any()  # the visitor is silent before the first interruption
        for onset, it in zip(labels.onsets, interruptions, strict=True):
            assert it["start_s"] < it["end_s"] <= SECONDS
            assert it["start_s"] <= onset * metrics.FRAME_S <= it["end_s"]
            assert labels.visitor_speech[onset] and not labels.visitor_silent[onset]
        # Speech labels only around interruptions; agent-only frames never while the visitor speaks.
        spans = np.zeros(labels.frames, dtype=bool)
        for it in interruptions:
            spans[int(it["start_s"] / metrics.FRAME_S):int(math.ceil(it["end_s"] / metrics.FRAME_S)) + 10] = True
        assert not (labels.visitor_speech & ~spans).any()
        assert not (labels.agent_only & labels.visitor_speech).any()
        assert labels.agent_only.any()


def test_a_room_written_as_wavs_reads_back(rooms: dict[int, Room], tmp_path: Path) -> None:
    room = rooms[SEEDS[0]]
    generate.write_wavs(room, tmp_path / "room")
    mic, ref = load_pair(tmp_path / "room" / "mic.wav", tmp_path / "room" / "ref.wav", mic_channel=2)
    assert np.array_equal(mic, room.mics[2]) and np.array_equal(ref, room.ref)


# ------------------------------------------------------------------------------------------ metrics
class _Constant:
    """A VoiceDetector that always (or never) hears speech."""

    def __init__(self, speech: bool) -> None:
        self.speech = speech

    def is_speech(self, frame: Pcm) -> bool:
        return self.speech

    def reset(self) -> None:
        return None


def constructed_room() -> Room:
    """10 s: the agent from 0.5 to 9.5 s, the visitor from 3 to 4 s and from 6 to 7 s, nothing else."""
    n = 10 * RATE_HZ
    rng = np.random.default_rng(0)
    echo = np.zeros(n)
    echo[RATE_HZ // 2:n - RATE_HZ // 2] = rng.standard_normal(n - RATE_HZ) * 1000
    visitor = np.zeros((generate.MICS, n))
    spans = [(3.0, 4.0), (6.0, 7.0)]
    for a, b in spans:
        visitor[:, int(a * RATE_HZ):int(b * RATE_HZ)] = rng.standard_normal(int((b - a) * RATE_HZ)) * 3000
    mics = np.rint(visitor + echo).astype(np.int16)
    spec = dataclasses.replace(generate.draw_spec(1), seconds=10.0)
    labels = {"interruptions": [{"start_s": a, "end_s": b, "language": "en", "source": "constructed"}
                                for a, b in spans]}
    return Room(spec=spec, mics=mics, ref=np.rint(echo).astype(np.int16), visitor=np.rint(visitor).astype(np.int16),
                echo0=np.rint(echo).astype(np.int16), noise0=np.zeros(n, dtype=np.int16), labels=labels)


def _figures(room: Room, speech_on: bool) -> dict[str, object]:
    run = systems.run_baseline(room, PassThrough(), Settings(), detector=_Constant(speech_on))
    return metrics.room_figures(room, metrics.room_labels(room), run)


def test_the_labels_of_the_constructed_room() -> None:
    labels = metrics.room_labels(constructed_room())
    assert labels.onsets == [300, 600]
    assert labels.visitor_speech.sum() == 200  # both seconds of speech, nothing else
    # The agent's 9 s minus the visitor's turns widened to [start - 0.1 s, end + 0.5 s]: 9.0 - 2 x 1.6 s.
    assert labels.agent_only.sum() == 580


def test_a_detector_always_on_catches_everything_and_is_false_all_the_agent_only_time() -> None:
    room = constructed_room()
    fig = _figures(room, speech_on=True)
    assert fig["recall"] == 1.0
    assert fig["false_speech_s"] == pytest.approx(5.8)
    assert [i["caught"] for i in fig["interruptions"]] == [True, True]  # type: ignore[attr-defined]
    assert [i["latency_s"] for i in fig["interruptions"]] == [0.01, 0.01]  # type: ignore[attr-defined]
    total = metrics.aggregate([fig])  # type: ignore[list-item]
    assert total["false_speech_s_per_min"] == pytest.approx(60.0)  # every second of agent-only time
    assert total["caught_300ms"] == 1.0 and total["median_latency_s"] == 0.01
    assert fig["erle_db"] == pytest.approx(0.0)  # nothing cancelled: the output is the microphone


def test_a_detector_never_on_catches_nothing_and_is_never_false() -> None:
    fig = _figures(constructed_room(), speech_on=False)
    total = metrics.aggregate([fig])  # type: ignore[list-item]
    assert fig["recall"] == 0.0 and fig["false_speech_s"] == 0.0 and fig["false_starts"] == 0
    assert total["caught_300ms"] == 0.0 and total["caught_at_all"] == 0.0
    assert total["median_latency_s"] is None and total["false_speech_s_per_min"] == 0.0


def test_targets_judge_both_constructed_detectors() -> None:
    room = constructed_room()
    rows = []
    for name, on in (("chain", True), ("aec3+ns/webrtcvad", False)):
        fig = _figures(room, speech_on=on)
        rows.append({**fig, "system": name})
    summary = bench.summarise(rows, ["chain", "aec3+ns/webrtcvad"], "reporting")
    met = {t.name.split(" (")[0].split(",")[0]: t.met for t in bench.targets(summary)}
    assert met["interruptions reported within 300 ms"] is True
    assert met["false speech per minute of agent speech"] is False
    assert met["ERLE minus AEC3+NS's"] is True  # the same pass-through: 0 dB each


# ------------------------------------------------------------------------------------------ harness
def test_the_report_puts_the_baselines_beside_the_chain_per_class(rooms: dict[int, Room]) -> None:
    settings = Settings()
    rows = []
    for room in rooms.values():
        labels = metrics.room_labels(room)
        for name in bench.DEFAULT_SYSTEMS:
            fig = metrics.room_figures(room, labels, systems.SYSTEMS[name].run(room, settings))
            rows.append({**fig, "system": name})
    summary = bench.summarise(rows, bench.DEFAULT_SYSTEMS, "reporting")
    main, by_ser, cpu = bench.sections(summary, bench.DEFAULT_SYSTEMS, rooms=16, split="reporting")
    quality = [bench.CHAIN, bench.AEC3_BASELINE, bench.SPEEX_BASELINE]
    assert [row[:2] for row in main.rows[:3]] == [["all", name] for name in quality]
    assert [row[:2] for row in main.rows[3:]] == [[c, name] for c in ("tv", "talker") for name in quality]
    assert len(main.targets) == 4 and all(isinstance(t.value, float) for t in main.targets)
    assert by_ser.rows and all(str(row[0]).startswith("SER ") for row in by_ser.rows)
    assert [row[0] for row in cpu.rows] == list(bench.DEFAULT_SYSTEMS)
    assert cpu.rows[-1][2] == 1.0  # one bare AEC3 call is the unit


def test_a_variant_that_needs_what_is_not_installed_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("onnxruntime", "silero_vad") else real(name, *a))
    reason = bench.unavailable(["chain", "chain bf+silero 0.25"])
    assert list(reason) == ["chain bf+silero 0.25"]
    assert "pip install onnxruntime && pip install --no-deps silero-vad" in reason["chain bf+silero 0.25"]
    assert systems.missing("no such system") is not None


def test_results_are_cached_under_the_code_and_the_settings() -> None:
    base = bench.code_hash("chain", Settings())
    assert bench.code_hash("aec3+ns/webrtcvad", Settings()) == base  # same code, same settings
    assert bench.code_hash("chain", Settings(vad={"barge_in_learn_talk": False})) != base
    assert bench.code_hash("chain bf", Settings()) != base  # variants also hash the array front end


def test_the_frame_is_the_products() -> None:
    assert metrics.FRAME == FRAME_SAMPLES and generate.FRAME == FRAME_SAMPLES


def test_why_counts_a_reason_for_every_frame_and_agrees_on_what_was_caught(rooms: dict[int, Room]) -> None:
    from kiosk_dev.rooms import why

    settings = Settings()
    window = int(metrics.DETECT_S / metrics.FRAME_S)
    missed = []
    for room in rooms.values():
        found = why.explain(room, settings)
        run = systems.SYSTEMS[bench.CHAIN].run(room, settings)
        figures = metrics.room_figures(room, metrics.room_labels(room), run)
        assert [item.caught for item in found] == [i["caught"] for i in figures["interruptions"]]
        for item in found:
            assert sum(item.reasons.values()) == window and set(item.reasons) <= set(why.REASONS)
        missed += [item for item in found if not item.caught]
    assert sum(why.summary(missed).values()) == len(missed) * window

"""kiosk_dev.bench.compare: two benchmark reports agree on the quality figures, never on the timing ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from kiosk_dev.bench import compare


def _report(erle_db: float, to_20_db_s: float, f1: float, cpu_us: float, delay_ms: float = 43.0) -> dict[str, Any]:
    return {"command": "kiosk bench audio --quick --no-live --json", "sections": [
        {"title": "Echo cancellation", "columns": ["configuration", "ERLE steady dB", "to 20 dB s", "CPU us/frame",
                                                   "delay est. ms"],
         "rows": [["hybrid", erle_db, to_20_db_s, cpu_us, delay_ms], ["none", None, None, 1.0, None]],
         "targets": [{"name": "ERLE steady (dB)", "value": erle_db, "target": ">= 45 dB", "met": True},
                     {"name": "whole chain CPU per 10 ms frame (us)", "value": cpu_us, "target": "<= 200",
                      "met": False}], "notes": []},
        {"title": "Voice detection", "columns": ["noise", "F1"], "rows": [["white 10 dB", f1]], "targets": [],
         "notes": []}]}


def test_timing_figures_are_never_compared() -> None:
    differences, compared, only = compare.compare(_report(50.0, 0.4, 0.95, 600.0), _report(50.0, 0.4, 0.95, 9000.0))
    assert differences == [] and only == []
    assert compared == 8  # 2 rows x 3 quality columns, one target, one F1; no CPU figure
    assert not any("CPU" in where for where in compare.figures(_report(50.0, 0.4, 0.95, 1.0)))


def test_a_quality_difference_is_reported() -> None:
    differences, _, _ = compare.compare(_report(50.0, 0.4, 0.95, 600.0), _report(47.5, 0.4, 0.90, 600.0))
    assert {d.where for d in differences} == {"Echo cancellation / row 1 (hybrid) / ERLE steady dB",
                                             "Voice detection / row 1 (white 10 dB) / F1"}


def test_rows_with_the_same_label_are_all_compared() -> None:
    a, b = _report(50.0, 0.4, 0.95, 600.0), _report(50.0, 0.4, 0.95, 600.0)
    for report, f1 in ((a, 0.95), (b, 0.80)):
        report["sections"][1]["rows"].append(["white 10 dB", f1])
    assert [d.where for d in compare.compare(a, b)[0]] == ["Voice detection / row 2 (white 10 dB) / F1"]


def test_tolerance_dB_absolute_seconds_relative() -> None:
    assert compare.within("ERLE steady dB", 50.0, 50.9) and not compare.within("ERLE steady dB", 50.0, 51.1)
    # A time to reach 20 dB is seconds, relative: 5%.
    assert compare.within("to 20 dB s", 1.00, 1.04) and not compare.within("to 20 dB s", 1.00, 1.2)
    assert compare.within("F1", 0.95, 0.96) and not compare.within("F1", 0.95, 0.90)


def test_a_missing_value_against_a_number_differs() -> None:
    a, b = _report(50.0, 0.4, 0.95, 600.0), _report(50.0, 0.4, 0.95, 600.0)
    b["sections"][0]["rows"][0][1] = None
    assert [d.where for d in compare.compare(a, b)[0]] == ["Echo cancellation / row 1 (hybrid) / ERLE steady dB"]


def test_diff_command_exit_status(tmp_path: Path) -> None:
    same_a, same_b, other = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    same_a.write_text(json.dumps(_report(50.0, 0.4, 0.95, 600.0)))
    same_b.write_text(json.dumps(_report(50.3, 0.41, 0.951, 12000.0)))
    other.write_text(json.dumps(_report(40.0, 0.4, 0.95, 600.0)))
    assert compare.main(["diff", str(same_a), str(same_b)]) == 0
    assert compare.main(["diff", str(same_a), str(other)]) == 1
    (tmp_path / "bad.json").write_text("{not json")
    assert compare.main(["diff", str(same_a), str(tmp_path / "bad.json")]) == 2
    empty = tmp_path / "empty.json"
    empty.write_text('{"sections": []}')
    assert compare.main(["diff", str(empty), str(empty)]) == 1  # nothing compared is no evidence
    (tmp_path / "other.json").write_text('{"sections": [{"title": 1}]}')
    assert compare.main(["diff", str(same_a), str(tmp_path / "other.json")]) == 2


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.recursive(st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=12))
def test_diff_of_any_json_never_crashes(tmp_path_factory: Any, data: Any) -> None:
    """A report that is not a benchmark report gives exit status 1 or 2 with a message, never a traceback."""
    path = tmp_path_factory.mktemp("r") / "r.json"
    path.write_text(json.dumps(data))
    assert compare.main(["diff", str(path), str(path)]) in (0, 1, 2)


def test_a_moment_in_the_recording_is_compared_to_three_frames() -> None:
    assert compare.within("starts at s", 5.01, 5.03) and not compare.within("starts at s", 5.01, 5.05)
    # Not 5% of the value: a segment that starts 0.2 s later at 5 s is a different segment start.
    assert not compare.within("ends at s", 5.0, 5.2)


def test_the_target_preset_selects_what_exists() -> None:
    """A label that names nothing would silently shrink the comparison: every one must exist."""
    from kiosk_dev.bench import FULL, PRESETS, QUICK, TARGET, aec, vad
    from kiosk_dev.roomsim import NOISE_KINDS

    assert set(PRESETS) == {"full", "quick", "target"}
    labels = {label for label, _, _ in aec.configurations(quick=True)}
    assert TARGET.aec_configurations is not None and set(TARGET.aec_configurations) <= labels
    assert "none" in TARGET.aec_configurations  # the baseline row: what the room alone gives
    rooms = {label for label, _, _ in vad.BARGE_IN_ROOMS}
    assert TARGET.barge_in_rooms is not None and set(TARGET.barge_in_rooms) <= rooms
    assert TARGET.vad_noises is not None and set(TARGET.vad_noises) <= set(NOISE_KINDS)
    assert TARGET.cpu_frames == 0  # CPU figures under emulation are not evidence
    # The agent-alone row's label says its length (the target's 20 s is not "0 min").
    assert [vad.duration_text(p.barge_in_alone_seconds) for p in (FULL, QUICK, TARGET)] == ["3 min", "1 min", "20 s"]
    # The quick and full runs are unchanged by the presets.
    assert (QUICK.aec_seconds, QUICK.aec_seeds, QUICK.vad_utterances, QUICK.barge_in_seeds) == (12.0, (0,), 8, (0, 1))
    assert (FULL.aec_seconds, FULL.aec_seeds, FULL.aec_unaligned, FULL.barge_in_alone_seconds) == (
        20.0, (0, 1, 2), True, 180.0)


def test_kiosk_audio_process_figures_on_the_fixed_pair(tmp_path: Path) -> None:
    """Untouched microphone audio has no ERLE; the chain's output has a lot, and its speech segments are read."""
    from kiosk.audio.format import read_wav, to_int16, write_wav
    from kiosk.audio.offline import process_files
    from kiosk.settings import Settings

    compare.write_process_inputs(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"mic.wav", "ref.wav", "near.wav", "truth.json", "kiosk.toml"}
    process_files(Settings(), tmp_path / "mic.wav", tmp_path / "ref.wav", tmp_path / "out.wav",
                  vad_path=tmp_path / "vad.json")
    figures = {row[0]: row for row in compare.process_section(tmp_path, tmp_path / "out.wav",
                                                              tmp_path / "vad.json").rows}
    assert figures["ERLE far end only dB"][1] > 30.0
    assert figures["speech segments"][1] >= 1 and "segment 1" in figures
    # The microphone itself as the "output": no echo removed.
    (tmp_path / "none.json").write_text('{"speech": []}')
    raw = {row[0]: row for row in compare.process_section(tmp_path, tmp_path / "mic.wav", tmp_path / "none.json").rows}
    assert abs(raw["ERLE far end only dB"][1]) < 0.1 and raw["speech segments"][1] == 0
    # The report and its comparison: the same output agrees with itself, a different one does not.
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert compare.main(["process-report", str(tmp_path), str(tmp_path / "out.wav"), str(tmp_path / "vad.json"),
                         str(a)]) == 0
    write_wav(tmp_path / "louder.wav", to_int16(read_wav(tmp_path / "out.wav").samples[:, 0] * 4.0))
    assert compare.main(["process-report", str(tmp_path), str(tmp_path / "louder.wav"), str(tmp_path / "vad.json"),
                         str(b), "--against", str(tmp_path / "out.wav")]) == 0
    assert compare.main(["diff", str(a), str(a)]) == 0
    assert compare.main(["diff", str(a), str(b)]) == 1  # 12 dB more residual echo
    (tmp_path / "bad.json").write_text('{"speech": [[1.0]]}')
    assert compare.main(["process-report", str(tmp_path), str(tmp_path / "out.wav"), str(tmp_path / "bad.json"),
                         str(b)]) == 2

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path

import numpy as np
import pytest

from kiosk.__main__ import main
from kiosk.audio.format import to_int16, write_wav
from kiosk.settings import Settings
from kiosk_dev import roomsim
from kiosk_dev.bench import BenchSection, TargetCheck, recordings, report

WHEN = dt.datetime(2026, 5, 4, 12, 30, tzinfo=dt.UTC)
MACHINE = {"cpu": "Test CPU", "cores": "2", "os": "Linux 6", "python": "3.11.7", "machine": "x86_64"}


def _sections() -> list[BenchSection]:
    return [
        BenchSection(title="Echo", columns=["backend", "ERLE dB"], rows=[["speex", 31.2], ["aec3", None]],
                     targets=[TargetCheck("ERLE steady", 31.2, ">= 45 dB", False)], notes=["a note"]),
        BenchSection(title="VAD", columns=["noise", "F1"], rows=[["white", 0.97]],
                     targets=[TargetCheck("F1 at 10 dB", 0.97, ">= 0.93", True)]),
    ]


def test_markdown_has_machine_date_command_and_a_target_summary() -> None:
    text = report.render_markdown(_sections(), command="kiosk bench audio --quick", when=WHEN, machine=MACHINE)
    assert text.startswith("## Audio\n")
    assert "2026-05-04 12:30 UTC" in text and "`kiosk bench audio --quick`" in text
    assert "Test CPU, 2 cores, Linux 6, Python 3.11.7" in text
    assert "Targets met: 1 of 2." in text
    assert "- ERLE steady: 31.2 (target >= 45 dB)" in text
    assert "| speex | 31.2 |" in text and "| aec3 | - |" in text
    assert text.index("### Echo") < text.index("### VAD")
    assert "| ERLE steady | 31.2 | >= 45 dB | **NO** |" in text


def test_write_replaces_only_its_own_section(tmp_path: Path) -> None:
    path = tmp_path / "performance.md"
    report.write_markdown(path, _sections(), command="first", when=WHEN, machine=MACHINE)
    assert path.read_text().startswith("# Measured performance\n\n## Audio\n")
    with path.open("a") as handle:
        handle.write("\n## Link\n\nlink figures stay\n")
    report.write_markdown(path, _sections()[:1], command="second", when=WHEN, machine=MACHINE)
    text = path.read_text()
    assert text.count("## Audio") == 1 and text.count("## Link") == 1
    assert "`second`" in text and "`first`" not in text
    assert "### VAD" not in text  # the old audio tables went with the old section
    assert text.index("## Audio") < text.index("## Link") and text.endswith("link figures stay\n")


def test_json_is_plain_data_and_nan_becomes_null() -> None:
    sections = _sections()
    sections[1].rows.append(["pink", float("nan")])
    data = json.loads(report.dumps(report.to_json(sections, command="c", when=WHEN, machine=MACHINE)))
    assert data["date"] == "2026-05-04T12:30:00+00:00"
    assert data["machine"]["cores"] == "2"
    assert data["sections"][1]["rows"][1] == ["pink", None]
    assert data["sections"][0]["targets"][0] == {"name": "ERLE steady", "value": 31.2, "target": ">= 45 dB",
                                                  "met": False}


def test_write_creates_the_file_and_machine_description_is_this_machine(tmp_path: Path) -> None:
    path = tmp_path / "docs" / "performance.md"
    report.write_markdown(path, _sections(), command="kiosk bench audio", when=WHEN)
    text = path.read_text()
    assert f"{os.cpu_count()} cores" in text
    assert f"Python {platform.python_version()}" in text


def test_bench_audio_command_wires_parts_and_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[str] = []

    def fake(part: str) -> object:
        def run(settings: Settings, quick: bool = False, preset: object = None) -> list[BenchSection]:
            assert preset is None  # kiosk bench audio sizes by --quick; presets are for the target comparison
            calls.append(part)
            return [BenchSection(title=f"{part} quick={quick}", columns=["x"], rows=[[1]])]
        return run

    for part in ("aec", "vad", "bargein"):
        monkeypatch.setattr(f"kiosk_dev.bench.{part}.run", fake(part))
    config = tmp_path / "kiosk.toml"
    config.write_text("")
    out = tmp_path / "perf.md"
    assert main(["--config", str(config), "bench", "audio", "--quick", "--write", str(out)]) == 0
    text = out.read_text()
    assert calls == ["aec", "vad", "bargein"]
    assert text.index("### aec quick=True") < text.index("### vad quick=True") < text.index("### bargein quick=True")
    assert "### vad quick=True" in capsys.readouterr().out

    calls.clear()
    assert main(["--config", str(config), "bench", "audio", "--no-live", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["title"] for s in data["sections"]] == ["aec quick=False", "vad quick=False", "Not measured in this run"]
    assert calls == ["aec", "vad"]


def test_bench_audio_rejects_a_missing_recordings_directory(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "kiosk.toml"
    config.write_text("")
    status = main(["--config", str(config), "bench", "audio", "--recordings", str(tmp_path / "nope")])
    assert status == 2
    assert "is not a directory" in capsys.readouterr().err


def test_bench_audio_rooms_runs_the_room_corpus_and_writes_its_own_section(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[dict[str, object]] = []

    def fake(settings: Settings, **kwargs: object) -> list[BenchSection]:
        calls.append(kwargs)
        return [BenchSection(title="Rooms: per class", columns=["class"], rows=[["all"]],
                             targets=[TargetCheck("false speech", 2.7, "<= 0.5", False)])]

    monkeypatch.setattr("kiosk_dev.rooms.bench.run", fake)
    config = tmp_path / "kiosk.toml"
    config.write_text("")
    out = tmp_path / "performance.md"
    out.write_text("# Measured performance\n\n## Audio\n\naudio figures stay\n\n## Rooms\n\nold rooms\n\n"
                   "## Link\n\nlink figures stay\n")
    assert main(["--config", str(config), "bench", "audio", "--rooms", "4", "--split", "tuning", "--jobs", "2",
                 "--write", str(out)]) == 0
    assert calls == [{"rooms": 4, "quick": False, "jobs": 2, "split": "tuning"}]
    text = out.read_text()
    assert "old rooms" not in text and "### Rooms: per class" in text
    assert "audio figures stay" in text and text.endswith("link figures stay\n")
    assert text.index("## Audio") < text.index("## Rooms") < text.index("## Link")
    assert "## Rooms" in capsys.readouterr().out
    assert main(["--config", str(config), "bench", "audio", "--rooms", "80", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sections"][0]["title"] == "Rooms: per class"
    assert calls[-1] == {"rooms": 80, "quick": False, "jobs": 1, "split": "reporting"}


@pytest.mark.parametrize(("args", "message"), [
    (["--split", "tuning"], "go with --rooms N"),
    (["--jobs", "2"], "go with --rooms N"),
    (["--rooms", "0"], "must be 1 or more"),
    (["--rooms", "4", "--recordings", "."], "separate runs"),
])
def test_bench_audio_rooms_options_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                               message: str) -> None:
    config = tmp_path / "kiosk.toml"
    config.write_text("")
    assert main(["--config", str(config), "bench", "audio", *args]) == 2
    assert message in capsys.readouterr().err


def test_recordings_figures(tmp_path: Path) -> None:
    scenario = roomsim.make_scenario(4, seconds=10, visitor_spans=[(5.0, 8.0)])
    full = tmp_path / "booth" / "full"
    bare = tmp_path / "booth" / "bare"
    for folder in (full, bare):
        write_wav(folder / "mic.wav", to_int16(scenario.mic))
        write_wav(folder / "ref.wav", to_int16(scenario.far))
    write_wav(full / "near.wav", to_int16(scenario.near))
    (full / "labels.json").write_text(json.dumps({"speech": [[5.0, 8.0]]}))
    (tmp_path / "booth" / "not-a-recording").mkdir()
    # speex: its double talk keeps the visitor whole, so the SDR floor below checks the measurement.
    sections = recordings.run(Settings(aec={"backend": "speex"}), tmp_path / "booth")
    rows = {row[0]: row for row in sections[0].rows}
    assert set(rows) == {"full", "bare"}
    name, seconds, erle, sdr, precision, recall, f1, segments, delay, _drift = rows["full"]
    assert seconds == pytest.approx(10.0)
    assert erle is not None and erle > 15.0
    assert sdr is not None and sdr > 5.0
    assert precision is not None and precision > 0.8
    assert recall is not None and recall > 0.4  # double talk: the canceller holds back part of the visitor
    assert segments >= 1
    assert delay is not None and abs(float(delay) - scenario.delay_ms) < 5.0
    assert rows["bare"][3] is None and rows["bare"][6] is None  # no near.wav, no labels.json
    assert rows["bare"][2] is not None  # ERLE needs only mic and ref


def test_a_multi_channel_recording_is_taken_as_audio_channel_says(tmp_path: Path) -> None:
    scenario = roomsim.make_scenario(4, seconds=6, visitor_spans=[(3.0, 5.0)])
    mic = to_int16(scenario.mic)
    write_wav(tmp_path / "mono" / "one" / "mic.wav", mic)
    write_wav(tmp_path / "array" / "one" / "mic.wav", np.stack([np.zeros_like(mic), mic, mic // 2], axis=1))
    for kind in ("mono", "array"):
        write_wav(tmp_path / kind / "one" / "ref.wav", to_int16(scenario.far))
    settings = Settings(aec={"backend": "speex"}, audio={"channel": 1})
    mono = recordings.run(settings, tmp_path / "mono")[0].rows
    array = recordings.run(settings, tmp_path / "array")[0].rows
    assert array == mono  # channel 1 of the array file is the mono recording


def test_sdr_forgives_latency_and_gain_but_not_added_noise() -> None:
    rng = np.random.default_rng(0)
    near = (rng.standard_normal(16000) * 3000).astype(np.int16)
    noise = rng.standard_normal(16000) * 300  # 20 dB under the visitor
    out = np.zeros(16000, dtype=np.float64)
    out[223:] = 0.5 * near[:-223]  # a canceller's latency and a fixed attenuation
    mask = np.ones(16000, dtype=bool)
    mask[-300:] = False  # the shifted output has no samples for the last few milliseconds
    clean = recordings.sdr_db(np.rint(out).astype(np.int16), near, mask)
    noisy = recordings.sdr_db(np.rint(out + 0.5 * noise).astype(np.int16), near, mask)
    assert clean > 40.0
    assert noisy == pytest.approx(20.0, abs=1.0)


def test_recordings_labels_errors(tmp_path: Path) -> None:
    bad = tmp_path / "labels.json"
    bad.write_text('{"speech": [[1.0]]}')
    with pytest.raises(Exception, match="not a labels file"):
        recordings.read_labels(bad, 100)
    good = tmp_path / "good.json"
    good.write_text('{"speech": [[0.1, 0.25]]}')
    flags = recordings.read_labels(good, 100)
    assert np.flatnonzero(flags).tolist() == list(range(10, 25))

"""The fleet's figures on the kiosk: stable metric names (the exposition against the documented list), identity,
the barge-in judge, the doctor's kept sweep, the update state, and the app publishing them."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from fixtures.fallback import OperatorKeys
from fixtures.tryboot import scratch_root
from kiosk.app import Kiosk
from kiosk.audio.doctor import (
    LoopbackFigures,
    SweepRecord,
    loopback_checks,
    read_sweep_record,
    recommend,
    sweep_record,
    write_sweep_record,
)
from kiosk.bargein import FALSE_WINDOW_SECONDS, MIN_REJECTED_FRAMES, BargeInJudge
from kiosk.checks import Check, Report, Verdict
from kiosk.doctor import keep_sweep
from kiosk.effects import InterruptAgent
from kiosk.events import Button, ButtonPressed, VoiceStarted, VoiceStopped
from kiosk.fallback.spool import Spool, publish_stats
from kiosk.metrics import FILE_FIGURES, Metrics, Status
from kiosk.settings import InteractionMode, MetricsSettings, Settings, SpoolSettings
from kiosk.state import KioskState, Phase, Policy, step
from kiosk.update.gate import RECORD

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "livekit.md"


# ------------------------------------------------------------------------------------------- names
def documented_names() -> set[str]:
    """Every metric name in docs/livekit.md's table ("Metrics and status"): the one list of names."""
    text = DOCS.read_text()
    section = text.split("## Metrics and status", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith(("| `kiosk_", "| `process_")):
            first_cell = line.split("|")[1]
            names.update(re.findall(r"`((?:kiosk|process)_[a-z0-9_]+)", first_cell))
    return names


def populated() -> Metrics:
    """A registry with every series present (labelled children made, the file figures known)."""
    m = Metrics()
    m.set_info("b1-reception", "b1", "2025.3.1", "A")
    m.set_offline(None)
    m.set_route("array")
    m.device_overruns.labels(device="array")
    m.device_underruns.labels(device="array")
    for name in FILE_FIGURES:
        m.files.set(name, 1.0)
    return m


def exposed_names(m: Metrics) -> set[str]:
    """Family names in the documented form: counters with ``_total``; the ``_created`` gauges left out."""
    names: set[str] = set()
    for family in text_string_to_metric_families(m.exposition().decode()):
        if family.type == "gauge" and family.name.endswith("_created"):
            continue
        names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def test_the_exposition_has_exactly_the_documented_names() -> None:
    documented = documented_names()
    exposed = exposed_names(populated())
    assert exposed - documented == set(), "exported but not in docs/livekit.md's metrics table"
    assert documented - exposed == set(), "in docs/livekit.md's metrics table but not exported"
    assert len(documented) > 40


def test_file_figures_are_exported_only_when_known() -> None:
    m = Metrics()
    assert "kiosk_update_last_rolled_back" not in m.exposition().decode()
    m.files.set("kiosk_update_last_rolled_back", 1.0)
    assert "kiosk_update_last_rolled_back 1.0" in m.exposition().decode()
    m.files.set("kiosk_update_last_rolled_back", None)
    assert "kiosk_update_last_rolled_back" not in m.exposition().decode()
    with pytest.raises(KeyError):
        m.files.set("kiosk_made_up", 1.0)


def test_info_has_one_series_and_offline_one_reason() -> None:
    m = Metrics()
    m.set_info("b1-reception", "b1", "2025.3.1", "A")
    m.set_info("b1-reception", "b1", "2025.4.0", "B")  # after an update
    text = m.exposition().decode()
    assert [line for line in text.splitlines() if line.startswith("kiosk_info{")] == [
        'kiosk_info{kiosk_id="b1-reception",site="b1",slot="B",version="2025.4.0"} 1.0']
    m.set_offline("credits_exhausted")
    text = m.exposition().decode()
    assert "kiosk_online 0.0" in text
    assert 'kiosk_offline_reason{reason="credits_exhausted"} 1.0' in text
    assert 'kiosk_offline_reason{reason="offline"} 0.0' in text
    # A refusal reason starts at 0, so the first refusal is an increase a rule can see.
    assert 'kiosk_api_refusals_total{reason="credits_exhausted"} 0.0' in text


def test_estimated_credits_follow_the_audio() -> None:
    m = Metrics()
    prices = MetricsSettings(input_audio_tokens_per_second=10, output_audio_tokens_per_second=20,
                             input_credits_per_million_tokens=32, output_credits_per_million_tokens=64)
    m.streamed_audio_seconds.inc(30)
    m.agent_audio_seconds.inc(30)
    m.publish_credits(prices)
    m.publish_credits(prices)  # published twice: counted once
    assert "kiosk_estimated_credits_total 0.048" in m.exposition().decode()


@pytest.mark.parametrize("value", ["b1 reception", "-b1", "", "a" * 64, "ö", "b1/reception"])
def test_kiosk_id_must_be_a_plain_name(value: str) -> None:
    with pytest.raises(ValidationError, match="kiosk_id"):
        MetricsSettings(kiosk_id=value)


def test_site_may_be_empty_but_not_odd() -> None:
    assert MetricsSettings(site="").site == ""
    with pytest.raises(ValidationError, match="site"):
        MetricsSettings(site="building 1")


# ------------------------------------------------------------------------------------------- barge-ins
def _speaking(mode: InteractionMode = InteractionMode.TAP_TO_TALK) -> KioskState:
    return KioskState(policy=Policy(mode=mode, barge_in=True), phase=Phase.SPEAKING, echo_path_verified=True,
                      playing=True)


def _feed(judge: BargeInJudge, state: KioskState, event: object, now: float) -> KioskState:
    transition = step(state, event)  # type: ignore[arg-type]
    judge.observe(state, event, transition.effects, now)  # type: ignore[arg-type]
    return transition.state


def test_a_voice_barge_in_followed_by_speech_is_not_false() -> None:
    judge = BargeInJudge()
    state = _feed(judge, _speaking(), VoiceStarted(at_seconds=99.8), 100.0)
    assert judge.counts.voice == 1
    _feed(judge, state, VoiceStopped(at_seconds=101.5), 102.1)
    judge.poll(100.0 + FALSE_WINDOW_SECONDS + 1)
    assert judge.counts.likely_false == 0


def test_a_voice_barge_in_on_a_blip_is_likely_false() -> None:
    judge = BargeInJudge()
    state = _feed(judge, _speaking(), VoiceStarted(at_seconds=99.9), 100.0)
    _feed(judge, state, VoiceStopped(at_seconds=100.1), 100.7)
    judge.poll(100.0 + FALSE_WINDOW_SECONDS - 0.1)
    assert judge.counts.likely_false == 0  # judged only once the window has closed
    judge.poll(100.0 + FALSE_WINDOW_SECONDS)
    assert judge.counts.likely_false == 1
    judge.poll(200.0)
    assert judge.counts.likely_false == 1


def test_speech_still_running_at_the_window_end_confirms_the_barge_in() -> None:
    judge = BargeInJudge()
    _feed(judge, _speaking(), VoiceStarted(at_seconds=99.9), 100.0)
    judge.poll(100.0 + FALSE_WINDOW_SECONDS)
    assert judge.counts.likely_false == 0


def test_a_press_after_unanswered_voice_is_likely_missed() -> None:
    judge = BargeInJudge()
    ptt = _speaking(InteractionMode.PUSH_TO_TALK)  # voice does not interrupt here
    state = _feed(judge, ptt, VoiceStarted(at_seconds=49.9), 50.0)
    assert judge.counts.voice == 0 and state.phase is Phase.SPEAKING
    _feed(judge, state, ButtonPressed(Button.TALK), 51.0)
    assert judge.counts.press == 1 and judge.counts.likely_missed == 1


def test_a_press_without_voice_before_is_not_missed() -> None:
    judge = BargeInJudge()
    state = _feed(judge, _speaking(InteractionMode.PUSH_TO_TALK), VoiceStarted(at_seconds=9.9), 10.0)
    _feed(judge, state, ButtonPressed(Button.TALK), 10.0 + 5.0)  # long after
    assert judge.counts.press == 1 and judge.counts.likely_missed == 0


def test_a_press_after_speech_held_back_as_echo_is_likely_missed() -> None:
    judge = BargeInJudge()
    judge.note_echo_rejected(100, 10.0)
    judge.note_echo_rejected(100, 10.5)
    judge.note_echo_rejected(100 + MIN_REJECTED_FRAMES, 11.5)
    _feed(judge, _speaking(), ButtonPressed(Button.TALK), 12.0)
    assert judge.counts.likely_missed == 1
    # The chain was replaced (route change): its count starts again at 0, which is no surge.
    judge = BargeInJudge()
    judge.note_echo_rejected(500, 10.0)
    judge.note_echo_rejected(3, 11.0)
    _feed(judge, _speaking(), ButtonPressed(Button.TALK), 11.5)
    assert judge.counts.likely_missed == 0


def test_interrupt_effects_are_what_counts() -> None:
    judge = BargeInJudge()
    listening = _speaking().with_(phase=Phase.LISTENING)
    judge.observe(listening, ButtonPressed(Button.TALK), (InterruptAgent(),), 1.0)
    assert judge.counts.press == 0  # not while speaking


# ------------------------------------------------------------------------------------------- the sweep
def _figures(**changes: object) -> LoopbackFigures:
    figures = LoopbackFigures(heard=True, detection_ratio=200.0, delay_ms=42.0, noise_floor_dbfs=-62.0,
                              echo_dbfs=-30.0, played_dbfs=-20.0, echo_return_loss_db=10.0, clipped=False,
                              erle_db=35.0, aec_backend="hybrid", capture_rate=0.99)
    for key, value in changes.items():
        setattr(figures, key, value)
    return figures


def test_sweep_record_from_the_doctor_checks() -> None:
    good = _figures()
    record = sweep_record(loopback_checks(good, 500.0), recommend(good, 500.0), 1700.0)
    assert record == SweepRecord(1700.0, measured=True, aec_ok=True, recommended_mode="hands_free", erle_db=35.0,
                                 delay_ms=42.0, noise_floor_dbfs=-62.0, capture_rate=0.99)
    weak = _figures(erle_db=8.0)
    record = sweep_record(loopback_checks(weak, 500.0), recommend(weak, 500.0), 1700.0)
    assert record is not None and not record.aec_ok and record.erle_db == 8.0
    failed = [Check("audio", "loopback", Verdict.FAIL, "the measurement did not run: busy")]
    record = sweep_record(failed, recommend(None, 500.0), 1700.0)
    assert record is not None and not record.measured and not record.aec_ok
    no_sound = [Check("audio", "loopback", Verdict.SKIP, "not measured (--no-sound)")]
    assert sweep_record(no_sound, recommend(None, 500.0), 1700.0) is None
    assert sweep_record([], None, 1700.0) is None


def test_keep_sweep_writes_what_the_kiosk_reads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = _figures()
    report = Report(loopback_checks(good, 500.0), recommend(good, 500.0))
    settings = Settings(metrics=MetricsSettings(doctor_record=tmp_path / "state" / "doctor-audio.json"))
    path = keep_sweep(report, settings, now_unix=1700.0)
    assert path == tmp_path / "state" / "doctor-audio.json"
    assert path.stat().st_mode & 0o777 == 0o644
    assert read_sweep_record(path) == sweep_record(report.checks, report.recommendation, 1700.0)
    (tmp_path / "a-file").write_text("")  # not a directory, even for root
    blocked = Settings(metrics=MetricsSettings(doctor_record=tmp_path / "a-file" / "doctor-audio.json"))
    with caplog.at_level(logging.WARNING):
        assert keep_sweep(report, blocked, now_unix=1.0) is None  # the doctor goes on
    assert "sudo -u kiosk kiosk doctor audio" in caplog.text and "a-file" in caplog.text


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory for the fuzz tests' files (Hypothesis runs many examples per test function)."""
    return tmp_path_factory.mktemp("sweep-fuzz")


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.binary(max_size=400))
def test_read_sweep_record_never_raises_on_bytes(fuzz_dir: Path, data: bytes) -> None:
    path = fuzz_dir / "bytes.json"
    path.write_bytes(data)
    assert read_sweep_record(path) is None or isinstance(read_sweep_record(path), SweepRecord)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=3), max_leaves=8)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.fixed_dictionaries({"version": st.sampled_from([1, 2, "1"]), "finished_unix": _json,
                              "measured": _json, "aec_ok": _json, "recommended_mode": _json, "erle_db": _json,
                              "delay_ms": _json}))
def test_read_sweep_record_takes_only_well_formed_records(fuzz_dir: Path, raw: dict[str, object]) -> None:
    path = fuzz_dir / "record.json"
    path.write_text(json.dumps(raw))
    record = read_sweep_record(path)
    if record is not None:
        assert raw["version"] == 1 and isinstance(raw["measured"], bool)
        assert all(v is None or np.isfinite(v) for v in (record.erle_db, record.delay_ms, record.finished_unix))


# ------------------------------------------------------------------------------------------- the app
def test_the_kiosk_publishes_identity_update_and_sweep(tmp_path: Path) -> None:
    root = scratch_root(tmp_path, partition=3)  # booted B; autoboot commits A: a trial boot
    (root / "usr/share/kiosk").mkdir(parents=True)
    (root / "usr/share/kiosk/image-version").write_text("2025.4.0\n")
    (root / RECORD).parent.mkdir(parents=True)
    (root / RECORD).write_text(json.dumps({"version": 1, "slot": "B", "action": "roll_back",
                                           "finished_unix": 1700000000.0, "reasons": ["kiosk doctor failed"]}))
    good = _figures()
    record_path = tmp_path / "doctor-audio.json"
    write_sweep_record(record_path, sweep_record(loopback_checks(good, 500.0), recommend(good, 500.0), 1600000000.0)
                       or SweepRecord(0.0, False, False, "push_to_talk"))
    settings = Settings(metrics=MetricsSettings(kiosk_id="b2-lobby", site="b2", doctor_record=record_path),
                        spool=SpoolSettings(directory=tmp_path / "spool"))
    kiosk = Kiosk(settings, system_root=root)
    kiosk._publish_fleet()
    samples = {s.name + str(sorted(s.labels.items())): s.value
               for f in text_string_to_metric_families(kiosk.metrics.exposition().decode()) for s in f.samples}
    assert samples["kiosk_info[('kiosk_id', 'b2-lobby'), ('site', 'b2'), ('slot', 'B'), ('version', '2025.4.0')]"] == 1
    assert samples["kiosk_update_trial[]"] == 1 and samples["kiosk_update_last_rolled_back[]"] == 1
    assert samples["kiosk_update_last_trial_timestamp_seconds[]"] == 1700000000.0
    assert samples["kiosk_doctor_last_aec_ok[]"] == 1 and samples["kiosk_doctor_last_erle_db[]"] == 35.0
    assert samples["kiosk_doctor_last_sweep_timestamp_seconds[]"] == 1600000000.0
    # No record, no A/B image: those figures are not exported at all (not as 0).
    bare = Kiosk(Settings(metrics=MetricsSettings(doctor_record=tmp_path / "none.json"),
                          spool=SpoolSettings(directory=tmp_path / "spool2")), system_root=tmp_path / "x")
    bare._publish_fleet()
    text = bare.metrics.exposition().decode()
    assert "kiosk_update_last_rolled_back" not in text and "kiosk_doctor_last_aec_ok" not in text
    assert 'slot="unknown",version="unknown"' in text


def test_the_spool_publishes_its_oldest_message_age(tmp_path: Path, operator_keys: OperatorKeys) -> None:
    clock = [1000.0]
    with Spool(tmp_path / "spool", recipient_public_key=operator_keys.public, wall_clock=lambda: clock[0]) as spool:
        metrics, status = Metrics(), Status()
        publish_stats(spool, metrics, status)
        assert "kiosk_spool_oldest_message_age_seconds 0.0" in metrics.exposition().decode()
        spool.store(np.zeros(1600, dtype=np.int16))
        clock[0] += 3700.0
        publish_stats(spool, metrics, status)
        assert "kiosk_spool_oldest_message_age_seconds 3700.0" in metrics.exposition().decode()

"""The field bench's figures from a kiosk trace: sessions and their causes, messages, attribution, what was heard."""

from __future__ import annotations

from typing import Any

from kiosk_dev.bench.field import (
    Exchange,
    FaultRecord,
    FieldResult,
    KioskView,
    MessageAttempt,
    Sample,
    Step,
    heard_and_seen,
    message_figures,
    resource_figures,
    sessions_from,
    summarise,
)
from kiosk_dev.supervisor import Incarnation


def step(t: float, event: dict[str, Any], old: str, new: str, effects: list[dict[str, Any]] | None = None,
         incarnation: int = 1) -> Step:
    return Step(t, incarnation, event, old, new, effects or [])


def conversation(t0: float, end_event: dict[str, Any], end_phase: str = "idle", incarnation: int = 1) -> list[Step]:
    return [
        step(t0, {"type": "ButtonPressed", "button": "talk"}, "idle", "connecting", incarnation=incarnation),
        step(t0 + 0.5, {"type": "SessionOpened", "session_id": "s"}, "connecting", "listening",
             [{"type": "PlayCue", "name": "session_start"}, {"type": "ShowPattern", "name": "listening"}],
             incarnation=incarnation),
        step(t0 + 3.0, {"type": "AgentStateChanged", "state": "speaking"}, "listening", "speaking",
             incarnation=incarnation),
        step(t0 + 8.0, end_event, "speaking", end_phase, [{"type": "ShowPattern", "name": end_phase}],
             incarnation=incarnation),
    ]


def incarnation(number: int, ended: float | None, planned: bool) -> Incarnation:
    return Incarnation(number, 100 + number, 0.0, ready=1.0, ended=ended, returncode=-9 if ended else None,
                       cause="signal" if ended else "", planned=planned)


def result(steps: list[Step], faults: list[FaultRecord], messages: list[MessageAttempt], endpoint: dict[str, Any],
           incarnations: list[Incarnation], samples: list[Sample] | None = None) -> FieldResult:
    from dataclasses import asdict

    return FieldResult(
        config={"seed": 1, "recover_limit_seconds": 240.0, "load_processes": 2}, unit={}, started=0.0, ended=600.0,
        exchanges=[Exchange(10.0, 12.0, completed=True), Exchange(40.0, 42.0, ended_by="DeviceLost(kiosk_array)")],
        messages=messages, faults=faults, sessions=sessions_from(steps, incarnations),
        incarnations=[{**asdict(i), "describe": i.describe} for i in incarnations], unit_failed=False,
        samples=samples or [], lag_ms=[1.0] * 98 + [30.0, 40.0], endpoint=endpoint, final_exchange_completed=True,
        counters={}, skipped_faults={}, load_average=[1.0, 1.0, 1.0])


def test_sessions_are_lost_only_when_neither_the_visitor_nor_a_timer_ended_them() -> None:
    steps = (conversation(10.0, {"type": "ButtonPressed", "button": "cancel"})
             + conversation(30.0, {"type": "TimerExpired", "name": "idle_end"})
             + conversation(50.0, {"type": "DeviceLost", "device": "kiosk_array"}, "error")
             + conversation(70.0, {"type": "AgentStateChanged", "state": "listening"}, "listening")[:3]
             + conversation(90.0, {"type": "LinkLost", "reason": "gone"}, "offline", incarnation=2))
    sessions = sessions_from(steps, [incarnation(1, 80.0, planned=True), incarnation(2, None, planned=False)])
    assert [(s.lost, s.cause) for s in sessions] == [
        (False, "ButtonPressed(cancel)"), (False, "TimerExpired(idle_end)"), (True, "DeviceLost(kiosk_array)"),
        (True, "kiosk killed (SIGKILL)"), (True, "LinkLost(gone)")]
    # A refusal while connecting never opened a session: not a lost one.
    refused = [step(1.0, {"type": "ButtonPressed", "button": "talk"}, "idle", "connecting"),
               step(1.1, {"type": "ApiRefused", "reason": "credits_exhausted"}, "connecting", "offline")]
    assert [s.lost for s in sessions_from(refused, [incarnation(1, None, False)])] == [False]


def test_losses_go_to_the_fault_in_force_and_messages_are_counted_once() -> None:
    steps = conversation(40.0, {"type": "DeviceLost", "device": "kiosk_array"}, "error") \
        + conversation(200.0, {"type": "SessionClosed", "reason": "agent left"}) \
        + conversation(400.0, {"type": "DeviceLost", "device": "kiosk_array"}, "error")
    faults = [FaultRecord("capture_stall", started=55.0, injected=55.0, cleared=57.0, usable=58.0),
              FaultRecord("agent_leaves", started=201.0, injected=201.0, cleared=201.1, usable=201.1)]
    messages = [MessageAttempt(1.0, "m1"), MessageAttempt(2.0, "m2"), MessageAttempt(3.0, None, "no confirmation"),
                MessageAttempt(4.0, "m3")]
    endpoint = {"stored": {"m1": "a", "m3": "c", "other": "x"}, "store_count": {"m1": 1, "m3": 2, "other": 1},
                "posts": {"m1": 2, "m3": 2, "other": 1},
                "opened": {"m1": {"seconds": 3.2}, "m3": {"seconds": 0.1}, "other": {"seconds": 2.0}}}
    figures = message_figures(result(steps, faults, messages, endpoint, [incarnation(1, None, False)]))
    assert figures["stored"] == 3 and figures["delivered"] == 2 and figures["lost"] == ["m2"]
    assert figures["duplicated"] == ["m3"] and figures["re_sent"] == 2 and figures["shorter_than_1s"] == ["m3"]
    assert figures["unconfirmed_at_endpoint"] == ["other"]
    summary = summarise(result(steps, faults, messages, endpoint, [incarnation(1, None, False)]))
    # The first loss came before the stall (no fault); the agent's departure is closed 15 s later but is its doing.
    assert summary["sessions"]["lost_by_cause"] == {"DeviceLost(kiosk_array) [no fault]": 2,
                                                    "SessionClosed(agent left) [agent_leaves]": 1}
    assert summary["invariants"]["messages_lost"] == 1 and summary["invariants"]["messages_duplicated"] == 1
    assert summary["faults"]["capture_stall"]["clear_to_usable_s"][0] == 1.0
    assert summary["resources"]["loop_lag_ms"]["p99"] > 30.0


def test_what_the_visitor_heard_and_saw_between_two_times() -> None:
    steps = [step(1.0, {"type": "ApiRefused"}, "connecting", "offline",
                  [{"type": "PlayCue", "name": "offline"}, {"type": "PlayCue", "name": "leave_message"},
                   {"type": "ShowPattern", "name": "offline"}]),
             step(2.0, {"type": "LinkUp"}, "offline", "idle", [{"type": "ShowPattern", "name": "idle"}]),
             step(9.0, {"type": "ButtonPressed"}, "idle", "connecting",
                  [{"type": "ShowPattern", "name": "connecting"}])]
    assert heard_and_seen(steps, 0.5, 5.0) == (["offline", "leave_message"], ["offline", "idle"])


def test_memory_growth_is_the_slope_of_the_longest_process_after_its_warm_up() -> None:
    mib = 1024 * 1024
    # Process 1 grows 2 MiB in its first minute (warm-up, ignored) and then 1 MiB over an hour.
    samples = [Sample(t, 1, int(100 * mib + (2 * mib if t >= 60 else 0) + mib * max(0.0, t - 60) / 3600), 40, 20,
                      t * 0.5) for t in range(0, 3700, 5)]
    samples += [Sample(3700.0 + t, 2, 200 * mib, 40, 20, t * 0.5) for t in range(0, 100, 5)]
    figures = resource_figures(result([], [], [], {}, [incarnation(1, 3650.0, True), incarnation(2, None, False)],
                                      samples))
    assert abs(figures["rss_mib_per_hour"] - 1.0) < 0.05 and abs(figures["threads_per_hour"]) < 1e-6


def test_a_run_kept_as_json_renders_the_same_report() -> None:
    """``kiosk bench field --from-json``: a long run's JSON becomes the same docs/field.md section as the run."""
    import datetime as dt
    import json

    from kiosk_dev.bench import report
    from kiosk_dev.bench.field import as_json, render, result_from_json

    steps = conversation(40.0, {"type": "DeviceLost", "device": "kiosk_array"}, "error")
    faults = [FaultRecord("capture_stall", started=55.0, injected=55.0, cleared=57.0, usable=58.0,
                          heard=["session_end"], saw=["error", "idle"])]
    samples = [Sample(float(t), 1, 100 * 1024 * 1024 + t * 10, 40, 20, t * 0.5) for t in range(0, 600, 5)]
    original = result(steps, faults, [MessageAttempt(1.0, "m1")], {"stored": {"m1": "a"}, "store_count": {"m1": 1},
                                                                   "posts": {"m1": 1}, "opened": {}},
                      [incarnation(1, None, False)], samples)
    summary = summarise(original)
    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    kept = json.loads(report.dumps(as_json(original, summary)))
    again, summary_again = result_from_json(kept)
    expected = render(original, summary, command="kiosk bench field", when=when)
    assert render(again, summary_again, command="kiosk bench field", when=when) == expected
    assert "capture_stall" in expected and "1.0, 1.0, 1.0" in expected


def test_a_file_that_is_no_kept_run_is_refused_by_name(tmp_path: Any) -> None:
    import json

    import pytest
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from kiosk.errors import InputError
    from kiosk_dev.bench.cli import _render_field_json

    class Args:
        json = False
        write = None
        section = "Measured"
        from_json = tmp_path / "run.json"

    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                               lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                             max_size=4), max_leaves=12)

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(st.one_of(st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
                     json_values.map(json.dumps),
                     st.fixed_dictionaries({"summary": json_values, "samples": json_values, "config": json_values})
                     .map(json.dumps)))
    def check(text: str) -> None:
        Args.from_json.write_text(text)
        with pytest.raises(InputError, match="not a run printed by"):
            _render_field_json(Args())  # type: ignore[arg-type]

    check()


def test_a_conversation_whose_room_is_down_is_not_usable() -> None:
    """Usable again is when the room is back (LinkUp) or a fresh session opened, not when the phase is a
    conversation phase: a reconnecting room or one being opened afresh serves nobody."""
    view = KioskView()

    def feed(t: float, event: str, old: str, new: str) -> None:
        view._record({"kind": "step", "t": t, "event": {"type": event}, "old": old, "new": new, "effects": []}, 1)

    feed(1.0, "Started", "starting", "idle")
    assert view.usable and view.serving_since == 1.0
    feed(2.0, "ButtonPressed", "idle", "connecting")
    feed(2.5, "SessionOpened", "connecting", "listening")
    assert view.usable and view.serving_since == 1.0  # a press and a session serve the visitor all along
    feed(3.0, "LinkReconnecting", "listening", "listening")
    assert not view.usable and not view.serving
    feed(9.0, "LinkUp", "listening", "listening")
    assert view.usable and view.serving_since == 9.0
    feed(14.0, "LinkLost", "listening", "connecting")  # the agent did not come back: a fresh session
    feed(14.5, "TimerExpired", "connecting", "connecting")
    assert not view.serving
    feed(14.8, "SessionOpened", "connecting", "listening")
    assert view.usable and view.serving_since == 14.8
    feed(20.0, "LinkReconnecting", "listening", "listening")
    feed(25.0, "LinkLost", "listening", "offline")
    assert not view.usable and not view.room_down  # offline: not usable, for the phase's sake
    feed(30.0, "LinkUp", "offline", "idle")
    assert view.usable and view.serving_since == 30.0

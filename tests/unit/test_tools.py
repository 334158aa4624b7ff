"""The tools' RPC payload parser and rate limits: strict arguments, refusals that name the problem (never the
values), and a Hypothesis fuzz of the parser: every payload parses or is refused as ``bad_arguments``."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiosk.events import Tool
from kiosk.tools import (
    MAX_PAYLOAD_CHARS,
    MAX_SUMMARY_CHARS,
    RPC_CODES,
    TOOL_METHODS,
    KioskSnapshot,
    NoArguments,
    TakeMessageArguments,
    ToolError,
    ToolLimits,
    ToolRefused,
    parse_arguments,
    status_sentence,
)

FUZZ = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def test_one_rpc_method_per_tool() -> None:
    assert TOOL_METHODS == {"kiosk.call_staff": Tool.CALL_STAFF, "kiosk.take_message": Tool.TAKE_MESSAGE,
                            "kiosk.end_conversation": Tool.END_CONVERSATION, "kiosk.kiosk_status": Tool.KIOSK_STATUS}
    # Application codes outside LiveKit's reserved 1001-1999, one per error.
    assert len(set(RPC_CODES.values())) == len(ToolError) and all(c >= 2000 for c in RPC_CODES.values())


@pytest.mark.parametrize("payload", ["", "  ", "{}", '{ }'])
@pytest.mark.parametrize("tool", [Tool.CALL_STAFF, Tool.END_CONVERSATION, Tool.KIOSK_STATUS])
def test_tools_without_arguments_take_an_empty_object(tool: Tool, payload: str) -> None:
    assert parse_arguments(tool, payload) == NoArguments()


def test_take_message_takes_one_line_of_summary() -> None:
    parsed = parse_arguments(Tool.TAKE_MESSAGE, json.dumps({"summary": "  Wants a call back about order 12  "}))
    assert parsed == TakeMessageArguments(summary="Wants a call back about order 12")


@pytest.mark.parametrize(("tool", "payload", "names"), [
    (Tool.TAKE_MESSAGE, "not json", "not JSON"),
    (Tool.TAKE_MESSAGE, "[1, 2]", "JSON object, not list"),
    (Tool.TAKE_MESSAGE, "{}", "summary: Field required"),
    (Tool.TAKE_MESSAGE, '{"summary": 42}', "summary: Input should be a valid string"),
    (Tool.TAKE_MESSAGE, json.dumps({"summary": "x" * (MAX_SUMMARY_CHARS + 1)}), "at most 200 characters"),
    (Tool.TAKE_MESSAGE, json.dumps({"summary": "line one\nline two"}), "one line of text"),
    (Tool.TAKE_MESSAGE, json.dumps({"summary": "   "}), "blank"),
    (Tool.TAKE_MESSAGE, json.dumps({"summary": "ok", "phone": "0123"}), "phone: Extra inputs are not permitted"),
    (Tool.CALL_STAFF, '{"urgent": true}', "urgent: Extra inputs are not permitted"),
    (Tool.KIOSK_STATUS, "x" * (MAX_PAYLOAD_CHARS + 1), f"at most {MAX_PAYLOAD_CHARS} are read"),
    (Tool.KIOSK_STATUS, "[" * 1000 + "]" * 1000, "not JSON"),
])
def test_bad_arguments_are_refused_naming_the_problem(tool: Tool, payload: str, names: str) -> None:
    with pytest.raises(ToolRefused) as refused:
        parse_arguments(tool, payload)
    assert refused.value.error is ToolError.BAD_ARGUMENTS and refused.value.rpc_code == 2400
    assert names in refused.value.detail, refused.value.detail
    assert refused.value.say  # something the agent can speak
    assert "0123" not in refused.value.detail and "line two" not in refused.value.detail  # never the values
    assert json.loads(refused.value.data())["error"] == "bad_arguments"


def test_the_session_cap_and_the_staff_interval() -> None:
    limits = ToolLimits(max_calls_per_session=3, staff_min_interval_seconds=60.0)
    limits.admit(Tool.CALL_STAFF, "s1", 0.0)
    limits.staff_called(0.0)
    with pytest.raises(ToolRefused) as refused:
        limits.admit(Tool.CALL_STAFF, "s1", 10.0)
    assert refused.value.error is ToolError.RATE_LIMITED and refused.value.retry_after_seconds == pytest.approx(50.0)
    assert json.loads(refused.value.data())["retry_after_seconds"] == 50.0
    limits.admit(Tool.KIOSK_STATUS, "s1", 11.0)
    with pytest.raises(ToolRefused, match="cannot be used again"):
        limits.admit(Tool.KIOSK_STATUS, "s1", 12.0)  # the fourth call of the session
    limits.admit(Tool.KIOSK_STATUS, "s2", 13.0)  # a new session starts counting again
    with pytest.raises(ToolRefused):
        limits.admit(Tool.CALL_STAFF, "s2", 59.0)  # the interval spans sessions: it protects the hardware
    limits.admit(Tool.CALL_STAFF, "s2", 60.0)


def test_the_status_sentence_says_nothing_personal() -> None:
    assert status_sentence(KioskSnapshot(True, True, "array", 0)) == (
        "The kiosk is online, using the microphone array; no messages are waiting for delivery.")
    assert status_sentence(KioskSnapshot(False, False, "headset", 3)).endswith("3 messages are waiting for delivery.")


# ------------------------------------------------------------------------------------------ fuzzing
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)
payloads = st.one_of(
    st.text(max_size=300),
    json_values.map(json.dumps),
    st.dictionaries(st.sampled_from(["summary", "Summary", "note", ""]), json_values, max_size=3).map(json.dumps),
    st.builds(lambda text: json.dumps({"summary": text}), st.text(max_size=260)),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
)


@FUZZ
@given(st.sampled_from(list(Tool)), payloads)
def test_every_payload_parses_or_is_refused_as_bad_arguments(tool: Tool, payload: str) -> None:
    try:
        parsed = parse_arguments(tool, payload)
    except ToolRefused as refused:
        assert refused.error is ToolError.BAD_ARGUMENTS and refused.say
        assert len(refused.detail) <= 300
        return
    if tool is Tool.TAKE_MESSAGE:
        assert isinstance(parsed, TakeMessageArguments)
        assert 0 < len(parsed.summary) <= MAX_SUMMARY_CHARS and "\n" not in parsed.summary
    else:
        assert parsed == NoArguments()


@FUZZ
@given(st.text(min_size=1, max_size=MAX_SUMMARY_CHARS).filter(lambda t: t.isprintable() and t.strip()))
def test_every_printable_line_is_a_summary(summary: str) -> None:
    parsed = parse_arguments(Tool.TAKE_MESSAGE, json.dumps({"summary": summary}))
    assert isinstance(parsed, TakeMessageArguments) and parsed.summary == summary.strip()

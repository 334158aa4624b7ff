"""Kiosk-side tools the agent calls over LiveKit RPC (call_staff, take_message, end_conversation, kiosk_status).

The contract, for any agent framework, is in docs/livekit.md ("Tools the agent can call").

The room link registers one RPC method per tool, ``kiosk.<tool>`` (``TOOL_METHODS``), and hands each
invocation to ``ToolRunner.call``, which is the one place every call is checked, run, counted and logged:

1. only the session's trusted agent may call (``LiveKitRoomLink.trusts``; everyone else: ``not_agent``);
2. only tools in the allowlist ``tools.enabled`` run (``tool_disabled``);
3. the JSON payload is parsed with a size and depth bound and validated strictly (pydantic, unknown fields
   refused, the summary one printable line of at most ``MAX_SUMMARY_CHARS``): ``bad_arguments``;
4. at most ``tools.max_calls_per_session`` calls per session, and ``call_staff`` no more often than
   ``panel.staff_output.min_interval_seconds`` (``rate_limited``, with ``retry_after_seconds``);
5. one tool runs at a time, within ``tools.timeout_seconds`` (``timeout``); ``ToolStarted``/``ToolFinished``
   bracket it, so the state machine shows the ``tool`` pattern and silence does not end the session;
6. the answer is JSON with a sentence the agent can speak (``say``); a refusal is an ``RpcError`` whose
   message is such a sentence and whose data names the error (``ToolRefused``).

Every call counts in ``kiosk_tool_calls_total{tool,outcome}`` and writes one log line with the tool, the outcome
and the duration: never the arguments (``take_message``'s summary is personal data; it travels as
``PersonalText`` to the sealed spool).
"""

from __future__ import annotations

import asyncio
import json
import logging
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kiosk.errors import DeviceError, KioskError
from kiosk.events import EndRequested, MessageRequested, StaffCalled, Tool, ToolFinished, ToolStarted
from kiosk.link.replies import BadReply, parse_json, printable
from kiosk.metrics import Metrics
from kiosk.personal import PersonalText
from kiosk.ports import EventSink, StaffSignal
from kiosk.settings import Settings

_LOGGER = logging.getLogger(__name__)

RPC_PREFIX = "kiosk."
# The RPC method of each tool: the allowlist of methods the room link registers (nothing else is answered).
TOOL_METHODS: dict[str, Tool] = {f"{RPC_PREFIX}{tool.value}": tool for tool in Tool}
# Longest payload read (LiveKit allows 15 KiB; a tool's arguments are a few dozen characters).
MAX_PAYLOAD_CHARS = 2048
# Longest take_message summary: one line for the staff who listen to the message.
MAX_SUMMARY_CHARS = 200
# A tool's answer must reach the caller before its RPC deadline: the kiosk gives up this much earlier.
DEADLINE_MARGIN_SECONDS = 0.5


class ToolError(StrEnum):
    """Why a tool call was refused (the ``error`` in the RPC error's data; the metric's outcome)."""

    BAD_ARGUMENTS = "bad_arguments"
    NOT_AGENT = "not_agent"
    TOOL_DISABLED = "tool_disabled"
    UNAVAILABLE = "unavailable"
    RATE_LIMITED = "rate_limited"
    FAILED = "failed"
    TIMEOUT = "timeout"


# RPC error codes (application codes: LiveKit reserves 1001-1999 for its own), HTTP-like on purpose.
RPC_CODES: dict[ToolError, int] = {
    ToolError.BAD_ARGUMENTS: 2400,
    ToolError.NOT_AGENT: 2403,
    ToolError.TOOL_DISABLED: 2404,
    ToolError.UNAVAILABLE: 2409,
    ToolError.RATE_LIMITED: 2429,
    ToolError.FAILED: 2500,
    ToolError.TIMEOUT: 2504,
}


class ToolRefused(KioskError):
    """A tool call that did not run (or failed): ``say`` is a sentence the agent can speak, ``detail`` for it."""

    def __init__(self, error: ToolError, say: str, detail: str = "", retry_after_seconds: float | None = None) -> None:
        super().__init__(error.value, say)
        self.error = error
        self.say = say
        self.detail = detail
        self.retry_after_seconds = retry_after_seconds

    @property
    def rpc_code(self) -> int:
        """The RPC error code for this refusal (``RPC_CODES``)."""
        return RPC_CODES[self.error]

    def data(self) -> str:
        """The RPC error's data: JSON naming the error (and when to try again)."""
        body: dict[str, Any] = {"error": self.error.value}
        if self.detail:
            body["detail"] = self.detail
        if self.retry_after_seconds is not None:
            body["retry_after_seconds"] = round(self.retry_after_seconds, 1)
        return json.dumps(body)


# ------------------------------------------------------------------------------------------ arguments
class _Args(BaseModel):
    """Strict arguments: unknown fields refused, no type coercion."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class NoArguments(_Args):
    """``call_staff``, ``end_conversation`` and ``kiosk_status`` take none: ``{}`` (or an empty payload)."""


class TakeMessageArguments(_Args):
    """``take_message``: the agent's one-line summary of what the message is about (personal data)."""

    summary: str = Field(min_length=1, max_length=MAX_SUMMARY_CHARS)

    @field_validator("summary")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if any(unicodedata.category(c).startswith("C") for c in value):
            raise ValueError("must be one line of text: no line breaks or control characters")
        if not value.strip():
            raise ValueError("must say something (it is blank)")
        return value.strip()


ARGUMENTS: dict[Tool, type[_Args]] = {
    Tool.CALL_STAFF: NoArguments,
    Tool.TAKE_MESSAGE: TakeMessageArguments,
    Tool.END_CONVERSATION: NoArguments,
    Tool.KIOSK_STATUS: NoArguments,
}


def parse_arguments(tool: Tool, payload: str) -> _Args:
    """``tool``'s arguments from an RPC payload (a JSON object; empty means ``{}``); ``ToolRefused`` otherwise.

    The refusal names what is wrong (field names and rules, never the values given).
    """
    def refuse(detail: str) -> ToolRefused:
        return ToolRefused(ToolError.BAD_ARGUMENTS, f"The kiosk could not use those {tool.value} arguments.",
                           printable(detail, 300))

    if len(payload) > MAX_PAYLOAD_CHARS:
        raise refuse(f"the payload is {len(payload)} characters; at most {MAX_PAYLOAD_CHARS} are read")
    data: Any = {}
    if payload.strip():
        try:
            data = parse_json(payload.encode("utf-8", errors="replace"))
        except BadReply as error:
            raise refuse(f"the payload is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise refuse(f"the payload must be a JSON object, not {type(data).__name__}")
    try:
        return ARGUMENTS[tool].model_validate(data)
    except ValidationError as error:
        problems = []
        for item in error.errors(include_input=False, include_url=False):
            where = ".".join(str(part) for part in item["loc"]) or "payload"
            problems.append(f"{printable(where, 40)}: {item['msg'].removeprefix('Value error, ')}")
        raise refuse("; ".join(problems[:4])) from None


# ------------------------------------------------------------------------------------------ limits
class ToolLimits:
    """The rate limits, pure (time is passed in): a per-session cap on every call, an interval on call_staff."""

    def __init__(self, max_calls_per_session: int, staff_min_interval_seconds: float) -> None:
        self.max_calls_per_session = max_calls_per_session
        self.staff_min_interval_seconds = staff_min_interval_seconds
        self._session = ""
        self._calls = 0
        self._last_staff_call: float | None = None

    def admit(self, tool: Tool, session_id: str, now: float) -> None:
        """Count one call in ``session_id``; ``ToolRefused(rate_limited)`` when it is over a limit."""
        if session_id != self._session:
            self._session, self._calls = session_id, 0
        if self._calls >= self.max_calls_per_session:
            raise ToolRefused(ToolError.RATE_LIMITED, "The kiosk's tools cannot be used again in this conversation.",
                              f"at most {self.max_calls_per_session} tool calls per session (tools.max_calls_per_"
                              "session)")
        self._calls += 1
        if tool is Tool.CALL_STAFF and self._last_staff_call is not None:
            wait = self._last_staff_call + self.staff_min_interval_seconds - now
            if wait > 0:
                raise ToolRefused(ToolError.RATE_LIMITED, "Staff have just been called; they are on their way.",
                                  "call_staff was used moments ago (panel.staff_output.min_interval_seconds)",
                                  retry_after_seconds=wait)

    def staff_called(self, now: float) -> None:
        """The output was pulsed at ``now``: the interval counts from here."""
        self._last_staff_call = now


# ------------------------------------------------------------------------------------------ running
@dataclass(frozen=True)
class KioskSnapshot:
    """What the tools may know of the kiosk (nothing personal)."""

    conversing: bool  # a conversation is under way (listening, thinking or speaking)
    online: bool
    route: str  # array, headset or none
    queued_messages: int  # visitors' messages waiting for delivery


_ROUTE_WORDS = {"array": "the microphone array", "headset": "the headset", "none": "no audio device"}


def status_sentence(snapshot: KioskSnapshot) -> str:
    """``kiosk_status``'s spoken answer."""
    online = "The kiosk is online" if snapshot.online else "The kiosk is offline"
    waiting = snapshot.queued_messages
    messages = "no messages are" if waiting == 0 else "one message is" if waiting == 1 else f"{waiting} messages are"
    return f"{online}, using {_ROUTE_WORDS.get(snapshot.route, snapshot.route)}; {messages} waiting for delivery."


class ToolRunner:
    """The ``ToolHandler`` port: checks, runs, counts and logs every tool call (see the module docstring)."""

    def __init__(self, settings: Settings, events: EventSink, *, metrics: Metrics,
                 snapshot: Callable[[], KioskSnapshot], staff: StaffSignal | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self._enabled = frozenset(settings.tools.enabled)
        self._timeout_seconds = settings.tools.timeout_seconds
        staff_spec = settings.panel.staff_output
        self._limits = ToolLimits(settings.tools.max_calls_per_session,
                                  staff_spec.min_interval_seconds if staff_spec is not None else 0.0)
        self._post = events
        self._metrics = metrics
        self._snapshot = snapshot
        self.staff = staff  # the staff-call output; the app sets it once the panel is open
        self._clock = clock
        # One tool at a time: the state machine's "a tool is running" is a flag, and a second call waits its turn.
        self._lock = asyncio.Lock()

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    async def call(self, tool: Tool, payload: str, *, trusted: bool, session_id: str,
                   response_timeout_seconds: float | None = None) -> str:
        """Run one call; the JSON answer, or ``ToolRefused`` (see the module docstring for the order of checks)."""
        started = self._now()
        # Until it ends one way or another: a call the caller's deadline or the room's end cancels stays this.
        outcome = "cancelled"
        try:
            if not trusted:
                # Anyone with a room token can call; only the session's agent may use the kiosk.
                raise ToolRefused(ToolError.NOT_AGENT, "Only the kiosk's own agent may use its tools.")
            if tool not in self._enabled:
                raise ToolRefused(ToolError.TOOL_DISABLED, f"The {tool.value.replace('_', ' ')} tool is not "
                                  "available at this kiosk.", f"{tool.value} is not in tools.enabled")
            self._limits.admit(tool, session_id, started)
            arguments = parse_arguments(tool, payload)
            timeout = self._timeout_seconds
            if response_timeout_seconds is not None:
                timeout = max(0.1, min(timeout, response_timeout_seconds - DEADLINE_MARGIN_SECONDS))
            async with self._lock:
                self._post(ToolStarted(tool))
                finished = "cancelled"
                try:
                    result = await asyncio.wait_for(self._run(tool, arguments), timeout)
                    finished = "ok"
                except TimeoutError:
                    finished = ToolError.TIMEOUT.value
                    raise ToolRefused(ToolError.TIMEOUT, "The kiosk did not manage that in time.",
                                      f"{tool.value} took longer than {timeout:g} s") from None
                except ToolRefused as refused:
                    finished = refused.error.value
                    raise
                finally:
                    # Always, whatever happened: the state machine's "a tool is running" must not stay set.
                    self._post(ToolFinished(tool, finished))
            outcome = "ok"
            return json.dumps(result)
        except ToolRefused as refused:
            outcome = refused.error.value
            raise
        except Exception:
            outcome = ToolError.FAILED.value  # a programming error: the SDK answers APPLICATION_ERROR (1500)
            raise
        finally:
            elapsed = self._now() - started
            self._metrics.tool_calls.labels(tool=tool.value, outcome=outcome).inc()
            self._metrics.tool_seconds.labels(tool=tool.value).observe(elapsed)
            # Tool, outcome and duration only: arguments may be personal (take_message's summary).
            level = logging.INFO if outcome == "ok" else logging.WARNING
            _LOGGER.log(level, "tool %s: %s in %.0f ms", tool.value, outcome, 1000 * elapsed)

    async def _run(self, tool: Tool, arguments: _Args) -> dict[str, Any]:
        snapshot = self._snapshot()
        if tool is Tool.KIOSK_STATUS:
            return {"say": status_sentence(snapshot), "online": snapshot.online, "route": snapshot.route,
                    "queued_messages": snapshot.queued_messages}
        if tool is Tool.CALL_STAFF:
            return await self._call_staff()
        if not snapshot.conversing:
            raise ToolRefused(ToolError.UNAVAILABLE, "There is no conversation at the kiosk to hand over.",
                              f"{tool.value} needs a conversation in progress")
        if tool is Tool.TAKE_MESSAGE:
            assert isinstance(arguments, TakeMessageArguments)
            # The summary is personal data: PersonalText keeps it out of every log line on its way to the seal.
            self._post(MessageRequested(PersonalText(arguments.summary)))
            return {"say": "Please leave your message after the tone; it will be passed on.",
                    "after": "the kiosk records the visitor's message when you have finished speaking"}
        self._post(EndRequested())
        return {"say": "Thank you for visiting. Goodbye!",
                "after": "the kiosk ends the conversation when you have finished speaking"}

    async def _call_staff(self) -> dict[str, Any]:
        if self.staff is None:
            raise ToolRefused(ToolError.UNAVAILABLE, "This kiosk cannot call staff right now.",
                              "no staff-call output (panel.staff_output, panel.enabled)")
        try:
            # Thread boundary: a GPIO driver that hangs (a wedged chip) must not hold the loop; the tool's
            # timeout answers the agent meanwhile. gpiozero switches the output off again in its own thread.
            await asyncio.to_thread(self.staff.call_staff)
        except DeviceError as error:
            _LOGGER.error("staff-call output failed: %s", error)
            raise ToolRefused(ToolError.FAILED, "The kiosk could not call staff; please ask at the desk.",
                              "the staff-call output failed") from None
        self._limits.staff_called(self._now())
        self._post(StaffCalled())
        return {"say": "I have called a member of staff; someone will be with you shortly."}

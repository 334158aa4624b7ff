"""Metrics (prometheus-client) and the JSON status endpoint, served on localhost.

Every metric the kiosk exports is defined here, on a ``Metrics`` object with its own registry (tests make
fresh ones; the app uses ``default_metrics()``). Areas update them directly (``metrics.aec_erle_db.set(x)``)
and keep the ``Status`` object current for ``GET /status``. ``MetricsServer`` serves ``GET /metrics``
(Prometheus text format) and ``GET /status`` (JSON) with aiohttp in the kiosk's one loop.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from kiosk.settings import MetricsSettings

_LOGGER = logging.getLogger(__name__)

# Kiosk-added latency buckets (seconds): the targets are tens of milliseconds.
_PATH_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.06, 0.08, 0.1, 0.2, 0.5)
_CONNECT_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
_SESSION_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def estimated_credits(streamed_in_seconds: float, agent_out_seconds: float, settings: MetricsSettings) -> float:
    """Estimated credits for audio seconds streamed in and received: the seconds times the per-token rates."""
    return (
        streamed_in_seconds * settings.input_audio_tokens_per_second * settings.input_credits_per_million_tokens
        + agent_out_seconds * settings.output_audio_tokens_per_second * settings.output_credits_per_million_tokens
    ) / 1e6


def credit_burn_per_talk_minute(
    streamed_in_seconds: float, agent_out_seconds: float, talk_seconds: float, settings: MetricsSettings
) -> float:
    """Estimated credits per minute of talk: audio seconds in and out times the per-token rates."""
    if talk_seconds <= 0:
        return 0.0
    return estimated_credits(streamed_in_seconds, agent_out_seconds, settings) / (talk_seconds / 60.0)


# Gauges read from files, with their help text: the doctor's last loopback sweep (``kiosk.audio.doctor``'s
# record) and the A/B update state (``kiosk.update.status``). A figure that is not known is not exported.
FILE_FIGURES: dict[str, str] = {
    "kiosk_doctor_last_sweep_timestamp_seconds": "When kiosk doctor last ran its loopback sweep (Unix time)",
    "kiosk_doctor_last_sweep_measured": "1 when that sweep ran (0: the devices did not open or it failed)",
    "kiosk_doctor_last_aec_ok": "1 when that sweep verified the echo path for voice barge-in (hands_free)",
    "kiosk_doctor_last_erle_db": "The echo canceller's ERLE on that sweep",
    "kiosk_doctor_last_echo_delay_ms": "The echo's delay behind the reference on that sweep",
    "kiosk_doctor_last_noise_floor_dbfs": "The noise floor at the microphone on that sweep",
    "kiosk_doctor_last_capture_ratio": "Audio captured per second of wall-clock time on that sweep (1: real time)",
    "kiosk_update_trial": "1 while this boot is an update's trial (the slot is not committed yet)",
    "kiosk_update_pending": "1 while an installed update waits for its trial boot",
    "kiosk_update_last_rolled_back": "1 when the last update trial ended in anything but a commit",
    "kiosk_update_last_trial_timestamp_seconds": "When the last update trial was decided (Unix time)",
}


class FileFigures:
    """A prometheus-client collector of the ``FILE_FIGURES`` gauges; ``set(name, value)`` (None: not known)."""

    def __init__(self) -> None:
        self._values: dict[str, float] = {}

    def set(self, name: str, value: float | None) -> None:
        """Set one figure (``name`` must be in ``FILE_FIGURES``); None drops it from the exposition."""
        if name not in FILE_FIGURES:
            raise KeyError(name)
        if value is None:
            self._values.pop(name, None)
        else:
            self._values[name] = float(value)

    def get(self, name: str) -> float | None:
        """The figure, or None when not known."""
        return self._values.get(name)

    def describe(self) -> list[GaugeMetricFamily]:
        """Nothing at registration (the families come and go with the files)."""
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The known figures."""
        for name, value in sorted(self._values.items()):
            yield GaugeMetricFamily(name, FILE_FIGURES[name], value=value)


class Metrics:
    """Every metric the kiosk exports, on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        # process_resident_memory_bytes, process_start_time_seconds, ...: the memory the rtc SDK keeps per session
        # and the restarts that hand it back (kiosk.recycle) show on the fleet's graphs.
        ProcessCollector(registry=r)
        # Sessions and the link.
        self.sessions = Counter("kiosk_sessions", "Sessions opened", registry=r)
        self.session_duration_seconds = Histogram(
            "kiosk_session_duration_seconds", "Length of each session", buckets=_SESSION_BUCKETS, registry=r
        )
        self.session_seconds = Counter("kiosk_session_seconds", "Seconds spent in sessions", registry=r)
        self.connect_seconds = Histogram(
            "kiosk_connect_seconds", "Session API + LiveKit connect + agent audio ready", buckets=_CONNECT_BUCKETS,
            registry=r,
        )
        self.first_agent_audio_seconds = Histogram(
            "kiosk_first_agent_audio_seconds", "Visitor stopped speaking -> first agent audio received",
            buckets=_CONNECT_BUCKETS, registry=r,
        )
        self.capture_path_seconds = Histogram(
            "kiosk_capture_path_seconds", "Kiosk-added latency: frame captured -> handed to LiveKit",
            buckets=_PATH_BUCKETS, registry=r,
        )
        self.playout_path_seconds = Histogram(
            "kiosk_playout_path_seconds", "Kiosk-added latency: frame received -> written to the playout buffer",
            buckets=_PATH_BUCKETS, registry=r,
        )
        self.reconnects = Counter("kiosk_reconnects", "SDK resume/reconnect attempts that began", registry=r)
        self.links_lost = Counter("kiosk_links_lost", "Final disconnects (a fresh session is needed)", registry=r)
        self.server_restarts = Counter(
            "kiosk_livekit_server_restarts", "LiveKit server restarts seen while reconnecting (a fresh session "
            "followed)", registry=r)
        self.api_refusals = Counter("kiosk_api_refusals", "Session API refusals", ["reason"], registry=r)
        self.mic_frames_dropped = Counter(
            "kiosk_mic_frames_dropped", "Capture frames dropped because the send queue was full", registry=r
        )
        self.streamed_audio_seconds = Counter(
            "kiosk_streamed_audio_seconds", "Audio streamed to the room (billed as input tokens)", registry=r
        )
        self.agent_audio_seconds = Counter(
            "kiosk_agent_audio_seconds", "Agent audio received (billed as output tokens)", registry=r
        )
        self.credit_burn_per_talk_minute = Gauge(
            "kiosk_credit_burn_per_talk_minute", "Estimated credits per minute of session (last session)", registry=r
        )
        self.turn_rpcs = Counter(
            "kiosk_turn_rpcs", "Manual-turn RPCs to the agent (start_turn, end_turn, cancel_turn) by outcome",
            ["method", "outcome"], registry=r,
        )
        # Tools the agent calls (kiosk.tools): tool name and outcome only, never arguments.
        self.tool_calls = Counter(
            "kiosk_tool_calls", "Kiosk tool calls from the agent by tool and outcome (ok or the refusal's code)",
            ["tool", "outcome"], registry=r,
        )
        self.tool_seconds = Histogram(
            "kiosk_tool_seconds", "Time to answer a kiosk tool call", ["tool"], buckets=_PATH_BUCKETS + (1.0, 2.0, 5.0),
            registry=r,
        )
        # Audio (the audio area updates these).
        self.aec_erle_db = Gauge("kiosk_aec_erle_db", "Echo return loss enhancement (recent)", registry=r)
        self.aec_delay_ms = Gauge("kiosk_aec_delay_ms", "Estimated bulk delay mic vs reference", registry=r)
        self.device_overruns = Counter("kiosk_device_overruns", "Capture overruns", ["device"], registry=r)
        self.device_underruns = Counter("kiosk_device_underruns", "Playback underruns", ["device"], registry=r)
        self.audio_stalls = Counter("kiosk_audio_stalls", "Running streams that stopped delivering (restarted)",
                                    registry=r)
        self.audio_recoveries = Counter("kiosk_audio_recoveries", "Stalls recovered in place, the session kept",
                                        registry=r)
        self.device_losses = Counter("kiosk_device_losses", "Sound devices lost (gone, failed, or not recovered)",
                                     registry=r)
        self.audio_reader_failures = Counter("kiosk_audio_reader_failures",
                                             "The audio reader raised and was started again (see the log)",
                                             registry=r)
        self.route = Gauge("kiosk_route", "1 for the audio route in use", ["route"], registry=r)
        self.route_switches = Counter("kiosk_route_switches", "Audio route switches", registry=r)
        # Offline spool (the fallback area updates these).
        self.spool_bytes = Gauge("kiosk_spool_bytes", "Bytes of stored visitor messages", registry=r)
        self.spool_messages = Gauge("kiosk_spool_messages", "Stored visitor messages", registry=r)
        self._published: dict[int, float] = {}  # count_to: what each counter has been raised to
        self.spool_retention_warning = Gauge(
            "kiosk_spool_retention_warning", "1 when the spool nears its age or disk limits", registry=r
        )
        self._init_fleet(r)

    # ---- fleet figures (docs/fleet.md, "Watching"; kiosk.app publishes them). Kept in their own block.
    def _init_fleet(self, r: CollectorRegistry) -> None:
        """Identity, liveness, barge-ins, credits, the oldest message, the doctor's last sweep, updates."""
        from kiosk.effects import OfflineReason
        from kiosk.events import RefusalReason

        self.info = Gauge("kiosk_info", "Always 1: what the kiosk says it is (metrics.kiosk_id and metrics.site), "
                          "its image version and booted slot", ["kiosk_id", "site", "version", "slot"], registry=r)
        self.online = Gauge("kiosk_online", "1 while the kiosk can hold a conversation, 0 while offline",
                            registry=r)
        self.offline_reason = Gauge("kiosk_offline_reason", "1 for the reason the kiosk is offline (all 0 online)",
                                    ["reason"], registry=r)
        self.voice_barge_in = Gauge(
            "kiosk_voice_barge_in", "1 while the visitor's voice may interrupt the agent (hands-free, "
            "interaction.barge_in, the echo-cancelled array)", registry=r)
        self.barge_ins = Counter("kiosk_barge_ins", "Agent answers interrupted, by trigger (voice or press)",
                                 ["trigger"], registry=r)
        self.barge_ins_likely_false = Counter(
            "kiosk_barge_ins_likely_false", "Voice barge-ins followed by too little visitor speech (kiosk.bargein)",
            registry=r)
        self.barge_ins_likely_missed = Counter(
            "kiosk_barge_ins_likely_missed", "Press barge-ins right after visitor voice that did not interrupt "
            "(kiosk.bargein)", registry=r)
        self.estimated_credits = Counter(
            "kiosk_estimated_credits", "Credits the audio streamed and received cost (estimate, metrics.* prices)",
            registry=r)
        self.spool_oldest_message_age_seconds = Gauge(
            "kiosk_spool_oldest_message_age_seconds", "Age of the oldest visitor message not yet delivered (0: none)",
            registry=r)
        # Known label values start at 0, so a rule's increase() sees the first event (a series that appears
        # with 1 has no earlier sample to count from).
        for reason in RefusalReason:
            self.api_refusals.labels(reason=reason.value)
        self._offline_reasons = tuple(offline.value for offline in OfflineReason)
        for offline in self._offline_reasons:
            self.offline_reason.labels(reason=offline)
        for trigger in ("voice", "press"):
            self.barge_ins.labels(trigger=trigger)
        # Figures read from files (the doctor's last sweep, the update state): exported only when known.
        self.files = FileFigures()
        r.register(self.files)

    def set_info(self, kiosk_id: str, site: str, version: str | None, slot: str | None) -> None:
        """``kiosk_info`` = 1 with these labels (and no other series: an update changes version and slot)."""
        self.info.clear()
        self.info.labels(kiosk_id=kiosk_id, site=site, version=version or "unknown", slot=slot or "unknown").set(1)

    def publish_credits(self, settings: MetricsSettings) -> None:
        """Raise ``kiosk_estimated_credits_total`` to what the audio streamed and received so far cost."""
        self.count_to(self.estimated_credits, estimated_credits(
            _counter_value(self.streamed_audio_seconds), _counter_value(self.agent_audio_seconds), settings))

    def set_offline(self, reason: str | None) -> None:
        """Online (``reason`` None) or offline for ``reason`` (an ``OfflineReason`` value)."""
        self.online.set(0.0 if reason is not None else 1.0)
        for name in self._offline_reasons:
            self.offline_reason.labels(reason=name).set(1.0 if name == reason else 0.0)

    def count_to(self, counter: Counter, total: float) -> None:
        """Raise ``counter`` to ``total``, a running count kept elsewhere (e.g. the audio engine's)."""
        done = self._published.get(id(counter), 0.0)
        if total > done:
            counter.inc(total - done)
            self._published[id(counter)] = total

    def set_route(self, route: str, all_routes: tuple[str, ...] = ("array", "headset", "none")) -> None:
        """Mark ``route`` as the one in use (1) and every other as 0."""
        for name in all_routes:
            self.route.labels(route=name).set(1.0 if name == route else 0.0)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return bytes(generate_latest(self.registry))


@dataclass
class Exchange:
    """The last visitor/agent exchange, from the captions: its size only (the words are personal data)."""

    visitor_chars: int = 0
    agent_chars: int = 0


@dataclass
class Status:
    """What ``GET /status`` shows; the controller, the link and the audio engine keep it current."""

    state: str = "starting"
    agent_state: str = ""
    session_id: str = ""
    connected: bool = False
    reconnecting: bool = False
    route: str = "none"
    last_exchange: Exchange = field(default_factory=Exchange)
    last_refusal: str = ""
    aec_erle_db: float | None = None
    aec_delay_ms: float | None = None
    spool_messages: int = 0
    spool_bytes: int = 0
    spool_warning: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data."""
        return asdict(self)


_METRICS: Metrics | None = None


def default_metrics() -> Metrics:
    """The process-wide metrics (made on first use)."""
    global _METRICS
    if _METRICS is None:
        _METRICS = Metrics()
    return _METRICS


def _counter_value(counter: Counter) -> float:
    """A label-less counter's current total."""
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                return float(sample.value)
    return 0.0


class MetricsServer:
    """``GET /metrics`` and ``GET /status`` on localhost (aiohttp, in the kiosk's loop)."""

    def __init__(self, settings: MetricsSettings, metrics: Metrics, status: Status) -> None:
        self._settings = settings
        self._metrics = metrics
        self._status = status
        self._runner: web.AppRunner | None = None
        self.port = settings.port

    def summary(self) -> dict[str, Any]:
        """Derived figures for /status: streamed fraction and credit burn."""
        m = self._metrics
        session_s = _counter_value(m.session_seconds)
        streamed_s = _counter_value(m.streamed_audio_seconds)
        agent_s = _counter_value(m.agent_audio_seconds)
        return {
            "sessions": _counter_value(m.sessions),
            "session_seconds": session_s,
            "streamed_audio_seconds": streamed_s,
            "streamed_fraction": streamed_s / session_s if session_s > 0 else None,
            "agent_audio_seconds": agent_s,
            "credit_burn_per_talk_minute": credit_burn_per_talk_minute(streamed_s, agent_s, session_s, self._settings),
            "reconnects": _counter_value(m.reconnects),
            "links_lost": _counter_value(m.links_lost),
        }

    async def _metrics_route(self, request: web.Request) -> web.Response:
        body = self._metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _status_route(self, request: web.Request) -> web.Response:
        return web.json_response({**self._status.to_dict(), "summary": self.summary()})

    async def start(self) -> None:
        """Bind and serve; ``port`` holds the bound port afterwards (useful with port 0)."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics_route)
        app.router.add_get("/status", self._status_route)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._settings.host, self._settings.port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        _LOGGER.info("metrics on http://%s:%d/metrics and /status", self._settings.host, self.port)

    async def aclose(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

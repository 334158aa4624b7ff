"""The composition root: builds every adapter from the settings, wires them, and runs the kiosk.

``kiosk run`` (and ``kiosk`` with no subcommand, as systemd starts it) runs ``Kiosk`` until SIGTERM.
The demo (``kiosk_dev.demo``) runs the same class against the local stack and the virtual room.

Wiring (see docs/ and DESIGN.md's dataflow)::

    AudioEngine --VoiceStarted/Stopped, DeviceLost--> EventBus --> Controller --effects--> ports
    AudioEngine --gated frames--> LiveKitRoomLink (FrameSink) --> room
    room --agent audio--> LiveKitRoomLink --> AudioEngine (PlayoutSink; also the AEC reference)
    GpioPanel (gpiozero threads) --Button*--> EventBus (call_soon_threadsafe)
    RouteManager --RouteChanged--> EventBus;  offline Probe --LinkUp/ApiRefused--> EventBus
    agent --RPC kiosk.<tool>--> LiveKitRoomLink --> ToolRunner --Tool*/MessageRequested/...--> EventBus
                                                    ToolRunner --call_staff--> GpioPanel's staff-call output
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kiosk.audio.aec import preload as preload_delay_estimate
from kiosk.audio.doctor import read_sweep_record
from kiosk.audio.engine import AudioEngine
from kiosk.audio.route import RouteManager
from kiosk.bargein import BargeInJudge
from kiosk.bus import EventBus
from kiosk.clock import LoopClock
from kiosk.controller import Controller
from kiosk.effects import StopCues
from kiosk.errors import KioskError
from kiosk.events import ApiRefused, Event, LinkLost, LinkUp, RefusalReason, SessionOpened, Started, VoiceStopped
from kiosk.fallback.delivery import Deliverer
from kiosk.fallback.netwatch import NetworkWatch
from kiosk.fallback.offline import PROBE_COVERS, Probe, reachable_check
from kiosk.fallback.offline import probe_backoff as offline_probe_backoff
from kiosk.fallback.spool import Spool, publish_stats, run_retention
from kiosk.health import HealthWatchdog, Notifier, progress_check
from kiosk.link.backoff import Backoff
from kiosk.link.livekit import LiveKitRoomLink
from kiosk.link.session_api import SessionApi, SessionRefused
from kiosk.metrics import Metrics, MetricsServer, Status
from kiosk.panel.gpio import GpioPanel, open_panel
from kiosk.ports import Panel, Pcm, StaffSignal
from kiosk.recycle import MemoryRecycle, resident_mib
from kiosk.settings import Settings
from kiosk.state import KioskState, MessageStep, Phase, Policy, Transition
from kiosk.tools import KioskSnapshot, ToolRunner
from kiosk.update.status import read_status

_LOGGER = logging.getLogger(__name__)

# How often the figures that are not event-driven (AEC, devices, spool) are copied into the metrics.
PUBLISH_INTERVAL_SECONDS = 5.0
# The watchdog's view of "alive": capture frames and controller heartbeats within this window.
MAX_STALL_SECONDS = 3.0
# How often the capture chain's echo-rejection count is sampled for the barge-in judge (kiosk.bargein).
BARGE_IN_SAMPLE_SECONDS = 0.25
# How often the memory restart (kiosk.recycle) looks at the resident memory.
RECYCLE_CHECK_SECONDS = 15.0
# Phases in which nobody is using the kiosk (a pre-warmed session, muted, may be open in IDLE).
QUIET_PHASES = frozenset({Phase.IDLE, Phase.OFFLINE})


class _Frames:
    """``ports.FrameSink`` that forwards to the room link once it exists (the engine is built first)."""

    def __init__(self) -> None:
        self.target: LiveKitRoomLink | None = None

    def push_frame(self, pcm: Pcm, captured_at: float | None = None) -> None:
        if self.target is not None:
            self.target.push_frame(pcm, captured_at=captured_at)


class Kiosk:
    """Every part of the kiosk, wired; ``await start()``, then ``await aclose()``."""

    def __init__(self, settings: Settings, *, panel: Panel | None = None,
                 probe_backoff: Backoff | None = None, system_root: Path = Path("/")) -> None:
        """``panel`` replaces the GPIO panel (the demo's virtual panel); it must post into ``self.bus``.

        ``probe_backoff`` paces the offline probe (default: ``kiosk.fallback.offline.probe_backoff``); tests pass a
        shorter one so a restored link is noticed within their time bound. ``system_root`` is where the update
        state is read for the metrics (``kiosk.update.status``; tests and the demo pass a scratch root).
        """
        self.system_root = system_root
        self.barge_ins = BargeInJudge()
        self.probe_backoff = probe_backoff or offline_probe_backoff(settings.session)
        self.settings = settings
        self.metrics = Metrics()
        self.status = Status()
        self.notifier = Notifier.from_environment()
        self.bus = EventBus()
        self._frames = _Frames()
        self.engine = AudioEngine(settings, self.bus.post, self._frames)
        self.session_api = SessionApi.from_settings(settings)
        self.tools = ToolRunner(settings, self.bus.post, metrics=self.metrics, snapshot=self._snapshot)
        self.link = LiveKitRoomLink(settings, self.bus.post, self.engine, session_api=self.session_api,
                                    metrics=self.metrics, status=self.status, tools=self.tools)
        self._frames.target = self.link
        self.route = RouteManager(settings, self.engine, self.bus.post)
        self.spool = Spool.from_settings(settings.spool)
        self.deliverer = Deliverer.from_settings(settings, self.spool)
        self.panel: Panel | None = panel
        # The staff-call output (call_staff): the GPIO panel's, or what the caller sets (the demo's virtual panel).
        self.staff: StaffSignal | None = None
        self.controller: Controller | None = None
        self.metrics_server = MetricsServer(settings.metrics, self.metrics, self.status) \
            if settings.metrics.enabled else None
        self.watchdog: HealthWatchdog | None = None
        self._probe: asyncio.Task[None] | None = None
        # Offline since a room failed (LinkLost), since when (loop time): the probe checks its server too, for at
        # most session.livekit_check_max_seconds.
        self._room_failed_at: float | None = None
        # A message offer was taken back because the service returned, and no session has opened since: the
        # service is flapping, so the next offer stands (the visitor is not told "online" and refused again).
        self._offer_taken_back = False
        self.netwatch = NetworkWatch()  # the kernel's news of the network coming back: probe and deliver at once
        self._tasks: list[asyncio.Task[Any]] = []
        self.listeners: list[Callable[[KioskState, Event, Transition], None]] = []
        self.recycle = MemoryRecycle(settings.livekit.recycle_above_mib, settings.livekit.recycle_idle_seconds)
        # Set when the kiosk should end so systemd starts it again (kiosk.recycle); ``run_until_stopped`` waits on it.
        self.restart_requested = asyncio.Event()

    # ------------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Open devices and pins, start every task, make the first link attempt, then tell systemd READY."""
        loop = asyncio.get_running_loop()
        self.bus.bind(loop)
        settings = self.settings
        if self.panel is None:
            self.panel = open_panel(settings.panel, settings.interaction, self.bus.post, loop=loop)
        if self.staff is None and isinstance(self.panel, GpioPanel) and self.panel.staff_output is not None:
            self.staff = self.panel
        self.tools.staff = self.staff
        devices = await self.route.list_here()  # before the engine opens a stream (RouteManager.list_here)
        await self.engine.start()
        await self.route.start(devices)
        self.controller = Controller(
            policy=Policy.from_settings(settings.interaction, settings.spool,
                                        consent_notice=settings.session.consent_notice, livekit=settings.livekit,
                                        tools=settings.tools, panel=settings.panel),
            audio=self.engine, link=self.link, clock=LoopClock(loop), panel=self.panel,
            store=self.spool, bus=self.bus, route=self.route.route,
            echo_path_verified=self.route.echo_path_verified,
        )
        self.controller.add_listener(self._observe)
        self.controller.start()
        if self.metrics_server is not None:
            await self.metrics_server.start()
        self.netwatch.start()
        if self.deliverer is not None:
            self._tasks.append(asyncio.create_task(self.deliverer.run(), name="delivery"))
            self._tasks.append(asyncio.create_task(self._deliver_when_the_network_returns(), name="netwatch"))
        self._tasks.append(asyncio.create_task(self._publish(), name="publish-metrics"))
        self._tasks.append(asyncio.create_task(self._watch_barge_ins(), name="barge-ins"))
        if settings.livekit.recycle_above_mib > 0 and self.notifier.enabled:
            # Only under systemd: run by hand, nobody would start the kiosk again.
            self._tasks.append(asyncio.create_task(self._recycle_when_idle(), name="recycle"))
        # Retention at start and on a timer, not only when a message is stored.
        self._tasks.append(asyncio.create_task(
            run_retention(self.spool, settings.spool.retention_check_seconds), name="retention"))
        if settings.spool.recipient_public_key is None:
            _LOGGER.warning("spool.recipient_public_key is unset: visitors are not offered to leave a message "
                            "(kiosk doctor security)")
        self.watchdog = HealthWatchdog(self.notifier, [
            # A lost device (gone, or route none) is a state the kiosk shows and retries, not a hang: withholding
            # the pings for it had systemd abort the kiosk every 13 s while an array was out (field bench).
            progress_check("capture", lambda: self.engine.frames_processed, max_stall_seconds=MAX_STALL_SECONDS,
                           now=loop.time, excused=lambda: self.engine.lost),
            self._controller_alive,
        ])
        self._tasks.append(asyncio.create_task(self.watchdog.run(), name="watchdog"))
        # The first link attempt: is the service there and the model available? Offline from boot is a
        # state like any other, so this never blocks start-up for long.
        refusal = await self._check_service()
        self.bus.post(Started())
        if refusal is not None:
            self.bus.post(ApiRefused(refusal, "start-up check"))
        self.notifier.ready("offline" if refusal is not None else "idle")
        # Only now: a restarted kiosk is ready for the next visitor before this is loaded (kiosk.audio.aec.preload).
        self._tasks.append(asyncio.create_task(asyncio.to_thread(preload_delay_estimate), name="preload"))
        _LOGGER.info("kiosk started: route %s, mode %s, AEC %s, %s", self.route.route.value,
                     settings.interaction.mode.value, settings.aec.backend.value,
                     "offline" if refusal is not None else "online")

    async def aclose(self) -> None:
        """Stop everything in reverse order; safe to call twice."""
        self.notifier.stopping()
        if self._probe is not None:
            self._probe.cancel()
        if self.watchdog is not None:
            await self.watchdog.aclose()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        self.netwatch.close()
        if self.deliverer is not None:
            await self.deliverer.aclose()
        if self.controller is not None:
            await self.controller.aclose()
        await self.link.aclose()
        await self.session_api.aclose()
        await self.route.aclose()
        await self.engine.aclose()
        if self.metrics_server is not None:
            await self.metrics_server.aclose()
        if self.panel is not None:
            self.panel.close()
        self.spool.close()
        self.notifier.close()

    # ------------------------------------------------------------------------------------ behaviour
    def _snapshot(self) -> KioskSnapshot:
        """What the agent's tools may know of the kiosk (kiosk_status; whether a conversation is under way)."""
        state = self.controller.state if self.controller is not None else None
        return KioskSnapshot(
            conversing=state is not None and state.phase in (Phase.LISTENING, Phase.THINKING, Phase.SPEAKING),
            online=state.online if state is not None else False,
            route=self.route.route.value,
            queued_messages=self.status.spool_messages,  # refreshed every PUBLISH_INTERVAL_SECONDS
        )

    def _controller_alive(self) -> tuple[bool, str]:
        controller = self.controller
        if controller is None:
            return False, "controller not started"
        stalled = asyncio.get_running_loop().time() - controller.alive_seconds
        return stalled <= MAX_STALL_SECONDS, f"controller loop stalled for {stalled:.1f} s"

    async def _check_service(self) -> RefusalReason | None:
        """Whether the model is available, and (offline since a room failed) its LiveKit server answers.

        None: all is well. The session API answering is not enough: with the LiveKit server down (restarting,
        its host unreachable) every visitor would wait through a connect and its retries before hearing that the
        kiosk is offline.
        """
        try:
            status = await self.session_api.model_status(self.settings.session.profiles[0].llm_model)
        except SessionRefused as error:
            return error.reason
        except (TimeoutError, KioskError, OSError) as error:
            _LOGGER.warning("session API check failed: %s", error)
            return RefusalReason.UNREACHABLE
        if status == "maintenance":
            return RefusalReason.MAINTENANCE
        server = self.link.server_url
        if server is None or self._room_failed_at is None:
            return None
        if await reachable_check(server, self.settings.session.request_timeout_seconds)() is None:
            return None
        failed_for = asyncio.get_running_loop().time() - self._room_failed_at
        if failed_for < self.settings.session.livekit_check_max_seconds:
            return RefusalReason.UNREACHABLE
        # A deployment may grant another LiveKit server next time: a dead old one must not keep the kiosk offline
        # for good. The next session finds out; if it fails too, the check starts over.
        _LOGGER.warning("the last session's LiveKit server still takes no connections after %.0f s, but the session "
                        "API answers: online again on the API's word", failed_for)
        return None

    def _observe(self, old: KioskState, event: Event, transition: Transition) -> None:
        """Keep the status endpoint current, run the offline probe while offline, wake delivery online."""
        new = transition.state
        now = asyncio.get_running_loop().time()
        self.barge_ins.note_echo_rejected(self.engine.chain.counters.echo_rejected_frames, now)
        self.barge_ins.observe(old, event, transition.effects, now)
        self.metrics.set_offline(None if new.online else new.offline_reason.value)
        self.metrics.voice_barge_in.set(1.0 if new.voice_barge_in else 0.0)
        self.status.state = new.phase.value
        self.status.route = new.route.value
        self.recycle.note(self._quiet(new), now)
        if isinstance(event, ApiRefused):
            self.status.last_refusal = event.reason.value
        if isinstance(event, LinkLost) and not new.online and self._room_failed_at is None:
            self._room_failed_at = now
        # Offline and not known to be back: a LinkUp while a visitor hears the message offer or leaves a message
        # leaves the kiosk offline until that ends (then idle), and asking again meanwhile would only be load.
        if new.phase is Phase.OFFLINE and not new.online and (self._probe is None or self._probe.done()):
            last = event.reason if isinstance(event, ApiRefused) else None
            # The check answers for an API that did not answer or was in maintenance, and for a room whose server
            # took no connections (it waits for that server); not for a refusal of the session request itself, nor
            # for an agent that never came.
            covered = not self._offer_taken_back and (last in PROBE_COVERS if last is not None else (
                isinstance(event, LinkLost) and event.transient and self._room_failed_at is not None))
            probe = Probe(self._check_service, self.bus.post, self.probe_backoff, sleep=self.netwatch.sleep)
            self._probe = asyncio.create_task(probe.run(last, covered=covered), name="probe")
        if isinstance(event, VoiceStopped):
            self.link.note_visitor_stopped(event.at_seconds)  # time to first agent audio starts here
        if isinstance(event, LinkUp) and any(isinstance(effect, StopCues) for effect in transition.effects):
            self._offer_taken_back = True
        elif isinstance(event, SessionOpened):
            self._offer_taken_back = False
        if isinstance(event, (LinkUp, SessionOpened)):
            self._room_failed_at = None
            if self._probe is not None:
                self._probe.cancel()
            if self.deliverer is not None:
                self.deliverer.wake()
        for listener in self.listeners:
            listener(old, event, transition)

    def _quiet(self, state: KioskState) -> bool:
        """Nobody is using the kiosk: idle or offline, no button held, no voice, no message being recorded."""
        return (state.phase in QUIET_PHASES and not state.talk_held and not state.voice_active
                and state.message is MessageStep.NONE)

    async def _recycle_when_idle(self) -> None:
        """End the kiosk at a quiet moment once the rtc SDK's kept memory passed the budget (kiosk.recycle)."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            controller = self.controller
            sending = self.deliverer is not None and self.deliverer.passing
            self.recycle.note(controller is not None and self._quiet(controller.state) and not sending, now)
            why = self.recycle.due(now, resident_mib())
            if why is not None:
                _LOGGER.warning("restarting to hand back memory the rtc SDK keeps: %s", why)
                self.notifier.status("restarting to hand back memory")
                self.restart_requested.set()
                return
            await asyncio.sleep(RECYCLE_CHECK_SECONDS)

    async def _deliver_when_the_network_returns(self) -> None:
        """Stored messages go out as soon as the kernel says the network is back, not at the next retry."""
        assert self.deliverer is not None
        while True:
            await self.netwatch.wait()
            self.deliverer.wake()

    async def _publish(self) -> None:
        """Copy the polled figures (AEC, devices, route, spool) into the metrics and the status."""
        while True:
            with contextlib.suppress(Exception):  # figures are best effort; never let them end the kiosk
                stats = self.engine.aec_stats()
                self.status.aec_erle_db = round(stats.erle_db, 1)
                self.status.aec_delay_ms = stats.delay_ms
                self.metrics.aec_erle_db.set(stats.erle_db)
                if stats.delay_ms is not None:
                    self.metrics.aec_delay_ms.set(stats.delay_ms)
                self.metrics.set_route(self.route.route.value)
                engine = self.engine
                self.metrics.count_to(self.metrics.audio_stalls, engine.stalls)
                self.metrics.count_to(self.metrics.audio_recoveries, engine.recoveries)
                self.metrics.count_to(self.metrics.device_losses, engine.device_losses)
                self.metrics.count_to(self.metrics.audio_reader_failures, engine.reader_failures)
                self.metrics.count_to(self.metrics.route_switches, self.route.switches)
                publish_stats(self.spool, self.metrics, self.status)
            with contextlib.suppress(Exception):  # the same: a figure missing is better than a kiosk down
                self._publish_fleet()
            await asyncio.sleep(PUBLISH_INTERVAL_SECONDS)

    def _publish_fleet(self) -> None:
        """The fleet's figures (docs/fleet.md, "Watching"): identity, barge-ins, credits, the files' figures."""
        m, settings = self.metrics, self.settings
        update = read_status(self.system_root)
        m.set_info(kiosk_id(settings), settings.metrics.site, update.image_version, update.slot)
        files = m.files
        known_boot = update.slot is not None and update.committed_slot is not None
        files.set("kiosk_update_trial", float(update.trial) if known_boot else None)
        files.set("kiosk_update_pending", float(update.pending_slot is not None) if known_boot else None)
        files.set("kiosk_update_last_rolled_back",
                  None if update.last_rolled_back is None else float(update.last_rolled_back))
        finished = (update.last_trial or {}).get("finished_unix")
        files.set("kiosk_update_last_trial_timestamp_seconds",
                  float(finished) if isinstance(finished, int | float) and not isinstance(finished, bool) else None)
        sweep = read_sweep_record(settings.metrics.doctor_record)
        for name, value in (
                ("kiosk_doctor_last_sweep_timestamp_seconds", None if sweep is None else sweep.finished_unix),
                ("kiosk_doctor_last_sweep_measured", None if sweep is None else float(sweep.measured)),
                ("kiosk_doctor_last_aec_ok", None if sweep is None else float(sweep.aec_ok)),
                ("kiosk_doctor_last_erle_db", None if sweep is None else sweep.erle_db),
                ("kiosk_doctor_last_echo_delay_ms", None if sweep is None else sweep.delay_ms),
                ("kiosk_doctor_last_noise_floor_dbfs", None if sweep is None else sweep.noise_floor_dbfs),
                ("kiosk_doctor_last_capture_ratio", None if sweep is None else sweep.capture_rate)):
            files.set(name, value)
        m.publish_credits(settings.metrics)
        counts = self.barge_ins.counts
        m.count_to(m.barge_ins.labels(trigger="voice"), counts.voice)
        m.count_to(m.barge_ins.labels(trigger="press"), counts.press)
        m.count_to(m.barge_ins_likely_false, counts.likely_false)
        m.count_to(m.barge_ins_likely_missed, counts.likely_missed)

    async def _watch_barge_ins(self) -> None:
        """Sample the chain's echo rejections and close the barge-in judge's windows (kiosk.bargein)."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            self.barge_ins.note_echo_rejected(self.engine.chain.counters.echo_rejected_frames, now)
            self.barge_ins.poll(now)
            await asyncio.sleep(BARGE_IN_SAMPLE_SECONDS)


def kiosk_id(settings: Settings) -> str:
    """``metrics.kiosk_id``, else this machine's short host name (``unknown`` when that is not a plain name)."""
    from kiosk.settings import MetricsSettings

    if settings.metrics.kiosk_id:
        return settings.metrics.kiosk_id
    name = socket.gethostname().split(".")[0]
    try:
        MetricsSettings(kiosk_id=name)
    except ValueError:
        return "unknown"
    return name


async def run_until_stopped(settings: Settings) -> int:
    """Run the kiosk until SIGTERM or SIGINT, or until it asks systemd to start it again (kiosk.recycle)."""
    kiosk = Kiosk(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await kiosk.start()
        controller_task = kiosk.controller.start() if kiosk.controller is not None else None
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(kiosk.restart_requested.wait())]
        if controller_task is not None:
            waiters.append(controller_task)  # type: ignore[arg-type]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if controller_task is not None and controller_task.done() and not stop.is_set():
            # A programming error ended the controller: exit non-zero and let systemd restart us.
            controller_task.result()
    finally:
        await kiosk.aclose()
    return 0


def _cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    """The service's main job."""
    return asyncio.run(run_until_stopped(settings))


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``kiosk run``."""
    run = subparsers.add_parser("run", help="run the kiosk (the service's main job; the default)")
    run.set_defaults(handler=_cmd_run)

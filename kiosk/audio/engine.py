"""The audio engine: devices, the capture chain per 10 ms frame, playout, recording and device loss.

``AudioEngine`` implements ``kiosk.ports.AudioEngine`` (gate, cues, recording, clearing playback) and
``kiosk.ports.PlayoutSink`` (agent audio in). It owns an ``AudioIO``; a reader task on the loop wakes
every 10 ms, moves what the PortAudio callbacks captured through the ``CaptureChain`` (a backlog one frame
at a time, giving the loop back in between, so a process that waited for the CPU does not then hold up the
room link and playout for the whole backlog) and:

* posts the chain's VoiceStarted / VoiceStopped to the ``EventSink``;
* pushes the frames the gate lets through to the ``FrameSink`` (the room link's published track);
* keeps cleaned frames while a visitor's message is being recorded;
* posts PlaybackStarted / PlaybackFinished as the playout buffer fills and runs dry;
* watches the device. A stream that still runs but has delivered nothing for ``audio.device_timeout_ms`` is
  a stall (a busy CPU, an SD-card write, a USB reset, the sound server pausing): it is restarted in place,
  keeping the session, the queued agent audio and the echo canceller (which re-estimates the delay if the
  restart moved it); nothing reaches the controller, and the visitor hears a pause. Only a stream that
  stopped, a device gone from enumeration, or ``_MAX_RESTARTS`` restarts in a row that bring no audio
  back post DeviceLost, close the device and retry with backoff until it opens again (DeviceFound).
  ``stalls`` and ``recoveries`` count them.

``switch_devices`` moves capture and playback to other devices (the route manager's headset switch)
without touching the ``FrameSink``: the published track goes on, only its source changes.
``last_frame_seconds`` (loop time of the newest captured frame) feeds the health watchdog.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from kiosk.audio.format import FRAME_SAMPLES, RATE_HZ
from kiosk.audio.io import AudioIO, StreamLayout
from kiosk.audio.pipeline import CaptureChain, ChainFrame
from kiosk.errors import DeviceError
from kiosk.events import DeviceFound, DeviceLost, PlaybackFinished, PlaybackStarted, VoiceStarted
from kiosk.ports import AecStats, EventSink, FrameSink, Pcm, Recording
from kiosk.settings import AecBackend, Settings

_LOGGER = logging.getLogger(__name__)

_TICK_SECONDS = 0.01
_REOPEN_FIRST_SECONDS = 0.25
_SETTLE_SECONDS = 3.0
# In-place restarts of a stalled stream in a row (no audio in between) before the device counts as lost.
_MAX_RESTARTS = 3
_READER_PAUSE_SECONDS = 1.0  # after the reader failed, before it runs again
# A closed gate still passes frames captured before it closed, which a busy capture path delivers late; a stalled
# one is not waited for longer than this.
_DRAIN_MAX_SECONDS = 1.5
# A restart that has not returned by then is stuck in the driver (PortAudio can loop inside ALSA's error
# handling after a USB device was power-cycled): the device counts as lost and a fresh one is opened.
_RESTART_TIMEOUT_SECONDS = 5.0


# Called with (chain frame, mic frame, reference frame, loop time) for every frame; for benchmarks and tests.
FrameListener = Callable[[ChainFrame, Pcm, Pcm, float], None]


def without_aec(settings: Settings) -> Settings:
    """The settings for a route with no acoustic echo path (headset): echo cancellation off."""
    aec = settings.aec.model_copy(update={"backend": AecBackend.NONE})
    return settings.model_copy(update={"aec": aec})


# A dry playout buffer counts as the end of playback only after this long (network jitter between packets).
PLAYBACK_END_HANGOVER_SECONDS = 0.3


class AudioEngine:
    """Capture chain and playout on real devices (see the module docstring)."""

    def __init__(self, settings: Settings, events: EventSink, frames: FrameSink | None = None, *,
                 capture_device: str | None = None, playback_device: str | None = None,
                 echo_cancel: bool = True) -> None:
        self.settings = settings
        self._events = events
        self._frames = frames
        self.capture_device = capture_device or settings.audio.capture_device
        self.playback_device = playback_device or settings.audio.playback_device
        self.echo_cancel = echo_cancel
        self.chain = CaptureChain(settings if echo_cancel else without_aec(settings))
        self.io: AudioIO | None = None
        self.layout: StreamLayout | None = None
        self.last_frame_seconds: float | None = None  # loop time of the newest captured frame
        self.frames_processed = 0
        self.device_losses = 0
        self.stalls = 0  # a running stream stopped delivering for audio.device_timeout_ms
        self.recoveries = 0  # ... and came back after an in-place restart, the session kept
        self.reader_failures = 0  # the reader raised (logged with its traceback) and was started again
        self._restarts_in_row = 0
        self.dropped_playout_samples = 0  # agent audio discarded while no device was open
        self.listeners: list[FrameListener] = []
        # Asked before a device that stopped and cannot be restarted is declared lost (the route manager sets it):
        # True when it moved the route meanwhile (a headset pulled out: back to the array, the session kept).
        self.device_gone: Callable[[], Awaitable[bool]] | None = None
        self._gate = False
        self._close_at: float | None = None  # the gate closes at the first frame captured from then on
        self.gate_closed = asyncio.Event()  # set while no frame from before the last close can still go out
        self.gate_closed.set()
        self._voice_in_gate = False  # the chain reported voice in frames that went out since the gate opened
        self._recording: list[Pcm] | None = None
        self._recording_limit_frames = int(settings.spool.max_message_seconds * RATE_HZ / FRAME_SAMPLES)
        self._playing = False
        self._empty_since: float | None = None  # loop time the playout buffer ran dry while playing
        self._drained = asyncio.Event()  # set by the reader whenever the playout buffer is empty
        self._lost = False
        self._last_capture_seconds = 0.0
        self._opened_seconds = 0.0
        self._capturing = False  # the current device has delivered audio since it opened
        self._task: asyncio.Task[None] | None = None
        self._reopen: asyncio.Task[None] | None = None
        self._switch_lock = asyncio.Lock()
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Open the devices (or, if that fails, post DeviceLost and keep retrying) and start the reader."""
        loop = asyncio.get_running_loop()
        self._last_capture_seconds = loop.time()
        try:
            await self._open(self.capture_device, self.playback_device)
        except DeviceError as error:
            _LOGGER.error("%s", error.message)
            self._mark_lost()
        self._task = asyncio.create_task(self._reader(), name="audio-engine")

    async def aclose(self) -> None:
        """Stop the reader and close the devices."""
        self._closed = True
        for task in (self._task, self._reopen):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._reopen = None
        await self._close_io()

    async def _open(self, capture: str, playback: str) -> None:
        settings = self.settings.audio
        io = AudioIO(settings, capture, playback)
        layout = await asyncio.to_thread(io.open)
        self.io, self.layout = io, layout
        self._last_capture_seconds = self._opened_seconds = asyncio.get_running_loop().time()
        self._capturing = False
        self._restarts_in_row = 0

    async def _close_io(self) -> None:
        io, self.io = self.io, None
        self._drained.set()  # nothing will play any more: release anyone waiting for the end
        if io is not None:
            await asyncio.to_thread(io.close)

    # ------------------------------------------------------------------ route
    async def switch_devices(self, capture: str, playback: str, *, echo_cancel: bool) -> bool:
        """Move to other devices (route change); the frame sink and the gate stay. False if they fail to open."""
        async with self._switch_lock:
            if self._reopen is not None:
                self._reopen.cancel()
                self._reopen = None
            await self._close_io()
            self.capture_device, self.playback_device = capture, playback
            if echo_cancel != self.echo_cancel:
                self.echo_cancel = echo_cancel
                self.chain = CaptureChain(self.settings if echo_cancel else without_aec(self.settings))
                if self._gate:
                    self.chain.open_gate()
            try:
                await self._open(capture, playback)
            except DeviceError as error:
                _LOGGER.error("%s", error.message)
                self._mark_lost()
                return False
            if self._lost:
                self._lost = False
                self._events(DeviceFound(device=capture))
            return True

    async def suspend(self) -> None:
        """No usable device at all (route none): close and stop retrying until ``switch_devices``."""
        async with self._switch_lock:
            if self._reopen is not None:
                self._reopen.cancel()
                self._reopen = None
            await self._close_io()
            if not self._lost:
                self._lost = True
                self.device_losses += 1
                self._events(DeviceLost(device=self.capture_device))

    def _mark_lost(self) -> None:
        if not self._lost:
            self._lost = True
            self.device_losses += 1
            _LOGGER.warning("audio device '%s' lost; retrying", self.capture_device)
            self._events(DeviceLost(device=self.capture_device))
        if self._reopen is None and not self._closed:
            self._reopen = asyncio.create_task(self._reopen_loop(), name="audio-reopen")

    async def _reopen_loop(self) -> None:
        delay = _REOPEN_FIRST_SECONDS
        try:
            while True:
                await asyncio.sleep(delay)
                async with self._switch_lock:
                    if self.io is not None:
                        return
                    try:
                        await self._open(self.capture_device, self.playback_device)
                    except DeviceError as error:
                        _LOGGER.debug("reopen failed: %s", error.message)
                        delay = min(delay * 2, self.settings.audio.reopen_max_seconds)
                        continue
                    self._lost = False
                    _LOGGER.info("audio device '%s' is back", self.capture_device)
                    self._events(DeviceFound(device=self.capture_device))
                    return
        finally:
            if self._reopen is asyncio.current_task():
                self._reopen = None

    # ------------------------------------------------------------------ reader
    async def _reader(self) -> None:
        """Run the reader; when it fails, log the failure with its traceback, count it and start it again.

        A reader that died unseen left a kiosk that looked alive and heard nothing (the field bench found one).
        After a failure it pauses ``_READER_PAUSE_SECONDS``: a failure on every frame logs once a second, and the
        frames it cannot process stop the health watchdog's pings, so systemd restarts the service.
        """
        while True:
            try:
                await self._run()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.reader_failures += 1
                _LOGGER.exception("the audio reader failed (failure %d); it starts again", self.reader_failures)
                await asyncio.sleep(_READER_PAUSE_SECONDS)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        timeout_seconds = self.settings.audio.device_timeout_ms / 1000
        while True:
            await asyncio.sleep(_TICK_SECONDS)
            io = self.io
            now = loop.time()
            if io is None:
                if self._close_at is not None:
                    self._close_gate()  # no device: nothing more will come
                continue
            if io.pump():
                self._last_capture_seconds = now
                self._capturing = True
                # Audio captured by a restarted stream that has stopped again (in the moment between its start
                # and its failing poll) is not a recovery: that attempt failed and is tried again below.
                if self._restarts_in_row and io.active:
                    self._restarts_in_row = 0
                    self.recoveries += 1
                    _LOGGER.info("audio from '%s' is back after a stall; the session goes on", self.capture_device)
            pending = io.pending_frames
            while (pair := io.pull()) is not None:
                pending -= 1
                self._frame(pair[0], pair[1], now - _TICK_SECONDS * max(pending, 0))
                if pending > 0:
                    # A backlog (the process waited for the CPU) is worked off a frame at a time, letting the
                    # loop serve the room link, playout and the buttons in between: one frame's chain work,
                    # not a second's, is the longest the loop waits for the reader.
                    await asyncio.sleep(0)
                    if self.io is not io:
                        break  # switched or closed meanwhile: what the old device held is not wanted
            self._playout_events(io)
            if self._close_at is not None and now - self._close_at > _DRAIN_MAX_SECONDS:
                self._close_gate()  # the capture path stalled: what it still holds is not waited for
            # Sound servers take a while to settle after opening (a first block, then a gap): allow more then.
            settled = self._capturing and now - self._opened_seconds > _SETTLE_SECONDS
            limit = timeout_seconds if settled else max(timeout_seconds, _SETTLE_SECONDS)
            stalled = now - self._last_capture_seconds > limit
            if not io.active or stalled:
                if self._switch_lock.locked():
                    continue  # a switch is closing or opening the device on purpose
                running = io.active
                # An in-place restart has not brought audio back yet: a stream that stopped again (a sound
                # server still stalled makes the fresh stream fail at once) is one more failed attempt, tried
                # again once it has had the same allowance, not a lost device.
                recovering = self._restarts_in_row > 0
                if not running and recovering and not stalled:
                    continue
                _LOGGER.warning("no capture from '%s' for %.0f ms (stream %s)", self.capture_device,
                                (now - self._last_capture_seconds) * 1000, "running" if running else "stopped")
                if (running or recovering) and self._restarts_in_row < _MAX_RESTARTS and await self._restart(io):
                    continue
                await self._close_io()
                if self.device_gone is not None and await self.device_gone():
                    continue  # another route took over (or none, which the route manager reports)
                self._mark_lost()

    async def _restart(self, io: AudioIO) -> bool:
        """Restart a stalled stream in place; False if the device is gone or the restart hangs."""
        if self._restarts_in_row == 0:
            self.stalls += 1
        self._restarts_in_row += 1
        loop = asyncio.get_running_loop()
        async with self._switch_lock:
            if self.io is not io:
                return True  # replaced meanwhile (a route switch): nothing to restart
            # Thread boundary: PortAudio's open and close block; the loop keeps serving events meanwhile.
            restart = loop.run_in_executor(None, io.restart)
            try:
                await asyncio.wait_for(asyncio.shield(restart), _RESTART_TIMEOUT_SECONDS)
            except DeviceError as error:
                _LOGGER.warning("restarting '%s' failed: %s", self.capture_device, error.message)
                return False
            except TimeoutError:
                # Abandoned: the thread stays blocked in the driver; a fresh AudioIO is opened instead.
                _LOGGER.error("restarting '%s' hung for %.0f s: the device counts as lost", self.capture_device,
                              _RESTART_TIMEOUT_SECONDS)
                self.io = None
                return False
        self._last_capture_seconds = self._opened_seconds = loop.time()
        self._capturing = False
        _LOGGER.info("restarted '%s' in place (stall %d, attempt %d)", self.capture_device, self.stalls,
                     self._restarts_in_row)
        return True

    def _frame(self, mic: Pcm, ref: Pcm, now: float) -> None:
        if self._close_at is not None and now >= self._close_at:
            self._close_gate()
        passing = self._gate or self._close_at is not None
        out = self.chain.process(mic, ref, now)
        if passing and any(isinstance(event, VoiceStarted) for event in out.events):
            self._voice_in_gate = True
        self.frames_processed += 1
        self.last_frame_seconds = now
        for event in out.events:
            self._events(event)
        if self._frames is not None:
            for frame in out.stream:
                # Stamped when the frame left the capture ring: the link measures the rest of the path from here.
                self._frames.push_frame(np.array(frame, dtype=np.int16), captured_at=now)
        if self._recording is not None and len(self._recording) < self._recording_limit_frames:
            self._recording.append(np.array(out.pcm, dtype=np.int16))
        for listener in self.listeners:
            listener(out, mic, ref, now)

    def _playout_events(self, io: AudioIO) -> None:
        queued = io.playout_queued_samples > 0
        now = asyncio.get_running_loop().time()
        if queued:
            self._empty_since = None
            if not self._playing:
                self._playing = True
                self._events(PlaybackStarted())
            return
        self._drained.set()
        if not self._playing:
            return
        # Agent audio arrives in bursts over the network: a buffer that runs dry for a moment between two
        # packets is not the end of the answer. Only a gap longer than the hangover is.
        if self._empty_since is None:
            self._empty_since = now
        elif now - self._empty_since >= PLAYBACK_END_HANGOVER_SECONDS:
            self._playing = False
            self._empty_since = None
            self._events(PlaybackFinished())

    # ------------------------------------------------------------------ ports.AudioEngine
    def set_gate(self, streaming: bool, *, preroll: bool = True) -> None:
        """Open or close the gate to the room link (pre-roll goes out first on opening, unless dropped).

        Closing lets the frames captured before this moment through still: on a busy machine the capture path
        delivers them late, and they hold the visitor's last words (a release ends the turn after them).
        ``gate_closed`` is set once the last of them has gone out (at most ``_DRAIN_MAX_SECONDS`` later).
        """
        self._gate = streaming
        if streaming:
            self._close_at = None
            self.gate_closed.clear()
            self._voice_in_gate = self.chain.segmenter.in_speech
            self.chain.open_gate(preroll=preroll)
        elif self._close_at is None and not self.gate_closed.is_set():
            self._close_at = asyncio.get_running_loop().time()

    async def wait_gate_closed(self) -> bool:
        """Return once no frame captured before the gate's last close can still go out; True if they held voice.

        True when the chain reported the visitor starting to speak (or already speaking as the gate opened) in
        the frames that went out since the gate opened, including those processed after the close.
        """
        await self.gate_closed.wait()
        return self._voice_in_gate

    def _close_gate(self) -> None:
        self._close_at = None
        self.chain.close_gate()
        self.gate_closed.set()

    def clear_playback(self) -> None:
        """Drop queued agent audio at once (barge-in, session end)."""
        if self.io is not None:
            self.io.clear_playout()

    async def play_cue(self, name: str) -> None:
        """Play a local cue to the end (it also feeds the echo reference, like any playout)."""
        from kiosk.audio.cues import load_cue

        pcm = load_cue(name, self.settings.spool.language, self.settings.spool.cues_directory)
        await self.write(pcm)
        await self.drain()

    def start_recording(self) -> None:
        """Start keeping cleaned capture audio (up to spool.max_message_seconds); voice is segmented afresh."""
        self._recording = []
        self.chain.restart_voice()

    def stop_recording(self) -> Recording:
        """Stop and hand over what was recorded."""
        frames, self._recording = self._recording or [], None
        pcm = np.concatenate(frames) if frames else np.zeros(0, dtype=np.int16)
        return Recording(pcm=pcm, duration_seconds=len(pcm) / RATE_HZ)

    # ------------------------------------------------------------------ ports.PlayoutSink
    async def write(self, pcm: Pcm) -> None:
        """Queue 16 kHz mono audio; waits while the bounded playout buffer is full."""
        offset = 0
        while offset < len(pcm):
            io = self.io
            if io is None:
                # Drop: no device to play on (lost, or route none); holding the agent's audio would only
                # make it play late, and stalling the producer would stall the room link.
                self.dropped_playout_samples += len(pcm) - offset
                return
            taken = io.queue_playout(pcm[offset:])
            offset += taken
            if offset < len(pcm):
                await asyncio.sleep(_TICK_SECONDS)

    def clear(self) -> None:
        """Drop everything queued (barge-in)."""
        self.clear_playback()

    async def drain(self) -> None:
        """Wait until the playout buffer has played out (or the device went away)."""
        if self.io is not None and self.io.playout_queued_samples > 0:
            self._drained.clear()
            await self._drained.wait()

    # ------------------------------------------------------------------ introspection
    @property
    def lost(self) -> bool:
        """Whether the engine currently has no working device."""
        return self._lost

    def stats(self) -> dict[str, Any]:
        """Counters for metrics and the status endpoint."""
        counters = self.io.counters if self.io is not None else None
        return {
            "capture_device": self.capture_device,
            "playback_device": self.playback_device,
            "layout": self.layout.describe() if self.layout is not None else None,
            "frames": self.frames_processed,
            "device_losses": self.device_losses,
            "stalls": self.stalls,
            "recoveries": self.recoveries,
            "dropped_playout_samples": self.dropped_playout_samples,
            "stream": vars(counters) if counters is not None else None,
            "chain": dataclasses.asdict(self.chain.counters),
        }

    def aec_stats(self) -> AecStats:
        """The echo canceller's current estimates (ERLE, delay) on the route in use."""
        return self.chain.echo_canceller.stats()

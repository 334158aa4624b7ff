"""The audio route: array, headset or none, following the configured devices as they come and go.

The route manager knows the configured devices by name (``audio.capture_device`` / ``playback_device`` for
the array, ``audio.headset_capture_device`` / ``headset_playback_device`` for the headset) and decides:

* headset present: capture and playback move to it (``AudioEngine.switch_devices``); the published track
  stays, only its source changes. A headset has no acoustic echo path: echo cancellation goes off and the
  route is posted with ``echo_path_verified=False`` (the controller falls back to push-to-talk semantics
  for barge-in).
* headset gone: back to the array (echo cancellation on, ``echo_path_verified`` True unless the
  configured backend is ``none``), also when the engine's stall timeout saw it go first (the engine asks
  ``device_gone`` before it declares its device lost).
* neither: route none; the engine closes and posts DeviceLost; the manager keeps checking and moves back
  as soon as a device returns (DeviceFound from the engine, RouteChanged from here).

Watching: PortAudio only enumerates at initialisation, so devices are listed by a fresh PortAudio in a
child process (but for the first check, at start-up: a listing made in this process before the engine opened
its stream, ``list_here``), and only when a cheap fingerprint of the sound configuration changed (sound cards and
ALSA configuration files, polled every ``audio.route_poll_seconds``), plus periodically while no route
works. On the Pi, udev events (pyudev, when installed) trigger a check at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from kiosk.audio.devices import (
    DeviceInfo,
    card_usb_id,
    enumerate_fresh,
    list_devices,
    present,
    sound_fingerprint,
)
from kiosk.audio.engine import AudioEngine
from kiosk.errors import DeviceError
from kiosk.events import HeadsetPlugged, HeadsetUnplugged, Route, RouteChanged
from kiosk.ports import EventSink
from kiosk.settings import AecBackend, Settings

_LOGGER = logging.getLogger(__name__)

_RETRY_NONE_SECONDS = 2.0  # re-enumerate this often while no route works, even without a fingerprint change

Enumerator = Callable[[], Awaitable[Sequence[DeviceInfo]]]


class RouteManager:
    """Chooses and switches the audio route (see the module docstring)."""

    def __init__(self, settings: Settings, engine: AudioEngine, events: EventSink, *,
                 enumerate_devices: Enumerator = enumerate_fresh,
                 fingerprint: Callable[[], str] = sound_fingerprint,
                 asound: Path = Path("/proc/asound")) -> None:
        self.settings = settings
        self.engine = engine
        self._events = events
        self._enumerate = enumerate_devices
        self._fingerprint = fingerprint
        self._asound = asound
        self._refused_usb_id: str | None = None  # the last unlisted headset, logged once
        on_array = engine.capture_device == settings.audio.capture_device and not engine.lost
        self.route = Route.ARRAY if on_array else Route.NONE
        self.headset_present = False
        self.switches = 0  # route changes made (for metrics and the session report)
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._udev: Any = None
        self._checking = asyncio.Lock()  # the watch and the engine's device_gone may ask at the same moment
        engine.device_gone = self._device_gone

    async def _device_gone(self) -> bool:
        """The engine's device stopped and cannot be restarted: check now, not at the next poll.

        The engine's stall timeout can see a pulled headset before the poll or udev does; without this it would
        post DeviceLost and end the conversation although the array is there. True when the route moved (to
        the other device, or to none, which posts ``RouteChanged(none)`` or ``DeviceLost`` itself).
        """
        before = self.route
        return await self.check() is not before

    @property
    def echo_path_verified(self) -> bool:
        """Whether voice barge-in is safe on the current route (the array with an echo canceller)."""
        return self.route is Route.ARRAY and self.settings.aec.backend is not AecBackend.NONE

    async def start(self, devices: Sequence[DeviceInfo] | None = None) -> None:
        """Check once (move to the headset if it is already plugged in), then watch.

        ``devices``: a listing to check against instead of a fresh one (``list_here`` before the engine opened).
        """
        async with self._checking:
            await self._check(devices)
        self._start_udev()
        self._task = asyncio.create_task(self._watch(), name="audio-route")

    async def aclose(self) -> None:
        """Stop watching."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._udev is not None:
            with contextlib.suppress(Exception):  # teardown of an optional fast path: nothing to recover
                asyncio.get_running_loop().remove_reader(self._udev.fileno())
            self._udev = None

    async def _watch(self) -> None:
        poll = self.settings.audio.route_poll_seconds
        last = self._fingerprint()
        since_check = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), poll)
            woken = self._wake.is_set()
            self._wake.clear()
            since_check += poll
            current = self._fingerprint()
            stale = self.route is Route.NONE and since_check >= _RETRY_NONE_SECONDS
            if woken or current != last or stale:
                last = current
                since_check = 0.0
                await self.check()

    async def check(self) -> Route:
        """Enumerate the devices now and switch the route if it should change; returns the route."""
        async with self._checking:
            return await self._check()

    @staticmethod
    async def list_here() -> Sequence[DeviceInfo] | None:
        """The devices as this process's PortAudio lists them; None if it cannot.

        Right only while none of this process's streams is open (at start-up): later checks list in a child
        process (module docstring), which costs a second Python start, 0.2 s more before a restarted kiosk is
        ready.
        """
        try:
            return await asyncio.to_thread(list_devices)
        except OSError as error:  # PortAudio did not start: the first check lists in a child, as later ones
            _LOGGER.debug("listing sound devices in this process failed: %s", error)
            return None

    async def _check(self, devices: Sequence[DeviceInfo] | None = None) -> Route:
        audio = self.settings.audio
        if devices is None:
            try:
                devices = await self._enumerate()
            except DeviceError as error:
                _LOGGER.warning("%s", error.message)
                return self.route
        array = present(audio.capture_device, "capture", devices) and present(
            audio.playback_device, "playback", devices)
        headset = present(audio.headset_capture_device, "capture", devices) and present(
            audio.headset_playback_device, "playback", devices) and self._headset_allowed()
        if headset != self.headset_present:
            self.headset_present = headset
            _LOGGER.info("headset %s", "plugged in" if headset else "unplugged")
            self._events(HeadsetPlugged() if headset else HeadsetUnplugged())
        want = Route.HEADSET if headset else Route.ARRAY if array else Route.NONE
        if want is not self.route:
            await self._switch(want)
        return self.route

    def _headset_allowed(self) -> bool:
        """Whether the present headset is one the site listed (``audio.headset_usb_ids``; '*' allows any).

        A visitor's own USB device that calls itself a headset must not become the kiosk's microphone and speaker.
        """
        audio = self.settings.audio
        if "*" in audio.headset_usb_ids:
            return True
        usb_id = card_usb_id(audio.headset_card_id, self._asound)
        if usb_id in audio.headset_usb_ids:
            return True
        if usb_id != self._refused_usb_id:
            self._refused_usb_id = usb_id
            _LOGGER.warning("a headset (card %s, USB id %s) is not in audio.headset_usb_ids: ignored; add its id "
                            "(lsusb) to use it", audio.headset_card_id, usb_id or "unknown: not a USB card")
        return False

    async def _switch(self, want: Route) -> None:
        audio = self.settings.audio
        if want is Route.NONE:
            _LOGGER.error("no usable sound device: '%s' is gone%s; retrying", audio.capture_device,
                          " and no headset is present" if audio.headset_capture_device else "")
            await self.engine.suspend()
            self._set(Route.NONE)
            return
        if want is Route.HEADSET:
            assert audio.headset_capture_device and audio.headset_playback_device
            ok = await self.engine.switch_devices(audio.headset_capture_device, audio.headset_playback_device,
                                                  echo_cancel=False)
        else:
            ok = await self.engine.switch_devices(audio.capture_device, audio.playback_device, echo_cancel=True)
        # A device that is listed but fails to open leaves the route at none; the next check retries.
        self._set(want if ok else Route.NONE)

    def _set(self, route: Route) -> None:
        if route is self.route:
            return
        self.route = route
        self.switches += 1
        _LOGGER.info("audio route: %s (echo path verified: %s)", route.value, self.echo_path_verified)
        self._events(RouteChanged(route=route, echo_path_verified=self.echo_path_verified))

    # ------------------------------------------------------------------ udev fast path (the Pi)
    def _start_udev(self) -> None:
        try:
            import pyudev
        except ImportError:
            return  # optional: fingerprint polling covers it
        try:
            context = pyudev.Context()
            monitor = pyudev.Monitor.from_netlink(context)
            monitor.filter_by(subsystem="sound")
            monitor.start()
        except Exception as error:  # netlink may be unavailable in a container: polling still works
            _LOGGER.debug("udev monitoring unavailable: %s", error)
            return

        def ready() -> None:
            # Runs on the loop (add_reader): drain the netlink socket and wake the watcher.
            while monitor.poll(timeout=0) is not None:
                pass
            self._wake.set()

        asyncio.get_running_loop().add_reader(monitor.fileno(), ready)
        self._udev = monitor

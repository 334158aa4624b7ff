from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from kiosk.audio.devices import DeviceInfo, enumerate_fresh
from kiosk.audio.engine import AudioEngine
from kiosk.audio.route import Enumerator, RouteManager
from kiosk.events import (
    DeviceFound,
    DeviceLost,
    HeadsetPlugged,
    HeadsetUnplugged,
    Route,
    RouteChanged,
    VoiceStarted,
)
from kiosk.settings import load_settings
from kiosk_dev.behaviour import EventRecorder as Recorder
from kiosk_dev.pulse import ARRAY_DEVICE, HEADSET_DEVICE, HEADSET_MIC_SINK, PulseServer
from kiosk_dev.speech import espeak, normalise

pytestmark = [pytest.mark.pulse, pytest.mark.slow]




async def until(predicate: Callable[[], bool], timeout_seconds: float) -> None:
    async def poll() -> None:
        while not predicate():  # noqa: ASYNC110 - polls plain counters that have no event to wait on
            await asyncio.sleep(0.05)
    await asyncio.wait_for(poll(), timeout_seconds)


def route_events(sink: Recorder) -> list[tuple[Route, bool]]:
    return [(e.route, e.echo_path_verified) for e in sink.of(RouteChanged)]  # type: ignore[attr-defined]


async def route_rig(route_poll_seconds: float, enumerate_devices: Enumerator = enumerate_fresh,
                    ) -> tuple[Recorder, AudioEngine, RouteManager]:
    """An engine and a route manager on the virtual array and any headset, both started as the kiosk starts them."""
    settings = load_settings(None, audio={
        "capture_device": ARRAY_DEVICE, "playback_device": ARRAY_DEVICE, "headset_capture_device": HEADSET_DEVICE,
        "headset_playback_device": HEADSET_DEVICE, "route_poll_seconds": route_poll_seconds,
        "device_timeout_ms": 500, "headset_usb_ids": ["*"]})
    sink = Recorder()
    engine = AudioEngine(settings, sink, sink)
    manager = RouteManager(settings, engine, sink, enumerate_devices=enumerate_devices)
    devices = await manager.list_here()
    await engine.start()
    await manager.start(devices)
    return sink, engine, manager


async def test_a_headset_plugged_in_at_start_is_chosen_without_a_child_listing(pulse_devices: PulseServer) -> None:
    """The first check uses the listing made before the engine opened (a child process is 0.2 s more at start)."""
    listings: list[int] = []

    async def fresh() -> list[DeviceInfo]:
        listings.append(1)
        return await enumerate_fresh()

    pulse_devices.plug("headset")
    sink, engine, manager = await route_rig(route_poll_seconds=30, enumerate_devices=fresh)
    try:
        assert manager.route is Route.HEADSET and engine.capture_device == HEADSET_DEVICE and not engine.echo_cancel
        assert sink.of(HeadsetPlugged) and route_events(sink) == [(Route.HEADSET, False)]
        assert listings == []
        await manager.check()  # later checks: engine streams are open, so a fresh PortAudio in a child
        assert listings == [1] and manager.route is Route.HEADSET
    finally:
        await manager.aclose()
        await engine.aclose()


async def test_headset_takes_over_and_hands_back(pulse_devices: PulseServer) -> None:
    pulse_devices.unplug("headset")
    sink, engine, manager = await route_rig(route_poll_seconds=0.2)
    switch_ms: list[float] = []
    try:
        assert manager.route is Route.ARRAY
        await until(lambda: engine.frames_processed > 20, 10)
        engine.set_gate(True)
        await until(lambda: len(sink.frames) > 20, 10)

        # Plugged in mid-conversation: the route moves, the frame sink keeps getting frames.
        started = time.monotonic()
        pulse_devices.plug("headset")
        await sink.wait_for(RouteChanged, 10)
        switch_ms.append((time.monotonic() - started) * 1000)
        assert sink.of(HeadsetPlugged)
        assert route_events(sink) == [(Route.HEADSET, False)]
        assert engine.capture_device == HEADSET_DEVICE and not engine.echo_cancel
        frames = len(sink.frames)
        await until(lambda: len(sink.frames) > frames + 20, 10)
        # The visitor speaks into the headset: capture really comes from it now.
        voice = (normalise(espeak("Can you hear me through the headset?"), -20) * 32767).astype(np.int16)
        pulse_devices.play(HEADSET_MIC_SINK, voice.tobytes()).wait(timeout=30)
        await sink.wait_for(VoiceStarted, 10)

        # Unplugged: back to the array, echo cancellation on again.
        started = time.monotonic()
        pulse_devices.unplug("headset")
        await sink.wait_for(RouteChanged, 10, count=2)
        switch_ms.append((time.monotonic() - started) * 1000)
        assert sink.of(HeadsetUnplugged)
        assert route_events(sink)[-1] == (Route.ARRAY, True)
        assert engine.capture_device == ARRAY_DEVICE and engine.echo_cancel
        frames = len(sink.frames)
        await until(lambda: len(sink.frames) > frames + 20, 10)

        # The array lost with no headset: route none, DeviceLost; back when it returns.
        pulse_devices.unplug("array")
        await sink.wait_for(RouteChanged, 10, count=3)
        assert route_events(sink)[-1] == (Route.NONE, False)
        await sink.wait_for(DeviceLost, 10)
        await asyncio.sleep(1.0)
        pulse_devices.plug("array")
        await sink.wait_for(RouteChanged, 15, count=4)
        await sink.wait_for(DeviceFound, 10)
        assert route_events(sink)[-1] == (Route.ARRAY, True)
        frames = engine.frames_processed
        await until(lambda: engine.frames_processed > frames + 20, 10)
    finally:
        await manager.aclose()
        await engine.aclose()
    assert manager.switches == 4
    print(f"route switch times (ms): {[round(ms) for ms in switch_ms]}")


async def test_only_a_listed_headset_takes_the_route(pulse_devices: PulseServer, tmp_path: Path) -> None:
    """A USB device that merely calls itself a headset is ignored; the site's listed one takes over.

    The sound devices are real (the private PulseAudio server); the USB id comes from a scratch
    ``/proc/asound`` (no USB card here), as the card's ``usbid`` file reads on a Pi.
    """
    pulse_devices.unplug("headset")
    asound = tmp_path / "asound"
    (asound / "kioskheadset").mkdir(parents=True)
    (asound / "kioskheadset" / "usbid").write_text("1d6b:0104\n")  # a visitor's gadget
    settings = load_settings(None, audio={
        "capture_device": ARRAY_DEVICE, "playback_device": ARRAY_DEVICE, "headset_capture_device": HEADSET_DEVICE,
        "headset_playback_device": HEADSET_DEVICE, "route_poll_seconds": 0.2, "device_timeout_ms": 500})
    assert "046d:0a44" in settings.audio.headset_usb_ids and "*" not in settings.audio.headset_usb_ids
    sink = Recorder()
    engine = AudioEngine(settings, sink, sink)
    await engine.start()
    manager = RouteManager(settings, engine, sink, asound=asound)
    await manager.start()
    try:
        assert manager.route is Route.ARRAY
        pulse_devices.plug("headset")
        await asyncio.sleep(1.5)  # several route checks
        assert manager.route is Route.ARRAY and not sink.of(HeadsetPlugged)
        (asound / "kioskheadset" / "usbid").write_text("046d:0a44\n")  # the site's listed headset
        await manager.check()
        assert manager.route is Route.HEADSET and sink.of(HeadsetPlugged)
    finally:
        await manager.aclose()
        await engine.aclose()


async def test_a_headset_pulled_before_the_route_check_sees_it_hands_back_to_the_array(
        pulse_devices: PulseServer) -> None:
    """Field bench (headset_plug, a loaded machine): the engine's stall timeout saw the pulled headset before the
    route manager's poll did, its in-place restart found no device, and it posted DeviceLost: the conversation
    ended although the array was there. Now the engine asks the route manager first. The poll is made too slow
    to see the unplug here, so only that path can move the route."""
    sink, engine, manager = await route_rig(route_poll_seconds=60)  # the headset is plugged in: it takes the route
    try:
        assert manager.route is Route.HEADSET
        await until(lambda: engine.frames_processed > 20, 10)
        pulse_devices.unplug("headset")
        await sink.wait_for(RouteChanged, 15, count=2)
        assert route_events(sink)[-1] == (Route.ARRAY, True) and sink.of(HeadsetUnplugged)
        assert engine.capture_device == ARRAY_DEVICE and engine.echo_cancel
        frames = engine.frames_processed
        await until(lambda: engine.frames_processed > frames + 20, 10)
        assert not sink.of(DeviceLost) and engine.device_losses == 0
    finally:
        await manager.aclose()
        await engine.aclose()

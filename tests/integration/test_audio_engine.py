from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from kiosk.audio.engine import AudioEngine
from kiosk.events import DeviceFound, DeviceLost, PlaybackFinished, PlaybackStarted, VoiceStarted
from kiosk.ports import Pcm
from kiosk.settings import Settings, load_settings
from kiosk_dev.behaviour import EventRecorder as Recorder
from kiosk_dev.pulse import ARRAY_DEVICE, ROOM_SINK, PulseServer
from kiosk_dev.speech import espeak, normalise
from kiosk_dev.virtual_room import VirtualRoom

pytestmark = [pytest.mark.pulse, pytest.mark.slow]




def settings_for(device: str = ARRAY_DEVICE, **audio: object) -> Settings:
    # The virtual devices' speaker-to-microphone path measured about 0.5 s here (sound-server buffering),
    # beyond the default search range of the delay estimator.
    return load_settings(None, audio={"capture_device": device, "playback_device": device, **audio},
                         aec={"max_delay_ms": 1000})


def speech(text: str, dbfs: float) -> np.ndarray:
    return normalise(espeak(text), dbfs)


async def until(predicate: Callable[[], bool], timeout_seconds: float) -> None:
    async def poll() -> None:
        while not predicate():  # noqa: ASYNC110 - polls plain counters that have no event to wait on
            await asyncio.sleep(0.05)
    await asyncio.wait_for(poll(), timeout_seconds)


async def test_visitor_speech_is_detected_and_streamed(pulse_devices: PulseServer) -> None:
    sink = Recorder()
    engine = AudioEngine(settings_for(), sink, sink)
    with VirtualRoom(pulse_devices) as room:
        await engine.start()
        try:
            await until(lambda: engine.frames_processed > 20, 10)
            engine.set_gate(True)
            engine.start_recording()
            room.say(speech("Hello, where can I find the registration desk?", -24))
            await sink.wait_for(VoiceStarted, 15)
            await until(lambda: not room.busy, 15)
            await asyncio.sleep(0.5)
            recording = engine.stop_recording()
        finally:
            await engine.aclose()
    assert len(sink.frames) > 50  # the gate let cleaned frames through to the frame sink
    assert recording.duration_seconds > 1.0
    loud = np.sqrt(np.mean(recording.pcm.astype(np.float64) ** 2))
    assert loud > 100, "the recording holds no speech"
    assert engine.last_frame_seconds is not None


async def test_agent_audio_plays_and_echo_is_reduced(pulse_devices: PulseServer) -> None:
    sink = Recorder()
    engine = AudioEngine(settings_for(), sink, sink)
    levels: list[tuple[float, float, bool]] = []

    def listen(frame: Any, mic: Pcm, ref: Pcm, now: float) -> None:
        out = frame.pcm
        levels.append((float(np.dot(mic.astype(np.float64), mic)), float(np.dot(out.astype(np.float64), out)),
                       bool(frame.speech)))

    engine.listeners.append(listen)
    agent = (speech("Welcome to our booth. I can tell you about the products, the talks and where to find "
                    "the coffee. Ask me anything you like, and take your time.", -18) * 32767).astype(np.int16)
    with VirtualRoom(pulse_devices, echo_gain_db=-6.0):
        await engine.start()
        try:
            await until(lambda: engine.frames_processed > 20, 10)
            await engine.write(np.concatenate([agent, agent]))
            await engine.drain()
            await asyncio.sleep(0.5)
            aec = engine.chain.echo_canceller.stats()  # type: ignore[attr-defined]
        finally:
            await engine.aclose()
    assert sink.of(PlaybackStarted) and sink.of(PlaybackFinished)
    mic_energy = sum(m for m, _, _ in levels[len(levels) // 2:])
    out_energy = sum(o for _, o, _ in levels[len(levels) // 2:])
    assert mic_energy > 0, "no echo reached the microphone"
    reduction_db = 10 * np.log10(mic_energy / max(out_energy, 1.0))
    print(f"live echo reduction {reduction_db:.1f} dB; {aec}")
    # Loose on purpose: through the sound server the echo path moved between 0.05 and 0.9 s from run to run
    # on a loaded machine (see docs/audio-io.md), which no canceller holds; when it stays put the reduction
    # is 20-60 dB. The deterministic figures are in the offline tests and the benchmark.
    assert reduction_db > 1.0, f"echo reduced by only {reduction_db:.1f} dB ({aec}, {engine.stats()})"


async def test_a_backlog_is_worked_off_without_holding_the_loop(pulse_devices: PulseServer) -> None:
    """A process that waited for the CPU finds a backlog of captured frames: the reader works it off a frame at
    a time, so the rest of the loop (the room link, playout, buttons) runs between frames, not after all."""
    engine = AudioEngine(settings_for(), Recorder())
    await engine.start()
    most_per_turn = 0
    try:
        await until(lambda: engine.frames_processed > 50, 10)

        async def watch() -> None:
            nonlocal most_per_turn
            seen = engine.frames_processed
            while True:
                await asyncio.sleep(0)
                most_per_turn = max(most_per_turn, engine.frames_processed - seen)
                seen = engine.frames_processed

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.1)
        before = engine.frames_processed
        time.sleep(0.5)  # the loop held as by a busy CPU: the callbacks go on capturing  # noqa: ASYNC251
        await until(lambda: engine.frames_processed > before + 60, 10)
        watcher.cancel()
    finally:
        await engine.aclose()
    assert not engine.lost
    # The 0.5 s hold leaves about 50 frames waiting; each turn of the loop processes at most a couple.
    assert most_per_turn <= 2, most_per_turn


@pytest.mark.parametrize("spoken", [True, False])
async def test_voice_in_frames_drained_after_the_close_is_reported(pulse_devices: PulseServer, spoken: bool) -> None:
    """The gate closes (a release) while the visitor's words still wait to be processed, as on a busy machine:
    they go out, and the engine says they held voice, so the turn they end is answered; without speech, none."""
    sink = Recorder()
    engine = AudioEngine(settings_for(), sink, sink)
    seen = {"frames": 0, "voice_before_close": False}

    def busy_then_release(_out: Any, mic: Pcm, _ref: Pcm, _now: float) -> None:
        # From the first frame of the words (or after a second of silence) the loop is held for 1.2 s, as
        # by a busy CPU, while capture goes on; then the visitor's release closes the gate.
        seen["frames"] += 1
        loud = int(np.abs(mic.astype(np.int32)).max()) > 1000
        if engine._gate and (loud if spoken else seen["frames"] > 100):
            seen["voice_before_close"] = bool(sink.of(VoiceStarted))
            time.sleep(1.2)
            engine.set_gate(False)

    player = None
    await engine.start()
    try:
        await until(lambda: engine.frames_processed > 50, 10)
        engine.set_gate(True)
        engine.listeners.append(busy_then_release)
        if spoken:
            pcm = (speech("Where is the registration desk, please?", -20) * 32767).astype(np.int16)
            player = pulse_devices.play(ROOM_SINK, pcm.tobytes())
        heard = await asyncio.wait_for(engine.wait_gate_closed(), 20)
    finally:
        await engine.aclose()
        if player is not None:
            player.kill()  # the words must not go on into the next test's room (the sound server is shared)
            player.wait()
    assert not seen["voice_before_close"]
    assert heard is spoken, engine.stats()


async def test_device_unplug_posts_lost_and_replug_found(pulse_devices: PulseServer) -> None:
    sink = Recorder()
    engine = AudioEngine(settings_for(device_timeout_ms=500), sink, sink)
    await engine.start()
    try:
        await until(lambda: engine.frames_processed > 20, 10)
        pulse_devices.unplug("array")
        await sink.wait_for(DeviceLost, 10)
        assert engine.lost
        frames = engine.frames_processed
        await asyncio.sleep(1.0)
        pulse_devices.plug("array")
        await sink.wait_for(DeviceFound, 20)
        await until(lambda: engine.frames_processed > frames + 20, 10)
    finally:
        await engine.aclose()
    assert not engine.lost
    assert engine.device_losses == 1


async def test_a_failure_in_the_reader_is_logged_and_the_reader_goes_on(pulse_devices: PulseServer,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    sink = Recorder()
    engine = AudioEngine(settings_for(), sink, sink)
    failures = 2

    def fail(*_: Any) -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise RuntimeError("a listener's bug")

    engine.listeners.append(fail)
    await engine.start()
    try:
        await until(lambda: engine.reader_failures == 2, 20)
        frames = engine.frames_processed
        await until(lambda: engine.frames_processed > frames + 50, 20)
    finally:
        await engine.aclose()
    assert "the audio reader failed (failure 2)" in caplog.text and "a listener's bug" in caplog.text
    assert not engine.lost


async def test_a_restarted_stream_that_stops_at_once_is_tried_again_not_lost(pulse_devices: PulseServer) -> None:
    """A sound server still stalled when the engine restarts the stream in place can make the fresh stream fail at
    once (seen with a 3 s freeze: PortAudio's poll failed and the stream stopped). That is a failed attempt of the
    recovery, tried again after the same allowance, not a lost device that would end the visitor's session."""
    sink = Recorder()
    engine = AudioEngine(settings_for(device_timeout_ms=1000), sink, sink)
    await engine.start()
    io = engine.io
    assert io is not None
    restarts: list[bool] = []
    restart = io.restart

    def restart_that_stops_the_first_time() -> Any:
        layout = restart()
        if not restarts:
            # The fresh stream captures a little before its poll fails (as the CI run that found the race saw):
            # that audio must not count as a recovery of the stream that stopped.
            deadline = time.monotonic() + 5
            while not io._mic.available and time.monotonic() < deadline:  # type: ignore[union-attr]
                time.sleep(0.01)
            for stream in io._streams:  # as the failing poll leaves it
                stream.stop_stream()
        restarts.append(io.active)
        return layout

    io.restart = restart_that_stops_the_first_time  # type: ignore[method-assign]
    try:
        await until(lambda: engine.frames_processed > 50, 10)
        pulse_devices.freeze()
        await asyncio.sleep(1.5)
        pulse_devices.thaw()
        await until(lambda: engine.recoveries == 1, 15)
        frames = engine.frames_processed
        await until(lambda: engine.frames_processed > frames + 50, 10)
    finally:
        pulse_devices.thaw()
        await engine.aclose()
    assert not sink.of(DeviceLost), engine.stats()
    assert restarts == [False, True] and engine.stalls == 1, (restarts, engine.stats())


@pytest.mark.parametrize("freeze_seconds", [1.5, 3.0])
async def test_a_stall_is_recovered_in_place_and_the_answer_goes_on(pulse_devices: PulseServer,
                                                                   freeze_seconds: float) -> None:
    """The sound server stops for a while (as a busy Pi or a USB reset stalls the stream): no DeviceLost, the
    stream restarts in place, the agent's queued answer is still played out, and capture resumes."""
    sink = Recorder()
    engine = AudioEngine(settings_for(device_timeout_ms=1000), sink, sink)
    await engine.start()
    answer = (np.sin(np.arange(16000 * 6) / 7.0) * 6000).astype(np.int16)  # 6 s of "agent audio"
    try:
        await until(lambda: engine.frames_processed > 50, 10)
        writer = asyncio.create_task(engine.write(answer))
        await sink.wait_for(PlaybackStarted, 5)
        await asyncio.sleep(0.5)
        pulse_devices.freeze()
        await asyncio.sleep(freeze_seconds)
        pulse_devices.thaw()
        frames = engine.frames_processed
        await until(lambda: engine.frames_processed > frames + 100, 15)  # capture is back
        await asyncio.wait_for(writer, 15)  # the answer was taken up again, none of it thrown away
        await sink.wait_for(PlaybackFinished, 15)
    finally:
        pulse_devices.thaw()
        await engine.aclose()
    assert not sink.of(DeviceLost), engine.stats()
    # One stall from the freeze (a loaded machine may add one of its own): each recovered in place.
    assert engine.stalls >= 1 and engine.recoveries == engine.stalls, engine.stats()
    assert engine.dropped_playout_samples == 0

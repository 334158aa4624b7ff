"""The virtual room itself (the rig every live audio test and the field bench stand on)."""

from __future__ import annotations

import subprocess
import time

import numpy as np
import psutil
import pytest

from kiosk_dev.pulse import ROOM_SINK, PulseServer
from kiosk_dev.virtual_room import VirtualRoom

pytestmark = [pytest.mark.pulse, pytest.mark.slow]


def room_level(pulse: PulseServer, seconds: float) -> float:
    """The loudest sample the room sink's monitor (the array's microphones) carries over ``seconds``."""
    parec = subprocess.Popen(["parec", "-d", f"{ROOM_SINK}.monitor", "--raw", "--format=s16le", "--rate=16000",
                              "--channels=1", "--latency-msec=10"], env=pulse.env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
    try:
        time.sleep(seconds)
    finally:
        parec.terminate()
    data, _ = parec.communicate(timeout=10)
    pcm = np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2")
    return float(np.abs(pcm.astype(np.int32)).max()) if pcm.size else 0.0


def test_a_writer_that_ends_by_itself_is_replaced(pulse_devices: PulseServer) -> None:
    """A field soak found the room's writer ended on a loaded machine, and the room silent for good after it:
    the kiosk heard none of the visitors' questions for the rest of the run."""
    visitor = (np.sin(np.arange(16000 * 4) / 3.0) * 0.3).astype(np.float32)
    with VirtualRoom(pulse_devices) as room:
        assert room._process is not None
        [writer] = [p for p in psutil.Process(room._process.pid).children() if p.name() == "pacat"]
        writer.kill()
        deadline = time.monotonic() + 10
        while room.writer_restarts == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert room.writer_restarts >= 1
        room.say(visitor)
        level = room_level(pulse_devices, 3.0)
    assert level > 3000, level  # the visitor (about 9800 at the peak) is heard through the new writer

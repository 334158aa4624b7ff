from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kiosk.audio.devices import list_devices, match_device, sound_fingerprint
from kiosk.errors import DeviceError
from kiosk_dev.pulse import ARRAY_DEVICE, HEADSET_DEVICE, MIC_DEVICE, SPEAKER_DEVICE, PulseServer

pytestmark = pytest.mark.pulse


def test_virtual_devices_are_found_by_name(pulse_devices: PulseServer) -> None:
    devices = list_devices()
    names = {d.name for d in devices}
    assert {ARRAY_DEVICE, SPEAKER_DEVICE, MIC_DEVICE, HEADSET_DEVICE} <= names
    assert match_device("KIOSK_ARRAY", "capture", devices).name == ARRAY_DEVICE
    assert match_device("speaker", "playback", devices).name == SPEAKER_DEVICE
    with pytest.raises(DeviceError) as error:
        match_device("kiosk", "capture", devices)
    assert error.value.code == "device_ambiguous"


def test_kiosk_devices_command_lists_and_resolves(pulse_devices: PulseServer, tmp_path: object) -> None:
    env = {**os.environ, "KIOSK_AUDIO__CAPTURE_DEVICE": "kiosk_array", "KIOSK_AUDIO__PLAYBACK_DEVICE": "nosuch"}
    out = subprocess.run([sys.executable, "-m", "kiosk", "devices"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "kiosk_array" in out.stdout and "kiosk_headset" in out.stdout
    assert "audio.capture_device = 'kiosk_array' -> 'kiosk_array'" in out.stdout
    assert "no playback device matches 'nosuch'" in out.stdout
    listed = subprocess.run([sys.executable, "-m", "kiosk", "devices", "--json"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert ARRAY_DEVICE in {d["name"] for d in json.loads(listed.stdout)}


def test_unplugged_device_leaves_a_fresh_enumeration(pulse_devices: PulseServer) -> None:
    before = sound_fingerprint()
    pulse_devices.unplug("headset")
    assert sound_fingerprint() != before
    listed = subprocess.run([sys.executable, "-m", "kiosk.audio.devices", "--json"], capture_output=True, text=True,
                            timeout=60)
    names = {d["name"] for d in json.loads(listed.stdout)}
    assert HEADSET_DEVICE not in names and ARRAY_DEVICE in names
    pulse_devices.plug("headset")
    listed = subprocess.run([sys.executable, "-m", "kiosk.audio.devices", "--json"], capture_output=True, text=True,
                            timeout=60)
    assert HEADSET_DEVICE in {d["name"] for d in json.loads(listed.stdout)}

"""Sound devices by name: PortAudio's capture and playback devices, and ``kiosk devices``.

The configuration names devices by a case-insensitive substring of the PortAudio name (never an index:
indexes change when a USB device is plugged in). An exact name wins over substrings; no match or several
matches raise ``DeviceError`` listing the candidates.

PortAudio builds its device list once per initialisation, and cannot re-initialise while a stream is open,
so a running kiosk sees new devices through a fresh enumeration in a child process (``enumerate_fresh``),
started only when the system's sound configuration changed (``sound_fingerprint``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kiosk.errors import DeviceError

if TYPE_CHECKING:
    from kiosk.settings import Settings

_LOGGER = logging.getLogger(__name__)

Direction = Literal["capture", "playback"]
_ENUMERATE_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class DeviceInfo:
    """One PortAudio device as the kiosk sees it."""

    index: int  # valid only within the PortAudio session that listed it
    name: str
    host_api: str
    max_input_channels: int
    max_output_channels: int
    default_rate_hz: int

    def supports(self, direction: Direction) -> bool:
        """Whether the device can capture (or play)."""
        return (self.max_input_channels if direction == "capture" else self.max_output_channels) > 0


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence C-level stderr (ALSA and JACK probe chatter) for a short block; not for the engine's run."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


_ALSA_HANDLER: Any = None
_JACK_HANDLER: Any = None
_ALSA_LIB: Any = None


def _alsa() -> Any:
    global _ALSA_LIB
    if _ALSA_LIB is None:
        name = ctypes.util.find_library("asound")
        if name is None:
            return None
        try:
            _ALSA_LIB = ctypes.CDLL(name)
        except OSError:
            return None
    return _ALSA_LIB


def refresh_alsa_config() -> None:
    """Re-read ALSA's configuration files if they changed (``snd_config_update``).

    PortAudio lists ALSA devices from the configuration tree ALSA cached when it was first read; a device
    whose definition came or went since (a USB card, a virtual device) would otherwise be listed wrongly.
    """
    lib = _alsa()
    if lib is not None:
        lib.snd_config_update()


def silence_alsa_errors() -> None:
    """Route ALSA (and JACK) library messages (probe chatter of absent plugins) nowhere, once per process."""
    global _ALSA_HANDLER
    if _ALSA_HANDLER is not None:
        return
    lib = _alsa()
    if lib is None:
        return
    handler_type = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                                    ctypes.c_char_p)
    _ALSA_HANDLER = handler_type(lambda *_: None)  # kept referenced: ALSA calls it from C
    lib.snd_lib_error_set_handler(_ALSA_HANDLER)
    _silence_jack()


def _silence_jack() -> None:
    """Send libjack's error and info messages nowhere.

    PortAudio probes JACK at start-up; with no JACK server (the kiosk never uses one) libjack prints
    "Cannot connect to server" lines on every enumeration.
    """
    global _JACK_HANDLER
    name = ctypes.util.find_library("jack")
    if name is None:
        return
    try:
        jack = ctypes.CDLL(name)
    except OSError:
        return
    handler_type = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
    _JACK_HANDLER = handler_type(lambda _: None)  # kept referenced: libjack calls it from C
    jack.jack_set_error_function(_JACK_HANDLER)
    jack.jack_set_info_function(_JACK_HANDLER)


def list_devices(pa: Any = None) -> list[DeviceInfo]:
    """Every PortAudio device (opens PortAudio for the call unless a ``pyaudio.PyAudio`` is given)."""
    import pyaudio

    silence_alsa_errors()
    own = pa is None
    if own:
        refresh_alsa_config()
        pa = pyaudio.PyAudio()
    try:
        out = []
        for i in range(pa.get_device_count()):
            info = pa.get_device_info_by_index(i)
            api = pa.get_host_api_info_by_index(int(info["hostApi"]))["name"]
            out.append(DeviceInfo(index=i, name=str(info["name"]), host_api=str(api),
                                  max_input_channels=int(info["maxInputChannels"]),
                                  max_output_channels=int(info["maxOutputChannels"]),
                                  default_rate_hz=int(info["defaultSampleRate"])))
        return out
    finally:
        if own:
            pa.terminate()


def match_device(name: str, direction: Direction, devices: Sequence[DeviceInfo],
                 field: str | None = None) -> DeviceInfo:
    """The device ``name`` refers to: exact (case-insensitive) name first, else a unique substring match.

    ``field`` names the setting in error messages (default: ``capture_device`` / ``playback_device``).
    """
    usable = [d for d in devices if d.supports(direction)]
    wanted = name.casefold()
    exact = [d for d in usable if d.name.casefold() == wanted]
    if len(exact) == 1:
        return exact[0]
    partial = exact or [d for d in usable if wanted in d.name.casefold()]
    field = field or ("capture_device" if direction == "capture" else "playback_device")
    listing = ", ".join(f"'{d.name}'" for d in usable) or "none"
    if not partial:
        raise DeviceError(f"no {direction} device matches '{name}'; set audio.{field} to part of one of: "
                          f"{listing} (see `kiosk devices`)", "device_missing")
    if len(partial) > 1:
        names = ", ".join(f"'{d.name}'" for d in partial)
        raise DeviceError(f"'{name}' matches several {direction} devices ({names}); set audio.{field} to a "
                          f"longer part of the one you mean", "device_ambiguous")
    return partial[0]


def present(name: str | None, direction: Direction, devices: Sequence[DeviceInfo]) -> bool:
    """Whether ``name`` resolves to exactly one device (False for an unset name)."""
    if not name:
        return False
    try:
        match_device(name, direction, devices)
    except DeviceError:
        return False
    return True


def card_usb_id(card_id: str, asound: Path = Path("/proc/asound")) -> str | None:
    """The USB vendor:product id of the ALSA card ``card_id`` (``/proc/asound/<id>/usbid``); None if not USB."""
    try:
        return (asound / card_id / "usbid").read_text().strip().lower() or None
    except OSError:
        return None


def sound_fingerprint() -> str:
    """A cheap digest of what decides the device list: sound cards and ALSA configuration files.

    Changes when a USB card comes or goes (``/proc/asound/cards``) or a configuration file is rewritten
    (the virtual devices of ``kiosk_dev.pulse`` come and go that way).
    """
    digest = hashlib.sha1()
    with contextlib.suppress(OSError):
        digest.update(Path("/proc/asound/cards").read_bytes())
    paths = os.environ.get("ALSA_CONFIG_PATH", "").split(":")
    paths += [str(Path.home() / ".asoundrc"), "/etc/asound.conf"]
    for path in paths:
        if not path:
            continue
        with contextlib.suppress(OSError):
            st = os.stat(path)
            digest.update(f"{path}:{st.st_mtime_ns}:{st.st_size}:{st.st_ino}".encode())
    return digest.hexdigest()


async def enumerate_fresh() -> list[DeviceInfo]:
    """The device list from a fresh PortAudio in a child process (this one may have streams open)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kiosk.audio.devices", "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        stdout, _ = await asyncio.wait_for(process.communicate(), _ENUMERATE_TIMEOUT_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise DeviceError("listing sound devices timed out; check the sound server and USB devices",
                          "device_enumeration") from None
    if process.returncode != 0:
        raise DeviceError(f"listing sound devices failed (status {process.returncode}); run `kiosk devices`",
                          "device_enumeration")
    return [DeviceInfo(**item) for item in json.loads(stdout)]


def _print_table(devices: Sequence[DeviceInfo], settings: Settings | None) -> None:
    print(f"{'in':>3} {'out':>3} {'rate':>6}  {'host api':<8}  name")
    for d in devices:
        print(f"{d.max_input_channels:>3} {d.max_output_channels:>3} {d.default_rate_hz:>6}  {d.host_api:<8}  "
              f"{d.name}")
    if settings is None:
        return
    audio = settings.audio
    print()
    wanted: list[tuple[str, str | None, Direction]] = [
        ("capture_device", audio.capture_device, "capture"),
        ("playback_device", audio.playback_device, "playback"),
        ("headset_capture_device", audio.headset_capture_device, "capture"),
        ("headset_playback_device", audio.headset_playback_device, "playback"),
    ]
    for field, name, direction in wanted:
        if name is None:
            print(f"audio.{field}: unset")
            continue
        try:
            print(f"audio.{field} = '{name}' -> '{match_device(name, direction, devices, field).name}'")
        except DeviceError as error:
            print(f"audio.{field} = '{name}' -> {error.message}")


def _cmd_devices(args: argparse.Namespace, settings: Settings) -> int:
    """List capture and playback devices with the names the configuration uses."""
    with quiet_stderr():
        devices = list_devices()
    if args.json:
        print(json.dumps([asdict(d) for d in devices], indent=2))
        return 0
    _print_table(devices, settings)
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``kiosk devices``."""
    parser = subparsers.add_parser("devices", help="list sound devices and what the configured names match")
    parser.add_argument("--json", action="store_true", help="machine-readable list")
    parser.set_defaults(handler=_cmd_devices)


def _main() -> int:
    """``python -m kiosk.audio.devices --json``: the fresh enumeration used by ``enumerate_fresh``."""
    started = time.monotonic()
    with quiet_stderr():
        devices = list_devices()
    json.dump([asdict(d) for d in devices], sys.stdout)
    _LOGGER.debug("enumerated %d devices in %.0f ms", len(devices), (time.monotonic() - started) * 1000)
    return 0


if __name__ == "__main__":
    sys.exit(_main())

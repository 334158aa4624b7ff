"""A private PulseAudio server with virtual sound devices, for the tests, the benchmarks and the demo.

The server runs in user mode with its own runtime directory (``-n``: no default script, only
``module-native-protocol-unix`` and ``module-null-sink`` s), so it never touches a desktop session and
works as root. PortAudio reaches it through ALSA's pulse plugin: an ALSA configuration written to the
server's directory (pointed to by ``ALSA_CONFIG_PATH``) defines one named PCM per virtual device, so the
kiosk opens them by name exactly like real cards:

==================  ===============================================  ===================================
ALSA PCM (device)   pulse devices                                    stands for
==================  ===============================================  ===================================
``kiosk_array``     plays into sink ``kiosk_speaker``, records the   a USB speakerphone / mic array with
                    monitor of sink ``kiosk_room``                   its speaker (one full-duplex device)
``kiosk_speaker``   sink ``kiosk_speaker`` (playback only)           a separate speaker
``kiosk_mic``       monitor of ``kiosk_room`` (capture only)         a separate microphone
``kiosk_headset``   plays into ``kiosk_headset``, records the        a USB headset
                    monitor of ``kiosk_headset_mic``
==================  ===============================================  ===================================

The room simulator (``kiosk_dev.virtual_room``) reads ``kiosk_speaker.monitor`` and writes into
``kiosk_room``; a test speaks into the headset by writing into ``kiosk_headset_mic``.

PortAudio opens the plugin with 30 ms periods (``PA_ALSA_PERIODSIZE=480`` in ``PulseServer.env``: 480 frames at
the 16 kHz the kiosk opens the virtual devices with), as a sound card's own buffer would: left to choose, it
reads below real time on a busy machine, and asking the server for 30 ms instead makes its duplex poll loop
spin (why, and what is left: docs/audio-io.md, "Observed on this machine").

Unplugging a device unloads its null sinks and rewrites the ALSA configuration without its PCMs, so a
fresh PortAudio enumeration no longer lists it (as with a USB card) and open streams on it fail.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kiosk.errors import KioskError

_LOGGER = logging.getLogger(__name__)

# Pulse sinks (sink name -> channels). The room has two channels so channel selection is exercised.
SPEAKER_SINK = "kiosk_speaker"
ROOM_SINK = "kiosk_room"
HEADSET_SINK = "kiosk_headset"
HEADSET_MIC_SINK = "kiosk_headset_mic"
SINK_CHANNELS = {SPEAKER_SINK: 1, ROOM_SINK: 2, HEADSET_SINK: 1, HEADSET_MIC_SINK: 1}
SINK_RATE_HZ = 48000
# PortAudio's ALSA period on the virtual devices, in frames (see the module docstring).
PORTAUDIO_PERIOD_FRAMES = 480
LIMBO_SINK = "kiosk_limbo"  # the suspended default device (see PulseServer.start)

# ALSA PCM names the kiosk's configuration uses.
ARRAY_DEVICE = "kiosk_array"
SPEAKER_DEVICE = "kiosk_speaker"
MIC_DEVICE = "kiosk_mic"
HEADSET_DEVICE = "kiosk_headset"

# Which sinks a device needs (a device is present only while all of them are loaded).
GROUPS = {"array": (SPEAKER_SINK, ROOM_SINK), "headset": (HEADSET_SINK, HEADSET_MIC_SINK)}
_SYSTEM_ALSA_CONF = "/usr/share/alsa/alsa.conf"
_START_TIMEOUT_SECONDS = 10.0


class PulseError(KioskError):
    """The private PulseAudio server could not be started or driven."""

    def __init__(self, message: str) -> None:
        super().__init__("pulse_failed", message)


def _pcm(name: str, device: str, description: str) -> str:
    # handle_underrun false: an underrun must not turn into an ALSA xrun that stops PortAudio's poll loop
    # (observed: duplex streams then got no further callbacks).
    return (f'pcm.{name} {{ type pulse; device "{device}"; handle_underrun false; '
            f'hint {{ show on; description "{description}" }} }}\n')


def _asym(name: str, playback: str, capture: str, description: str) -> str:
    return (f'pcm.{name} {{ type asym; playback.pcm "{playback}"; capture.pcm "{capture}"; '
            f'hint {{ show on; description "{description}" }} }}\n')


@dataclass
class PulseServer:
    """A private PulseAudio server under ``directory`` (created if needed) with the kiosk's null sinks."""

    directory: Path

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        self.runtime = self.directory / "runtime"
        self.socket = self.runtime / "native"
        self.alsa_conf = self.directory / "asound.conf"
        self._process: subprocess.Popen[bytes] | None = None
        self._modules: dict[str, int] = {}

    # ------------------------------------------------------------------ environment
    @property
    def env(self) -> dict[str, str]:
        """Environment for processes (and PortAudio in this one) that should use this server."""
        return {
            "PULSE_SERVER": f"unix:{self.socket}",
            "PULSE_RUNTIME_PATH": str(self.runtime),
            "ALSA_CONFIG_PATH": f"{_SYSTEM_ALSA_CONF}:{self.alsa_conf}",
            "PA_ALSA_PERIODSIZE": str(PORTAUDIO_PERIOD_FRAMES),
        }

    def apply_env(self) -> None:
        """Point this process at the server (before PortAudio is first initialised here)."""
        os.environ.update(self.env)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the daemon and load every sink; idempotent."""
        if self._process is not None and self._process.poll() is None:
            return
        exe = shutil.which("pulseaudio")
        if exe is None:
            raise PulseError("pulseaudio is not installed: run scripts/bootstrap (it installs pulseaudio)")
        self.runtime.mkdir(parents=True, exist_ok=True)
        self.runtime.chmod(0o700)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        env = {**os.environ, **self.env, "HOME": str(self.directory)}
        log = (self.directory / "pulseaudio.log").open("wb")
        # -n: no default script, so nothing but what we load (no hardware, no desktop modules).
        self._process = subprocess.Popen(
            [exe, "-n", "--daemonize=no", "--exit-idle-time=-1", "--use-pid-file=no", "--system=no",
             "--disallow-exit=no", "--log-target=stderr", "--log-level=warning",
             "-L", f"module-native-protocol-unix socket={self.socket} auth-anonymous=1"],
            env=env, stdout=log, stderr=log, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        while not self._ready():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise PulseError(f"pulseaudio did not start; see {self.directory / 'pulseaudio.log'}")
            time.sleep(0.05)
        # Limbo: the default device, suspended, so streams PulseAudio "rescues" from an unloaded sink (or
        # that reconnect after it went) stall there, as they would on a pulled-out USB device, instead of
        # carrying on with another device's audio.
        self.pactl("load-module", "module-null-sink", f"sink_name={LIMBO_SINK}", f"rate={SINK_RATE_HZ}",
                   "channels=1")
        self.pactl("set-default-sink", LIMBO_SINK)
        self.pactl("set-default-source", f"{LIMBO_SINK}.monitor")
        self.pactl("suspend-sink", LIMBO_SINK, "1")  # suspends its monitor too
        for sink in SINK_CHANNELS:
            self.load_sink(sink)
        _LOGGER.info("private PulseAudio server at %s", self.socket)

    def _ready(self) -> bool:
        return subprocess.run(["pactl", "info"], env={**os.environ, **self.env}, capture_output=True,
                              timeout=5).returncode == 0

    def stop(self) -> None:
        """Stop the daemon (by its own process id)."""
        process, self._process = self._process, None
        self._modules.clear()
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def freeze(self) -> None:
        """Stop the daemon in its tracks (SIGSTOP): every stream stalls while it still counts as running."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """Let a frozen daemon go on (SIGCONT)."""
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    @property
    def pid(self) -> int | None:
        """The daemon's process id while it runs (the field bench stops it with SIGSTOP: a stalled sound server)."""
        return self._process.pid if self.running and self._process is not None else None

    @property
    def running(self) -> bool:
        """Whether the daemon is alive."""
        return self._process is not None and self._process.poll() is None

    # ------------------------------------------------------------------ devices
    def pactl(self, *args: str) -> str:
        """Run ``pactl`` against this server; raise ``PulseError`` with its message on failure."""
        result = subprocess.run(["pactl", *args], env={**os.environ, **self.env}, capture_output=True,
                                text=True, timeout=10)
        if result.returncode != 0:
            raise PulseError(f"pactl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def load_sink(self, sink: str) -> None:
        """Load one of the kiosk's null sinks (plug a device in); rewrites the ALSA configuration."""
        if sink in self._modules:
            return
        channels = SINK_CHANNELS[sink]
        module = self.pactl("load-module", "module-null-sink", f"sink_name={sink}", f"rate={SINK_RATE_HZ}",
                            f"channels={channels}", f"sink_properties=device.description={sink}")
        self._modules[sink] = int(module)
        self.write_alsa_conf()

    def unload_sink(self, sink: str) -> None:
        """Unload a null sink (pull the device out); streams on it fail, enumeration loses it."""
        module = self._modules.pop(sink, None)
        if module is None:
            return
        self.write_alsa_conf()
        # PulseAudio would move the streams to another device ("rescue"); a pulled-out USB device takes its
        # streams with it, so their client connections are ended right after the sink goes.
        clients = self._clients_on(sink)
        self.pactl("unload-module", str(module))
        for client in clients:
            subprocess.run(["pactl", "kill-client", client], env={**os.environ, **self.env}, capture_output=True,
                           timeout=10)

    def _clients_on(self, sink: str) -> set[str]:
        """Client ids with a stream playing into ``sink`` or recording its monitor."""
        def table(kind: str) -> list[list[str]]:
            return [line.split("\t") for line in self.pactl("list", "short", kind).splitlines()]

        sink_ids = {row[0] for row in table("sinks") if len(row) > 1 and row[1] == sink}
        source_ids = {row[0] for row in table("sources") if len(row) > 1 and row[1] == f"{sink}.monitor"}
        clients = {row[2] for row in table("sink-inputs") if len(row) > 2 and row[1] in sink_ids}
        clients |= {row[2] for row in table("source-outputs") if len(row) > 2 and row[1] in source_ids}
        return clients

    def plug(self, group: str) -> None:
        """Plug a device group in: ``array`` or ``headset``."""
        for sink in GROUPS[group]:
            self.load_sink(sink)

    def unplug(self, group: str) -> None:
        """Pull a device group out: ``array`` or ``headset``."""
        for sink in GROUPS[group]:
            self.unload_sink(sink)

    def plugged(self, group: str) -> bool:
        """Whether every sink of a group is loaded."""
        return all(s in self._modules for s in GROUPS[group])

    def write_alsa_conf(self) -> None:
        """Write the ALSA PCMs for the sinks loaded now (atomically: PortAudio may be reading it)."""
        text = "# written by kiosk_dev.pulse: the virtual sound devices of a private PulseAudio server\n"
        if self.plugged("array"):
            text += _pcm(SPEAKER_DEVICE, SPEAKER_SINK, "kiosk virtual speaker")
            text += _pcm(MIC_DEVICE, f"{ROOM_SINK}.monitor", "kiosk virtual microphone (the room)")
            text += _asym(ARRAY_DEVICE, SPEAKER_DEVICE, MIC_DEVICE, "kiosk virtual speakerphone array")
        if self.plugged("headset"):
            text += _pcm("kiosk_headset_out", HEADSET_SINK, "kiosk virtual headset speaker")
            text += _pcm("kiosk_headset_in", f"{HEADSET_MIC_SINK}.monitor", "kiosk virtual headset mic")
            text += _asym(HEADSET_DEVICE, "kiosk_headset_out", "kiosk_headset_in", "kiosk virtual headset")
        tmp = self.alsa_conf.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.alsa_conf)

    def restore(self) -> None:
        """Every device plugged in again (after a test that unplugged some)."""
        for sink in SINK_CHANNELS:
            self.load_sink(sink)

    def play(self, sink: str, pcm_bytes: bytes, rate_hz: int = 16000) -> subprocess.Popen[bytes]:
        """Play raw s16le mono into a sink with ``pacat`` (returns the running process)."""
        process = subprocess.Popen(
            ["pacat", "-d", sink, "--raw", "--format=s16le", f"--rate={rate_hz}", "--channels=1",
             "--latency-msec=20"], env={**os.environ, **self.env}, stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert process.stdin is not None
        process.stdin.write(pcm_bytes)
        process.stdin.close()
        return process


@contextlib.contextmanager
def private_pulse(directory: Path | None = None, *, apply_env: bool = True) -> Iterator[PulseServer]:
    """Run a private server for the duration of a ``with`` block (a temp directory unless given)."""
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kiosk-pulse-")))
        server = PulseServer(directory)
        server.start()
        stack.callback(server.stop)
        if apply_env:
            saved = {key: os.environ.get(key) for key in server.env}
            stack.callback(_restore_env, saved)
            server.apply_env()
        yield server


def _restore_env(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value

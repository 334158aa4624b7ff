"""Start and stop the real livekit-server (pinned v1.13.5) with a config that works offline.

The binary is the pinned build that scripts/bootstrap caches as ``~/.cache/kiosk/bin/livekit-server-v1.13.5``
(built from the Go module after its checksum matched the pinned one), used only while it matches the SHA-256
recorded beside it (``.sha256``); a ``livekit-server`` on PATH is not used. It runs inside the private network namespace
(``kiosk_dev.netns``) and binds 127.0.0.1 plus the namespace's server address; health check ``GET /``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from kiosk.errors import KioskError
from kiosk_dev.netns import SERVER_IF, SERVER_IP, PrivateNetwork

_LOGGER = logging.getLogger(__name__)

LIVEKIT_VERSION = "v1.13.5"
API_KEY = "devkey"
HTTP_PORT = 7880


class LiveKitServerError(KioskError):
    """The local LiveKit server is missing or did not start."""

    def __init__(self, message: str) -> None:
        super().__init__("livekit_server", message)


def find_binary(cache: Path | None = None) -> Path:
    """The cached pinned build, checked against the SHA-256 scripts/bootstrap recorded when it built it."""
    if cache is None:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kiosk" / "bin"
    cached = cache / f"livekit-server-{LIVEKIT_VERSION}"
    record = cached.with_name(cached.name + ".sha256")
    if not (cached.is_file() and os.access(cached, os.X_OK)):
        raise LiveKitServerError(f"no livekit-server build at {cached}: run scripts/bootstrap")
    try:
        recorded = record.read_text().split()[0]
    except (OSError, IndexError):
        raise LiveKitServerError(f"{cached} has no recorded SHA-256 ({record.name}): run scripts/bootstrap, which "
                                 "rebuilds it from the pinned module") from None
    digest = hashlib.sha256()
    with cached.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != recorded:
        raise LiveKitServerError(f"{cached} does not match its recorded SHA-256 (changed since it was built): "
                                 "run scripts/bootstrap to rebuild it")
    return cached


def config_yaml(api_key: str, api_secret: str, node_ip: str = SERVER_IP, interface: str = SERVER_IF,
                port: int = HTTP_PORT) -> str:
    """The offline configuration (no external IP lookup, no STUN outside)."""
    return (
        f"port: {port}\n"
        f'bind_addresses: ["127.0.0.1", "{node_ip}"]\n'
        f'keys: {{{api_key}: "{api_secret}"}}\n'
        "rtc:\n"
        f"  tcp_port: {port + 1}\n"
        f"  udp_port: {port + 2}\n"
        "  use_external_ip: false\n"
        f"  node_ip: {node_ip}\n"
        f"  interfaces: {{includes: [{interface}]}}\n"
        '  stun_servers: ["127.0.0.1:3478"]\n'
        "room: {empty_timeout: 30, departure_timeout: 5}\n"
        "logging: {level: warn}\n"
    )


@dataclass
class LiveKitServer:
    """A running livekit-server; use as a context manager (or ``start()``/``stop()``)."""

    node_ip: str = SERVER_IP
    port: int = HTTP_PORT
    api_key: str = API_KEY
    api_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    startup_timeout_seconds: float = 20.0
    network: PrivateNetwork | None = None  # run in its server-side namespace
    _proc: subprocess.Popen[bytes] | None = None
    _dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        """The WebSocket URL clients connect to."""
        return f"ws://{self.node_ip}:{self.port}"

    def healthy(self) -> bool:
        """``GET /`` answers 200."""
        try:
            with urllib.request.urlopen(f"http://{self.node_ip}:{self.port}/", timeout=1.0) as reply:
                return int(reply.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self) -> LiveKitServer:
        """Start and wait until healthy; raises ``LiveKitServerError`` with the server's output otherwise."""
        binary = find_binary()
        self._dir = tempfile.TemporaryDirectory(prefix="kiosk-livekit-")
        config = Path(self._dir.name) / "livekit.yaml"
        config.write_text(config_yaml(self.api_key, self.api_secret, self.node_ip, port=self.port))
        log = Path(self._dir.name) / "server.log"
        with log.open("wb") as out:
            argv = [str(binary), "--config", str(config)]
            if self.network is not None:
                argv = self.network.server_command(argv)
            self._proc = subprocess.Popen(argv, stdout=out,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        # Startup happens once, before any loop work: polling with a short sleep is fine here.
        deadline = time.monotonic() + self.startup_timeout_seconds
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if self.healthy():
                _LOGGER.info("livekit-server %s at %s (pid %d)", binary.name, self.url, self._proc.pid)
                return self
            time.sleep(0.1)
        output = log.read_text(errors="replace")[-2000:]
        self.stop()
        raise LiveKitServerError(f"livekit-server did not become healthy at {self.url} within "
                                 f"{self.startup_timeout_seconds} s (is the private network up?); output:\n{output}")

    def stop(self) -> None:
        """Stop cleanly (SIGTERM, then SIGKILL after 5 s)."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(timeout=5)
            self._proc = None
        if self._dir is not None:
            with contextlib.suppress(OSError):
                self._dir.cleanup()
            self._dir = None

    def kill(self) -> None:
        """End the server at once (SIGKILL, as a crash would); ``start()`` brings it back with the same keys."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait(timeout=10)
            self._proc = None
        if self._dir is not None:
            with contextlib.suppress(OSError):
                self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> LiveKitServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

"""Private network namespaces joined by a veth pair, for the local LiveKit server and its clients.

libwebrtc (inside the rtc SDK) gathers no loopback candidates, and traffic between two addresses of one
namespace never crosses an interface (so an outage could not be simulated). So there are two private
namespaces joined by a veth pair:

- the kiosk side: the calling process moves itself in with ``unshare(CLONE_NEWNET)`` and keeps ``lk1``
  (10.213.0.2). The Linux call moves only the calling thread; every thread and child process it starts
  afterwards inherits it. So call ``enter_private_network()`` from the main thread before the rtc SDK starts
  its threads (before the first ``rtc.Room``, ``AudioSource`` or ``AudioProcessingModule``); the pytest
  plugin (``kiosk_dev.stack``) and the demo do it first thing;
- the server side: a holder process (``unshare -n sleep infinity``, killed when this process dies) owns
  the second namespace with ``lk0`` (10.213.0.1); the LiveKit server, the stand-in session API and the
  stand-in agent run in it through ``nsenter`` (``PrivateNetwork.server_command``).

``PrivateNetwork.set_link(False)`` takes ``lk1`` down: a real outage between kiosk and backend. It needs
root (CAP_SYS_ADMIN and CAP_NET_ADMIN), as in CI. The host's network is untouched; loopback is up on both
sides so local HTTP still works.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import subprocess
import threading
from dataclasses import dataclass, field

from kiosk.errors import KioskError

_LOGGER = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
SERVER_IF = "lk0"
CLIENT_IF = "lk1"
SERVER_IP = "10.213.0.1"
CLIENT_IP = "10.213.0.2"
PREFIX_LEN = 24


class NetnsError(KioskError):
    """The private network namespace cannot be made."""

    def __init__(self, message: str) -> None:
        super().__init__("netns_failed", message)


@dataclass(frozen=True)
class PrivateNetwork:
    """The kiosk-side namespace this process runs in, and the server-side one (held by ``holder_pid``)."""

    holder_pid: int
    server_ip: str = SERVER_IP
    client_ip: str = CLIENT_IP
    server_if: str = SERVER_IF
    client_if: str = CLIENT_IF
    _holder: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def server_command(self, argv: list[str]) -> list[str]:
        """``argv`` wrapped to run in the server-side namespace."""
        return ["nsenter", "-t", str(self.holder_pid), "-n", "--", *argv]

    def set_link(self, up: bool) -> None:
        """Take the kiosk's side of the veth down (``up=False``: an outage) or bring it back."""
        _ip("link", "set", self.client_if, "up" if up else "down")
        if up:
            # Bringing a link down flushes its prefix route; up restores it with the address.
            _ip("route", "replace", f"{self.server_ip}/32", "dev", self.client_if)


_NETWORK: PrivateNetwork | None = None


def _ip(*args: str) -> str:
    try:
        done = subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        raise NetnsError("the `ip` command is missing: install iproute2 (scripts/bootstrap does)") from None
    except subprocess.CalledProcessError as error:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {error.stderr.strip()}") from None
    return done.stdout


def _run(argv: list[str]) -> None:
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True, timeout=10)
    except subprocess.CalledProcessError as error:
        raise NetnsError(f"`{' '.join(argv)}` failed: {error.stderr.strip()}") from None


def _wait_for_new_namespace(pid: int) -> None:
    """Until the holder has run ``unshare`` (its namespace differs from ours)."""
    mine = os.readlink("/proc/self/ns/net")
    for _ in range(500):
        try:
            if os.readlink(f"/proc/{pid}/ns/net") != mine:
                return
        except FileNotFoundError:
            break
        threading.Event().wait(0.01)  # startup only, before any loop runs
    raise NetnsError("the server-side namespace holder did not start (is util-linux `unshare` installed?)")


def current() -> PrivateNetwork | None:
    """The private network this process entered, if any."""
    return _NETWORK


def _ffi_started() -> bool:
    try:
        from livekit.rtc._ffi_client import FfiClient
    except ImportError:  # pragma: no cover - livekit is a dependency
        return False
    return FfiClient._instance is not None


def enter_private_network() -> PrivateNetwork:
    """Move this process (the calling thread and everything it starts later) into a new private network.

    Idempotent. Raises ``NetnsError`` when not permitted or when the rtc SDK already runs threads in the
    old namespace (they would stay there and WebRTC could not reach the server).
    """
    global _NETWORK
    if _NETWORK is not None:
        return _NETWORK
    if threading.current_thread() is not threading.main_thread():
        raise NetnsError("enter_private_network() must run on the main thread, before the rtc SDK starts")
    if _ffi_started():
        raise NetnsError("the rtc SDK already started its threads outside the private network: call "
                         "enter_private_network() before the first rtc.Room/AudioSource/AudioProcessingModule")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise NetnsError(f"unshare(CLONE_NEWNET) failed: {os.strerror(errno)}; the local stack needs root "
                         "(run the tests or the demo as root, as CI does)")
    _ip("link", "set", "lo", "up")

    def _die_with_parent() -> None:
        # Runs in the forked child before exec: the holder (and so the server-side namespace) goes away
        # when this process dies, however it dies.
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    holder = subprocess.Popen(["unshare", "-n", "--", "sleep", "infinity"], preexec_fn=_die_with_parent,
                              stdin=subprocess.DEVNULL)
    atexit.register(holder.kill)
    _wait_for_new_namespace(holder.pid)
    pid = str(holder.pid)
    _ip("link", "add", SERVER_IF, "type", "veth", "peer", "name", CLIENT_IF)
    _ip("link", "set", SERVER_IF, "netns", pid)
    _ip("addr", "add", f"{CLIENT_IP}/{PREFIX_LEN}", "dev", CLIENT_IF)
    _ip("link", "set", CLIENT_IF, "up")
    for args in (("link", "set", "lo", "up"), ("addr", "add", f"{SERVER_IP}/{PREFIX_LEN}", "dev", SERVER_IF),
                 ("link", "set", SERVER_IF, "up")):
        _run(["nsenter", "-t", pid, "-n", "--", "ip", *args])
    _NETWORK = PrivateNetwork(holder.pid, _holder=holder)
    _LOGGER.info("entered a private network namespace: %s %s <-> %s %s", SERVER_IF, SERVER_IP, CLIENT_IF, CLIENT_IP)
    return _NETWORK

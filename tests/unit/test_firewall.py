"""image/nftables.conf, loaded for real into a private network namespace and probed from a second one.

Two namespaces joined by a veth pair stand for the kiosk and the venue's network. Nothing from the venue
may open a connection to the kiosk (the metrics port included, even when it listens on every address, and
SSH); the kiosk's own connections out, TCP and UDP, get their replies; loopback works. Without the
ruleset the same probes get through, so the checks can fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RULESET = ROOT / "image" / "nftables.conf"
KIOSK_IP = "10.214.0.2"
VENUE_IP = "10.214.0.1"

pytestmark = [
    pytest.mark.needs_tool("nft", "ip"),
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]

_LISTEN = """
import socket, sys, time
socks = []
for port in map(int, sys.argv[1:]):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(8); socks.append(s)
print("ready", flush=True)
time.sleep(60)
"""

_ECHO = """
import socket, sys, threading
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind((sys.argv[1], 8443)); t.listen(8)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((sys.argv[1], 3478))
def udp():
    while True:
        data, peer = u.recvfrom(100); u.sendto(data, peer)
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
t.settimeout(60)
while True:
    c, _ = t.accept(); c.sendall(c.recv(100)); c.close()
"""

_TCP = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5)  # the handshake completed
if len(sys.argv) > 3:  # an echo server: the reply must come back too
    s.sendall(b"ping"); s.settimeout(1.5); assert s.recv(10) == b"ping"
s.close(); print("open")
"""

_UDP = """
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(1.5)
u.sendto(b"stun", (sys.argv[1], 3478)); print(u.recvfrom(10)[0].decode())
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _in(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


@pytest.fixture
def network() -> Iterator[tuple[str, str]]:
    tag = f"{os.getpid() % 100000}"
    kiosk, venue = f"kfw-k{tag}", f"kfw-v{tag}"
    procs: list[subprocess.Popen[str]] = []
    _ip("netns", "add", kiosk)
    _ip("netns", "add", venue)
    try:
        _ip("link", "add", f"kfk{tag}", "type", "veth", "peer", "name", f"kfv{tag}")
        _ip("link", "set", f"kfk{tag}", "netns", kiosk)
        _ip("link", "set", f"kfv{tag}", "netns", venue)
        for ns, dev, addr in ((kiosk, f"kfk{tag}", KIOSK_IP), (venue, f"kfv{tag}", VENUE_IP)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        for ns, script, args in ((kiosk, _LISTEN, ["9101", "22"]), (venue, _ECHO, [VENUE_IP])):
            proc = subprocess.Popen(_in(ns, sys.executable, "-c", script, *args), stdout=subprocess.PIPE, text=True)
            procs.append(proc)
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield kiosk, venue
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)
        for ns in (kiosk, venue):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)


def _probe(ns: str, script: str, *args: str) -> str:
    result = subprocess.run(_in(ns, sys.executable, "-c", script, *args), capture_output=True, text=True, timeout=30,
                            check=False)
    return result.stdout.strip() if result.returncode == 0 else "blocked"


def test_the_ruleset_keeps_the_venue_out_and_lets_the_kiosk_out(network: tuple[str, str]) -> None:
    kiosk, venue = network
    # Control: with no ruleset the venue reaches the metrics port and SSH.
    assert _probe(venue, _TCP, KIOSK_IP, "9101") == "open"
    started = time.monotonic()
    subprocess.run(_in(kiosk, "nft", "-f", str(RULESET)), check=True, capture_output=True, timeout=30)
    assert _probe(venue, _TCP, KIOSK_IP, "9101") == "blocked"  # the metrics port, listening on 0.0.0.0
    assert _probe(venue, _TCP, KIOSK_IP, "22") == "blocked"
    assert _probe(kiosk, _TCP, "127.0.0.1", "9101") == "open"  # loopback: the kiosk's own status endpoint
    assert _probe(kiosk, _TCP, VENUE_IP, "8443", "echo") == "open"  # the kiosk's connections out get their replies
    assert _probe(kiosk, _UDP, VENUE_IP) == "stun"  # UDP too (DNS, NTP, WebRTC media started from the kiosk)
    print(f"probes took {time.monotonic() - started:.1f} s")
    # Loading it again (a restart of nftables.service) replaces the table, it does not stack a second one.
    subprocess.run(_in(kiosk, "nft", "-f", str(RULESET)), check=True, capture_output=True, timeout=30)
    tables = subprocess.run(_in(kiosk, "nft", "list", "tables"), capture_output=True, text=True, timeout=30).stdout
    assert tables.split() == ["table", "inet", "kiosk"]


def test_the_ruleset_passes_nft_check() -> None:
    result = subprocess.run(["nft", "-c", "-f", str(RULESET)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    text = RULESET.read_text()
    assert "policy drop" in text and 'include "/etc/nftables.d/*.nft"' in text

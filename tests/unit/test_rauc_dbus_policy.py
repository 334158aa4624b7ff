"""image/rauc/dbus-rauc.conf: on the kiosk only root may talk to RAUC, as a real dbus-daemon decides.

A private bus with the system bus's default policy (deny method calls unless allowed), then the distribution's
RAUC policy (rauc-service: any user may call RAUC), then ours, in the order the system bus reads
``/usr/share/dbus-1/system.d`` and ``/etc/dbus-1/system.d``. A stand-in owns ``de.pengutronix.rauc``
(``dbus-test-tool echo``, as root, whom both policies let own it); ``dbus-send`` calls it as root and as another
user. Without our file the other user gets through: that is the distribution's default this file closes.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NAME = "de.pengutronix.rauc"
# The distribution's policy as rauc-service 1.8 (Debian) installs it in /usr/share/dbus-1/system.d.
DISTRIBUTION_POLICY = """<!DOCTYPE busconfig PUBLIC
 "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy context="default">
    <allow send_destination="de.pengutronix.rauc"/>
  </policy>
  <policy user="root">
    <allow own="de.pengutronix.rauc"/>
  </policy>
</busconfig>
"""
# The system bus's default policy (/usr/share/dbus-1/system.conf), reduced to what decides here.
BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
  </policy>
  {includes}
</busconfig>
"""
OTHER_UID = 65534  # nobody: stands for the kiosk user

pytestmark = [pytest.mark.needs_tool("dbus-daemon", "dbus-send", "dbus-test-tool"),
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to call the bus as another user")]


def _bus(with_ours: bool) -> Iterator[str]:
    # The other user must reach the socket: a directory of its own under /tmp (pytest's tmp_path is root's only).
    with tempfile.TemporaryDirectory(prefix="kiosk-dbus-") as scratch:
        yield from _run_bus(Path(scratch), with_ours)


def _run_bus(base: Path, with_ours: bool) -> Iterator[str]:
    base.chmod(0o755)
    (base / "distribution.conf").write_text(DISTRIBUTION_POLICY)
    includes = [f"<include>{base / 'distribution.conf'}</include>"]
    if with_ours:
        includes.append(f"<include>{ROOT / 'image/rauc/dbus-rauc.conf'}</include>")
    socket = base / "bus"
    config = base / "bus.conf"
    config.write_text(BUS_CONFIG.format(socket=socket, includes="\n  ".join(includes)))
    daemon = subprocess.Popen(["dbus-daemon", f"--config-file={config}", "--nofork", "--nopidfile"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    owner: subprocess.Popen[bytes] | None = None
    try:
        for _ in range(100):
            if socket.exists():
                break
            time.sleep(0.05)
        socket.chmod(0o777)
        address = f"unix:path={socket}"
        owner = subprocess.Popen(["dbus-test-tool", "echo", f"--name={NAME}"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL,
                                 env={**os.environ, "DBUS_SESSION_BUS_ADDRESS": address})
        for _ in range(100):
            if _call(address, None).returncode == 0:
                break
            time.sleep(0.05)
        yield address
    finally:
        for process in (owner, daemon):
            if process is not None:
                process.terminate()
                process.wait(timeout=10)


def _call(address: str, uid: int | None) -> subprocess.CompletedProcess[str]:
    """Call the RAUC name (Peer.Ping) as root (uid None) or as ``uid``."""
    return subprocess.run(["dbus-send", f"--bus={address}", f"--dest={NAME}", "--print-reply", "--reply-timeout=5000",
                           "/", "org.freedesktop.DBus.Peer.Ping"], capture_output=True, text=True, timeout=30,
                          user=uid, check=False)


@pytest.fixture
def distribution_bus() -> Iterator[str]:
    yield from _bus(with_ours=False)


@pytest.fixture
def kiosk_bus() -> Iterator[str]:
    yield from _bus(with_ours=True)


def test_the_distributions_policy_lets_any_user_call_rauc(distribution_bus: str) -> None:
    assert _call(distribution_bus, None).returncode == 0
    other = _call(distribution_bus, OTHER_UID)
    assert other.returncode == 0, other.stderr


def test_on_the_kiosk_only_root_calls_rauc(kiosk_bus: str) -> None:
    root = _call(kiosk_bus, None)
    assert root.returncode == 0, root.stderr
    other = _call(kiosk_bus, OTHER_UID)
    assert other.returncode != 0 and "AccessDenied" in other.stderr, other.stderr

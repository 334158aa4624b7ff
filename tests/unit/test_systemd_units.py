"""systemd/: the unit files verify, the sandboxes score (kiosk <= 2.0, every other unit <= 3.0), sysusers and
tmpfiles do what they say, and no unit runs the kiosk's code as root beyond provisioning's file moves."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fixtures.units import exec_paths, stub_executables
from kiosk_dev.supervisor import parse_timespan

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "systemd"
SERVICES = ("kiosk.service", "kiosk-provision.service", "kiosk-cooldown.service", "kiosk-update-gate.service",
            "kiosk-update-check.service")
UNITS = (*SERVICES, "kiosk-retry.timer")
# Exposure limits (systemd-analyze security, 0 = locked down, 10 = unrestricted).
LIMITS = {"kiosk.service": 2.0, "kiosk-provision.service": 3.0, "kiosk-cooldown.service": 3.0,
          "kiosk-update-gate.service": 3.0, "kiosk-update-check.service": 3.0}

pytestmark = pytest.mark.needs_tool("systemd-analyze")


def _entries(path: Path) -> dict[str, dict[str, list[str]]]:
    """Parse a unit file into section -> key -> values (keys may repeat, as in systemd)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"{path.name}: {line!r} before any section"
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def _scratch_root(tmp_path: Path, units: dict[str, str]) -> Path:
    """A root with this machine's stock units, our units, and stubs for the programs they run (systemd 257)."""
    root = tmp_path / "root"
    shutil.copytree(Path("/usr/lib/systemd/system"), root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for name, text in units.items():
        (root / "etc/systemd/system" / name).write_text(text)
    stub_executables(root, [root / "etc/systemd/system" / name for name in units])
    return root


def _verify(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", f"--root={root}", *UNITS],
                          capture_output=True, text=True, timeout=60)


def test_units_verify_cleanly(tmp_path: Path) -> None:
    root = _scratch_root(tmp_path, {u: (SYSTEMD / u).read_text() for u in UNITS})
    result = _verify(root)
    # verify exits 0 on unknown keys and bad values; they show up on stderr only.
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key and a bad value are reported."""
    units = {u: (SYSTEMD / u).read_text() for u in UNITS}
    units["kiosk.service"] = units["kiosk.service"].replace("Restart=always", "Restart=sometimes\nRestartSecs=3")
    result = _verify(_scratch_root(tmp_path, units))
    assert "RestartSecs" in result.stderr and "sometimes" in result.stderr


def test_exec_paths_reads_every_exec_key_and_prefix() -> None:
    """The programs to stub: each Exec*= key, systemd's prefixes stripped, only absolute paths."""
    unit = ("[Service]\nExecCondition=/opt/kiosk/venv/bin/python -I -m kiosk.update.gate is-trial\n"
            "ExecStartPre=-/bin/sleep 1\nExecStart=@/usr/bin/true true\nExecStopPost=+!/bin/systemctl stop x\n"
            "ExecReload=kill -HUP $MAINPID\nEnvironment=PATH=/opt/elsewhere\n")
    assert exec_paths(unit) == {"/opt/kiosk/venv/bin/python", "/bin/sleep", "/usr/bin/true", "/bin/systemctl"}
    assert exec_paths((SYSTEMD / "kiosk.service").read_text()) == {"/opt/kiosk/venv/bin/kiosk"}


def test_units_running_system_programs_verify(tmp_path: Path) -> None:
    """A unit that runs programs the scratch root lacks verifies cleanly with systemd 257 as with 252."""
    units = {u: (SYSTEMD / u).read_text() for u in UNITS}
    extra = "ExecStartPre=-/bin/sleep 1\nExecStopPost=/bin/systemctl --no-block stop kiosk.service\n"
    units["kiosk-cooldown.service"] = units["kiosk-cooldown.service"].replace("ExecStart=", extra + "ExecStart=", 1)
    root = _scratch_root(tmp_path, units)
    assert (root / "bin/sleep").is_file() and (root / "bin/systemctl").is_file()
    result = _verify(root)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def _exposure(unit: Path, threshold: int = 20) -> tuple[int, float]:
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", f"--threshold={threshold}", str(unit)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert match, result.stdout + result.stderr
    return result.returncode, float(match.group(1))


@pytest.mark.parametrize("unit", SERVICES)
def test_hardening_exposure_within_the_limit(unit: str) -> None:
    """kiosk.service <= 2.0; provisioning and the cool-down (9.5 and 9.6 unsandboxed as root) <= 3.0."""
    limit = LIMITS[unit]
    returncode, exposure = _exposure(SYSTEMD / unit, threshold=round(limit * 10))
    print(f"{unit} exposure: {exposure}")
    assert exposure <= limit
    assert returncode == 0


def test_threshold_fails_a_weak_unit(tmp_path: Path) -> None:
    """The same command rejects a unit without the sandbox (so the check above is real)."""
    weak = tmp_path / "weak.service"
    weak.write_text("[Service]\nType=notify\nExecStart=/opt/kiosk/venv/bin/kiosk\nUser=kiosk\n")
    returncode, exposure = _exposure(weak)
    assert exposure > 2.0 and returncode != 0


def test_service_contract() -> None:
    unit = _entries(SYSTEMD / "kiosk.service")
    svc, head = unit["Service"], unit["Unit"]
    assert svc["Type"] == ["notify"]
    assert svc["Restart"] == ["always"]
    watchdog = re.fullmatch(r"(\d+)s", svc["WatchdogSec"][0])
    assert watchdog and 2 <= int(watchdog.group(1)) <= 30
    # Back soon after a kill (a visitor may be waiting), but not in a tight loop.
    assert 0.1 <= parse_timespan(svc["RestartSec"][0]) <= 1.0
    # Start limits belong in [Unit]; in [Service] systemd ignores them.
    assert "StartLimitBurst" in head and "StartLimitIntervalSec" in head
    assert "StartLimitBurst" not in svc
    # The offline path starts from boot: no waiting for the network or the clock.
    ordering = " ".join(head.get("After", []) + head.get("Wants", []) + head.get("Requires", []))
    assert "network-online" not in ordering and "time-sync" not in ordering
    assert svc["ExecStart"] == ["/opt/kiosk/venv/bin/kiosk"]
    assert svc["User"] == ["kiosk"] and "DynamicUser" not in svc
    assert svc["SupplementaryGroups"] == ["audio gpio"]
    assert svc["DevicePolicy"] == ["closed"]
    assert sorted(svc["DeviceAllow"]) == ["char-alsa rw", "char-gpiochip rw"]
    assert svc.get("PrivateDevices", ["no"]) == ["no"]
    # Two credentials: the session API's and delivery's own (never one doubling as the other).
    assert svc["LoadCredential"] == ["device-credential:/etc/kiosk/credentials/device-credential",
                                     "delivery-credential:/etc/kiosk/credentials/delivery-credential"]
    assert svc["StateDirectory"] == ["kiosk"] and svc["RuntimeDirectory"] == ["kiosk"]
    assert "LG_WD=%t/kiosk" in svc["Environment"]
    assert "CPUWeight" in svc and "CPUQuota" not in svc
    families = svc["RestrictAddressFamilies"][0].split()
    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_NETLINK", "AF_UNIX"]
    assert head["OnFailure"] == ["kiosk-cooldown.service kiosk-retry.timer"]
    # Secrets never travel in the environment file.
    example = (SYSTEMD / "kiosk.env.example").read_text()
    assert not re.search(r"^#?\s*KIOSK_(SESSION|DELIVERY)__CREDENTIAL=", example, flags=re.M)


def test_cooldown_diagnoses_as_the_kiosk_user_and_the_timer_retries() -> None:
    svc = _entries(SYSTEMD / "kiosk-cooldown.service")["Service"]
    commands = " ".join(svc["ExecStart"])
    # No reboot loop, and no root: the doctor runs as the kiosk (with its credential, through systemd),
    # and nothing in the unit needs systemctl.
    assert "reboot" not in commands and "systemctl" not in commands and "doctor" in commands
    assert not any(c.startswith(("+", "!", "-+", "+-")) for c in svc["ExecStart"])
    assert svc["User"] == ["kiosk"] and svc["CapabilityBoundingSet"] == [""]
    assert svc["LoadCredential"] == ["device-credential:/etc/kiosk/credentials/device-credential"]
    timer = _entries(SYSTEMD / "kiosk-retry.timer")["Timer"]
    assert timer["Unit"] == ["kiosk.service"] and timer["OnActiveSec"] == ["10min"]
    # Inactive once fired, so the next crash loop can start it again.
    assert timer["RemainAfterElapse"] == ["no"]
    # It fires after the start limit's window, so the start is allowed without reset-failed.
    head = _entries(SYSTEMD / "kiosk.service")["Unit"]
    assert head["StartLimitIntervalSec"] == timer["OnActiveSec"]


def test_provisioning_runs_only_its_module_as_root_in_a_sandbox() -> None:
    svc = _entries(SYSTEMD / "kiosk-provision.service")["Service"]
    # Isolated Python, the provisioning module only (it validates the config as the kiosk user itself).
    assert svc["ExecStart"] == ["/opt/kiosk/venv/bin/python -I -m kiosk.provision apply"]
    assert set(svc["CapabilityBoundingSet"][0].split()) == {"CAP_CHOWN", "CAP_SETUID", "CAP_SETGID", "CAP_SYS_ADMIN"}
    assert svc["PrivateNetwork"] == ["yes"] and svc["ProtectSystem"] == ["strict"]
    assert set(svc["ReadWritePaths"][0].split()) == {"/etc/kiosk", "-/bootfs", "-/boot/firmware"}


def test_update_gate_runs_only_on_a_trial_boot_after_the_kiosk() -> None:
    """The gate: after kiosk.service came up, only on a trial boot, and a crashed gate reboots (rolls back)."""
    unit = _entries(SYSTEMD / "kiosk-update-gate.service")
    head, svc = unit["Unit"], unit["Service"]
    assert "kiosk.service" in head["After"][0].split() and head["Wants"] == ["kiosk.service"]
    assert head["FailureAction"] == ["reboot"]
    assert svc["ExecCondition"] == ["/opt/kiosk/venv/bin/python -I -m kiosk.update.gate is-trial"]
    assert svc["ExecStart"] == ["/opt/kiosk/venv/bin/python -I -m kiosk.update.gate run"]
    assert svc["Type"] == ["oneshot"] and "User" not in svc  # root: systemctl and RAUC over unix sockets
    assert svc["CapabilityBoundingSet"] == [""] and svc["PrivateNetwork"] == ["yes"]
    assert svc["RestrictAddressFamilies"] == ["AF_UNIX"] and svc["ReadWritePaths"] == ["/persistent/rauc"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    # Its timeout covers the check unit's, so the check's own time bound decides first.
    gate = re.fullmatch(r"(\d+)min", svc["TimeoutStartSec"][0])
    check = re.fullmatch(r"(\d+)min", _entries(SYSTEMD / "kiosk-update-check.service")["Service"]["TimeoutStartSec"][0])
    assert gate and check and int(gate.group(1)) > int(check.group(1))


def test_update_check_runs_as_the_kiosk_with_the_devices_free() -> None:
    unit = _entries(SYSTEMD / "kiosk-update-check.service")
    head, svc = unit["Unit"], unit["Service"]
    assert head["Conflicts"] == ["kiosk.service"]  # the kiosk stops first: the checks open the same devices
    assert svc["User"] == ["kiosk"] and svc["CapabilityBoundingSet"] == [""]
    assert not any(c.startswith(("+", "!", "-+", "+-")) for c in svc["ExecStart"])
    assert svc["ExecStart"] == ["/opt/kiosk/venv/bin/kiosk update check --out %t/kiosk-update-check/result.json"]
    assert svc["RuntimeDirectory"] == ["kiosk-update-check"] and svc["RuntimeDirectoryPreserve"] == ["yes"]
    assert svc["LoadCredential"] == ["device-credential:/etc/kiosk/credentials/device-credential"]
    # Same device sandbox as the kiosk.
    kiosk = _entries(SYSTEMD / "kiosk.service")["Service"]
    for key in ("DevicePolicy", "DeviceAllow", "SupplementaryGroups", "RestrictAddressFamilies", "SystemCallFilter"):
        assert svc[key] == kiosk[key], key
    from kiosk.update.gate import CHECK_RESULT, CHECK_UNIT

    assert CHECK_UNIT == "kiosk-update-check.service" and str(CHECK_RESULT) == "/run/kiosk-update-check/result.json"


@pytest.fixture
def scratch_etc(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group"):
        shutil.copy(Path("/etc") / name, root / "etc" / name)
    return root


@pytest.mark.needs_tool("systemd-sysusers")
def test_sysusers_creates_the_service_user(scratch_etc: Path) -> None:
    subprocess.run(["systemd-sysusers", f"--root={scratch_etc}", str(SYSTEMD / "kiosk.sysusers.conf")],
                   check=True, capture_output=True, timeout=60)
    passwd = {line.split(":")[0]: line.split(":") for line in (scratch_etc / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (scratch_etc / "etc/group").read_text().splitlines()}
    assert passwd["kiosk"][6] == "/usr/sbin/nologin"
    for group in ("audio", "gpio"):
        assert "kiosk" in groups[group][3].split(","), group


@pytest.mark.needs_tool("systemd-tmpfiles", "systemd-sysusers")
def test_tmpfiles_make_an_empty_private_credential(scratch_etc: Path) -> None:
    conf = SYSTEMD / "kiosk.tmpfiles.conf"
    # At boot sysusers runs first: /etc/kiosk belongs to the kiosk group.
    subprocess.run(["systemd-sysusers", f"--root={scratch_etc}", str(SYSTEMD / "kiosk.sysusers.conf")],
                   check=True, capture_output=True, timeout=60)
    subprocess.run(["systemd-tmpfiles", f"--root={scratch_etc}", "--create", str(conf)],
                   check=True, capture_output=True, timeout=60)
    for name in ("device-credential", "delivery-credential"):
        made = scratch_etc / "etc/kiosk/credentials" / name
        assert made.read_bytes() == b"" and made.stat().st_mode & 0o777 == 0o600, name
    cred = scratch_etc / "etc/kiosk/credentials/device-credential"
    assert (cred.parent.stat().st_mode & 0o777) == 0o700
    etc = scratch_etc / "etc/kiosk"
    kiosk_gid = next(int(line.split(":")[2]) for line in (scratch_etc / "etc/group").read_text().splitlines()
                     if line.startswith("kiosk:"))
    assert (etc.stat().st_mode & 0o777) == 0o750 and (etc.stat().st_uid, etc.stat().st_gid) == (0, kiosk_gid)
    # A provisioned credential is never overwritten by a later boot.
    cred.write_text("secret")
    subprocess.run(["systemd-tmpfiles", f"--root={scratch_etc}", "--create", str(conf)],
                   check=True, capture_output=True, timeout=60)
    assert cred.read_text() == "secret"


def test_journald_dropin_is_capped() -> None:
    import configparser

    parser = configparser.ConfigParser(strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(SYSTEMD / "journald-kiosk.conf")
    journal = parser["Journal"]
    # Every key is one journald knows (the stock journald.conf lists them all, commented out).
    stock = Path("/etc/systemd/journald.conf")
    if stock.exists():
        known = set(re.findall(r"^#?(\w+)=", stock.read_text(), flags=re.M))
        assert set(journal) <= known, set(journal) - known
    assert re.fullmatch(r"\d+M", journal["SystemMaxUse"]) and int(journal["SystemMaxUse"][:-1]) <= 256
    assert "RuntimeMaxUse" in journal


def test_hardware_watchdog_dropin_within_the_pi_limit() -> None:
    import configparser

    parser = configparser.ConfigParser(strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(SYSTEMD / "system-watchdog.conf")
    manager = parser["Manager"]
    stock = Path("/etc/systemd/system.conf")
    if stock.exists():
        known = set(re.findall(r"^#?(\w+)=", stock.read_text(), flags=re.M))
        assert set(manager) <= known, set(manager) - known
    # The Pi's watchdog tops out near 15 s; a longer value leaves no watchdog at all.
    value = re.fullmatch(r"(\d+)s", manager["RuntimeWatchdogSec"])
    assert value and 5 <= int(value.group(1)) <= 15

"""image/ and hw/: what can be checked without building an arm64 image.

The layer's YAML and metadata, shellcheck on every shell script, the install step run into a scratch
root (files, user, default config, units that verify, the operator key, locked passwords, the wheelhouse
guard), the udev rules' syntax, and the ALSA config parsed by alsa-lib. Provisioning itself:
tests/unit/test_provision.py; the firewall: tests/unit/test_firewall.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fixtures.units import stub_executables
from kiosk.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "image"
HW = ROOT / "hw"
LAYER = IMAGE / "layer" / "voice-kiosk.yaml"
KIOSK_BIN = Path(sys.executable).parent / "kiosk"


# ------------------------------------------------------------------------------------ shell scripts
def _shell_scripts() -> list[Path]:
    found = []
    for base in (IMAGE, ROOT / "scripts"):
        for path in sorted(base.rglob("*")):
            if not path.is_file():
                continue
            head = path.read_bytes()[:200]
            if path.suffix == ".sh" or re.match(rb"#!\s*/(usr/)?bin/(env\s+)?(ba)?sh\b", head) \
                    or b"shellcheck shell=" in head:
                found.append(path)
    return found


def test_the_scripts_are_found() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in _shell_scripts()}
    assert {"image/install-kiosk.sh", "scripts/bootstrap", "scripts/lock", "scripts/wheelhouse",
            "image/pi-gen/stage-kiosk/00-install/01-run.sh", "image/pi-gen/config.example"} <= names


@pytest.mark.needs_tool("shellcheck")
def test_shellcheck_every_shell_script() -> None:
    scripts = _shell_scripts()
    result = subprocess.run(["shellcheck", "--format=gcc", *map(str, scripts)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.needs_tool("shellcheck")
def test_shellcheck_would_catch_a_mistake(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/sh\nrm -rf $1/*\n")
    assert subprocess.run(["shellcheck", str(bad)], capture_output=True, timeout=60).returncode != 0


# ----------------------------------------------------------------------------------- layer metadata
def _metadata(path: Path) -> dict[str, str]:
    """The METABEGIN..METAEND block: ``# Key: value`` lines, ``#  more`` continues the last value."""
    fields: dict[str, str] = {}
    inside = False
    last = ""
    for line in path.read_text().splitlines():
        if line.startswith("# METABEGIN"):
            inside = True
            continue
        if line.startswith("# METAEND"):
            return fields
        if not inside or line.strip() == "#":
            continue
        assert line.startswith("#"), f"non-comment line inside the metadata: {line!r}"
        if line.startswith("#  ") and last:
            fields[last] += " " + line[3:].strip()
            continue
        key, sep, value = line[2:].partition(":")
        assert sep and re.fullmatch(r"X-Env-[A-Za-z0-9_-]+", key), f"bad metadata line {line!r}"
        assert key not in fields, f"{key} given twice"
        fields[key] = value.strip()
        last = key
    raise AssertionError("no METAEND")


VARIABLES = ("srcdir", "api_url", "mode", "language", "hw_watchdog_sec", "operator_key", "wheelhouse", "update_ca",
             "version", "ssh")


def test_layer_yaml_and_metadata() -> None:
    meta = _metadata(LAYER)
    assert meta["X-Env-Layer-Name"] == "voice-kiosk"
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["X-Env-Layer-Version"])
    assert meta["X-Env-VarPrefix"] == "kiosk"
    assert "network-online" not in meta["X-Env-Layer-Requires"]
    declared = {m.group(1) for k in meta if (m := re.fullmatch(r"X-Env-Var-([a-z_]+)", k))}
    assert declared == set(VARIABLES)
    for var in VARIABLES:
        for suffix in ("Desc", "Required", "Valid", "Set"):
            assert f"X-Env-Var-{var}-{suffix}" in meta, f"{var} lacks {suffix}"
        valid = meta[f"X-Env-Var-{var}-Valid"]
        assert valid.startswith("regex:"), var
        pattern = re.compile(valid.removeprefix("regex:"))
        default = meta[f"X-Env-Var-{var}"]
        if default:
            assert pattern.fullmatch(default), f"{var}'s default {default!r} fails its own regex"
    assert meta["X-Env-Var-srcdir-Required"] == "y"

    data = yaml.safe_load(LAYER.read_text())
    packages = data["mmdebstrap"]["packages"]
    # python3-lgpio: gpiozero's pin factory on Pi 4/5 (the venv is built with system site packages).
    assert {"python3-venv", "libportaudio2", "libspeexdsp1", "python3-lgpio", "nftables"} <= set(packages)
    # A/B updates: RAUC's tool and its D-Bus service (rauc install, rauc status mark-good).
    assert {"rauc", "rauc-service"} <= set(packages)
    # The layer adds no SSH server (the base's is masked by install-kiosk.sh unless IGconf_kiosk_ssh=y).
    assert not any("ssh" in p for p in packages)
    assert "--system-site-packages" in (IMAGE / "install-kiosk.sh").read_text()
    hooks = data["mmdebstrap"]["customize-hooks"]
    assert any("image/install-kiosk.sh" in h for h in hooks)
    assert any("enable-units" in h and "kiosk" in h and "nftables" in h and "kiosk-update-gate" in h for h in hooks)


def _valid(var: str) -> re.Pattern[str]:
    return re.compile(_metadata(LAYER)[f"X-Env-Var-{var}-Valid"].removeprefix("regex:"))


@pytest.mark.parametrize(("var", "good", "bad"), [
    ("srcdir", "/home/build/kiosk", "relative/path"),
    ("api_url", "https://voice.example.com:8443/api", "ftp://voice.example.com"),
    ("mode", "tap_to_talk", "hands_free"),
    ("language", "de", "german"),
    # The Pi's hardware watchdog tops out near 15 s; 30 leaves no watchdog at all.
    ("hw_watchdog_sec", "15", "30"),
    # kiosk bundle keygen's raw 32-byte key, not an OpenSSL DER/PEM body.
    ("operator_key", "GJrGQjMXvIwQOL0fOMsdhoTK02wdVOCvcslMx8fbk5M=",
     "MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE="),
    ("wheelhouse", "/srv/wheels", "wheels"),
    ("update_ca", "/home/build/kiosk-update/update-ca.pem", "update-ca.pem"),
    ("version", "2025.3.1", "v1 beta"),
    ("ssh", "y", "yes"),
])
def test_variable_validation(var: str, good: str, bad: str) -> None:
    assert _valid(var).fullmatch(good) and not _valid(var).fullmatch(bad)


def test_config_yaml() -> None:
    config = yaml.safe_load((IMAGE / "config" / "kiosk.yaml").read_text())
    assert config["include"]["file"] == "trixie-minbase-ab.yaml"  # the read-only A/B layout
    assert config["layer"]["app"] == _metadata(LAYER)["X-Env-Layer-Name"]
    assert config["device"]["layer"] in ("rpi4", "rpi5")
    for var, value in config["kiosk"].items():
        assert _valid(var).fullmatch(str(value)), f"kiosk.{var} = {value!r} fails the layer's validation"


def test_pi_gen_stage_matches_the_layer() -> None:
    stage = IMAGE / "pi-gen" / "stage-kiosk"
    assert os.access(stage / "prerun.sh", os.X_OK) and os.access(stage / "00-install" / "01-run.sh", os.X_OK)
    assert "image/install-kiosk.sh" in (stage / "00-install" / "01-run.sh").read_text()
    packages = (stage / "00-install" / "00-packages").read_text().split()
    assert set(packages) <= set(yaml.safe_load(LAYER.read_text())["mmdebstrap"]["packages"])
    assert "nftables" in packages
    config = (IMAGE / "pi-gen" / "config.example").read_text()
    assert "ENABLE_SSH=0" in config and "PASSWORDLESS_SUDO=0" in config
    # pi-gen wants a first user's password: a random one per build (and the stage locks it anyway).
    assert re.search(r"^FIRST_USER_PASS=\"\$\(.*urandom", config, flags=re.M)


# ------------------------------------------------------------------------------- the install step
OPERATOR_KEY = "GJrGQjMXvIwQOL0fOMsdhoTK02wdVOCvcslMx8fbk5M="
SHARED_HASH = "$y$j9T$abcdefghijklmnopqrstu.$0123456789abcdefghijklmnopqrstuvwxyzABCDE"
SHARED_SHADOW = (f"root:{SHARED_HASH}:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n"
                 f"pi:{SHARED_HASH}:19000:0:99999:7:::\n")


def _update_ca(tmp_path: Path) -> Path:
    """A CA certificate for the image's RAUC keyring (openssl; a fixed stand-in PEM without it)."""
    cert = tmp_path / "update-ca.pem"
    if shutil.which("openssl"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(tmp_path / "update-ca.key"), "-out", str(cert), "-days", "2",
                        "-subj", "/CN=Test updates CA"], check=True, capture_output=True, timeout=60)
    else:
        cert.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    return cert


def _install(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "boot" / "firmware").mkdir(parents=True)
    for name in ("passwd", "group"):
        shutil.copy(Path("/etc") / name, root / "etc" / name)
    # A base image's accounts: root and a first user with the same password hash on every card.
    with (root / "etc/passwd").open("a") as passwd:
        passwd.write("pi:x:1000:1000:,,,:/home/pi:/bin/bash\n")
    (root / "etc/shadow").write_text(SHARED_SHADOW)
    (root / "etc/shadow").chmod(0o640)
    (root / "boot/firmware/config.txt").write_text("arm_64bit=1\n")
    (root / "boot/firmware/cmdline.txt").write_text("console=tty1 root=/dev/disk/by-slot/active/system\n")
    _enable_ssh_as_the_base_does(root)
    env = {**os.environ, "IGconf_kiosk_api_url": "https://voice.example.org", "IGconf_kiosk_mode": "tap_to_talk",
           "IGconf_kiosk_hw_watchdog_sec": "12", "IGconf_kiosk_operator_key": OPERATOR_KEY,
           "IGconf_kiosk_update_ca": str(_update_ca(tmp_path)), "IGconf_kiosk_version": "2025.3.1",
           "IGconf_device_class": "pi5"}
    subprocess.run([str(IMAGE / "install-kiosk.sh"), "--files-only", str(root)], check=True, env=env,
                   capture_output=True, timeout=120)
    return root


def _enable_ssh_as_the_base_does(root: Path) -> None:
    """What the A/B base's openssh-server layer leaves: ssh and its key generator enabled, sshd.service an alias."""
    system = root / "etc/systemd/system"
    (system / "multi-user.target.wants").mkdir(parents=True, exist_ok=True)
    (system / "multi-user.target.wants/ssh.service").symlink_to("/usr/lib/systemd/system/ssh.service")
    (system / "multi-user.target.wants/ssh-hostkeys-generate.service").symlink_to(
        "/etc/systemd/system/ssh-hostkeys-generate.service")
    (system / "sshd.service").symlink_to("/usr/lib/systemd/system/ssh.service")


def _ssh_state(root: Path) -> dict[str, str]:
    system = root / "etc/systemd/system"
    return {p.relative_to(system).as_posix(): os.readlink(p) for p in system.rglob("ssh*") if p.is_symlink()}


def test_every_installed_source_exists() -> None:
    script = (IMAGE / "install-kiosk.sh").read_text()
    sources = re.findall(r"^\s*put \d{4} (\S+) (\S+)", script, flags=re.M)
    for source, _ in sources:
        assert (ROOT / source).is_file(), f"install-kiosk.sh installs {source}, which is not in the repository"
    # ... and everything in systemd/ that the appliance needs is installed.
    installed = {source for source, _ in sources}
    assert {p.relative_to(ROOT).as_posix() for p in (ROOT / "systemd").iterdir()} <= installed
    assert {"hw/99-kiosk-audio.rules", "hw/asound.conf", "image/slot-shared.conf", "image/nftables.conf"} <= installed


@pytest.mark.needs_tool("systemd-sysusers")
def test_install_into_a_scratch_root(tmp_path: Path) -> None:
    root = _install(tmp_path)
    script = (IMAGE / "install-kiosk.sh").read_text()
    for _, dest in re.findall(r"^\s*put \d{4} (\S+) (\S+)", script, flags=re.M):
        assert (root / dest.lstrip("/")).is_file(), dest
    wants = root / "etc/systemd/system/multi-user.target.wants"
    # ... and not the base's SSH server: its units are masked, nothing pulls them in.
    assert {p.name for p in wants.iterdir()} == {"kiosk.service", "kiosk-provision.service",
                                                 "kiosk-update-gate.service"}
    assert _ssh_state(root) == {"ssh.service": "/dev/null", "ssh.socket": "/dev/null", "sshd.service": "/dev/null"}
    # The inbound firewall is loaded early at boot by Debian's nftables.service.
    assert (root / "etc/systemd/system/sysinit.target.wants/nftables.service").is_symlink()
    assert (root / "etc/nftables.conf").read_text() == (IMAGE / "nftables.conf").read_text()
    # The operator's public key, for signed provisioning after the first boot.
    from kiosk.provision import OPERATOR_KEY as KEY_PATH
    from kiosk.provision import decode_public_key

    assert len(decode_public_key((root / KEY_PATH).read_text())) == 32
    # No console password shared by every kiosk: root's and the first user's are locked, others untouched.
    shadow = {line.split(":")[0]: line.split(":") for line in (root / "etc/shadow").read_text().splitlines()}
    assert shadow["root"][1] == "!" and shadow["pi"][1] == "!" and shadow["daemon"][1] == "*"
    assert SHARED_HASH not in (root / "etc/shadow").read_text()
    assert (root / "etc/shadow").stat().st_mode & 0o777 == 0o640
    assert "kiosk:" in (root / "etc/passwd").read_text()
    assert "RuntimeWatchdogSec=12s" in (root / "etc/systemd/system.conf.d/kiosk-watchdog.conf").read_text()
    assert "dtparam=watchdog=on" in (root / "boot/firmware/config.txt").read_text()
    assert (root / "boot/firmware/cmdline.txt").read_text().count("watchdog_disarm=0") == 1
    # The slot-shared paths are empty mount points: image content there would overwrite provisioning.
    assert list((root / "etc/kiosk").iterdir()) == [] and list((root / "var/lib/kiosk").iterdir()) == []
    # The default site config the layer writes is one the kiosk accepts.
    settings = load_settings(root / "usr/share/kiosk/kiosk.toml.default")
    assert settings.session.api_url == "https://voice.example.org"
    assert settings.interaction.mode.value == "tap_to_talk"
    assert settings.audio.capture_device == settings.audio.playback_device == "kiosk_array"  # one duplex stream
    # Re-running (an image rebuilt on the same tree) does not append the boot lines twice.
    subprocess.run([str(IMAGE / "install-kiosk.sh"), "--files-only", str(root)], check=True, capture_output=True,
                   timeout=120)
    assert (root / "boot/firmware/config.txt").read_text().count("dtparam=watchdog=on") == 1
    assert (root / "boot/firmware/cmdline.txt").read_text().count("watchdog_disarm=0") == 1


@pytest.mark.needs_tool("systemd-sysusers")
def test_ssh_is_kept_only_when_asked_for(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group"):
        shutil.copy(Path("/etc") / name, root / "etc" / name)
    _enable_ssh_as_the_base_does(root)
    before = _ssh_state(root)
    script = [str(IMAGE / "install-kiosk.sh"), "--files-only", str(root)]
    subprocess.run(script, check=True, capture_output=True, timeout=120, env={**os.environ, "IGconf_kiosk_ssh": "y"})
    assert _ssh_state(root) == before
    bad = subprocess.run(script, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "IGconf_kiosk_ssh": "yes"})
    assert bad.returncode != 0 and "IGconf_kiosk_ssh 'yes' is not y or n" in bad.stderr
    assert _ssh_state(root) == before


@pytest.mark.needs_tool("systemd-sysusers")
def test_journal_caps_win_over_the_ab_base(tmp_path: Path) -> None:
    """journald applies its drop-ins in name order, the last wins: the A/B base's pre-image step writes
    persistent.conf (512 MB, no retention limit), so the kiosk's caps must sort after it."""
    root = _install(tmp_path)
    (root / "etc/systemd/journald.conf.d/persistent.conf").write_text("[Journal]\nSystemMaxUse=512M\n")
    drop_ins = sorted((root / "etc/systemd/journald.conf.d").iterdir())
    assert drop_ins[-1].read_text() == (ROOT / "systemd/journald-kiosk.conf").read_text()


@pytest.mark.needs_tool("systemd-sysusers")
def test_install_sets_up_updates(tmp_path: Path) -> None:
    """RAUC's config for this board, the operator's update CA as its keyring, root-only D-Bus, the version."""
    import xml.etree.ElementTree as ET

    root = _install(tmp_path)
    conf = (root / "etc/rauc/system.conf").read_text()
    assert re.search(r"^compatible=voice-kiosk-pi5$", conf, flags=re.M) and "@COMPATIBLE@" not in conf
    assert re.search(r"^path=/etc/rauc/keyring.pem$", conf, flags=re.M)
    assert (root / "etc/rauc/keyring.pem").read_text() == (tmp_path / "update-ca.pem").read_text()
    assert "PRIVATE KEY" not in (root / "etc/rauc/keyring.pem").read_text()
    backend = root / "usr/lib/kiosk/rauc-tryboot-backend"
    assert os.access(backend, os.X_OK) and re.search(r"^bootloader-custom-backend=/usr/lib/kiosk/rauc-tryboot-backend$",
                                                     conf, flags=re.M)
    assert (root / "usr/share/kiosk/image-version").read_text() == "2025.3.1\n"
    from kiosk.update.status import read_image_version

    assert read_image_version(root) == "2025.3.1"
    # Only root may talk to RAUC (the distribution's policy lets every user install and mark slots).
    policy = ET.parse(root / "etc/dbus-1/system.d/kiosk-rauc.conf").getroot()
    rules = {(p.get("context") or p.get("user"), child.tag, child.get("send_destination"))
             for p in policy.iter("policy") for child in p}
    assert rules == {("default", "deny", "de.pengutronix.rauc"), ("root", "allow", "de.pengutronix.rauc")}
    assert "d /persistent/rauc 0755 root root -" in (root / "usr/lib/tmpfiles.d/kiosk-update.conf").read_text()
    assert (root / "opt/kiosk/docs/fleet.md").is_file()


@pytest.mark.needs_tool("systemd-sysusers")
def test_install_refuses_a_bad_update_ca_or_version(tmp_path: Path) -> None:
    root = _install(tmp_path)
    key = tmp_path / "update-ca.key"
    for env, problem in (({"IGconf_kiosk_update_ca": str(key)}, "not the update CA's certificate"),
                         ({"IGconf_kiosk_update_ca": str(tmp_path / "none.pem")}, "not the update CA's certificate"),
                         ({"IGconf_kiosk_version": "v1 beta"}, "is not a version")):
        if not key.exists():
            key.write_text("-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n")
        result = subprocess.run([str(IMAGE / "install-kiosk.sh"), "--files-only", str(root)], capture_output=True,
                                text=True, timeout=120, env={**os.environ, **env})
        assert result.returncode == 1 and problem in result.stderr, result.stderr
    # No CA at all: the image is built, and says its kiosks refuse every bundle.
    result = subprocess.run([str(IMAGE / "install-kiosk.sh"), "--files-only", str(root)], capture_output=True,
                            text=True, timeout=120, env={k: v for k, v in os.environ.items()
                                                         if not k.startswith("IGconf_kiosk_update_ca")})
    assert result.returncode == 0 and "refuse every update bundle" in result.stderr
    assert not (root / "etc/rauc/keyring.pem").exists()


@pytest.mark.needs_tool("systemd-analyze")
def test_installed_units_verify(tmp_path: Path) -> None:
    root = _install(tmp_path)
    shutil.copytree(Path("/usr/lib/systemd/system"), root / "usr/lib/systemd/system", symlinks=True,
                    dirs_exist_ok=True)
    units = ("kiosk.service", "kiosk-provision.service", "kiosk-cooldown.service", "kiosk-retry.timer",
             "kiosk-update-gate.service", "kiosk-update-check.service")
    # The venv's programs are built in the target by the full install; systemd 257 checks that they exist.
    assert "/opt/kiosk/venv/bin/kiosk" in stub_executables(root, [root / "etc/systemd/system" / u for u in units])
    result = subprocess.run(["systemd-analyze", "verify", f"--root={root}", *units],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_slot_shared_declaration_covers_the_state() -> None:
    lines = [ln for ln in (IMAGE / "slot-shared.conf").read_text().splitlines() if ln and not ln.startswith("#")]
    # The generator's own parse: key=value, Version must be 1, Path= may repeat.
    pairs = [ln.split("=", 1) for ln in lines]
    assert all(len(p) == 2 for p in pairs)
    assert [v for k, v in pairs if k == "Version"] == ["1"]
    paths = [v for k, v in pairs if k == "Path"]
    unit = (ROOT / "systemd" / "kiosk.service").read_text()
    assert "StateDirectory=kiosk" in unit and "/var/lib/kiosk" in paths
    credential = re.search(r"^LoadCredential=device-credential:(\S+)", unit, flags=re.M)
    assert credential and any(credential.group(1).startswith(p + "/") for p in paths)
    spool = load_settings().spool.directory
    assert any(str(spool).startswith(p + "/") for p in paths), "the spool must be on slot-shared storage"
    # The unit pulls in every shared mount itself (the generator may enable only one of them).
    requires = re.search(r"^RequiresMountsFor=(.+)$", unit, flags=re.M)
    assert requires and set(requires.group(1).split()) == set(paths)


# ------------------------------------------------------------------------- the wheelhouse guard
@pytest.mark.needs_tool("systemd-sysusers")
def test_the_venv_step_refuses_a_missing_or_stale_wheelhouse(tmp_path: Path) -> None:
    """The full install never reaches for an index: no wheelhouse, or one made from other locks, stops it."""
    root = _install(tmp_path)
    missing = subprocess.run([str(IMAGE / "install-kiosk.sh"), "--wheelhouse", str(tmp_path / "none"), str(root)],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "scripts/wheelhouse" in missing.stderr
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "LOCKS.sha256").write_text(f"{'0' * 64}  requirements/kiosk.lock\n")
    result = subprocess.run([str(IMAGE / "install-kiosk.sh"), str(root)], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "KIOSK_WHEELHOUSE": str(stale)})
    assert result.returncode == 1 and "other locks" in result.stderr
    assert not (root / "opt/kiosk/venv").exists()


def test_the_venv_is_installed_offline_and_hash_checked() -> None:
    script = (IMAGE / "install-kiosk.sh").read_text()
    installs = [ln for ln in script.splitlines() if re.search(r"\$pip install", ln)]
    assert len(installs) == 3
    assert all("$offline" in ln for ln in installs)
    assert re.search(r'^\s*offline="--no-index --find-links /opt/kiosk/wheelhouse', script, flags=re.M)
    # Every third-party file is checked against the locks; only the kiosk itself goes in without them.
    assert "--require-hashes -r /opt/kiosk/src/requirements/build.lock" in script
    assert re.search(r"--require-hashes --no-build-isolation --ignore-installed \\\n\s*-r "
                     r"/opt/kiosk/src/requirements/kiosk.lock", script)
    assert "--no-deps --no-build-isolation /opt/kiosk/src" in script


# --------------------------------------------------------------------------------------------- hw/
_UDEV_MATCH = {"ACTION", "SUBSYSTEM", "SUBSYSTEMS", "KERNEL", "KERNELS", "ATTR", "ATTRS", "ENV", "DRIVERS",
               "TAG", "TAGS", "TEST", "PROGRAM", "RESULT", "DEVPATH", "NAME", "SYMLINK", "CONST"}
_UDEV_ASSIGN = {"ATTR", "ENV", "NAME", "SYMLINK", "OWNER", "GROUP", "MODE", "TAG", "RUN", "GOTO", "LABEL",
                "OPTIONS", "IMPORT", "SYSCTL", "PROGRAM"}
_UDEV_TOKEN = re.compile(r'(?P<key>[A-Z]+)(\{(?P<attr>[^}]+)\})?(?P<op>==|!=|\+=|-=|:=|=)"(?P<value>[^"]*)"')


def _udev_rules(text: str) -> list[list[re.Match[str]]]:
    """Parse rules the way udev splits them: comma-separated key/operator/quoted-value tokens."""
    rules = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        tokens = []
        rest = line.strip()
        while rest:
            m = _UDEV_TOKEN.match(rest)
            assert m, f"line {n}: cannot parse {rest!r}"
            key, op = m["key"], m["op"]
            if op in ("==", "!="):
                assert key in _UDEV_MATCH, f"line {n}: {key} is not a match key"
            else:
                assert key in _UDEV_ASSIGN, f"line {n}: {key} cannot be assigned"
            tokens.append(m)
            rest = rest[m.end():]
            if rest:
                assert rest.startswith(", ") or rest.startswith(","), f"line {n}: expected a comma at {rest!r}"
                rest = rest.lstrip(", ")
        rules.append(tokens)
    return rules


def test_udev_rules_parse_and_name_cards_validly() -> None:
    rules = _udev_rules((HW / "99-kiosk-audio.rules").read_text())
    labels = {t["value"] for r in rules for t in r if t["key"] == "LABEL"}
    gotos = {t["value"] for r in rules for t in r if t["key"] == "GOTO"}
    assert gotos <= labels, f"GOTO without LABEL: {gotos - labels}"
    ids = {t["value"] for r in rules for t in r if t["key"] == "ATTR" and t["attr"] == "id" and t["op"] == "="}
    assert ids == {"kioskarray", "kioskspeaker", "kioskheadset"}
    for card_id in ids:  # ALSA card ids: at most 15 letters and digits
        assert re.fullmatch(r"[A-Za-z0-9]{1,15}", card_id)
    for rule in rules:
        for t in rule:
            if t["key"] == "ATTRS" and t["attr"] in ("idVendor", "idProduct"):
                assert re.fullmatch(r"[0-9a-f]{4}", t["value"]), t.group(0)


def test_udev_parser_catches_mistakes() -> None:
    with pytest.raises(AssertionError):
        _udev_rules('SUBSYSTEM=="sound", ATTR{id}=="x" GOTO="end"\n')
    with pytest.raises(AssertionError):
        _udev_rules('ATTRS{idVendor}="2886", ATTR{id}="kioskarray"\n')


def _alsa(tmp_path: Path, conf: Path, tool: str) -> subprocess.CompletedProcess[str]:
    # The system's top-level config first (it loads the plugins' definitions), then ours.
    env = {**os.environ, "ALSA_CONFIG_PATH": f"/usr/share/alsa/alsa.conf:{conf}", "HOME": str(tmp_path)}
    return subprocess.run([tool, "-L"], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.needs_tool("aplay", "arecord")
def test_asound_conf_parses_in_alsa_lib(tmp_path: Path) -> None:
    conf = HW / "asound.conf"
    for tool in ("aplay", "arecord"):
        result = _alsa(tmp_path, conf, tool)
        assert "ALSA lib" not in result.stderr, result.stderr
        names = set(re.findall(r"^(kiosk_\w+)$", result.stdout, flags=re.M))
        assert names == {"kiosk_array", "kiosk_speaker", "kiosk_headset"}, result.stdout
    # Every card the PCMs name is one the udev rules create.
    body = re.sub(r"#.*", "", conf.read_text())
    cards = set(re.findall(r"CARD=(\w+)", body)) | set(re.findall(r"\bcard (\w+)", body))
    rules = (HW / "99-kiosk-audio.rules").read_text()
    assert cards and all(f'ATTR{{id}}="{c}"' in rules for c in cards), cards
    # And a broken copy is reported, so the check above is real.
    broken = tmp_path / "broken.conf"
    broken.write_text(conf.read_text().replace("pcm.kiosk_headset {", "pcm.kiosk_headset {{", 1))
    assert "ALSA lib" in _alsa(tmp_path, broken, "aplay").stderr


def test_boot_config_snippet() -> None:
    lines = [ln for ln in (HW / "config.txt.snippet").read_text().splitlines() if ln and not ln.startswith("#")]
    for line in lines:
        assert re.fullmatch(r"\[\w+\]|[a-z_0-9]+=\S+", line), f"not a config.txt line: {line!r}"
    assert "dtparam=watchdog=on" in lines


def test_parts_list_is_honest() -> None:
    parts = (HW / "PARTS.md").read_text().lower()
    assert "not tested" in parts or "untested" in parts

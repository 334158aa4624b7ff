"""image/ and hw/: what can be checked without building an arm64 image.

The layer's YAML and metadata, shellcheck on every shell script, the install step run into a scratch
root (files, user, default config, units that verify), the first-boot provisioning script run for real
under a scratch root, the udev rules' syntax, and the ALSA config parsed by alsa-lib.
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
    assert {"image/kiosk-provision", "image/install-kiosk.sh", "scripts/bootstrap",
            "image/pi-gen/stage-kiosk/00-install/01-run.sh", "image/pi-gen/config.example"} <= names


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_every_shell_script() -> None:
    scripts = _shell_scripts()
    result = subprocess.run(["shellcheck", "--format=gcc", *map(str, scripts)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
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


VARIABLES = ("srcdir", "api_url", "mode", "language", "hw_watchdog_sec")


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
    assert {"python3-venv", "libportaudio2", "libspeexdsp1", "python3-lgpio"} <= set(packages)
    assert "--system-site-packages" in (IMAGE / "install-kiosk.sh").read_text()
    hooks = data["mmdebstrap"]["customize-hooks"]
    assert any("image/install-kiosk.sh" in h for h in hooks)
    assert any("enable-units" in h and "kiosk" in h for h in hooks)


def _valid(var: str) -> re.Pattern[str]:
    return re.compile(_metadata(LAYER)[f"X-Env-Var-{var}-Valid"].removeprefix("regex:"))


@pytest.mark.parametrize(("var", "good", "bad"), [
    ("srcdir", "/home/build/kiosk", "relative/path"),
    ("api_url", "https://voice.example.com:8443/api", "ftp://voice.example.com"),
    ("mode", "tap_to_talk", "hands_free"),
    ("language", "de", "german"),
    # The Pi's hardware watchdog tops out near 15 s; 30 leaves no watchdog at all.
    ("hw_watchdog_sec", "15", "30"),
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


# ------------------------------------------------------------------------------- the install step
def _install(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "boot" / "firmware").mkdir(parents=True)
    for name in ("passwd", "group"):
        shutil.copy(Path("/etc") / name, root / "etc" / name)
    (root / "boot/firmware/config.txt").write_text("arm_64bit=1\n")
    (root / "boot/firmware/cmdline.txt").write_text("console=tty1 root=/dev/disk/by-slot/active/system\n")
    env = {**os.environ, "IGconf_kiosk_api_url": "https://voice.example.org", "IGconf_kiosk_mode": "tap_to_talk",
           "IGconf_kiosk_hw_watchdog_sec": "12"}
    subprocess.run([str(IMAGE / "install-kiosk.sh"), "--files-only", str(root)], check=True, env=env,
                   capture_output=True, timeout=120)
    return root


def test_every_installed_source_exists() -> None:
    script = (IMAGE / "install-kiosk.sh").read_text()
    sources = re.findall(r"^\s*put \d{4} (\S+) (\S+)", script, flags=re.M)
    for source, _ in sources:
        assert (ROOT / source).is_file(), f"install-kiosk.sh installs {source}, which is not in the repository"
    # ... and everything in systemd/ that the appliance needs is installed.
    installed = {source for source, _ in sources}
    assert {p.relative_to(ROOT).as_posix() for p in (ROOT / "systemd").iterdir()} <= installed
    assert {"hw/99-kiosk-audio.rules", "hw/asound.conf", "image/kiosk-provision", "image/slot-shared.conf"} <= installed


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers not installed")
def test_install_into_a_scratch_root(tmp_path: Path) -> None:
    root = _install(tmp_path)
    script = (IMAGE / "install-kiosk.sh").read_text()
    for _, dest in re.findall(r"^\s*put \d{4} (\S+) (\S+)", script, flags=re.M):
        assert (root / dest.lstrip("/")).is_file(), dest
    assert os.access(root / "usr/libexec/kiosk/kiosk-provision", os.X_OK)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    assert {p.name for p in wants.iterdir()} == {"kiosk.service", "kiosk-provision.service"}
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


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_installed_units_verify(tmp_path: Path) -> None:
    root = _install(tmp_path)
    shutil.copytree(Path("/usr/lib/systemd/system"), root / "usr/lib/systemd/system", symlinks=True,
                    dirs_exist_ok=True)
    venv_kiosk = root / "opt/kiosk/venv/bin/kiosk"  # built in the target by the full install
    venv_kiosk.parent.mkdir(parents=True)
    venv_kiosk.write_text("#!/bin/sh\n")
    venv_kiosk.chmod(0o755)
    result = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "kiosk.service",
                             "kiosk-provision.service", "kiosk-cooldown.service"],
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


# --------------------------------------------------------------------------------- provisioning
def _provision(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KIOSK_PROVISION_ROOT": str(root), "KIOSK_BIN": str(KIOSK_BIN)}
    env.pop("KIOSK_CONFIG", None)
    return subprocess.run([str(IMAGE / "kiosk-provision")], env=env, capture_output=True, text=True, timeout=120,
                          check=True)


@pytest.fixture
def device(tmp_path: Path) -> Path:
    root = tmp_path / "device"
    (root / "bootfs").mkdir(parents=True)
    (root / "usr/share/kiosk").mkdir(parents=True)
    (root / "usr/share/kiosk/kiosk.toml.default").write_text('[session]\napi_url = "https://default.example"\n')
    return root


def test_first_boot_takes_credential_and_config(device: Path) -> None:
    drop = device / "bootfs" / "kiosk-provision"
    drop.mkdir()
    (drop / "device-credential").write_text("dev-cred-42\n")
    (drop / "delivery-credential").write_text("deliver-cred-7\n")
    (drop / "kiosk.toml").write_text('[interaction]\nmode = "open_mic"\n')
    _provision(device)
    cred = device / "etc/kiosk/credentials/device-credential"
    assert cred.read_text() == "dev-cred-42\n" and cred.stat().st_mode & 0o777 == 0o600
    assert (cred.parent.stat().st_mode & 0o777) == 0o700
    # Delivery's own credential, beside the session API's.
    delivery = device / "etc/kiosk/credentials/delivery-credential"
    assert delivery.read_text() == "deliver-cred-7\n" and delivery.stat().st_mode & 0o777 == 0o600
    assert load_settings(device / "etc/kiosk/kiosk.toml").interaction.mode.value == "open_mic"
    # Nothing secret is left on the boot partition; a note says what happened.
    assert not drop.exists()
    note = (device / "bootfs" / "kiosk-provision.txt").read_text()
    assert "device credential: installed" in note and "dev-cred-42" not in note
    assert "delivery credential: installed" in note and "deliver-cred-7" not in note
    assert not any(secret in p.read_text() for p in (device / "bootfs").rglob("*") if p.is_file()
                   for secret in ("dev-cred-42", "deliver-cred-7"))


def test_a_broken_site_config_is_rejected_and_kept_for_the_installer(device: Path) -> None:
    (device / "etc/kiosk").mkdir(parents=True)
    (device / "etc/kiosk/kiosk.toml").write_text('[interaction]\nmode = "tap_to_talk"\n')
    drop = device / "bootfs" / "kiosk-provision"
    drop.mkdir()
    (drop / "kiosk.toml").write_text('[session]\napi_url = "voice.example.com"\n')
    _provision(device)
    assert (drop / "kiosk.toml.rejected").exists()
    note = (device / "bootfs" / "kiosk-provision.txt").read_text()
    assert "REJECTED" in note and "session.api_url" in note
    # The config in force is untouched.
    assert 'mode = "tap_to_talk"' in (device / "etc/kiosk/kiosk.toml").read_text()


def test_a_site_config_holding_a_credential_is_rejected(device: Path) -> None:
    drop = device / "bootfs" / "kiosk-provision"
    drop.mkdir()
    (drop / "kiosk.toml").write_text('[delivery]\nurl = "https://messages.example/up"\ncredential = "s3cr3t-77"\n')
    _provision(device)
    note = (device / "bootfs" / "kiosk-provision.txt").read_text()
    assert "REJECTED" in note and "delivery.credential" in note and "delivery-credential" in note
    assert "s3cr3t-77" not in note
    installed = device / "etc/kiosk/kiosk.toml"
    assert not installed.exists() or "s3cr3t-77" not in installed.read_text()


def test_default_config_on_first_boot_only(device: Path) -> None:
    _provision(device)
    installed = device / "etc/kiosk/kiosk.toml"
    assert load_settings(installed).session.api_url == "https://default.example"
    installed.write_text('[session]\napi_url = "https://site.example"\n')
    _provision(device)  # a later boot with nothing on the boot partition changes nothing
    assert load_settings(installed).session.api_url == "https://site.example"
    assert not (device / "etc/kiosk/credentials/device-credential").exists()


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


@pytest.mark.skipif(shutil.which("aplay") is None or not Path("/usr/share/alsa/alsa.conf").exists(),
                    reason="alsa-utils not installed")
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

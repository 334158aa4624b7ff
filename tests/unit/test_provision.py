"""kiosk.provision: the boot partition's bundle, first boot open, signed bundles after, run for real.

Each test builds a scratch root (its own /etc/passwd with the kiosk user made by systemd-sysusers, the
image's default config, the operator's public key) and a fake boot partition, then runs
``python -m kiosk.provision apply --root ROOT`` as a separate process, as the unit does: the site config is
validated by a child process running as the scratch root's kiosk uid.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from kiosk.__main__ import main as kiosk_main
from kiosk.checks import Verdict
from kiosk.provision import (
    CONFIG_MODE,
    MAX_FILE_BYTES,
    PAYLOAD_NAMES,
    BundleRejected,
    ServiceUserValidator,
    build_manifest,
    format_env,
    parse_env,
    parse_manifest,
    security_checks,
    service_ids,
    verify_bundle,
)
from kiosk.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "systemd"

pytestmark = [
    pytest.mark.needs_tool("systemd-sysusers"),
    pytest.mark.skipif(os.geteuid() != 0, reason="provisioning sets owners and runs a child as the kiosk user"),
]

OPEN_MIC_TOML = '[interaction]\nmode = "open_mic"\nopen_mic_acknowledged = true\n'


# ------------------------------------------------------------------------------------------ fixtures
def _reachable_by_others(path: Path) -> bool:
    """Whether a user with no special rights can run ``path`` (every directory above it searchable)."""
    real = path.resolve()
    return all(p.stat().st_mode & 0o001 for p in [real, *real.parents])


def _python_for_the_kiosk_user() -> tuple[str, str]:
    """An interpreter the scratch root's kiosk user can run, and the PYTHONPATH that gives it this environment.

    On a kiosk it is /opt/kiosk/venv/bin/python. Here the test environment's interpreter may live in a private
    home directory; then the system's Python of the same version runs with this environment's packages.
    """
    site_packages = sysconfig.get_paths()["purelib"]
    path = os.pathsep.join([str(ROOT), str(ROOT / "dev"), site_packages])
    if _reachable_by_others(Path(sys.executable)):
        return sys.executable, path
    system = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if system.exists() and _reachable_by_others(system) and _reachable_by_others(Path(site_packages)):
        return str(system), path
    pytest.skip("no Python interpreter here that the kiosk user may run")


class Device:
    """A scratch root with a boot partition, and the operator's signing key."""

    def __init__(self, root: Path, key: SigningKey) -> None:
        self.root = root
        self.key = key
        self.boot = root / "bootfs"
        self.drop = self.boot / "kiosk-provision"
        self.etc = root / "etc/kiosk"
        self.uid, self.gid = service_ids(root)

    def bundle(self, **files: str | bytes) -> Path:
        """Put a bundle on the boot partition: keyword = file name with _ for - and . (device_credential)."""
        self.drop.mkdir(parents=True, exist_ok=True)
        for key, content in files.items():
            name = {"device_credential": "device-credential", "delivery_credential": "delivery-credential",
                    "kiosk_toml": "kiosk.toml", "kiosk_env": "kiosk.env"}.get(key, key)
            data = content.encode() if isinstance(content, str) else content
            (self.drop / name).write_bytes(data)
        return self.drop

    def sign(self, serial: int, key: SigningKey | None = None) -> None:
        """Sign the bundle on the boot partition as the operator does (manifest + manifest.sig)."""
        files = {n: (self.drop / n).read_bytes() for n in PAYLOAD_NAMES if (self.drop / n).exists()}
        manifest = build_manifest(files, serial)
        (self.drop / "manifest").write_bytes(manifest)
        signature = (key or self.key).sign(manifest).signature
        (self.drop / "manifest.sig").write_text(base64.b64encode(signature).decode() + "\n")

    def provision(self) -> subprocess.CompletedProcess[str]:
        """One boot's provisioning, as its own process (the unit's command, under the scratch root)."""
        python, pythonpath = _python_for_the_kiosk_user()
        env = {k: v for k, v in os.environ.items() if not k.startswith("KIOSK_")}
        env["PYTHONPATH"] = pythonpath
        return subprocess.run([python, "-m", "kiosk.provision", "apply", "--root", str(self.root)],
                              env=env, capture_output=True, text=True, timeout=180, check=False)

    def note(self) -> str:
        return (self.boot / "kiosk-provision.txt").read_text()

    @property
    def rejected(self) -> Path:
        return self.boot / "kiosk-provision.rejected"

    def marker(self) -> dict[str, object]:
        data: dict[str, object] = json.loads((self.etc / "provisioned").read_text())
        return data


def make_root(tmp_path: Path, key: SigningKey | None) -> Path:
    root = tmp_path / "device"
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group"):
        shutil.copy(Path("/etc") / name, root / "etc" / name)
    subprocess.run(["systemd-sysusers", f"--root={root}", str(SYSTEMD / "kiosk.sysusers.conf")], check=True,
                   capture_output=True, timeout=60)
    (root / "bootfs").mkdir()
    share = root / "usr/share/kiosk"
    share.mkdir(parents=True)
    (share / "kiosk.toml.default").write_text('[session]\napi_url = "https://default.example"\n')
    if key is not None:
        public = base64.b64encode(bytes(key.verify_key)).decode()
        (share / "operator-key.pub").write_text(f"# operator\n{public}\n")
    return root


@pytest.fixture
def device(tmp_path: Path) -> Device:
    key = SigningKey.generate()
    return Device(make_root(tmp_path, key), key)


def _mode(path: Path) -> tuple[int, int, int]:
    info = path.stat()
    return stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid


def _no_secret_left(device: Device, secret: str) -> None:
    for path in device.boot.rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="replace"), path


# ------------------------------------------------------------------------------------------ first boot
def test_first_boot_takes_an_unsigned_bundle(device: Device) -> None:
    device.bundle(device_credential="dev-cred-42\r\n", kiosk_toml=OPEN_MIC_TOML,
                  kiosk_env="# site\nKIOSK_LOG_LEVEL = DEBUG\n\nKIOSK_AUDIO__CAPTURE_DEVICE=kiosk_array\n")
    result = device.provision()
    assert result.returncode == 0, result.stderr
    cred = device.etc / "credentials/device-credential"
    assert cred.read_text() == "dev-cred-42\n"
    assert _mode(cred) == (0o600, 0, 0) and _mode(cred.parent) == (0o700, 0, 0)
    # Configuration: readable by the kiosk's group, writable by root only, nothing for others.
    for name in ("kiosk.toml", "kiosk.env"):
        assert _mode(device.etc / name) == (CONFIG_MODE, 0, device.gid), name
    assert _mode(device.etc) == (0o750, 0, device.gid)
    assert load_settings(device.etc / "kiosk.toml").interaction.mode.value == "open_mic"
    env_lines = [ln for ln in (device.etc / "kiosk.env").read_text().splitlines() if not ln.startswith("#")]
    assert env_lines == ["KIOSK_LOG_LEVEL=DEBUG", "KIOSK_AUDIO__CAPTURE_DEVICE=kiosk_array"]
    # The card keeps a note and no secret; the first boot is over.
    assert not device.drop.exists() and not device.rejected.exists()
    note = device.note()
    assert "ACCEPTED" in note and "device credential" in note and "first boot" in note
    _no_secret_left(device, "dev-cred-42")
    assert device.marker()["first_boot"] == "bundle accepted"


def test_delivery_gets_its_own_credential(device: Device) -> None:
    """The message endpoint's credential is installed beside the session API's, never in the clear on the card."""
    device.bundle(device_credential="dev-cred-42\n", delivery_credential="deliver-cred-7\n")
    assert device.provision().returncode == 0
    delivery = device.etc / "credentials/delivery-credential"
    assert delivery.read_text() == "deliver-cred-7\n" and _mode(delivery) == (0o600, 0, 0)
    assert "delivery credential" in device.note()
    _no_secret_left(device, "deliver-cred-7")
    device.bundle(delivery_credential="two words\n")  # later, signed, but not one token: refused
    device.sign(serial=9)
    assert device.provision().returncode == 3 and "delivery-credential: must be one line" in device.note()
    _no_secret_left(device, "two words")


def test_first_boot_without_a_bundle_installs_the_default_and_closes_the_window(device: Device) -> None:
    assert device.provision().returncode == 0
    installed = device.etc / "kiosk.toml"
    assert load_settings(installed).session.api_url == "https://default.example"
    assert _mode(installed) == (CONFIG_MODE, 0, device.gid)
    assert device.marker()["first_boot"] == "no bundle on the card"
    installed.write_text('[session]\napi_url = "https://site.example"\n')
    assert device.provision().returncode == 0  # a later boot with nothing on the card changes nothing
    assert load_settings(installed).session.api_url == "https://site.example"
    # ... and the window is shut: an unsigned bundle now is someone with the card.
    device.bundle(kiosk_toml='[session]\napi_url = "https://attacker.example"\n')
    assert device.provision().returncode == 3
    assert load_settings(installed).session.api_url == "https://site.example"
    assert "not signed" in device.note()


# ------------------------------------------------------------------------------------------ later boots
def test_later_boots_reject_an_unsigned_bundle_and_keep_it_for_the_installer(device: Device) -> None:
    device.bundle(device_credential="first-cred\n", kiosk_toml='[interaction]\nmode = "tap_to_talk"\n')
    assert device.provision().returncode == 0
    # Someone with the card for a minute: their host for the API and delivery, their credential.
    device.bundle(device_credential="their-cred\n",
                  kiosk_toml='[session]\napi_url = "https://attacker.example"\n'
                             '[delivery]\nurl = "https://attacker.example/inbox"\n')
    result = device.provision()
    assert result.returncode == 3
    assert (device.etc / "credentials/device-credential").read_text() == "first-cred\n"
    assert 'mode = "tap_to_talk"' in (device.etc / "kiosk.toml").read_text()
    note = device.note()
    assert "REJECTED" in note and "not signed" in note and "kiosk bundle sign" in note
    # Kept for the installer to see, without the (secret) credential.
    assert (device.rejected / "kiosk.toml").exists()
    assert not (device.rejected / "device-credential").exists()
    _no_secret_left(device, "their-cred")
    assert "bundle rejected" in result.stderr


def test_a_signed_bundle_is_accepted_later_and_cannot_be_replayed(device: Device) -> None:
    assert device.provision().returncode == 0  # first boot, nothing on the card
    device.bundle(device_credential="rotated-cred\n", kiosk_toml=OPEN_MIC_TOML)
    device.sign(serial=5)
    saved = {p.name: p.read_bytes() for p in device.drop.iterdir()}
    result = device.provision()
    assert result.returncode == 0, result.stderr + device.note()
    assert (device.etc / "credentials/device-credential").read_text() == "rotated-cred\n"
    assert load_settings(device.etc / "kiosk.toml").interaction.mode.value == "open_mic"
    assert "signed (serial 5)" in device.note() and device.marker()["serial"] == 5
    assert _mode(device.etc / "kiosk.toml") == (CONFIG_MODE, 0, device.gid)
    # The same signed bundle again (a copy someone kept): refused, the serial must go up.
    (device.etc / "kiosk.toml").write_text('[interaction]\nmode = "push_to_talk"\n')
    device.drop.mkdir()
    for name, data in saved.items():
        (device.drop / name).write_bytes(data)
    assert device.provision().returncode == 3
    assert "not above 5" in device.note()
    assert 'mode = "push_to_talk"' in (device.etc / "kiosk.toml").read_text()


@pytest.mark.parametrize("tamper", ["changed file", "added file", "other key", "edited manifest", "no signature"])
def test_a_tampered_bundle_is_rejected(device: Device, tamper: str) -> None:
    assert device.provision().returncode == 0
    device.bundle(kiosk_toml=OPEN_MIC_TOML)
    device.sign(serial=7, key=SigningKey.generate() if tamper == "other key" else None)
    if tamper == "changed file":
        device.bundle(kiosk_toml='[session]\napi_url = "https://attacker.example"\n')
    elif tamper == "added file":
        device.bundle(kiosk_env="KIOSK_SESSION__API_URL=https://attacker.example\n")
    elif tamper == "edited manifest":
        manifest = (device.drop / "manifest").read_text().replace("serial 7", "serial 8")
        (device.drop / "manifest").write_text(manifest)
    elif tamper == "no signature":
        (device.drop / "manifest.sig").unlink()
    before = (device.etc / "kiosk.toml").read_bytes()
    assert device.provision().returncode == 3
    assert (device.etc / "kiosk.toml").read_bytes() == before
    assert not (device.etc / "kiosk.env").exists()
    note = device.note()
    expected = {"changed file": "changed after signing", "added file": "not the ones the manifest lists",
                "other key": "signature does not match", "edited manifest": "signature does not match",
                "no signature": "needs both manifest and manifest.sig"}[tamper]
    assert "REJECTED" in note and expected in note, note


def test_without_an_operator_key_no_bundle_is_accepted_after_the_first_boot(tmp_path: Path) -> None:
    key = SigningKey.generate()
    device = Device(make_root(tmp_path, None), key)
    assert device.provision().returncode == 0
    device.bundle(kiosk_toml=OPEN_MIC_TOML)
    device.sign(serial=1)
    assert device.provision().returncode == 3
    assert "no operator key" in device.note() and "reflash" in device.note()


def test_a_kiosk_provisioned_before_markers_existed_is_not_at_its_first_boot(device: Device) -> None:
    device.etc.mkdir(parents=True)
    (device.etc / "kiosk.toml").write_text('[interaction]\nmode = "tap_to_talk"\n')
    device.bundle(kiosk_toml='[session]\napi_url = "https://attacker.example"\n')
    assert device.provision().returncode == 3
    assert "not signed" in device.note()
    assert "migrated" in str(device.marker()["first_boot"])


# ------------------------------------------------------------------------------------ what a bundle holds
@pytest.mark.parametrize(("line", "why"), [
    ("LD_PRELOAD=/boot/firmware/evil.so", "only KIOSK_* variables"),
    ("PYTHONPATH=/boot/firmware", "only KIOSK_* variables"),
    ("KIOSK_CONFIG=/boot/firmware/evil.toml", "KIOSK_CONFIG"),
    ("KIOSK_SESSION__CREDENTIAL=abc", "credentials never travel in the environment"),
    ('KIOSK_LOG_LEVEL="DEBUG"', "quote"),
    ("KIOSK_LOG_LEVEL=DEBUG\\", "backslash"),
    ("export KIOSK_LOG_LEVEL=DEBUG", "expected NAME=value"),
])
def test_an_environment_beyond_kiosk_settings_is_rejected(device: Device, line: str, why: str) -> None:
    device.bundle(device_credential="cred-1\n", kiosk_env=f"KIOSK_LOG_LEVEL=INFO\n{line}\n")
    assert device.provision().returncode == 3
    assert not (device.etc / "kiosk.env").exists()
    assert not (device.etc / "credentials/device-credential").exists()
    note = device.note()
    assert "REJECTED" in note and "kiosk.env line 2" in note and why in note, note
    # Even at the first boot, a rejected bundle closes the window (and the image's default is in force).
    assert device.marker()["first_boot"] == "bundle rejected"
    assert load_settings(device.etc / "kiosk.toml").session.api_url == "https://default.example"


def test_a_config_that_fails_validation_is_rejected_with_the_field(device: Device) -> None:
    device.etc.mkdir(parents=True)
    (device.etc / "kiosk.toml").write_text('[interaction]\nmode = "tap_to_talk"\n')
    (device.etc / "provisioned").write_text('{"version": 1, "first_boot": "done", "serial": 0}\n')
    device.bundle(kiosk_toml='[session]\napi_url = "voice.example.com"\n')
    device.sign(serial=1)
    assert device.provision().returncode == 3
    note = device.note()
    assert "REJECTED" in note and "session.api_url" in note and "checked as the kiosk user" in note
    assert 'mode = "tap_to_talk"' in (device.etc / "kiosk.toml").read_text()
    assert (device.rejected / "kiosk.toml").exists()


def test_the_environment_is_validated_with_the_config(device: Device) -> None:
    """A KIOSK_* value the settings refuse (plain http to another host) is caught like a bad config."""
    device.bundle(kiosk_env="KIOSK_SESSION__API_URL=http://voice.example.com\n")
    assert device.provision().returncode == 3
    assert "session.api_url" in device.note()


@pytest.mark.parametrize(("name", "content", "why"), [
    ("kiosk.toml.txt", "x", "unknown file 'kiosk.toml.txt'"),
    ("device-credential", "two words\n", "one line of printable characters"),
    ("device-credential", "", "the file is empty"),
    ("kiosk.toml", "x" * (MAX_FILE_BYTES + 1), "larger than"),
])
def test_malformed_bundles_are_rejected(device: Device, name: str, content: str, why: str) -> None:
    device.drop.mkdir(parents=True)
    (device.drop / name).write_text(content)
    assert device.provision().returncode == 3
    assert why in device.note()


def test_hidden_files_from_a_laptop_are_ignored(device: Device) -> None:
    device.bundle(device_credential="cred-2\n", **{".DS_Store": b"\0\1", "._kiosk.toml": b"\0"})
    assert device.provision().returncode == 0
    assert (device.etc / "credentials/device-credential").read_text() == "cred-2\n"


def test_validation_runs_as_the_kiosk_user_without_its_groups(device: Device) -> None:
    probe = ("import json, os, sys; sys.stdin.read(); "
             "print(json.dumps([os.getuid(), os.geteuid(), os.getgid(), os.getgroups(), sorted(os.environ)]), "
             "file=sys.stderr); sys.exit(9)")
    python, _ = _python_for_the_kiosk_user()
    validator = ServiceUserValidator(device.uid, device.gid, argv=(python, "-c", probe))
    message = validator(b"", {"KIOSK_LOG_LEVEL": "DEBUG"})
    assert message is not None
    uid, euid, gid, groups, names = json.loads(message)
    assert (uid, euid, gid) == (device.uid, device.uid, device.gid) and device.uid != 0
    assert groups in ([], [device.gid])
    assert "KIOSK_LOG_LEVEL" in names and not any(n in names for n in ("LD_PRELOAD", "HOME", "SUDO_USER"))


# ------------------------------------------------------------------------------------------ the operator
def test_the_operators_tools_make_a_bundle_the_kiosk_accepts(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "operator.key"
    assert kiosk_main(["bundle", "keygen", str(key_file)]) == 0
    public = capsys.readouterr().out.strip()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert (tmp_path / "operator.key.pub").read_text().strip() == public
    assert kiosk_main(["bundle", "keygen", str(key_file)]) == 2  # never overwrites a key

    root = make_root(tmp_path, None)
    (root / "usr/share/kiosk/operator-key.pub").write_text(public + "\n")  # what the image build installs
    device = Device(root, SigningKey.generate())
    assert device.provision().returncode == 0
    drop = device.bundle(device_credential="cred-3\n", kiosk_toml=OPEN_MIC_TOML)
    assert kiosk_main(["bundle", "sign", str(drop), "--key", str(key_file), "--serial", "20250301"]) == 0
    assert "serial 20250301" in capsys.readouterr().out
    assert kiosk_main(["bundle", "verify", str(drop), "--public-key", f"{key_file}.pub"]) == 0
    assert device.provision().returncode == 0, device.note()
    assert (device.etc / "credentials/device-credential").read_text() == "cred-3\n"


def test_the_verify_tool_reports_a_changed_bundle(tmp_path: Path) -> None:
    key_file = tmp_path / "operator.key"
    assert kiosk_main(["bundle", "keygen", str(key_file)]) == 0
    drop = tmp_path / "kiosk-provision"
    drop.mkdir()
    (drop / "kiosk.toml").write_text("[interaction]\n")
    assert kiosk_main(["bundle", "sign", str(drop), "--key", str(key_file), "--serial", "1"]) == 0
    (drop / "kiosk.toml").write_text("[session]\n")
    assert kiosk_main(["bundle", "verify", str(drop), "--public-key", f"{key_file}.pub"]) == 2


# ------------------------------------------------------------------------------------------ doctor
def test_security_checks_report_the_appliance_state(device: Device) -> None:
    device.bundle(device_credential="cred-4\n")
    assert device.provision().returncode == 0
    settings_ = load_settings(device.etc / "kiosk.toml")
    nft = subprocess.CompletedProcess([], 0, "table inet kiosk {\n chain input {\n  type filter hook input priority "
                                      "filter; policy drop;\n }\n}\n", "")
    checks = {c.name: c for c in security_checks(settings_, root=device.root, run=lambda argv: nft)}
    assert checks["first boot"].status is Verdict.OK
    assert checks["operator key"].status is Verdict.OK
    assert checks["config files"].status is Verdict.OK
    if shutil.which("nft"):
        assert checks["firewall"].status is Verdict.OK
    # A config file others can read, an unprovisioned root, a firewall that lets everything in: each reported.
    (device.etc / "kiosk.toml").chmod(0o644)
    (device.etc / "provisioned").unlink()
    accept = subprocess.CompletedProcess([], 0, "chain input { type filter hook input priority filter; "
                                         "policy accept; }", "")
    checks = {c.name: c for c in security_checks(settings_, root=device.root, run=lambda argv: accept)}
    assert checks["config files"].status is Verdict.FAIL and "0644" in checks["config files"].summary
    assert checks["first boot"].status is Verdict.FAIL
    if shutil.which("nft"):
        assert checks["firewall"].status is Verdict.FAIL


@pytest.mark.needs_tool("systemd-analyze")
def test_security_checks_score_the_installed_units(tmp_path: Path) -> None:
    root = make_root(tmp_path, None)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for name in ("kiosk.service", "kiosk-provision.service", "kiosk-cooldown.service"):
        shutil.copy(SYSTEMD / name, units / name)
    checks = {c.name: c for c in security_checks(load_settings(None), root=root)}
    unit_check = checks["unit sandboxes"]
    assert unit_check.status is Verdict.OK, unit_check.summary
    assert all(isinstance(v, float) and v <= 3.0 for v in unit_check.figures.values())
    (units / "kiosk-provision.service").write_text("[Service]\nExecStart=/bin/true\n")
    checks = {c.name: c for c in security_checks(load_settings(None), root=root)}
    assert checks["unit sandboxes"].status is Verdict.FAIL and "kiosk-provision.service" in \
        checks["unit sandboxes"].summary


# ------------------------------------------------------------------------------------------ fuzz
_printable = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x2FF), max_size=200)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(_printable)
def test_fuzz_env_parser_accepts_only_kiosk_settings(text: str) -> None:
    try:
        env = parse_env(text)
    except BundleRejected as error:
        assert error.message.startswith("kiosk.env line ")
        return
    for name, value in env.items():
        assert re.fullmatch(r"KIOSK_[A-Z0-9_]+", name) and name != "KIOSK_CONFIG"
        assert not set(value) & set("\"'\\`$\n\r\0")
    assert parse_env(format_env(env).decode()) == env  # what is installed reads back the same


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from([
    "KIOSK_LOG_LEVEL=DEBUG", "LD_PRELOAD=/x.so", "# comment", "", "KIOSK_A__B=1 2", "PATH=/tmp", "KIOSK_X=$(id)",
    "KIOSK_Y='q'", "  KIOSK_Z = v ", "KIOSK_CONFIG=/x", "kiosk_lower=1", "=1", "KIOSK_W=a\\",
]), max_size=8))
def test_fuzz_env_lines_from_a_hostile_card(lines: list[str]) -> None:
    text = "\n".join(lines)
    bad = [ln for ln in lines if ln.strip() and not ln.strip().startswith("#") and (
        not ln.strip().startswith("KIOSK_") or any(c in ln for c in "$'\\") or "KIOSK_CONFIG" in ln)]
    names = [ln.split("=")[0].strip() for ln in lines if ln.strip().startswith("KIOSK_")]
    try:
        env = parse_env(text)
    except BundleRejected:
        return
    assert not bad and len(names) == len(set(names))
    assert all(n.startswith("KIOSK_") for n in env)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(max_size=300))
def test_fuzz_manifest_parser_never_crashes(data: bytes) -> None:
    try:
        manifest = parse_manifest(data)
    except BundleRejected:
        return
    assert manifest.serial >= 1 and set(manifest.files) <= set(PAYLOAD_NAMES)


_KEY = SigningKey(b"\x01" * 32)
_FILES = {"kiosk.toml": OPEN_MIC_TOML.encode(), "device-credential": b"cred\n"}
_MANIFEST = build_manifest(_FILES, 3)
_SIGNED = {**_FILES, "manifest": _MANIFEST, "manifest.sig": base64.b64encode(_KEY.sign(_MANIFEST).signature)}


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.sampled_from(sorted(_SIGNED)), st.integers(min_value=0, max_value=10_000), st.integers(1, 255))
def test_fuzz_any_changed_byte_breaks_the_signature(name: str, position: int, flip: int) -> None:
    assert verify_bundle(_SIGNED, bytes(_KEY.verify_key)).serial == 3
    # The signature file is base64 text: flip a byte of the signature itself, not of its encoding.
    raw = base64.b64decode(_SIGNED[name]) if name == "manifest.sig" else _SIGNED[name]
    data = bytearray(raw)
    data[position % len(data)] ^= flip
    changed = {**_SIGNED, name: base64.b64encode(bytes(data)) if name == "manifest.sig" else bytes(data)}
    with pytest.raises(BundleRejected):
        verify_bundle(changed, bytes(_KEY.verify_key))


def test_the_root_process_loads_no_settings_code(device: Device) -> None:
    """As root, only the standard library, PyNaCl and the provisioning module run: never pydantic or the settings."""
    probe = ("import runpy, sys; sys.argv = ['kiosk.provision', 'apply', '--root', sys.argv[1]]\n"
             "try:\n    runpy.run_module('kiosk.provision', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'pydantic_settings', 'numpy')"
             " or m in ('kiosk.settings', 'kiosk.app'))\nprint(loaded)")
    device.bundle(device_credential="cred-5\n", kiosk_toml=OPEN_MIC_TOML)
    python, pythonpath = _python_for_the_kiosk_user()
    result = subprocess.run([python, "-c", probe, str(device.root)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": pythonpath}, check=True)
    assert result.stdout.strip() == "[]", result.stdout
    assert "ACCEPTED" in device.note()  # the config was validated all the same, in the kiosk user's process

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kiosk.errors import ConfigError
from kiosk.settings import AecBackend, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("KIOSK_") or key == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(key)


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kiosk.settings.DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    settings = load_settings()
    assert settings.aec.backend is AecBackend.HYBRID
    assert settings.session.profiles[0].llm_model == "gpt-realtime"


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "kiosk.toml"
    toml.write_text('[aec]\nbackend = "speex"\nfilter_ms = 200\n[audio]\ncapture_device = "ReSpeaker"\n')
    monkeypatch.setenv("KIOSK_AEC__FILTER_MS", "256")
    settings = load_settings(toml)
    assert settings.aec.backend is AecBackend.SPEEX
    assert settings.aec.filter_ms == 256
    assert settings.audio.capture_device == "ReSpeaker"


def test_errors_name_the_field_and_the_fix(tmp_path: Path) -> None:
    toml = tmp_path / "kiosk.toml"
    toml.write_text('[panel]\ntalk_button = {pin = 22}\n[session.profiles.0]\n')
    toml.write_text('[panel]\ntalk_button = {pin = 22}\n')
    with pytest.raises(ConfigError) as info:
        load_settings(toml)
    assert "panel" in info.value.message and "GPIO 22 is already used" in info.value.message


def test_unknown_key_and_bad_voice(tmp_path: Path) -> None:
    toml = tmp_path / "kiosk.toml"
    toml.write_text('[aec]\nbackendd = "speex"\n[[session.profiles]]\nvoice = "robot"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(toml)
    assert "aec.backendd: unknown setting" in info.value.message
    assert "session.profiles.0.voice" in info.value.message and "marin" in info.value.message


def test_credential_from_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "device-credential").write_text("s3cret-token\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    monkeypatch.setattr("kiosk.settings.DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    settings = load_settings()
    assert settings.session.credential is not None
    assert settings.session.credential.get_secret_value() == "s3cret-token"


def _kiosk(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # A guard against a hang, not a timing check: starting the CLI takes about a second here, up to a minute
    # under emulation (scripts/target-check).
    return subprocess.run([sys.executable, "-m", "kiosk", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_broken_config_exits_2(tmp_path: Path) -> None:
    toml = tmp_path / "kiosk.toml"
    toml.write_text("[aec]\nbackend = 'magic'\n")
    env = {**os.environ, "KIOSK_CONFIG": str(toml)}
    result = _kiosk("config", env=env)
    assert result.returncode == 2
    assert "aec.backend" in result.stderr and "KIOSK_AEC__BACKEND" in result.stderr


def test_cli_bad_toml_syntax_exits_2(tmp_path: Path) -> None:
    toml = tmp_path / "kiosk.toml"
    toml.write_text("[aec\n")
    result = _kiosk("config", env={**os.environ, "KIOSK_CONFIG": str(toml)})
    assert result.returncode == 2 and "TOML" in result.stderr


def test_cli_config_redacts_secrets(tmp_path: Path) -> None:
    env = {**os.environ, "KIOSK_CONFIG": str(tmp_path / "none.toml"), "KIOSK_SESSION__CREDENTIAL": "topsecret",
           "KIOSK_SESSION__API_URL": "https://kiosk:hunter2@voice.example.com/v1",
           "KIOSK_DELIVERY__URL": "https://messages.example.com/in?token=letmein&site=lobby"}
    (tmp_path / "none.toml").write_text("")
    result = _kiosk("config", env=env)
    assert result.returncode == 0, result.stderr
    assert "topsecret" not in result.stdout and "**********" in result.stdout
    assert "hunter2" not in result.stdout and "https://***@voice.example.com/v1" in result.stdout
    assert "letmein" not in result.stdout and "token=***&site=lobby" in result.stdout


def test_empty_systemd_credential_is_no_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "device-credential").write_text("\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    monkeypatch.setattr("kiosk.settings.DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    assert load_settings().session.credential is None


@pytest.mark.parametrize("field", ["KIOSK_SESSION__API_URL", "KIOSK_DELIVERY__URL"])
def test_plain_http_to_another_host_is_refused_at_load(field: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(field, "http://voice.example.com/v1")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = caught.value.message
    assert "http://voice.example.com/v1" in message and "https://" in message
    assert "allow_insecure_transport" in message and "(top level)" not in message
    monkeypatch.setenv("KIOSK_SECURITY__ALLOW_INSECURE_TRANSPORT", "true")
    assert load_settings().security.allow_insecure_transport


def test_open_mic_needs_the_sites_acknowledgement(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KIOSK_INTERACTION__MODE", "open_mic")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "interaction.open_mic_acknowledged" in caught.value.message and "tap_to_talk" in caught.value.message
    monkeypatch.setenv("KIOSK_INTERACTION__OPEN_MIC_ACKNOWLEDGED", "true")
    assert load_settings().interaction.mode.value == "open_mic"

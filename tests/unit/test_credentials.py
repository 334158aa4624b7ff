"""Credentials: delivery has its own (the systemd credential ``delivery-credential``), and no secret is ever
read from the TOML file."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from kiosk.errors import ConfigError
from kiosk.settings import Settings, load_settings


@pytest.fixture(autouse=True)
def no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CREDENTIALS_DIRECTORY", "KIOSK_SESSION__CREDENTIAL", "KIOSK_DELIVERY__CREDENTIAL", "KIOSK_CONFIG"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(("section", "name"), [("session", "device-credential"), ("delivery", "delivery-credential")])
def test_a_credential_in_the_config_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str], section: str,
                                                    name: str) -> None:
    from kiosk.__main__ import main

    config = tmp_path / "kiosk.toml"
    config.write_text(f'[{section}]\ncredential = "leaked-on-every-card"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    message = caught.value.message
    assert f"{section}.credential" in message and f"'{name}'" in message and str(config) in message
    assert "leaked-on-every-card" not in message
    assert main(["--config", str(config), "config"]) == 2
    err = capsys.readouterr().err
    assert f"{section}.credential" in err and "leaked-on-every-card" not in err
    # The same key from the environment (a command run by hand) is fine.
    config.write_text("[interaction]\nmode = \"tap_to_talk\"\n")
    monkeypatch.setenv(f"KIOSK_{section.upper()}__CREDENTIAL", "from-the-environment")
    loaded = getattr(load_settings(config), section).credential
    assert loaded is not None and loaded.get_secret_value() == "from-the-environment"


def test_a_broken_config_file_is_still_reported_by_its_syntax(tmp_path: Path) -> None:
    config = tmp_path / "kiosk.toml"
    config.write_text("[session\ncredential = 'x'\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert "TOML syntax" in caught.value.message


def test_each_credential_comes_from_its_own_systemd_credential(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "device-credential").write_text("session-secret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    settings = load_settings()
    assert settings.session.credential is not None
    assert settings.delivery.credential is None  # the session API's credential never doubles for delivery
    (tmp_path / "delivery-credential").write_text("delivery-secret\n")
    settings = load_settings()
    assert settings.delivery.credential is not None
    assert settings.delivery.credential.get_secret_value() == "delivery-secret"
    assert settings.session.credential is not None
    assert settings.session.credential.get_secret_value() == "session-secret"
    (tmp_path / "delivery-credential").write_text("\n")  # tmpfiles' empty placeholder: no credential
    assert load_settings().delivery.credential is None


def test_delivery_never_sends_the_session_credential(tmp_path: Path) -> None:
    from kiosk.fallback.delivery import Deliverer, uploader_from_settings
    from kiosk.fallback.spool import Spool

    settings = Settings(session={"credential": SecretStr("session-secret")},
                        delivery={"url": "https://messages.example/upload"})
    with pytest.raises(ConfigError) as caught:
        uploader_from_settings(settings, credential_file=tmp_path / "absent")
    assert "delivery.credential" in caught.value.message and "delivery-credential" in caught.value.message
    with Spool(tmp_path / "spool") as spool:
        assert Deliverer.from_settings(settings, spool) is None  # nothing is sent without delivery's own
    provisioned = tmp_path / "delivery-credential"
    provisioned.write_text("delivery-secret\n")
    uploader = uploader_from_settings(settings, credential_file=provisioned)  # run by hand, as root
    assert uploader._credential == "delivery-secret"
    settings.delivery.credential = SecretStr("from-systemd")
    assert uploader_from_settings(settings, credential_file=provisioned)._credential == "from-systemd"


def test_the_redacted_config_hides_both_credentials() -> None:
    from kiosk.settings import redacted

    settings = Settings(session={"credential": SecretStr("s1")}, delivery={"credential": SecretStr("d1")})
    text = str(redacted(settings))
    assert "s1" not in text and "d1" not in text and text.count("**********") == 2

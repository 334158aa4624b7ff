"""Sealed messages: keys, sealing, the operator's commands (keygen, export, decrypt, the documented one-liner)
and the stored-voice part of ``kiosk doctor security``."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiosk.audio.format import encode_wav
from kiosk.checks import Verdict
from kiosk.fallback import sealing
from kiosk.fallback.doctor import security_checks
from kiosk.fallback.spool import AUDIO_DIR, QUARANTINE_DIR, Spool
from kiosk.settings import Settings

DOCS = Path(__file__).parents[2] / "docs"
PRIVATE, PUBLIC = sealing.generate_keypair()
FUZZ = settings(max_examples=200, deadline=None, derandomize=True)


def speech(seed: int, seconds: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(16000 * seconds)) * 3000).astype(np.int16)


@pytest.fixture
def quiet_main(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kiosk.__main__.setup_logging", lambda level: None)  # keep pytest's log capture
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


# ------------------------------------------------------------------------------------------------ keys
def test_keys_are_read_as_base64_or_hex() -> None:
    b64 = sealing.encode_key(PUBLIC)
    assert len(b64) == 44
    assert sealing.parse_key(b64) == sealing.parse_key(PUBLIC.hex()) == sealing.parse_key(PUBLIC.hex().upper()) \
        == sealing.parse_key(f"  {b64}\n") == sealing.parse_key(b64.replace("+", "-").replace("/", "_")) == PUBLIC
    for bad in ("", "abc", b64[:-4], base64.b64encode(b"x" * 31).decode(), "zz" * 32, b64 + "AAAA"):
        with pytest.raises(ValueError, match="32 bytes"):
            sealing.parse_key(bad)
    with pytest.raises(ValueError, match="low-order"):
        sealing.check_public_key(bytes(32))


def test_a_bad_recipient_key_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from kiosk.errors import ConfigError
    from kiosk.settings import load_settings

    monkeypatch.setenv("KIOSK_SPOOL__RECIPIENT_PUBLIC_KEY", "not-a-key")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "spool.recipient_public_key" in caught.value.message and "kiosk messages keygen" in caught.value.message
    monkeypatch.setenv("KIOSK_SPOOL__RECIPIENT_PUBLIC_KEY", sealing.encode_key(bytes(32)))
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "low-order" in caught.value.message
    monkeypatch.setenv("KIOSK_SPOOL__RECIPIENT_PUBLIC_KEY", PUBLIC.hex())
    assert load_settings().spool.recipient_public_key == sealing.encode_key(PUBLIC)


@FUZZ
@given(st.text(max_size=120))
def test_key_parsing_never_fails_another_way(text: str) -> None:
    try:
        assert len(sealing.parse_key(text)) == 32
    except ValueError as error:
        assert "32 bytes" in str(error)


# --------------------------------------------------------------------------------------------- sealing
def test_seal_and_open() -> None:
    wav = encode_wav(speech(1, 0.5))
    sealed = sealing.seal(wav, PUBLIC)
    assert sealed[:8] == sealing.MAGIC and sealed[8:40] == PUBLIC and len(sealed) == len(wav) + 88
    assert sealing.samples_for_size(len(sealed)) == 8000
    assert sealing.unseal(sealed, PRIVATE) == wav
    other, _ = sealing.generate_keypair()
    with pytest.raises(sealing.SealError) as caught:
        sealing.unseal(sealed, other)
    assert caught.value.code == "wrong_key" and sealing.encode_key(PUBLIC) in caught.value.message
    tampered = bytearray(sealed)
    tampered[200] ^= 1
    with pytest.raises(sealing.SealError) as caught:
        sealing.unseal(bytes(tampered), PRIVATE)
    assert caught.value.code == "message_corrupt"


@FUZZ
@given(st.binary(max_size=300))
def test_opening_arbitrary_bytes_fails_cleanly(data: bytes) -> None:
    with pytest.raises(sealing.SealError):
        sealing.unseal(data, PRIVATE)
    with pytest.raises(sealing.SealError):
        sealing.unseal(sealing.MAGIC + PUBLIC + data, PRIVATE)


@FUZZ
@given(st.integers(min_value=0, max_value=2999), st.integers(min_value=1, max_value=255))
def test_any_changed_byte_is_detected(position: int, flip: int) -> None:
    sealed = bytearray(sealing.seal(b"RIFF" + bytes(range(256)) * 11, PUBLIC))
    sealed[position % len(sealed)] ^= flip
    with pytest.raises(sealing.SealError):
        sealing.unseal(bytes(sealed), PRIVATE)


# ------------------------------------------------------------------------------- the operator's commands
def keygen(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, str]:
    from kiosk.__main__ import main

    key_file = tmp_path / "operator.key"
    assert main(["messages", "keygen", str(key_file)]) == 0
    printed = capsys.readouterr().out
    return key_file, tomllib.loads(printed)["spool"]["recipient_public_key"]


def test_keygen_writes_a_private_key_and_prints_the_setting(tmp_path: Path, quiet_main: None,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from kiosk.__main__ import main

    key_file, public = keygen(tmp_path, capsys)
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert sealing.encode_key(sealing.public_key_for(sealing.read_private_key(key_file))) == public
    before = key_file.read_bytes()
    assert main(["messages", "keygen", str(key_file)]) == 1  # never overwrites a key
    assert "never overwritten" in capsys.readouterr().err and key_file.read_bytes() == before


def export_one(tmp_path: Path, public: str, pcm: np.ndarray, monkeypatch: pytest.MonkeyPatch,
               capsys: pytest.CaptureFixture[str]) -> Path:
    """Store ``pcm`` as the service would (sealed to ``public``), then `kiosk messages export --all`."""
    from kiosk.__main__ import main

    monkeypatch.setenv("KIOSK_SPOOL__DIRECTORY", str(tmp_path / "spool"))
    monkeypatch.setenv("KIOSK_SPOOL__RECIPIENT_PUBLIC_KEY", public)
    with Spool.from_settings(Settings().spool) as spool:
        spool.store(pcm)
    out = tmp_path / "export"
    assert main(["messages", "export", "--all", str(out)]) == 0
    capsys.readouterr()
    return out


def test_export_then_decrypt_gives_back_the_recording(tmp_path: Path, quiet_main: None,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from kiosk.__main__ import main

    key_file, public = keygen(tmp_path, capsys)
    pcm = speech(10, 1.5)
    out = export_one(tmp_path, public, pcm, monkeypatch, capsys)
    [sealed] = out.glob("*.wav.sealed")
    [meta] = out.glob("*.json")
    assert sealed.stat().st_mode & 0o777 == 0o600 and meta.stat().st_mode & 0o777 == 0o600
    assert json.loads(meta.read_text())["recipient_public_key"] == public
    # On the operator's machine: open the export directory into another directory.
    monkeypatch.delenv("KIOSK_SPOOL__RECIPIENT_PUBLIC_KEY")
    assert main(["messages", "decrypt", "--key", str(key_file), "--out", str(tmp_path / "plain"), str(out)]) == 0
    assert "1.5 s" in capsys.readouterr().out
    [wav] = (tmp_path / "plain").iterdir()
    assert wav.name == sealed.name.removesuffix(".sealed") and wav.stat().st_mode & 0o777 == 0o600
    assert wav.read_bytes() == encode_wav(pcm)


def test_decrypt_with_the_wrong_key_or_a_damaged_file_says_why(tmp_path: Path, quiet_main: None,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from kiosk.__main__ import main

    key_file, public = keygen(tmp_path, capsys)
    out = export_one(tmp_path, public, speech(11), monkeypatch, capsys)
    [sealed] = out.glob("*.wav.sealed")
    other = tmp_path / "other.key"
    sealing.write_private_key(other, sealing.generate_keypair()[0])
    assert main(["messages", "decrypt", "--key", str(other), str(sealed)]) == 1
    assert f"sealed to the public key {public}" in capsys.readouterr().out
    data = bytearray(sealed.read_bytes())
    data[-3] ^= 0x40
    sealed.write_bytes(bytes(data))
    (out / "garbage.sealed").write_bytes(b"\x00" * 100)
    assert main(["messages", "decrypt", "--key", str(key_file), str(out)]) == 1
    said = capsys.readouterr().out
    assert "altered or damaged" in said and "not a sealed kiosk message" in said
    assert not list(out.glob("*.wav"))  # nothing half-opened is written
    assert main(["messages", "decrypt", "--key", str(key_file), str(tmp_path / "missing")]) == 2
    assert main(["messages", "decrypt", "--key", str(tmp_path / "missing.key"), str(out)]) == 1


def documented_one_liner() -> list[str]:
    """The PyNaCl command docs/offline.md gives the operator (the line starting with python3 -c)."""
    text = (DOCS / "offline.md").read_text()
    match = re.search(r"^\s*(python3 -c '.+)$", text, flags=re.M)
    assert match, "docs/offline.md has no python3 -c one-liner for opening a message"
    return shlex.split(match.group(1))


def test_the_documented_one_liner_opens_an_exported_message(tmp_path: Path, quiet_main: None,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    key_file, public = keygen(tmp_path, capsys)
    pcm = speech(12, 0.8)
    out = export_one(tmp_path, public, pcm, monkeypatch, capsys)
    [sealed] = out.glob("*.wav.sealed")
    words = documented_one_liner()
    # python3 -c CODE operator.key MESSAGE.wav.sealed > MESSAGE.wav: run CODE with the key and the file.
    assert words[:2] == ["python3", "-c"] and words[3:5] == ["operator.key", "MESSAGE.wav.sealed"]
    assert words[5:] == [">", "MESSAGE.wav"]
    opened = subprocess.run([sys.executable, "-c", words[2], str(key_file), str(sealed)], capture_output=True,
                            check=True, timeout=60).stdout
    assert opened == encode_wav(pcm)


# ------------------------------------------------------------------------------------ doctor security
def doctor_settings(tmp_path: Path, **delivery: object) -> Settings:
    spool = {"directory": tmp_path / "spool", "recipient_public_key": sealing.encode_key(PUBLIC),
             "max_age_days": 10}
    return Settings(spool=spool, delivery=delivery)  # type: ignore[arg-type]


def by_name(settings_: Settings, **kwargs: object) -> dict[str, tuple[Verdict, str]]:
    return {c.name: (c.status, c.summary) for c in security_checks(settings_, **kwargs)}  # type: ignore[arg-type]


def test_doctor_security_on_a_healthy_spool(tmp_path: Path) -> None:
    cfg = doctor_settings(tmp_path, url="https://messages.example/upload", credential="d-secret")
    with Spool.from_settings(cfg.spool) as spool:
        spool.store(speech(20))
    checks = security_checks(cfg, credential_file=tmp_path / "none")
    assert {c.name: c.status for c in checks} == {
        "message encryption": Verdict.OK, "plain audio on the card": Verdict.OK, "retention": Verdict.OK,
        "delivery credential": Verdict.OK, "spool permissions": Verdict.OK}
    assert all(c.area == "security" for c in checks)
    assert "d-secret" not in json.dumps([c.summary for c in checks])


def test_doctor_security_finds_each_problem(tmp_path: Path) -> None:
    cfg = doctor_settings(tmp_path, url="https://messages.example/upload")
    now = time.time()
    with Spool.from_settings(cfg.spool) as spool:
        spool.store(speech(21))
    (tmp_path / "spool" / AUDIO_DIR / "left-by-hand.wav").write_bytes(encode_wav(speech(22)))
    found = by_name(cfg, credential_file=tmp_path / "none", now=now)
    plain = found["plain audio on the card"]
    assert plain[0] is Verdict.FAIL and "1 unencrypted" in plain[1]
    assert found["delivery credential"][0] is Verdict.FAIL
    assert found["retention"][0] is Verdict.OK
    # 11 days on (a 10-day limit plus two hourly timer periods): nothing has removed the message.
    assert by_name(cfg, credential_file=tmp_path / "none", now=now + 11 * 86400)["retention"][0] is Verdict.FAIL
    # The provisioned file counts as the credential when the settings have none (a command run by hand).
    provisioned = tmp_path / "delivery-credential"
    provisioned.write_text("d-secret\n")
    assert by_name(cfg, credential_file=provisioned)["delivery credential"][0] is Verdict.OK
    (tmp_path / "spool").chmod(0o755)
    assert by_name(cfg)["spool permissions"][0] is Verdict.FAIL
    no_key = Settings(spool={"directory": tmp_path / "spool"})
    assert by_name(no_key)["message encryption"][0] is Verdict.WARN
    assert by_name(no_key)["delivery credential"][0] is Verdict.SKIP  # no delivery.url
    quarantine = tmp_path / "spool" / QUARANTINE_DIR
    quarantine.mkdir()
    (tmp_path / "spool" / AUDIO_DIR / "left-by-hand.wav").rename(quarantine / "left-by-hand.wav")
    found = by_name(cfg)
    assert found["plain audio on the card"][0] is Verdict.FAIL and "1 in" in found["plain audio on the card"][1]
    os.utime(quarantine / "left-by-hand.wav", (now - 40 * 86400, now - 40 * 86400))
    assert by_name(cfg, now=now)["retention"][0] is Verdict.FAIL  # quarantine kept past its 30 days

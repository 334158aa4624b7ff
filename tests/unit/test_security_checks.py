"""``kiosk doctor security`` (the network side), the metrics host rule and the trusted-agent decision."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from livekit import rtc

from kiosk.checks import Verdict
from kiosk.errors import ConfigError
from kiosk.link.doctor import security_checks
from kiosk.link.livekit import is_trusted_agent
from kiosk.metrics import Exchange, Status
from kiosk.settings import Settings, load_settings


def _by_name(settings: Settings) -> dict[str, Verdict]:
    checks = security_checks(settings)
    assert all(c.area == "security" and c.summary for c in checks)
    assert all(c.fix for c in checks if c.status in (Verdict.WARN, Verdict.FAIL))
    return {c.name: c.status for c in checks}


def test_defaults_pass() -> None:
    assert _by_name(Settings()) == {"transport": Verdict.OK, "secrets in URLs": Verdict.OK,
                                    "metrics exposure": Verdict.OK}


def test_insecure_transport_switch_is_a_failure() -> None:
    settings = Settings(session={"api_url": "http://10.213.0.1:8080"}, security={"allow_insecure_transport": True})
    checks = {c.name: c for c in security_checks(settings)}
    transport = checks["transport"]
    assert transport.status is Verdict.FAIL
    assert "session.api_url" in transport.summary and "allow_insecure_transport" in transport.summary


def test_secret_in_a_url_is_a_warning_and_not_shown() -> None:
    settings = Settings(delivery={"url": "https://user:hunter2@messages.example.test/in?token=hunter3"})
    checks = {c.name: c for c in security_checks(settings)}
    assert checks["secrets in URLs"].status is Verdict.WARN and "delivery.url" in checks["secrets in URLs"].summary
    assert all("hunter" not in c.summary for c in checks.values())


def test_metrics_beyond_loopback_needs_the_explicit_setting() -> None:
    with pytest.raises(ValueError, match="expose_beyond_loopback"):
        Settings(metrics={"host": "0.0.0.0"})
    with pytest.raises(ValueError, match="expose_beyond_loopback"):
        Settings(metrics={"host": "192.168.1.20"})
    exposed = Settings(metrics={"host": "0.0.0.0", "expose_beyond_loopback": True})
    assert _by_name(exposed)["metrics exposure"] is Verdict.WARN
    assert _by_name(Settings(metrics={"host": "localhost"}))["metrics exposure"] is Verdict.OK
    assert _by_name(Settings(metrics={"enabled": False, "host": "0.0.0.0"}))["metrics exposure"] is Verdict.OK


def test_metrics_host_from_the_environment_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kiosk.settings.DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    monkeypatch.setenv("KIOSK_METRICS__HOST", "0.0.0.0")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "metrics.host" in caught.value.message and "expose_beyond_loopback" in caught.value.message
    monkeypatch.setenv("KIOSK_METRICS__EXPOSE_BEYOND_LOOPBACK", "true")
    assert load_settings().metrics.host == "0.0.0.0"


def test_cli_doctor_security(tmp_path: Path) -> None:
    (tmp_path / "kiosk.toml").write_text("")
    env = {**os.environ, "KIOSK_CONFIG": str(tmp_path / "kiosk.toml")}
    ok = subprocess.run([sys.executable, "-m", "kiosk", "doctor", "security", "--json"], env=env,
                        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    report = json.loads(ok.stdout)  # other areas' parts (units, firewall) may fail on a development machine
    network = {c["name"]: c["status"] for c in report["checks"] if c["name"] in _by_name(Settings())}
    assert network == {"transport": "ok", "secrets in URLs": "ok", "metrics exposure": "ok"}
    failing = subprocess.run([sys.executable, "-m", "kiosk", "doctor", "security"], capture_output=True, text=True,
                             env={**env, "KIOSK_SECURITY__ALLOW_INSECURE_TRANSPORT": "true"}, timeout=60,
                             stdin=subprocess.DEVNULL)
    assert failing.returncode == 1 and "[FAIL] security transport" in failing.stdout


@dataclass
class Participant:
    identity: str
    kind: int


AGENT = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
STANDARD = rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD


def test_trusted_agent_decision() -> None:
    assert is_trusted_agent(Participant("agent-1", AGENT), None)
    assert is_trusted_agent(Participant("agent-1", AGENT), "agent-1")
    assert not is_trusted_agent(Participant("agent-2", AGENT), "agent-1")  # named: the identity must match
    assert not is_trusted_agent(Participant("agent-1", STANDARD), "agent-1")  # the kind must be AGENT
    assert not is_trusted_agent(Participant("agent-1", STANDARD), None)


def test_status_has_no_caption_text() -> None:
    status = Status(last_exchange=Exchange(visitor_chars=12, agent_chars=40))
    assert status.to_dict()["last_exchange"] == {"visitor_chars": 12, "agent_chars": 40}

from __future__ import annotations

from kiosk.checks import Verdict
from kiosk.doctor import run_doctor
from kiosk.settings import Settings


def _verdicts(settings: Settings) -> dict[str, Verdict]:
    return {c.name: c.status for c in run_doctor(settings, ["security"]).checks}


def test_defaults() -> None:
    verdicts = _verdicts(Settings())
    assert verdicts["AI notice"] is Verdict.WARN and verdicts["open microphone"] is Verdict.OK
    assert verdicts["headset allowlist"] is Verdict.OK


def test_what_a_public_place_must_not_have() -> None:
    settings = Settings(audio={"headset_usb_ids": ["*"]}, session={"consent_notice": True},
                        interaction={"mode": "open_mic", "open_mic_acknowledged": True})
    verdicts = _verdicts(settings)
    assert verdicts["headset allowlist"] is Verdict.FAIL and verdicts["open microphone"] is Verdict.WARN
    assert verdicts["AI notice"] is Verdict.OK
    assert run_doctor(settings, ["security"]).exit_status() == 1

"""hw/ and the settings agree: the udev rule names as the headset exactly the USB ids the kiosk allows."""

from __future__ import annotations

import re
from pathlib import Path

from kiosk.settings import KNOWN_HEADSET_USB_IDS, AudioSettings

HW = Path(__file__).resolve().parents[2] / "hw"


def _ids_named(card: str) -> set[str]:
    rule = re.compile(r'ATTRS\{idVendor\}=="([0-9a-f]{4})", ATTRS\{idProduct\}=="([0-9a-f]{4})", ATTR\{id\}="'
                      + card + '"')
    return {f"{v}:{p}" for v, p in rule.findall((HW / "99-kiosk-audio.rules").read_text())}


def test_udev_headsets_are_the_allowed_ones() -> None:
    assert _ids_named("kioskheadset") == set(KNOWN_HEADSET_USB_IDS) == set(AudioSettings().headset_usb_ids)


def test_no_rule_names_a_headset_by_its_product_string() -> None:
    text = (HW / "99-kiosk-audio.rules").read_text()
    assert not [line for line in text.splitlines()
                if "kioskheadset" in line and "ATTRS{product}" in line and not line.lstrip().startswith("#")]


def test_usb_ids_are_validated() -> None:
    import pytest
    from pydantic import ValidationError

    assert AudioSettings(headset_usb_ids=["046D:0A44", " * "]).headset_usb_ids == ["046d:0a44", "*"]
    with pytest.raises(ValidationError, match="lsusb"):
        AudioSettings(headset_usb_ids=["Logitech"])

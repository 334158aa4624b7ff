"""``kiosk bench sessions``: the figure is the slope of resident memory after the first session."""

from __future__ import annotations

import json

import pytest

from kiosk_dev.bench.sessions import SessionsResult, render, run, to_json


def test_the_first_session_is_left_out_of_the_slope() -> None:
    result = SessionsResult("connect", 5, resident_mib=[80.0, 100.0, 100.5, 101.0, 101.5], threads=[11] * 5,
                            live_handles=[0] * 5)
    assert result.kept_mib_per_session == pytest.approx(0.5)
    assert "kept per session (slope after the first): 0.50 MiB" in render(result)
    assert json.loads(to_json(result))["kept_mib_per_session"] == pytest.approx(0.5)
    assert SessionsResult("link", 2, resident_mib=[80.0, 90.0]).kept_mib_per_session is None


def test_an_unknown_mode_is_refused_before_anything_starts() -> None:
    with pytest.raises(ValueError, match="one of link, connect, publish, subscribe"):
        run("reconnect", 3)

"""kiosk_dev.inputs: synthetic benchmark inputs recorded on one machine are replayed, sample for sample, on another."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiosk.errors import KioskError
from kiosk_dev import inputs


@pytest.fixture(autouse=True)
def _no_store() -> Iterator[None]:
    inputs.use(None)
    yield
    inputs.use(None)


CALLS: list[tuple[Any, ...]] = []


@inputs.recorded("tone")
def tone(seconds: float, hz: float = 440.0) -> Any:
    CALLS.append((seconds, hz))
    return np.sin(2 * np.pi * hz * np.arange(int(seconds * 16000)) / 16000).astype(np.float32)


def test_recorded_inputs_are_replayed_without_making_them(tmp_path: Path) -> None:
    CALLS.clear()
    inputs.use(tmp_path, "record")
    made = tone(0.01, hz=300.0)
    assert CALLS == [(0.01, 300.0)] and len(list(tmp_path.glob("tone-*.npz"))) == 1
    inputs.use(tmp_path, "replay")
    again = tone(0.01, hz=300.0)
    assert CALLS == [(0.01, 300.0)]  # read, not made
    assert again.dtype == made.dtype and np.array_equal(again, made)


def test_without_a_store_inputs_are_made_and_nothing_is_written(tmp_path: Path) -> None:
    CALLS.clear()
    tone(0.01)
    tone(0.01)
    assert len(CALLS) == 2 and not list(tmp_path.iterdir())


def test_a_call_with_an_array_argument_is_never_recorded(tmp_path: Path) -> None:
    @inputs.recorded("scaled")
    def scaled(signal: Any, gain: float) -> Any:
        return signal * gain

    inputs.use(tmp_path, "record")
    assert np.array_equal(scaled(np.ones(3), 2.0), np.full(3, 2.0))
    assert not list(tmp_path.iterdir())
    inputs.use(tmp_path, "replay")
    assert np.array_equal(scaled(np.ones(3), 3.0), np.full(3, 3.0))  # made, not looked up


def test_a_missing_input_names_the_file_and_the_fix(tmp_path: Path) -> None:
    inputs.use(tmp_path, "replay")
    with pytest.raises(KioskError) as error:
        tone(0.5)
    assert error.value.code == "bench_input_missing"
    assert "tone-" in error.value.message and "--record-inputs" in error.value.message
    with pytest.raises(KioskError, match="not a directory"):
        inputs.use(tmp_path / "absent", "replay")


def test_the_file_name_depends_only_on_the_call() -> None:
    # Both machines must name a call alike: repr of plain values, hashed. A change here orphans recorded inputs.
    assert inputs.key("tone", (0.5,), {"hz": 440.0}) == inputs.key("tone", (0.5,), {"hz": 440.0})
    assert inputs.key("tone", (0.5,), {"hz": 440.0}) != inputs.key("tone", (0.5,), {"hz": 441.0})
    assert inputs.key("scenario", (0,), {"seconds": 8.0, "visitor_spans": [(4.0, 5.2)]}) == \
        "scenario-f73c25946f5c848e3306"


def test_a_scenario_round_trips(tmp_path: Path) -> None:
    from kiosk_dev.roomsim import make_scenario

    inputs.use(tmp_path, "record")
    made = make_scenario(3, seconds=1.0, delay_ms=40.0, drift_ppm=100.0, visitor_spans=[(0.2, 0.6)])
    inputs.use(tmp_path, "replay")
    again = make_scenario(3, seconds=1.0, delay_ms=40.0, drift_ppm=100.0, visitor_spans=[(0.2, 0.6)])
    for name in ("far", "echo", "near", "noise", "mic"):
        assert np.array_equal(getattr(again, name), getattr(made, name)), name
    assert (again.delay_ms, again.drift_ppm, again.near_spans) == (40.0, 100.0, [(0.2, 0.6)])


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.binary(max_size=600) | st.sampled_from([b"PK\x03\x04", b"PK\x05\x06" + bytes(18), b"\x93NUMPY"])
       | st.builds(lambda tail: b"\x93NUMPY\x01\x00" + tail, st.binary(max_size=80)))
def test_a_damaged_input_file_gives_a_clear_error(tmp_path_factory: Any, data: bytes) -> None:
    directory = tmp_path_factory.mktemp("inputs")
    (directory / f"{inputs.key('tone', (0.25,), {})}.npz").write_bytes(data)
    inputs.use(directory, "replay")
    try:
        result = tone(0.25)
    except KioskError as error:
        assert error.code in ("bench_input_damaged", "bench_input_missing")
    else:  # only a real npz with a "value" array gets here
        assert isinstance(result, np.ndarray)
    finally:
        inputs.use(None)


def test_a_wrong_kind_of_numpy_file_is_damaged_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / f"{inputs.key('tone', (0.25,), {})}.npz"
    inputs.use(tmp_path, "replay")
    with path.open("wb") as handle:
        np.save(handle, np.zeros(4))  # a bare .npy under the .npz name
    with pytest.raises(KioskError, match="not an .npz archive"):
        tone(0.25)
    with path.open("wb") as handle:
        np.savez(handle, other=np.zeros(4))  # an archive without the array the decoder wants
    with pytest.raises(KioskError) as error:
        tone(0.25)
    assert error.value.code == "bench_input_damaged"
    with path.open("wb") as handle:
        np.savez(handle, value=np.array([object()], dtype=object))  # pickled objects are refused
    with pytest.raises(KioskError) as error:
        tone(0.25)
    assert error.value.code == "bench_input_damaged"

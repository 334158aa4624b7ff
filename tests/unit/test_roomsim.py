from __future__ import annotations

import numpy as np
import pytest

from kiosk_dev import roomsim


def test_rir_is_deterministic_and_normalised() -> None:
    a = roomsim.room_impulse_response(3)
    b = roomsim.room_impulse_response(3)
    c = roomsim.room_impulse_response(4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(a) == 6000 and float(np.max(np.abs(a))) == pytest.approx(1.0)
    # Speaker 15 cm from the microphone: the direct path (the peak) arrives within a few ms.
    assert int(np.argmax(np.abs(a))) < 100


def test_render_echo_integer_delay_is_exact() -> None:
    far = np.zeros(4000, dtype=np.float32)
    far[100] = 1.0
    rir = np.zeros(10, dtype=np.float32)
    rir[0] = 0.5
    echo = roomsim.render_echo(far, rir, delay_ms=10.0)
    assert int(np.argmax(echo)) == 260 and echo[260] == pytest.approx(0.5)


def test_render_echo_drift_moves_the_echo() -> None:
    far = np.zeros(16000 * 10, dtype=np.float32)
    far[16000 * 9] = 1.0
    rir = np.array([1.0], dtype=np.float32)
    echo = roomsim.render_echo(far, rir, delay_ms=0.0, drift_ppm=100.0)
    # 100 ppm faster capture: an impulse played at 9 s lands 14.4 samples later.
    k = int(np.argmax(echo))
    a, b, c = echo[k - 1], echo[k], echo[k + 1]
    peak = k + 0.5 * (a - c) / (a - 2 * b + c)
    assert peak - 16000 * 9 == pytest.approx(14.4, abs=0.2)


def test_streaming_room_matches_render_echo() -> None:
    sc = roomsim.make_scenario(0, seconds=3.0)
    rir = roomsim.room_impulse_response(0)
    room = roomsim.StreamingRoom(rir, delay_ms=37.5, drift_ppm=-80.0)
    blocks = [room.process(sc.far[i:i + 441]) for i in range(0, len(sc.far), 441)]
    streamed = np.concatenate(blocks)
    offline = roomsim.render_echo(sc.far, rir, 37.5, -80.0)
    err = np.sum((streamed - offline) ** 2) / np.sum(offline ** 2)
    assert 10 * np.log10(err) < -60


def test_streaming_room_delay_step() -> None:
    rir = np.array([1.0], dtype=np.float32)
    room = roomsim.StreamingRoom(rir, delay_ms=10.0)
    impulse = np.zeros(1600, dtype=np.float32)
    impulse[0] = 1.0
    assert int(np.argmax(room.process(impulse))) == 160
    room.set_delay_ms(30.0)
    assert int(np.argmax(room.process(impulse))) == 480


@pytest.mark.parametrize("kind", roomsim.NOISE_KINDS)
def test_backgrounds_are_unit_variance_and_seeded(kind: str) -> None:
    a = roomsim.background(kind, 16000 * 2, seed=5)
    b = roomsim.background(kind, 16000 * 2, seed=5)
    assert np.array_equal(a, b)
    assert float(np.std(a)) == pytest.approx(1.0, rel=0.05)


def test_pink_noise_is_pink() -> None:
    noise = roomsim.pink_noise(16000 * 4, 0)
    spectrum = np.abs(np.fft.rfft(noise)) ** 2
    freqs = np.fft.rfftfreq(len(noise), 1 / 16000)
    low = spectrum[(freqs > 100) & (freqs < 200)].mean()
    high = spectrum[(freqs > 3200) & (freqs < 6400)].mean()
    assert 10 * np.log10(low / high) > 10  # about 3 dB per octave over 5 octaves


def test_unknown_background_is_refused() -> None:
    with pytest.raises(ValueError, match="use one of"):
        roomsim.background("traffic", 100)


def test_scenario_levels_and_parts() -> None:
    sc = roomsim.make_scenario(2, seconds=6.0, visitor_spans=[(2.0, 4.0)], noise_kind="pink", noise_dbfs=-50.0)
    assert np.allclose(sc.mic, sc.echo + sc.near + sc.noise, atol=1e-3)
    assert not sc.near[: 2 * 16000].any() and sc.near[2 * 16000: 4 * 16000].any()
    active = sc.near[np.abs(sc.near) > 1e-4]
    assert roomsim.rms_dbfs(active) == pytest.approx(-26.0, abs=1.5)  # a span cuts an utterance short
    assert roomsim.rms_dbfs(sc.noise) == pytest.approx(-50.0, abs=0.5)
    again = roomsim.make_scenario(2, seconds=6.0, visitor_spans=[(2.0, 4.0)], noise_kind="pink", noise_dbfs=-50.0)
    assert np.array_equal(sc.mic, again.mic)

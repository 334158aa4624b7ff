from __future__ import annotations

import numpy as np

from kiosk.audio import speex


def _noise(seconds: float, seed: int = 0, level: float = 3000.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * level).astype(np.int16)


def test_echo_canceller_removes_a_delayed_echo() -> None:
    far = _noise(4.0)
    echo = np.zeros_like(far)
    echo[40:] = (far[:-40].astype(np.float64) * 0.5).astype(np.int16)  # 2.5 ms, -6 dB
    state = speex.EchoState(160, 1024, 16000)
    out = np.zeros_like(far)
    for i in range(0, len(far), 160):
        out[i:i + 160] = state.cancel(echo[i:i + 160], far[i:i + 160])
    tail = slice(3 * 16000, 4 * 16000)
    erle = 10 * np.log10(np.sum(echo[tail].astype(float) ** 2) / np.sum(out[tail].astype(float) ** 2))
    assert erle > 20.0
    state.reset()
    first = state.cancel(echo[16000:16160], far[16000:16160]).copy()
    assert np.sum(first.astype(float) ** 2) > 0.5 * np.sum(echo[16000:16160].astype(float) ** 2)


def test_preprocessor_controls_round_trip() -> None:
    echo = speex.EchoState(160, 512, 16000)
    pre = speex.Preprocessor(160, 16000, echo=echo, echo_suppress_db=-55, echo_suppress_active_db=-22)
    assert pre.get_int(speex.SPEEX_PREPROCESS_GET_ECHO_SUPPRESS) == -55
    assert pre.get_int(speex.SPEEX_PREPROCESS_GET_ECHO_SUPPRESS_ACTIVE) == -22


def test_preprocessor_denoise_attenuates_steady_noise() -> None:
    noise = _noise(3.0, seed=3, level=300.0)
    pre = speex.Preprocessor(160, 16000, denoise=True, noise_suppress_db=-25)
    out = np.zeros_like(noise)
    for i in range(0, len(noise), 160):
        out[i:i + 160] = pre.run(noise[i:i + 160])
    tail = slice(2 * 16000, 3 * 16000)
    attenuation = 10 * np.log10(np.sum(noise[tail].astype(float) ** 2) / np.sum(out[tail].astype(float) ** 2))
    assert attenuation > 10.0


def test_resampler_latency_and_ratio() -> None:
    resampler = speex.Resampler(1, 1, quality=8, max_in_samples=640, max_out_samples=640)
    impulse = np.zeros(640, dtype=np.int16)
    impulse[100] = 10000
    out = np.zeros(640, dtype=np.int16)
    consumed, produced = resampler.process(impulse, out)
    assert (consumed, produced) == (640, 640)
    assert int(np.argmax(out)) == 100 + resampler.input_latency_samples

    # +1000 ppm: 1001 input samples per 1000 output samples.
    resampler = speex.Resampler(1001, 1000, quality=8, max_in_samples=2000, max_out_samples=1000)
    signal = _noise(2.0)
    total_in = total_out = 0
    block = np.zeros(1000, dtype=np.int16)
    while total_out < 20000:
        consumed, produced = resampler.process(signal[total_in:total_in + 2000], block)
        total_in += consumed
        total_out += produced
    assert abs(total_in / total_out - 1.001) < 2e-4


def test_resampler_ratio_change_keeps_running() -> None:
    resampler = speex.Resampler(1, 1, max_in_samples=400, max_out_samples=160)
    out = np.zeros(160, dtype=np.int16)
    resampler.process(_noise(0.1), out)
    resampler.set_ratio(59999, 60000)
    consumed, produced = resampler.process(_noise(0.1, seed=2), out)
    assert produced == 160 and 159 <= consumed <= 161

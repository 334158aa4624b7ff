"""``kiosk doctor audio``: the devices, and a loopback measurement through the kiosk's own audio I/O.

The devices must be present and open; then a sweep and a noise burst are played and recorded, giving the
delay of the echo behind the reference, the echo level, the noise floor, the capture rate, the ERLE the
configured echo canceller reaches on that recording, and a recommended interaction mode:

- ``headset_only``: the noise floor at the microphone is at or above ``LOUD_FLOOR_DBFS``; a far-field
  array cannot pick a visitor out of that.
- ``hands_free``: the sweep was heard, its delay lies within the echo canceller's search range, nothing
  clipped, the capture kept up with real time (``MIN_CAPTURE_RATE``), and the ERLE reached
  ``HANDS_FREE_ERLE_DB``; a verified echo path, so barge-in by voice is safe.
- ``push_to_talk``: anything else (a weak or unmeasured canceller, an echo path that could not be
  verified); a press clears the playback, so the agent's voice never reaches the microphone stream.

docs/appliance.md explains the thresholds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from kiosk.checks import Check, Figures, Recommendation, Verdict
from kiosk.errors import DeviceError
from kiosk.ports import EchoCanceller
from kiosk.settings import Settings

Signal = npt.NDArray[np.float32]

# ---- recommendation thresholds (docs/appliance.md explains them)
LOUD_FLOOR_DBFS = -35.0  # noise floor at/above this: headset only
HANDS_FREE_ERLE_DB = 20.0  # echo canceller must reach this for hands-free (barge-in by voice)
MIN_DETECTION_RATIO = 8.0  # sweep's matched-filter peak over the median: below this it was not heard
CLIP_LEVEL = 0.98  # |sample| at/above this (of full scale) counts as clipped
MIN_CAPTURE_RATE = 0.9  # capture below this share of real time: blocks are dropped, the path is unverified

# ---- the loopback stimulus (seconds)
LEAD_SECONDS = 0.5  # silence first: the noise floor (from 0.1 s on, after the streams settle)
SWEEP_SECONDS = 1.0
GAP_SECONDS = 0.3
BURST_SECONDS = 5.0  # band-limited noise: the echo canceller converges on it
ERLE_TAIL_SECONDS = 2.0  # ERLE over the burst's last seconds (after convergence)
SWEEP_AMPLITUDE = 0.5
BURST_RMS = 0.1  # -20 dBFS
MEASURE_RATE_HZ = 16000


def make_stimulus(rate_hz: int = MEASURE_RATE_HZ, seed: int = 0) -> tuple[Signal, Signal, int, tuple[int, int]]:
    """(stimulus, sweep, sweep_start, (burst_start, burst_end)): what the loopback measurement plays."""
    from scipy.signal import butter, chirp, sosfilt

    n_sweep = int(SWEEP_SECONDS * rate_hz)
    t = np.arange(n_sweep) / rate_hz
    top_hz = min(7000.0, 0.45 * rate_hz)
    sweep = chirp(t, f0=100.0, t1=SWEEP_SECONDS, f1=top_hz, method="logarithmic")
    fade = int(0.01 * rate_hz)
    ramp = np.linspace(0.0, 1.0, fade)
    sweep[:fade] *= ramp
    sweep[-fade:] *= ramp[::-1]
    sweep = (SWEEP_AMPLITUDE * sweep).astype(np.float32)
    rng = np.random.default_rng(seed)
    n_burst = int(BURST_SECONDS * rate_hz)
    sos = butter(4, [200.0, min(6000.0, 0.45 * rate_hz)], btype="bandpass", fs=rate_hz, output="sos")
    burst = sosfilt(sos, rng.standard_normal(n_burst))
    burst *= BURST_RMS / np.sqrt(np.mean(burst**2))
    lead = int(LEAD_SECONDS * rate_hz)
    gap = int(GAP_SECONDS * rate_hz)
    stimulus = np.concatenate([np.zeros(lead), sweep, np.zeros(gap), burst]).astype(np.float32)
    burst_start = lead + n_sweep + gap
    return stimulus, sweep, lead, (burst_start, burst_start + n_burst)


def _dbfs(x: npt.NDArray[np.floating[Any]]) -> float:
    power = float(np.mean(np.square(x, dtype=np.float64))) if len(x) else 0.0
    return round(10.0 * float(np.log10(max(power, 1e-12))), 1)


@dataclass
class LoopbackFigures:
    """What the loopback measurement found."""

    heard: bool
    detection_ratio: float
    delay_ms: float | None  # the echo behind the reference the canceller gets (what it has to cover)
    noise_floor_dbfs: float
    echo_dbfs: float | None
    played_dbfs: float
    echo_return_loss_db: float | None
    clipped: bool
    erle_db: float | None = None
    aec_backend: str | None = None
    aec_delay_ms: float | None = None
    aec_note: str | None = None
    streams: str = "recording"  # how it was captured: "duplex", "two streams", or an offline recording
    capture_rate: float = 1.0  # audio captured per second of wall-clock time (below 1: dropped blocks)


def _find(signal: Signal, template: Signal, start: int, stop: int) -> tuple[int, float]:
    """Where ``template`` starts in ``signal`` between ``start`` and ``stop`` (matched filter), and how surely."""
    from scipy.signal import correlate

    start = max(0, start)
    segment = signal[start: stop + len(template)]
    if len(segment) < len(template):
        return start, 0.0
    corr = np.abs(correlate(segment.astype(np.float64), template.astype(np.float64), mode="valid", method="fft"))
    peak = int(np.argmax(corr))
    return start + peak, float(corr[peak] / (np.median(corr) + 1e-12))


def analyse_loopback(mic: Signal, ref: Signal, max_delay_ms: float, seed: int = 0) -> LoopbackFigures:
    """Find the sweep in the reference (what was rendered) and in the microphone; measure the levels.

    ``mic`` and ``ref`` are 16 kHz float, sample-aligned as the echo canceller receives them.
    """
    stimulus, sweep, sweep_start, (b0, b1) = make_stimulus(MEASURE_RATE_HZ, seed)
    rate = MEASURE_RATE_HZ
    # Where the stimulus landed in the reference (the playout may start a little after the capture).
    ref_sweep, _ = _find(ref, sweep, 0, len(ref) - len(sweep))
    offset = ref_sweep - sweep_start
    max_lag = int(max_delay_ms * rate / 1000)
    # Two separately started streams can put the echo a little early: search back into the lead too.
    pre = int((LEAD_SECONDS - 0.15) * rate)
    mic_sweep, ratio = _find(mic, sweep, ref_sweep - pre, ref_sweep + max_lag)
    heard = ratio >= MIN_DETECTION_RATIO
    lag = mic_sweep - ref_sweep if heard else 0
    # The noise floor: the quieter of the microphone before the sweep arrives (after the streams
    # settle) and after the burst's echo died down; one of them can hold a sound server's start-up
    # burst or a late, reverberant echo.
    before = mic[int(0.05 * rate): offset + sweep_start + lag - int(0.02 * rate)]
    after = mic[offset + b1 + max(lag, 0) + int(0.15 * rate):] if heard else mic[:0]
    floor = min(_dbfs(before), _dbfs(after)) if len(after) >= rate // 10 else _dbfs(before)
    played = _dbfs(stimulus[b0:b1])
    echo = _dbfs(mic[offset + b0 + lag: offset + b1 + lag]) if heard else None
    return LoopbackFigures(
        heard=heard, detection_ratio=round(ratio, 1),
        delay_ms=round(1000.0 * lag / rate, 1) if heard else None,
        noise_floor_dbfs=floor, echo_dbfs=echo, played_dbfs=played,
        echo_return_loss_db=round(played - echo, 1) if echo is not None else None,
        clipped=bool(np.max(np.abs(mic)) >= CLIP_LEVEL) if len(mic) else False)


EchoCancellerFactory = Callable[[Settings], EchoCanceller]


def _default_aec_factory(settings: Settings) -> EchoCanceller:
    from kiosk.audio.aec import make_echo_canceller

    return make_echo_canceller(settings.aec)


def measure_erle(mic: Signal, ref: Signal, settings: Settings, figures: LoopbackFigures,
                 factory: EchoCancellerFactory = _default_aec_factory, seed: int = 0) -> None:
    """Run the configured echo canceller over the recording, frame by frame as live, and fill in its ERLE.

    The canceller gets (microphone, reference) pairs exactly as the audio engine hands them over and
    estimates the delay itself unless ``aec.delay_ms`` is set. ERLE over the burst's last
    ``ERLE_TAIL_SECONDS``.
    """
    try:
        aec = factory(settings)
    except ImportError as error:
        figures.aec_note = f"echo canceller not available ({error.name or error}): ERLE not measured"
        return
    _, sweep, sweep_start, (b0, b1) = make_stimulus(MEASURE_RATE_HZ, seed)
    ref_sweep, _ = _find(ref, sweep, 0, len(ref) - len(sweep))
    offset = ref_sweep - sweep_start
    frame = MEASURE_RATE_HZ // 100
    mic16 = np.clip(np.rint(mic * 32768.0), -32768, 32767).astype(np.int16)
    ref16 = np.clip(np.rint(ref * 32768.0), -32768, 32767).astype(np.int16)
    n = min(len(mic16), len(ref16)) // frame * frame
    out = np.zeros(n, dtype=np.int16)
    for i in range(0, n, frame):
        out[i: i + frame] = aec.process(mic16[i: i + frame], ref16[i: i + frame])
    lag = int((figures.delay_ms or 0.0) * MEASURE_RATE_HZ / 1000)
    t1 = min(offset + b1 + lag, n)
    t0 = max(offset + b0 + lag, t1 - int(ERLE_TAIL_SECONDS * MEASURE_RATE_HZ))
    mic_power = float(np.mean(np.square(mic16[t0:t1], dtype=np.float64))) if t1 > t0 else 0.0
    out_power = float(np.mean(np.square(out[t0:t1], dtype=np.float64))) if t1 > t0 else 0.0
    figures.erle_db = round(10.0 * float(np.log10((mic_power + 1.0) / (out_power + 1.0))), 1)
    figures.aec_backend = aec.name
    figures.aec_delay_ms = aec.stats().delay_ms


def recommend(figures: LoopbackFigures | None, max_delay_ms: float) -> Recommendation:
    """The interaction mode the loopback figures support (see the module docstring for the rules)."""
    ptt: dict[str, str | bool] = {"interaction.mode": "push_to_talk", "interaction.barge_in": False}
    if figures is None:
        return Recommendation("push_to_talk", "no loopback measurement: the echo path is unverified", ptt)
    if figures.noise_floor_dbfs >= LOUD_FLOOR_DBFS:
        return Recommendation("headset_only", f"the noise floor at the microphone is {figures.noise_floor_dbfs} dBFS "
                              f"(>= {LOUD_FLOOR_DBFS:g}): too loud for a far-field microphone",
                              {"audio.headset_capture_device": "(your headset)",
                               "audio.headset_playback_device": "(your headset)", **ptt})
    if not figures.heard:
        return Recommendation("push_to_talk", "the microphone did not hear the speaker's sweep, so the echo path "
                              "cannot be verified", ptt)
    if figures.erle_db is None:
        return Recommendation("push_to_talk", "the echo canceller's ERLE was not measured; the echo path is "
                              "unverified", ptt)
    if figures.capture_rate < MIN_CAPTURE_RATE:
        return Recommendation("push_to_talk", f"the capture delivered only {figures.capture_rate:.0%} of real time "
                              "(dropped blocks slide the microphone against the echo reference)", ptt)
    if figures.clipped:
        return Recommendation("push_to_talk", "the microphone clipped during playback; the canceller cannot "
                              "model a clipped echo (lower the speaker volume or the microphone gain)", ptt)
    if figures.delay_ms is not None and figures.delay_ms > max_delay_ms:
        return Recommendation("push_to_talk", f"the echo arrives {figures.delay_ms} ms late, beyond the "
                              f"canceller's search range ({max_delay_ms:g} ms)", ptt)
    if figures.erle_db >= HANDS_FREE_ERLE_DB:
        return Recommendation("hands_free", f"the echo canceller reaches {figures.erle_db} dB ERLE "
                              f"(>= {HANDS_FREE_ERLE_DB:g}): a verified echo path, barge-in by voice is safe",
                              {"interaction.mode": "tap_to_talk", "interaction.barge_in": True})
    return Recommendation("push_to_talk", f"the echo canceller reaches only {figures.erle_db} dB ERLE "
                          f"(< {HANDS_FREE_ERLE_DB:g})", ptt)


def _find_device(pa: Any, name: str, want_input: bool) -> tuple[int, dict[str, Any]]:
    """The PortAudio device ``name`` refers to, by the engine's rules (``kiosk.audio.devices``).

    Raises ``DeviceError`` (no match, or several) with the candidates in the message.
    """
    from kiosk.audio import devices

    direction: Literal["capture", "playback"] = "capture" if want_input else "playback"
    device = devices.match_device(name, direction, devices.list_devices(pa))
    return device.index, pa.get_device_info_by_index(device.index)


def record_loopback(settings: Settings, tail_seconds: float = 1.3) -> tuple[Signal, Signal, str, float]:
    """Play the stimulus through the kiosk's own audio I/O: (mic, reference, stream layout, capture rate).

    The capture rate is the audio captured over the wall-clock time it took (1.0: real time; less: the
    device or its driver dropped blocks, which also slides the microphone against the reference).
    """
    stimulus = make_stimulus(MEASURE_RATE_HZ)[0]
    play = np.clip(np.rint(stimulus * 32767.0), -32768, 32767).astype(np.int16)
    return play_and_record(settings, play, tail_seconds)


def play_and_record(settings: Settings, play: npt.NDArray[np.int16],
                    tail_seconds: float) -> tuple[Signal, Signal, str, float]:
    """Play ``play`` (16 kHz int16) and record ``tail_seconds`` beyond it: (mic, reference, layout, capture rate).

    ``kiosk.audio.io.AudioIO`` opens the devices as the running kiosk does (one duplex stream for one
    device, else two) and pairs each 10 ms microphone frame with the reference rendered at the same time,
    so the delay and the ERLE measured here are the ones the echo canceller meets live. Used by the
    loopback measurement and by ``kiosk selftest voice``.
    """
    import time

    from kiosk.audio.io import AudioIO

    frame = MEASURE_RATE_HZ // 100
    frames = (len(play) + int(tail_seconds * MEASURE_RATE_HZ)) // frame
    mic = np.zeros(frames * frame, dtype=np.int16)
    ref = np.zeros(frames * frame, dtype=np.int16)
    io = AudioIO(settings.audio)
    try:
        layout = io.open()
    except DeviceError as error:
        raise OSError(error.message) from None
    started = time.monotonic()
    try:
        queued = got = 0
        # Wall-clock deadline for a stalled device (this command is not the kiosk's loop).
        deadline = started + 2 * frames * frame / MEASURE_RATE_HZ + 5.0
        while got < frames:
            if queued < len(play):
                queued += io.queue_playout(play[queued:])
            io.pump()
            while got < frames and (pair := io.pull()) is not None:
                mic[got * frame:(got + 1) * frame] = pair[0]
                ref[got * frame:(got + 1) * frame] = pair[1]
                got += 1
            if not io.active:
                raise OSError("the audio stream stopped during the measurement (device unplugged?)")
            if time.monotonic() > deadline:
                raise OSError(f"the capture device delivered {got} of {frames} frames in time")
            time.sleep(0.005)
        elapsed = time.monotonic() - started
    finally:
        io.close()
    scale = np.float32(1.0 / 32768.0)
    capture_rate = min(1.0, frames * frame / MEASURE_RATE_HZ / max(elapsed, 1e-3))
    return (mic.astype(np.float32) * scale, ref.astype(np.float32) * scale,
            "duplex" if layout.duplex else "two streams", round(capture_rate, 2))


def _devices_check(settings: Settings) -> tuple[list[Check], bool]:
    """The configured devices are present and open (capture and playback, and the headset if configured)."""
    try:
        import pyaudio
    except ImportError:
        return [Check("audio", "devices", Verdict.FAIL, "PyAudio is not installed", "reinstall the kiosk")], False
    checks: list[Check] = []
    a = settings.audio
    wanted = [("capture", a.capture_device, True), ("playback", a.playback_device, False)]
    if a.headset_capture_device:
        wanted.append(("headset capture", a.headset_capture_device, True))
    if a.headset_playback_device:
        wanted.append(("headset playback", a.headset_playback_device, False))
    all_ok = True
    from kiosk.audio.devices import silence_alsa_errors

    silence_alsa_errors()
    pa = pyaudio.PyAudio()
    try:
        for role, name, is_input in wanted:
            headset = role.startswith("headset")
            try:
                index, info = _find_device(pa, name, is_input)
            except DeviceError as error:
                all_ok = all_ok and headset
                checks.append(Check("audio", f"{role} device", Verdict.WARN if headset else Verdict.FAIL,
                                    error.message + (" (the headset is not plugged in?)" if headset else ""),
                                    "see `kiosk devices` for the names; check hw/99-kiosk-audio.rules matched "
                                    "the device (`cat /proc/asound/cards`)"))
                continue
            try:
                stream = pa.open(rate=int(info["defaultSampleRate"]), channels=1, format=pyaudio.paInt16,
                                 input=is_input, output=not is_input, input_device_index=index if is_input else None,
                                 output_device_index=None if is_input else index, start=False)
                stream.close()
                checks.append(Check("audio", f"{role} device", Verdict.OK, f"'{info['name']}' opens",
                                    figures={"name": str(info["name"]), "index": index,
                                             "default_rate_hz": int(info["defaultSampleRate"])}))
            except (OSError, ValueError) as error:
                all_ok = all_ok and headset
                checks.append(Check("audio", f"{role} device", Verdict.FAIL,
                                    f"'{info['name']}' is present but does not open: {error}",
                                    "another process may hold it (stop kiosk.service first), or the ALSA config "
                                    "names a missing card (hw/asound.conf)"))
    finally:
        pa.terminate()
    return checks, all_ok


def check_audio(settings: Settings, sound: bool = True,
                aec_factory: EchoCancellerFactory = _default_aec_factory) -> tuple[list[Check], Recommendation]:
    """Devices present and opening, then (with ``sound``) the loopback measurement and a recommendation."""
    checks, ok = _devices_check(settings)
    if not sound:
        checks.append(Check("audio", "loopback", Verdict.SKIP, "not measured (--no-sound)"))
        return checks, recommend(None, settings.aec.max_delay_ms)
    if not ok:
        checks.append(Check("audio", "loopback", Verdict.SKIP, "not measured: the devices do not open"))
        return checks, recommend(None, settings.aec.max_delay_ms)
    try:
        mic, ref, layout, capture_rate = record_loopback(
            settings, tail_seconds=max(settings.aec.max_delay_ms, 1000.0) / 1000 + 0.3)
    except (OSError, ValueError) as error:  # PyAudio raises both for devices that refuse the format
        checks.append(Check("audio", "loopback", Verdict.FAIL, f"the measurement did not run: {error}",
                            "check the devices with `kiosk devices`; stop kiosk.service while measuring"))
        return checks, recommend(None, settings.aec.max_delay_ms)
    figures = analyse_loopback(mic, ref, max(settings.aec.max_delay_ms, 1000.0))
    figures.streams = layout
    figures.capture_rate = capture_rate
    if figures.heard:
        measure_erle(mic, ref, settings, figures, aec_factory)
    checks.extend(loopback_checks(figures, settings.aec.max_delay_ms))
    return checks, recommend(figures, settings.aec.max_delay_ms)


def loopback_checks(figures: LoopbackFigures, max_delay_ms: float) -> list[Check]:
    """Turn the loopback figures into report lines."""
    data: Figures = dict(asdict(figures))
    checks: list[Check] = []
    if not figures.heard:
        checks.append(Check("audio", "echo path", Verdict.WARN,
                            f"the microphone did not hear the sweep (detection {figures.detection_ratio}, needs "
                            f"{MIN_DETECTION_RATIO:g}); noise floor {figures.noise_floor_dbfs} dBFS",
                            "turn the speaker on and up, check it faces the room; with a headset this is expected",
                            data))
        return checks
    late = figures.delay_ms is not None and figures.delay_ms > max_delay_ms
    checks.append(Check("audio", "echo path", Verdict.WARN if late or figures.clipped else Verdict.OK,
                        f"delay {figures.delay_ms} ms"
                        + (" (two streams: includes their start skew)" if figures.streams == "two streams" else "")
                        + f", echo {figures.echo_dbfs} dBFS (return loss "
                        f"{figures.echo_return_loss_db} dB), noise floor {figures.noise_floor_dbfs} dBFS"
                        + (", CLIPPED" if figures.clipped else ""),
                        ("lower the speaker volume or the microphone gain" if figures.clipped else
                         f"raise aec.max_delay_ms above {figures.delay_ms} or set aec.delay_ms") if late
                        or figures.clipped else None, data))
    if figures.capture_rate < MIN_CAPTURE_RATE:
        checks.append(Check("audio", "capture rate", Verdict.WARN,
                            f"the capture delivered {figures.capture_rate:.0%} of real time: the device or its "
                            "driver drops blocks", "check the USB cabling and power; see `kiosk devices`",
                            {"capture_rate": figures.capture_rate}))
    if figures.erle_db is None:
        checks.append(Check("audio", "echo canceller", Verdict.SKIP, figures.aec_note or "ERLE not measured"))
    else:
        weak = figures.erle_db < HANDS_FREE_ERLE_DB
        checks.append(Check("audio", "echo canceller", Verdict.WARN if weak else Verdict.OK,
                            f"{figures.aec_backend}: ERLE {figures.erle_db} dB on this recording"
                            + (f" (its own delay estimate {figures.aec_delay_ms:.0f} ms)"
                               if figures.aec_delay_ms is not None else ""),
                            "hands-free needs a stronger canceller: try aec.backend = \"speex\"/\"webrtc\", "
                            "move the microphone away from the speaker, lower the volume" if weak else None,
                            {"erle_db": figures.erle_db, "aec_backend": figures.aec_backend}))
    return checks

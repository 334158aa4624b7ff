"""``kiosk doctor``: on-site checks with a readable report (or JSON) and an exit status.

Areas: ``audio`` (devices present and opening; a loopback measurement: a sweep and a noise burst played
and recorded through the kiosk's own audio I/O, giving the delay of the echo behind the reference, the
echo level, the noise floor, the capture rate, the ERLE the configured echo canceller reaches on that
recording, and a recommended interaction mode),
``gpio`` (buttons and LEDs, ``kiosk.panel.doctor``), ``network`` (session API reachable, catalog status,
a session and a LiveKit connect test), ``disk`` (the spool's free space, persistence and writability)
and ``watchdog`` (the unit's and the hardware watchdog). Parts owned by other modules are imported
lazily; when one is missing the check says "not available" instead of failing the whole report.

Exit status: 0 when no check failed (warnings and skipped checks allowed; with ``--strict`` warnings
count as failures), 1 when a check failed, 2 for a broken configuration (as every command).

The recommended mode follows from the loopback figures (thresholds below, documented in
docs/appliance.md):

- ``headset_only``: the noise floor at the microphone is at or above ``LOUD_FLOOR_DBFS``; a far-field
  array cannot pick a visitor out of that.
- ``hands_free``: the sweep was heard, its delay lies within the echo canceller's search range, nothing
  clipped, the capture kept up with real time (``MIN_CAPTURE_RATE``), and the ERLE reached
  ``HANDS_FREE_ERLE_DB``; a verified echo path, so barge-in by voice is safe.
- ``push_to_talk``: anything else (a weak or unmeasured canceller, an echo path that could not be
  verified); a press clears the playback, so the agent's voice never reaches the microphone stream.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import SecretStr

from kiosk.errors import DeviceError
from kiosk.settings import Settings

_LOGGER = logging.getLogger(__name__)

AREAS = ("audio", "gpio", "network", "disk", "watchdog")

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

# ---- the spool
PERSISTENT_HINT = "the A/B image binds /var/lib/kiosk from /persistent (image/README.md)"
# Where provisioning puts the device credential (kiosk.service hands it over with LoadCredential=).
CREDENTIAL_FILE = Path("/etc/kiosk/credentials/device-credential")
# The Pi's hardware watchdog tops out near 15 s; longer values fail to arm it.
MAX_HW_WATCHDOG_SECONDS = 15.0


class Status(StrEnum):
    """Outcome of one check."""

    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"  # not applicable here, or the part that does it is not available


@dataclass
class Check:
    """One line of the report: what was checked, the outcome, the figures, and the fix if any."""

    area: str
    name: str
    status: Status
    summary: str
    fix: str | None = None
    figures: dict[str, float | int | str | bool | None] = field(default_factory=dict)


@dataclass
class Recommendation:
    """The interaction mode the loopback measurement supports, and why."""

    mode: str  # hands_free | push_to_talk | headset_only
    why: str
    settings: dict[str, str | bool] = field(default_factory=dict)


@dataclass
class Report:
    """Everything ``kiosk doctor`` found."""

    checks: list[Check] = field(default_factory=list)
    recommendation: Recommendation | None = None

    def exit_status(self, strict: bool = False) -> int:
        """0 when nothing failed (with ``strict``, nothing warned either), else 1."""
        bad = {Status.FAIL, Status.WARN} if strict else {Status.FAIL}
        return 1 if any(c.status in bad for c in self.checks) else 0

    def to_json(self, strict: bool = False) -> dict[str, Any]:
        """Plain data for ``--json``."""
        return {
            "exit_status": self.exit_status(strict),
            "counts": {s.value: sum(c.status is s for c in self.checks) for s in Status},
            "checks": [asdict(c) for c in self.checks],
            "recommendation": asdict(self.recommendation) if self.recommendation else None,
        }

    def to_text(self) -> str:
        """The readable report."""
        counts = {s: sum(c.status is s for c in self.checks) for s in Status}
        lines = [f"kiosk doctor: {len(self.checks)} checks, {counts[Status.OK]} ok, {counts[Status.WARN]} "
                 f"warning(s), {counts[Status.FAIL]} failed, {counts[Status.SKIP]} skipped", ""]
        marks = {Status.OK: " ok ", Status.WARN: "warn", Status.FAIL: "FAIL", Status.SKIP: "skip"}
        for c in self.checks:
            lines.append(f"[{marks[c.status]}] {c.area:<8} {c.name}: {c.summary}")
            if c.fix and c.status in (Status.WARN, Status.FAIL):
                lines.append(f"       fix: {c.fix}")
        if self.recommendation:
            r = self.recommendation
            lines += ["", f"recommended mode: {r.mode}: {r.why}"]
            lines += [f"  {key} = {json.dumps(value)}" for key, value in r.settings.items()]
        return "\n".join(lines) + "\n"


# ============================================================================================ disk
def _mount_of(path: Path, mounts_file: Path) -> tuple[str, str, list[str]]:
    """(mount point, fs type, options) of the mount holding ``path`` (longest matching mount point)."""
    best: tuple[str, str, list[str]] = ("/", "unknown", [])
    resolved = str(path)
    try:
        text = mounts_file.read_text()
    except OSError:
        return best
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        point = parts[1].replace("\\040", " ")
        if (resolved == point or resolved.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[0]):
            best = (point, parts[2], parts[3].split(","))
    return best


def check_disk(settings: Settings, mounts_file: Path = Path("/proc/mounts")) -> list[Check]:
    """The spool directory: free space against ``spool.min_free_mb``, persistence, writability."""
    spool = settings.spool.directory
    checks: list[Check] = []
    existing = spool
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    usage = shutil.disk_usage(existing)
    free_mb = usage.free / 1e6
    keep = settings.spool.min_free_mb
    figures: dict[str, float | int | str | bool | None] = {
        "path": str(spool), "free_mb": round(free_mb, 1), "total_mb": round(usage.total / 1e6, 1),
        "min_free_mb": keep}
    if free_mb < keep:
        checks.append(Check("disk", "spool space", Status.FAIL,
                            f"{free_mb:.0f} MB free on {existing}, below spool.min_free_mb = {keep} MB",
                            "free space (old logs, old messages: `kiosk messages export` then delete) "
                            "or lower spool.min_free_mb", figures))
    elif free_mb < 2 * keep:
        checks.append(Check("disk", "spool space", Status.WARN,
                            f"{free_mb:.0f} MB free on {existing}: less than twice spool.min_free_mb = {keep} MB",
                            "free space before the spool starts dropping the oldest messages", figures))
    else:
        checks.append(Check("disk", "spool space", Status.OK,
                            f"{free_mb:.0f} MB free on {existing} (keeps {keep} MB)", None, figures))

    point, fstype, options = _mount_of(existing.resolve(), mounts_file)
    mount_figures: dict[str, float | int | str | bool | None] = {"mount_point": point, "fs_type": fstype}
    if fstype in ("tmpfs", "ramfs", "overlay"):
        checks.append(Check("disk", "spool persistence", Status.FAIL if fstype != "overlay" else Status.WARN,
                            f"{existing} is on {fstype} ({point}): stored messages would not survive a reboot",
                            f"put spool.directory on persistent storage; {PERSISTENT_HINT}", mount_figures))
    elif "ro" in options:
        checks.append(Check("disk", "spool persistence", Status.FAIL,
                            f"{point} is mounted read-only: messages cannot be stored",
                            f"give the spool a writable, persistent mount; {PERSISTENT_HINT}", mount_figures))
    else:
        checks.append(Check("disk", "spool persistence", Status.OK, f"on {fstype} at {point}", None, mount_figures))

    if spool.exists():
        try:
            with tempfile.NamedTemporaryFile(dir=spool, prefix=".doctor-") as probe:
                probe.write(b"x")
                probe.flush()
                os.fsync(probe.fileno())
            checks.append(Check("disk", "spool writable", Status.OK, f"wrote and synced a file in {spool}"))
        except OSError as error:
            checks.append(Check("disk", "spool writable", Status.FAIL, f"cannot write in {spool}: {error.strerror}",
                                "run as the kiosk user or root; systemd's StateDirectory=kiosk sets the owner"))
    else:
        checks.append(Check("disk", "spool writable", Status.WARN, f"{spool} does not exist yet",
                            "start kiosk.service once (StateDirectory= creates it) or create it for the "
                            "kiosk user"))
    return checks


# ======================================================================================== watchdog
Runner = Callable[[Sequence[str]], str | None]


def _systemctl(args: Sequence[str]) -> str | None:
    """``systemctl ...`` output, or None when systemd is not running here."""
    if not Path("/run/systemd/system").is_dir() or shutil.which("systemctl") is None:
        return None
    try:
        result = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _usec(value: str | None) -> float | None:
    """A systemd time value (``WatchdogUSec``: microseconds, or "infinity") in seconds."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text in ("infinity", "0"):
        return 0.0 if text == "0" else float("inf")
    if text.isdigit():
        return int(text) / 1e6
    # systemctl show may print "10s", "1min 30s", "100ms".
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}
    total = 0.0
    for part in text.split():
        number = part.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = part[len(number):]
        if not number or unit not in units:
            return None
        total += float(number) * units[unit]
    return total


def check_watchdog(
    environ: dict[str, str] | None = None,
    run: Runner = _systemctl,
    sys_root: Path = Path("/"),
) -> list[Check]:
    """The unit watchdog (``WatchdogSec=``) and the hardware watchdog (``RuntimeWatchdogSec=``, the device)."""
    env = dict(os.environ) if environ is None else environ
    checks: list[Check] = []

    # The unit's watchdog: from our own environment when running inside the service, else systemctl.
    unit_seconds: float | None = None
    if env.get("WATCHDOG_USEC", "").isdigit():
        unit_seconds = int(env["WATCHDOG_USEC"]) / 1e6
    else:
        unit_seconds = _usec(run(["show", "kiosk.service", "--property=WatchdogUSec", "--value"]))
    if unit_seconds is None:
        checks.append(Check("watchdog", "service watchdog", Status.SKIP,
                            "systemd is not running here: cannot read kiosk.service's WatchdogSec="))
    elif unit_seconds == 0 or unit_seconds == float("inf"):
        checks.append(Check("watchdog", "service watchdog", Status.WARN, "kiosk.service has no WatchdogSec=",
                            "install systemd/kiosk.service (WatchdogSec=10s) and `systemctl daemon-reload`"))
    else:
        checks.append(Check("watchdog", "service watchdog", Status.OK,
                            f"WatchdogSec={unit_seconds:g}s; pings only while capture and controller are alive",
                            None, {"watchdog_seconds": unit_seconds}))

    # The hardware watchdog systemd feeds: configured value, and what the kernel device says.
    runtime = _usec(run(["show", "--property=RuntimeWatchdogUSec", "--value"]))
    device = sys_root / "sys/class/watchdog/watchdog0"
    state = _read(device / "state")
    timeout = _read(device / "timeout")
    figures: dict[str, float | int | str | bool | None] = {
        "runtime_watchdog_seconds": runtime, "device_state": state,
        "device_timeout_seconds": int(timeout) if timeout and timeout.isdigit() else None}
    if not device.exists():
        checks.append(Check("watchdog", "hardware watchdog", Status.SKIP if runtime is None else Status.WARN,
                            "no watchdog device (/sys/class/watchdog/watchdog0)",
                            "on a Pi: dtparam=watchdog=on (hw/config.txt.snippet)", figures))
    elif runtime is not None and (runtime == 0 or runtime == float("inf")):
        checks.append(Check("watchdog", "hardware watchdog", Status.WARN,
                            "systemd does not feed the hardware watchdog (RuntimeWatchdogSec= unset)",
                            "install systemd/system-watchdog.conf as /etc/systemd/system.conf.d/kiosk-watchdog.conf",
                            figures))
    elif runtime is not None and runtime > MAX_HW_WATCHDOG_SECONDS:
        checks.append(Check("watchdog", "hardware watchdog", Status.FAIL,
                            f"RuntimeWatchdogSec={runtime:g}s: the Pi's watchdog tops out near 15 s, so it is "
                            "not armed",
                            "set RuntimeWatchdogSec=15s or less", figures))
    elif state != "active":
        checks.append(Check("watchdog", "hardware watchdog", Status.WARN,
                            f"watchdog device is {state or 'in an unknown state'}, not active",
                            "with an initramfs add watchdog_disarm=0 to cmdline.txt; check RuntimeWatchdogSec=",
                            figures))
    else:
        checks.append(Check("watchdog", "hardware watchdog", Status.OK,
                            f"active, timeout {timeout} s" + (f", fed every {runtime / 2:g} s" if runtime else ""),
                            None, figures))
    return checks


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


# =========================================================================================== audio
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


EchoCancellerFactory = Callable[[Settings], Any]


def _default_aec_factory(settings: Settings) -> Any:
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
    figures.aec_backend = str(getattr(aec, "name", settings.aec.backend.value))
    stats = getattr(aec, "stats", None)
    if callable(stats):
        figures.aec_delay_ms = getattr(stats(), "delay_ms", None)


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

    ``kiosk.audio.io.AudioIO`` opens the devices as the running kiosk does (one duplex stream for one
    device, else two) and pairs each 10 ms microphone frame with the reference rendered at the same time,
    so the delay and the ERLE measured here are the ones the echo canceller meets live.
    """
    import time

    from kiosk.audio.io import AudioIO

    stimulus = make_stimulus(MEASURE_RATE_HZ)[0]
    play = np.clip(np.rint(stimulus * 32767.0), -32768, 32767).astype(np.int16)
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
        return [Check("audio", "devices", Status.FAIL, "PyAudio is not installed", "reinstall the kiosk")], False
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
                checks.append(Check("audio", f"{role} device", Status.WARN if headset else Status.FAIL,
                                    error.message + (" (the headset is not plugged in?)" if headset else ""),
                                    "see `kiosk devices` for the names; check hw/99-kiosk-audio.rules matched "
                                    "the device (`cat /proc/asound/cards`)"))
                continue
            try:
                stream = pa.open(rate=int(info["defaultSampleRate"]), channels=1, format=pyaudio.paInt16,
                                 input=is_input, output=not is_input, input_device_index=index if is_input else None,
                                 output_device_index=None if is_input else index, start=False)
                stream.close()
                checks.append(Check("audio", f"{role} device", Status.OK, f"'{info['name']}' opens",
                                    figures={"name": str(info["name"]), "index": index,
                                             "default_rate_hz": int(info["defaultSampleRate"])}))
            except (OSError, ValueError) as error:
                all_ok = all_ok and headset
                checks.append(Check("audio", f"{role} device", Status.FAIL,
                                    f"'{info['name']}' is present but does not open: {error}",
                                    "another process may hold it (stop kiosk.service first), or the ALSA config "
                                    "names a missing card (hw/asound.conf)"))
    finally:
        pa.terminate()
    return checks, all_ok


def check_audio(settings: Settings, sound: bool = True,
                aec_factory: EchoCancellerFactory = _default_aec_factory) -> tuple[list[Check], Recommendation]:
    """Devices present and opening, then (with ``sound``) the loopback measurement and a recommendation."""
    missing = [m for m in ("kiosk.audio.devices", "kiosk.audio.io") if importlib.util.find_spec(m) is None]
    if missing:
        return ([Check("audio", "devices", Status.SKIP, f"not available: {', '.join(missing)} is not installed")],
                recommend(None, settings.aec.max_delay_ms))
    checks, ok = _devices_check(settings)
    if not sound:
        checks.append(Check("audio", "loopback", Status.SKIP, "not measured (--no-sound)"))
        return checks, recommend(None, settings.aec.max_delay_ms)
    if not ok:
        checks.append(Check("audio", "loopback", Status.SKIP, "not measured: the devices do not open"))
        return checks, recommend(None, settings.aec.max_delay_ms)
    try:
        mic, ref, layout, capture_rate = record_loopback(
            settings, tail_seconds=max(settings.aec.max_delay_ms, 1000.0) / 1000 + 0.3)
    except (OSError, ValueError) as error:  # PyAudio raises both for devices that refuse the format
        checks.append(Check("audio", "loopback", Status.FAIL, f"the measurement did not run: {error}",
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
    data: dict[str, float | int | str | bool | None] = dict(asdict(figures))
    checks: list[Check] = []
    if not figures.heard:
        checks.append(Check("audio", "echo path", Status.WARN,
                            f"the microphone did not hear the sweep (detection {figures.detection_ratio}, needs "
                            f"{MIN_DETECTION_RATIO:g}); noise floor {figures.noise_floor_dbfs} dBFS",
                            "turn the speaker on and up, check it faces the room; with a headset this is expected",
                            data))
        return checks
    late = figures.delay_ms is not None and figures.delay_ms > max_delay_ms
    checks.append(Check("audio", "echo path", Status.WARN if late or figures.clipped else Status.OK,
                        f"delay {figures.delay_ms} ms"
                        + (" (two streams: includes their start skew)" if figures.streams == "two streams" else "")
                        + f", echo {figures.echo_dbfs} dBFS (return loss "
                        f"{figures.echo_return_loss_db} dB), noise floor {figures.noise_floor_dbfs} dBFS"
                        + (", CLIPPED" if figures.clipped else ""),
                        ("lower the speaker volume or the microphone gain" if figures.clipped else
                         f"raise aec.max_delay_ms above {figures.delay_ms} or set aec.delay_ms") if late
                        or figures.clipped else None, data))
    if figures.capture_rate < MIN_CAPTURE_RATE:
        checks.append(Check("audio", "capture rate", Status.WARN,
                            f"the capture delivered {figures.capture_rate:.0%} of real time: the device or its "
                            "driver drops blocks", "check the USB cabling and power; see `kiosk devices`",
                            {"capture_rate": figures.capture_rate}))
    if figures.erle_db is None:
        checks.append(Check("audio", "echo canceller", Status.SKIP, figures.aec_note or "ERLE not measured"))
    else:
        weak = figures.erle_db < HANDS_FREE_ERLE_DB
        checks.append(Check("audio", "echo canceller", Status.WARN if weak else Status.OK,
                            f"{figures.aec_backend}: ERLE {figures.erle_db} dB on this recording"
                            + (f" (its own delay estimate {figures.aec_delay_ms:.0f} ms)"
                               if figures.aec_delay_ms is not None else ""),
                            "hands-free needs a stronger canceller: try aec.backend = \"speex\"/\"webrtc\", "
                            "move the microphone away from the speaker, lower the volume" if weak else None,
                            {"erle_db": figures.erle_db, "aec_backend": figures.aec_backend}))
    return checks


# ============================================================================================ gpio
def check_gpio_area(settings: Settings) -> list[Check]:
    """Buttons and LEDs through ``kiosk.panel.doctor.check_gpio`` (interactive on a Pi)."""
    if not settings.panel.enabled:
        return [Check("gpio", "panel", Status.SKIP, "panel.enabled = false")]
    try:
        panel_doctor = importlib.import_module("kiosk.panel.doctor")
    except ImportError as error:
        return [Check("gpio", "panel", Status.SKIP, f"not available: the GPIO check ({error.name}) is not installed")]
    def ask(prompt: str) -> str:
        sys.stderr.write(prompt)
        sys.stderr.flush()
        return sys.stdin.readline().strip()

    def say(message: str) -> None:
        print(message, file=sys.stderr)

    try:
        # Interactive on a terminal (blink each LED, wait for each button); prompts go to stderr so the
        # report on stdout (and --json) stays clean.
        results = panel_doctor.check_gpio(settings.panel, ask=ask, say=say)
    except Exception as error:  # a broken pin factory or a missing gpiochip must read as a failed check
        return [Check("gpio", "panel", Status.FAIL, f"the GPIO check failed: {error}",
                      "check panel.pin_factory and that the kiosk user is in the gpio group")]
    return [_gpio_result(r) for r in (results if isinstance(results, list | tuple) else [results])]


def _gpio_result(result: Any) -> Check:
    """Adapt one result of the panel's check (an object with ok/name/detail-like fields) to a report line."""
    ok = bool(getattr(result, "ok", getattr(result, "passed", False)))
    name = str(getattr(result, "name", getattr(result, "part", "panel")))
    detail = str(getattr(result, "detail", getattr(result, "message", getattr(result, "summary", ""))))
    fix = None
    if not ok:
        fix = ("set panel.pin_factory (lgpio on a Pi, with python3-lgpio installed; mock without a Pi)"
               if "factory" in name else "check the wiring against hw/README.md")
    return Check("gpio", name, Status.OK if ok else Status.FAIL, detail or ("works" if ok else "did not respond"), fix)


# ========================================================================================= network
async def _network(settings: Settings, open_session: bool) -> list[Check]:
    try:
        from kiosk.link.session_api import SessionApi, SessionRefused
    except ImportError as error:
        return [Check("network", "session API", Status.SKIP, f"not available ({error.name} is not installed)")]
    s = settings.session
    checks: list[Check] = []
    credential = s.credential.get_secret_value() if s.credential is not None else ""
    if not credential:
        checks.append(Check("network", "device credential", Status.FAIL, "no device credential is provisioned",
                            "put device-credential in kiosk-provision/ on the boot partition and reboot, or "
                            f"write {CREDENTIAL_FILE} as root (mode 0600); run kiosk doctor as root to read it"))
    else:
        checks.append(Check("network", "device credential", Status.OK, "present (not shown)"))
    client = SessionApi(s)
    try:
        if s.source.value == "voice_api":
            for profile in s.profiles:
                try:
                    status = await client.model_status(profile.llm_model)
                except SessionRefused as error:
                    unreachable = error.reason.value in ("unreachable", "timeout")
                    checks.append(Check("network", "session API" if unreachable else f"catalog {profile.llm_model}",
                                        Status.FAIL, error.message,
                                        "check the network, DNS and session.api_url" if unreachable else None))
                    if unreachable:
                        return checks
                    continue
                checks.append(Check("network", f"catalog {profile.llm_model}",
                                    Status.OK if status == "available" else Status.WARN,
                                    f"reachable at {s.api_url}; status {status}",
                                    None if status == "available" else "the kiosk uses the next profile or goes "
                                    "offline until the model is available", {"status": status}))
        if not open_session:
            checks.append(Check("network", "LiveKit connect", Status.SKIP, "not tried (--no-session)"))
            return checks
        try:
            grant = await client.open_session()
        except SessionRefused as error:
            checks.append(Check("network", "session", Status.FAIL, error.message))
            return checks
        checks.append(Check("network", "session", Status.OK, f"session {grant.session_id} granted"))
        checks.append(await _livekit_connect(grant.livekit_url, grant.token.get_secret_value(),
                                             s.request_timeout_seconds * 2))
    finally:
        await client.aclose()
    return checks


async def _livekit_connect(url: str, token: str, timeout_seconds: float) -> Check:
    try:
        from livekit import rtc
    except ImportError as error:
        return Check("network", "LiveKit connect", Status.SKIP, f"not available ({error.name})")
    room = rtc.Room()
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        await asyncio.wait_for(room.connect(url, token, rtc.RoomOptions(auto_subscribe=False)), timeout_seconds)
    except (TimeoutError, rtc.ConnectError) as error:
        return Check("network", "LiveKit connect", Status.FAIL, f"could not join the room at {url}: "
                     f"{error or 'timed out'}", "check that UDP and TCP to the LiveKit server pass the site firewall")
    finally:
        connect_ms = round(1000.0 * (loop.time() - started))
    await room.disconnect()
    return Check("network", "LiveKit connect", Status.OK, f"joined and left the room in {connect_ms} ms",
                 figures={"connect_ms": connect_ms})


def check_network(settings: Settings, open_session: bool = True,
                  credential_file: Path = CREDENTIAL_FILE) -> list[Check]:
    """Session API reachable, catalog status per profile, then a session and a LiveKit connect test."""
    credential = settings.session.credential
    if credential is None or not credential.get_secret_value():
        # Run by hand there is no $CREDENTIALS_DIRECTORY (only the service gets one): read the provisioned file.
        try:
            value = credential_file.read_text().strip()
        except OSError:
            value = ""
        if value:
            settings = settings.model_copy(
                update={"session": settings.session.model_copy(update={"credential": SecretStr(value)})})
    return asyncio.run(_network(settings, open_session))


# ============================================================================================= run
def run_doctor(settings: Settings, areas: Sequence[str], *, sound: bool = True, open_session: bool = True) -> Report:
    """Run the checks for ``areas`` (in the order of ``AREAS``) and build the report."""
    report = Report()
    for area in AREAS:
        if area not in areas:
            continue
        if area == "audio":
            checks, report.recommendation = check_audio(settings, sound)
        elif area == "gpio":
            checks = check_gpio_area(settings)
        elif area == "network":
            checks = check_network(settings, open_session)
        elif area == "disk":
            checks = check_disk(settings)
        else:
            checks = check_watchdog()
        report.checks.extend(checks)
    return report


def _cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    areas = AREAS if not args.areas or "all" in args.areas else tuple(args.areas)
    report = run_doctor(settings, areas, sound=not args.no_sound, open_session=not args.no_session)
    if args.json:
        print(json.dumps(report.to_json(args.strict), indent=2))
    else:
        sys.stdout.write(report.to_text())
    return report.exit_status(args.strict)


def _area(value: str) -> str:
    if value not in ("all", *AREAS):
        raise argparse.ArgumentTypeError(f"'{value}' is not an area; use all, {', '.join(AREAS)}")
    return value


def register(subparsers: Any) -> None:
    """Add ``kiosk doctor``."""
    parser = subparsers.add_parser(
        "doctor", help="on-site checks: audio (with a loopback measurement), gpio, network, disk, watchdog",
        description="On-site checks. The audio check plays a short sweep and a noise burst on the speaker. "
                    "Exit status 0: nothing failed; 1: a check failed.")
    parser.add_argument("areas", nargs="*", type=_area, metavar="AREA",
                        help="all (default), audio, gpio, network, disk, watchdog")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-sound", action="store_true", help="skip the loopback measurement (no sound played)")
    parser.add_argument("--no-session", action="store_true",
                        help="skip opening a session and the LiveKit connect test")
    parser.add_argument("--strict", action="store_true", help="warnings count as failures in the exit status")
    parser.set_defaults(handler=_cmd_doctor)

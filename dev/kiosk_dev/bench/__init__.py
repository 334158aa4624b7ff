"""Benchmarks (`kiosk bench ...`): each module returns ``BenchSection``s; the report prints and writes them.

Benchmarks report figures and check them against targets; they never fail a test run on a timing.
"""

from __future__ import annotations

# ``dataclasses.field`` by its module: ``kiosk_dev.bench.field`` is the field benchmark.
import dataclasses
from dataclasses import dataclass


@dataclass
class TargetCheck:
    """One target from the issue: the figure, the bound and whether it is met."""

    name: str
    value: float
    target: str  # e.g. ">= 45 dB"
    met: bool


@dataclass
class BenchSection:
    """A titled table of figures plus the target checks and free-text notes that belong to it."""

    title: str
    columns: list[str]
    rows: list[list[str | float | int | None]] = dataclasses.field(default_factory=list)
    targets: list[TargetCheck] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_markdown(self) -> str:
        """Render as a markdown section (table, targets, notes)."""
        def cell(value: str | float | int | None) -> str:
            if value is None:
                return "-"
            if isinstance(value, float):
                return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
            return str(value)

        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in self.rows]
        if self.targets:
            lines += ["", "| target | measured | bound | met |", "|---|---|---|---|"]
            lines += [f"| {t.name} | {cell(t.value)} | {t.target} | {'yes' if t.met else '**NO**'} |"
                      for t in self.targets]
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class AudioPreset:
    """How much of the offline audio benchmark runs (``None``: all there is of that part).

    ``FULL`` is ``kiosk bench audio``, ``QUICK`` its ``--quick``. ``TARGET`` is the comparison of the x86 host
    with the emulated arm64 target (``python -m kiosk_dev.bench.compare``): every code path the quick run takes
    through the product (the configured chain, AEC3 through livekit.rtc's APM, speexdsp, webrtcvad, the
    segmenter and gate) on fewer and shorter scenarios, and no CPU section (CPU figures under emulation are not
    evidence), so that it finishes in about 15-20 minutes at emulation's ~80x.
    """

    name: str
    aec_seconds: float
    aec_seeds: tuple[int, ...]
    aec_configurations: tuple[str, ...] | None  # labels of kiosk_dev.bench.aec.configurations()
    aec_unaligned: bool  # the 'unaligned' rows (raw reference to the backend)
    vad_utterances: int | None  # of the speech corpus
    vad_noises: tuple[str, ...] | None
    vad_snrs_db: tuple[float, ...] | None
    vad_alternatives: bool  # the other detector modes, frame lengths and level floors
    distant_seconds: float
    barge_in_seeds: tuple[int, ...]
    barge_in_rooms: tuple[str, ...] | None  # labels of kiosk_dev.bench.vad.BARGE_IN_ROOMS
    barge_in_alone_seconds: float
    cpu_frames: int  # 0: no CPU section


FULL = AudioPreset(
    name="full", aec_seconds=20.0, aec_seeds=(0, 1, 2), aec_configurations=None, aec_unaligned=True,
    vad_utterances=None, vad_noises=None, vad_snrs_db=None, vad_alternatives=True, distant_seconds=60.0,
    barge_in_seeds=(0, 1, 2, 3), barge_in_rooms=None, barge_in_alone_seconds=180.0, cpu_frames=6000)
QUICK = AudioPreset(
    name="quick", aec_seconds=12.0, aec_seeds=(0,), aec_configurations=None, aec_unaligned=False,
    vad_utterances=8, vad_noises=("white", "pink", "babble"), vad_snrs_db=(10.0,), vad_alternatives=False,
    distant_seconds=20.0, barge_in_seeds=(0, 1), barge_in_rooms=None, barge_in_alone_seconds=60.0, cpu_frames=1500)
TARGET = AudioPreset(
    name="target", aec_seconds=8.0, aec_seeds=(0,),
    aec_configurations=("none", "speex 128 ms + residual + ns", "webrtc aec3 + ns", "hybrid aec3 + ns / speex 128 ms"),
    aec_unaligned=False, vad_utterances=4, vad_noises=("pink", "babble"), vad_snrs_db=(10.0,),
    vad_alternatives=False, distant_seconds=10.0, barge_in_seeds=(0,), barge_in_rooms=("40 ms", "40 ms, 100 ppm"),
    barge_in_alone_seconds=20.0, cpu_frames=0)
PRESETS = {p.name: p for p in (FULL, QUICK, TARGET)}

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

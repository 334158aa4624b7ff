"""On-site checks: the one ``Check`` record every area's doctor returns, and the report ``kiosk doctor`` prints.

Each area checks itself next to its code (``kiosk.audio.doctor``, ``kiosk.panel.doctor``,
``kiosk.link.doctor``, ``kiosk.fallback.doctor``, the watchdog in ``kiosk.health``) and returns
``Check`` lines; ``kiosk.doctor`` runs the areas asked for and prints the ``Report``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

Figures = dict[str, float | int | str | bool | None]


class Verdict(StrEnum):
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
    status: Verdict
    summary: str
    fix: str | None = None
    figures: Figures = field(default_factory=dict)


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
        bad = {Verdict.FAIL, Verdict.WARN} if strict else {Verdict.FAIL}
        return 1 if any(c.status in bad for c in self.checks) else 0

    def to_json(self, strict: bool = False) -> dict[str, Any]:
        """Plain data for ``--json``."""
        return {
            "exit_status": self.exit_status(strict),
            "counts": {s.value: sum(c.status is s for c in self.checks) for s in Verdict},
            "checks": [asdict(c) for c in self.checks],
            "recommendation": asdict(self.recommendation) if self.recommendation else None,
        }

    def to_text(self) -> str:
        """The readable report."""
        counts = {s: sum(c.status is s for c in self.checks) for s in Verdict}
        lines = [f"kiosk doctor: {len(self.checks)} checks, {counts[Verdict.OK]} ok, {counts[Verdict.WARN]} "
                 f"warning(s), {counts[Verdict.FAIL]} failed, {counts[Verdict.SKIP]} skipped", ""]
        marks = {Verdict.OK: " ok ", Verdict.WARN: "warn", Verdict.FAIL: "FAIL", Verdict.SKIP: "skip"}
        for c in self.checks:
            lines.append(f"[{marks[c.status]}] {c.area:<8} {c.name}: {c.summary}")
            if c.fix and c.status in (Verdict.WARN, Verdict.FAIL):
                lines.append(f"       fix: {c.fix}")
        if self.recommendation:
            r = self.recommendation
            lines += ["", f"recommended mode: {r.mode}: {r.why}"]
            lines += [f"  {key} = {json.dumps(value)}" for key, value in r.settings.items()]
        return "\n".join(lines) + "\n"

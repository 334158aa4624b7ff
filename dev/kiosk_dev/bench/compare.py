"""Whether two ``kiosk bench audio --json`` reports give the same quality figures (x86 against the emulated target).

``python -m kiosk_dev.bench.compare report OUT`` runs the quick offline benchmark (``kiosk bench audio --quick
--no-live --json``, without needing kiosk-dev installed: the target check runs it from the checkout) and writes
the report; ``python -m kiosk_dev.bench.compare diff A B`` compares two reports figure by figure and exits 1 when
a quality figure differs by more than the tolerance. CPU and wall-clock figures are left out: they differ by
machine, and under emulation they are not evidence of anything. The tolerance: 1 dB for a figure in dB, else 5%
of the larger value or 0.02, whichever is larger (the two machines' floating point differs in the last bits,
NEON against AVX, and an adaptive filter carries that forward).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Columns and targets about time spent computing, not about the audio: never compared.
TIMING_WORDS = ("cpu", "us per frame", "us/frame", "µs", "wall", "elapsed", "runtime")
DB_TOLERANCE = 1.0
RELATIVE_TOLERANCE = 0.05
ABSOLUTE_TOLERANCE = 0.02


@dataclass(frozen=True)
class Difference:
    """One figure present in both reports whose values differ beyond the tolerance (or in kind)."""

    where: str
    a: object
    b: object


def is_timing(label: str) -> bool:
    """Whether a column or target name is a computing-time figure."""
    lowered = label.lower()
    return any(word in lowered for word in TIMING_WORDS)


def within(label: str, a: float, b: float) -> bool:
    """Whether two values of the figure ``label`` agree within the tolerance."""
    if label.endswith("dB") and "s to " not in label:  # a level in dB, not a time to reach one
        return abs(a - b) <= DB_TOLERANCE
    return abs(a - b) <= max(ABSOLUTE_TOLERANCE, RELATIVE_TOLERANCE * max(abs(a), abs(b)))


def _same(label: str, a: Any, b: Any) -> bool:
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return within(label, float(a), float(b))
    return bool(a == b)


class ReportError(ValueError):
    """The JSON is not a ``kiosk bench audio --json`` report."""


def _sections(report: Any) -> list[dict[str, Any]]:
    sections = report.get("sections") if isinstance(report, dict) else None
    if not isinstance(sections, list) or not all(
            isinstance(s, dict) and isinstance(s.get("title"), str) and isinstance(s.get("columns"), list)
            and isinstance(s.get("rows"), list) and all(isinstance(r, list) for r in s["rows"])
            and isinstance(s.get("targets", []), list)
            and all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in s.get("targets", []))
            for s in sections):
        raise ReportError("not a `kiosk bench audio --json` report (it needs sections with a title, columns, rows "
                          "and targets)")
    return sections


def figures(report: Any) -> dict[str, tuple[str, Any]]:
    """Every quality figure of a report: ``section / row N (labels) / column`` and ``section / target: name``."""
    found: dict[str, tuple[str, Any]] = {}
    for section in _sections(report):
        title, columns = section["title"], [str(c) for c in section["columns"]]
        for number, row in enumerate(section["rows"], start=1):
            # Rows keep their order on every machine; the labels only make the line readable.
            key = f"row {number} ({', '.join(str(c) for c in row if isinstance(c, str))})"
            for column, value in zip(columns, row, strict=False):
                if not is_timing(column) and not isinstance(value, str):
                    found[f"{title} / {key} / {column}"] = (column, value)
        for target in section.get("targets", []):
            if not is_timing(target["name"]):
                found[f"{title} / target: {target['name']}"] = (target["name"], target.get("value"))
    return found


def compare(a: Any, b: Any) -> tuple[list[Difference], int, list[str]]:
    """The differences beyond the tolerance, how many figures were compared, and those only one report has."""
    fa, fb = figures(a), figures(b)
    differences = [Difference(where, fa[where][1], fb[where][1]) for where in fa.keys() & fb.keys()
                   if not _same(fa[where][0], fa[where][1], fb[where][1])]
    only = sorted(fa.keys() ^ fb.keys())
    return sorted(differences, key=lambda d: d.where), len(fa.keys() & fb.keys()), only


def _report(out: Path) -> int:
    from kiosk.settings import Settings
    from kiosk_dev.bench import report
    from kiosk_dev.bench.cli import collect

    sections = collect(Settings(), quick=True, recordings=None, live=False)
    data = report.to_json(sections, command="kiosk bench audio --quick --no-live --json", when=dt.datetime.now(dt.UTC))
    out.write_text(report.dumps(data) + "\n")
    return 0


def _diff(path_a: Path, path_b: Path) -> int:
    try:
        a, b = (json.loads(p.read_text()) for p in (path_a, path_b))
        differences, compared, only = compare(a, b)
    except (OSError, ValueError) as error:
        print(f"compare: cannot read the reports: {error} (give two `kiosk bench audio --json` outputs)",
              file=sys.stderr)
        return 2
    for where in only:
        print(f"only in one report: {where}")
    for d in differences:
        print(f"DIFFERS: {where_text(d)}")
    verdict = "the same within the tolerance" if not differences and compared else "NOT the same"
    print(f"compare: {compared} quality figures compared, {len(differences)} differ: {verdict}")
    return 0 if not differences and compared else 1


def where_text(d: Difference) -> str:
    """A difference as one line."""
    return f"{d.where}: {d.a} against {d.b}"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kiosk_dev.bench.compare report OUT | diff A B``."""
    parser = argparse.ArgumentParser(prog="python -m kiosk_dev.bench.compare",
                                     description=__doc__.splitlines()[0] if __doc__ else "")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("report", help="run the quick offline benchmark and write its JSON").add_argument("out", type=Path)
    diff = sub.add_parser("diff", help="compare two reports' quality figures")
    diff.add_argument("a", type=Path)
    diff.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    if args.command == "report":
        return _report(args.out)
    return _diff(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark report: prints ``BenchSection``s and writes them as markdown (docs/performance.md) or JSON.

The report says where the figures come from: the machine (CPU model, cores, Python version), the date
and the command that produced them, so a reader can tell figures of a Pi from figures of a laptop.
docs/performance.md is shared by several benchmarks: each owns one ``## `` section and ``write_section``
replaces only that one, keeping the others.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kiosk_dev.bench import BenchSection

_LOGGER = logging.getLogger(__name__)


def machine_description() -> dict[str, str]:
    """CPU model, core count, OS and Python version of this machine."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model"):
                model = value.strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": str(os.cpu_count() or 0),
        "machine": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


FILE_TITLE = "# Measured performance"
AUDIO_HEADING = "## Audio"


def render_markdown(sections: Sequence[BenchSection], *, command: str, when: dt.datetime,
                    machine: dict[str, str] | None = None, heading: str = AUDIO_HEADING) -> str:
    """One ``## `` section as markdown: where the figures come from, a target summary, then the tables."""
    machine = machine_description() if machine is None else machine
    lines = [heading, "",
             f"Measured {when.strftime('%Y-%m-%d %H:%M UTC')} with `{command}`.", "",
             f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, {machine.get('os', '?')}, "
             f"Python {machine.get('python', '?')}.", ""]
    targets = [t for s in sections for t in s.targets]
    if targets:
        met = sum(1 for t in targets if t.met)
        lines += [f"Targets met: {met} of {len(targets)}.", ""]
        missed = [t for t in targets if not t.met]
        if missed:
            lines += ["Not met:", ""] + [f"- {t.name}: {_fmt(t.value)} (target {t.target})" for t in missed] + [""]
    body = "\n".join(section.to_markdown() for section in sections)
    return "\n".join(lines) + "\n" + body


def to_json(sections: Sequence[BenchSection], *, command: str, when: dt.datetime,
            machine: dict[str, str] | None = None) -> dict[str, Any]:
    """The report as plain data (``--json``)."""
    return {
        "command": command,
        "date": when.isoformat(),
        "machine": machine_description() if machine is None else machine,
        "sections": [dataclasses.asdict(section) for section in sections],
    }


def write_markdown(path: Path, sections: Sequence[BenchSection], *, command: str, when: dt.datetime,
                   machine: dict[str, str] | None = None, heading: str = AUDIO_HEADING) -> None:
    """Write the report as the ``heading`` section of ``path``, keeping the file's other sections."""
    write_section(path, heading, render_markdown(sections, command=command, when=when, machine=machine,
                                                 heading=heading))
    _LOGGER.info("wrote the %s section of %s", heading, path)


def write_section(path: Path, heading: str, section: str) -> None:
    """Replace the ``heading`` section of ``path`` (up to the next ``## `` heading), or append it."""
    text = path.read_text() if path.exists() else f"{FILE_TITLE}\n\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    section = section if section.endswith("\n") else section + "\n"
    if start is None:
        new = text + ("" if text.endswith("\n\n") else "\n" if text.endswith("\n") else "\n\n") + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + section + ("\n" if end < len(lines) else "") + "".join(lines[end:])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def dumps(data: dict[str, Any]) -> str:
    """JSON text for ``--json``: floats as numbers, NaN/inf as null."""
    return json.dumps(_clean(data), indent=2)


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"

"""Whether two ``kiosk bench audio --json`` reports give the same quality figures (x86 against the emulated target).

``python -m kiosk_dev.bench.compare report [--preset quick|target] [--record-inputs DIR | --replay-inputs DIR] OUT``
runs the offline benchmark (``kiosk bench audio --no-live --json`` at that size, without needing kiosk-dev
installed: the target check runs it from the checkout) and writes the report. ``--preset target`` is the smaller
run the emulated target can finish in about 15-20 minutes (``kiosk_dev.bench.TARGET``); ``--record-inputs`` keeps
every synthetic input made (speech, rooms, scenarios) and ``--replay-inputs`` reads them instead of making them
(``kiosk_dev.inputs``), so both machines process the same samples.

``process-inputs DIR`` writes a fixed microphone/reference pair (``mic.wav``, ``ref.wav``, with ``near.wav``,
``truth.json`` and an empty ``kiosk.toml``) for ``kiosk audio process``; ``process-report DIR OUT.wav VAD.json
REPORT`` turns that command's output into a report of the same form (ERLE, double-talk SDR, speech segments).

``diff A B`` compares two reports figure by figure and exits 1 when a quality figure differs by more than the
tolerance. CPU and wall-clock figures are left out: they differ by machine, and under emulation they are not
evidence of anything. The tolerance: 1 dB for a figure in dB; 0.03 s (three frames) for a moment in the recording
(a column ending "at s"); else 5% of the larger value or 0.02, whichever is larger. The two machines' floating point
differs in the last bits (NEON against SSE/AVX builds of AEC3, speexdsp and numpy), and an adaptive filter carries
that forward.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from kiosk_dev.bench import BenchSection

# Columns and targets about time spent computing, not about the audio: never compared.
TIMING_WORDS = ("cpu", "us per frame", "us/frame", "µs", "wall", "elapsed", "runtime")
DB_TOLERANCE = 1.0
MOMENT_TOLERANCE_SECONDS = 0.03
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
    if label.endswith(" at s"):  # a moment in the recording: frames, not a share
        return abs(a - b) <= MOMENT_TOLERANCE_SECONDS
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


def _report(out: Path, preset_name: str, record: Path | None, replay: Path | None) -> int:
    from kiosk.settings import Settings
    from kiosk_dev import inputs
    from kiosk_dev.bench import PRESETS, report
    from kiosk_dev.bench.cli import collect

    if record is not None:
        inputs.use(record, "record")
    elif replay is not None:
        inputs.use(replay, "replay")
    preset = PRESETS[preset_name]
    sections = collect(Settings(), quick=True, recordings=None, live=False, preset=preset)
    command = ("kiosk bench audio --quick --no-live --json" if preset_name == "quick"
               else f"python -m kiosk_dev.bench.compare report --preset {preset_name}")
    data = report.to_json(sections, command=command, when=dt.datetime.now(dt.UTC))
    out.write_text(report.dumps(data) + "\n")
    return 0


# The fixed pair for `kiosk audio process`: agent speech echoed through a room with 40 ms delay and 50 ppm drift,
# the visitor speaking over it twice, a little pink noise. Far end only before the first turn (ERLE is measured
# there, after 2 s to converge).
PROCESS_SEED = 4
PROCESS_SECONDS = 10.0
PROCESS_TURNS = ((5.0, 6.5), (7.8, 9.3))
PROCESS_SETTLE_SECONDS = 2.0
PROCESS_TITLE = "kiosk audio process on the fixed pair"


def write_process_inputs(directory: Path) -> None:
    """Write the fixed pair (mic.wav, ref.wav), the clean visitor (near.wav), truth.json and an empty kiosk.toml."""
    from kiosk.audio.format import to_int16, write_wav
    from kiosk_dev.roomsim import make_scenario

    sc = make_scenario(PROCESS_SEED, seconds=PROCESS_SECONDS, delay_ms=40.0, drift_ppm=50.0,
                       visitor_spans=list(PROCESS_TURNS), noise_kind="pink", noise_dbfs=-65.0)
    directory.mkdir(parents=True, exist_ok=True)
    write_wav(directory / "mic.wav", to_int16(sc.mic))
    write_wav(directory / "ref.wav", to_int16(sc.far))
    write_wav(directory / "near.wav", to_int16(sc.near))
    (directory / "truth.json").write_text(json.dumps({"turns": [list(t) for t in PROCESS_TURNS],
                                                      "settle_seconds": PROCESS_SETTLE_SECONDS}) + "\n")
    (directory / "kiosk.toml").write_text("# defaults: the comparison runs the configured chain as shipped\n")


def process_section(directory: Path, out_wav: Path, vad_json: Path) -> BenchSection:
    """The figures of one ``kiosk audio process`` run over the fixed pair, as a report section."""
    from kiosk.audio.format import read_wav
    from kiosk_dev.bench.aec import RATE_HZ, erle_db, sdr_db

    def mono(path: Path) -> npt.NDArray[np.float64]:
        wav = read_wav(path)
        if wav.rate_hz != RATE_HZ:
            raise ReportError(f"{path} is at {wav.rate_hz} Hz, not {RATE_HZ}: give kiosk audio process's --out")
        return wav.samples[:, 0]

    truth = json.loads((directory / "truth.json").read_text())
    turns = [(float(a), float(b)) for a, b in truth["turns"]]
    settle = float(truth["settle_seconds"])
    mic, near, out = mono(directory / "mic.wav"), mono(directory / "near.wav"), mono(out_wav)
    n = min(len(mic), len(out), len(near))
    far_only = np.zeros(n, dtype=bool)
    far_only[int(settle * RATE_HZ):int(turns[0][0] * RATE_HZ)] = True
    erle = erle_db(mic[:n], out[:n], far_only)
    sdr, level = sdr_db(near[:n], out[:n], [(int(a * RATE_HZ), int(b * RATE_HZ)) for a, b in turns])
    speech = [(float(a), float(b)) for a, b in json.loads(vad_json.read_text())["speech"]]
    section = BenchSection(title=PROCESS_TITLE, columns=["figure", "value", "starts at s", "ends at s"])
    section.rows += [["ERLE far end only dB", erle, None, None], ["double-talk SDR dB", sdr, None, None],
                     ["visitor level dB", level, None, None], ["speech segments", len(speech), None, None]]
    section.rows += [[f"segment {k}", None, a, b] for k, (a, b) in enumerate(speech, start=1)]
    section.notes.append(f"Visitor turns {turns} s; ERLE over {settle:g} s to {turns[0][0]:g} s (far end only); "
                         "SDR as in the echo-cancellation benchmark.")
    return section


def _process_report(directory: Path, out_wav: Path, vad_json: Path, out: Path, against: Path | None) -> int:
    from kiosk_dev.bench import report

    try:
        section = process_section(directory, out_wav, vad_json)
        if against is not None:
            section.notes.append(f"output against {against.name}: {output_difference_db(out_wav, against):.1f} dB "
                                 "(difference energy over the other output's)")
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"compare: cannot read the kiosk audio process output: {error} (give the folder of process-inputs, "
              "and the --out WAV and --vad JSON that kiosk audio process wrote)", file=sys.stderr)
        return 2
    data = report.to_json([section], command="kiosk audio process --mic mic.wav --ref ref.wav --out OUT --vad VAD",
                          when=dt.datetime.now(dt.UTC))
    out.write_text(report.dumps(data) + "\n")
    print("\n".join(f"{row[0]}: {row[1] if row[1] is not None else row[2:]}" for row in section.rows))
    print("\n".join(section.notes))
    return 0


def output_difference_db(a: Path, b: Path) -> float:
    """10 log10 of the energy of (a - b) over the energy of b: how far apart two outputs are."""
    import math

    from kiosk.audio.format import read_wav

    x, y = read_wav(a).samples[:, 0], read_wav(b).samples[:, 0]
    n = min(len(x), len(y))
    diff = float(((x[:n] - y[:n]) ** 2).sum())
    return 10.0 * math.log10(max(diff, 1e-20) / max(float((y[:n] ** 2).sum()), 1e-20))


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
    rep = sub.add_parser("report", help="run the offline benchmark and write its JSON")
    rep.add_argument("--preset", choices=("quick", "target"), default="quick",
                     help="quick: kiosk bench audio --quick; target: the smaller run for the emulated target")
    recorded = rep.add_mutually_exclusive_group()
    recorded.add_argument("--record-inputs", type=Path, default=None, metavar="DIR",
                          help="keep every synthetic input made in DIR")
    recorded.add_argument("--replay-inputs", type=Path, default=None, metavar="DIR",
                          help="read the synthetic inputs from DIR (recorded on the other machine)")
    rep.add_argument("out", type=Path)
    pin = sub.add_parser("process-inputs", help="write the fixed mic/ref pair for kiosk audio process")
    pin.add_argument("directory", type=Path)
    prep = sub.add_parser("process-report", help="the figures of kiosk audio process's output over the fixed pair")
    prep.add_argument("directory", type=Path, help="the folder process-inputs wrote")
    prep.add_argument("out_wav", type=Path, help="kiosk audio process --out")
    prep.add_argument("vad_json", type=Path, help="kiosk audio process --vad")
    prep.add_argument("report", type=Path, help="where to write the report JSON")
    prep.add_argument("--against", type=Path, default=None, metavar="WAV",
                      help="another run's --out: print how far apart the two outputs are")
    diff = sub.add_parser("diff", help="compare two reports' quality figures")
    diff.add_argument("a", type=Path)
    diff.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    if args.command == "report":
        return _report(args.out, args.preset, args.record_inputs, args.replay_inputs)
    if args.command == "process-inputs":
        write_process_inputs(args.directory)
        return 0
    if args.command == "process-report":
        return _process_report(args.directory, args.out_wav, args.vad_json, args.report, args.against)
    return _diff(args.a, args.b)


if __name__ == "__main__":
    status = main()
    # The rtc SDK's native threads (AEC3 is livekit.rtc's APM) can still call back while the interpreter
    # finalises, which aborts the process after the report is written (seen once, on the host under load); leave
    # without finalising, as kiosk_dev.stack and kiosk_dev.kiosk_process do.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)

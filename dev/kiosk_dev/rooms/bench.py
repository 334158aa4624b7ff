"""The room-corpus benchmark: every system on the same rooms, figures per room class and overall, per half.

``kiosk bench audio --rooms N [--split tuning|reporting] [--jobs J] [--json] [--write docs/performance.md]``
(``run``) reports the configured chain with the AEC3 + webrtcvad and speexdsp + webrtcvad baselines side by
side, and the CPU of each against one bare AEC3 call. ``python -m kiosk_dev.rooms.bench [--rooms N |
--quick] [--split reporting|tuning|all] [--systems A,B] [--jobs J] [--json] [--overall]`` does the same
for any registered system (``systems``, ``variants``) and prints the target checks of every ``chain*``
system. Per-room results are cached under ``<rooms cache>/results/<hash>/``, keyed by the system and the
room: the hash covers the product's audio code, the harness, the generator version and the settings the
chain runs with, so a changed chain is always measured afresh.

Targets (the issue's, judged on the reporting half for the configured chain, ``chain``):

- >= 95 % of interruptions reported within 300 ms, over rooms with signal-to-echo >= -10 dB;
- <= 0.5 s of false speech per minute of agent speech (the visitor silent), backgrounds included;
- double-talk SDR >= +6 dB (the mean of every room class);
- ERLE at least WebRTC AEC3 with noise suppression (``aec3+ns/webrtcvad``) on every room class.

CPU: the mean process time per frame of each system on the same rooms in the same run, and its ratio to
one bare AEC3 call's (``aec3 bare``); timings of a shared machine, reported, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kiosk
import kiosk_dev.rooms.variants  # noqa: F401  (registers the variants)
from kiosk_dev.bench import BenchSection, TargetCheck
from kiosk_dev.rooms import generate, voices
from kiosk_dev.rooms.metrics import TARGET_SER_DB, aggregate, room_figures, room_labels
from kiosk_dev.rooms.systems import SYSTEMS, missing

if TYPE_CHECKING:
    from kiosk.settings import Settings

DEFAULT_ROOMS = 80
QUICK_ROOMS = 16  # every class in both halves
CHAIN = "chain"
AEC3_BASELINE = "aec3+ns/webrtcvad"
SPEEX_BASELINE = "speex/webrtcvad"
BARE = "aec3 bare"
DEFAULT_SYSTEMS = (CHAIN, AEC3_BASELINE, SPEEX_BASELINE, BARE)
TARGET_DETECT = 0.95
TARGET_FALSE_S_PER_MIN = 0.5
TARGET_SDR_DB = 6.0
SER_BANDS = ((-12.0, -10.0), (-10.0, -6.0), (-6.0, 0.0), (0.0, 6.01))
ROOMS_HEADING = "## Rooms"
_PRODUCT = Path(kiosk.__file__).resolve().parent
_HERE = Path(__file__).resolve().parent
# What every system's figures depend on; variants also on the array front end and the onset check.
# variants.py itself is not hashed: a variant's definition never changes under its name.
BASE_FILES = (_PRODUCT / "audio" / "aec.py", _PRODUCT / "audio" / "pipeline.py", _PRODUCT / "audio" / "vad.py",
              _PRODUCT / "audio" / "speex.py", _PRODUCT / "audio" / "format.py", _PRODUCT / "settings.py",
              _HERE / "metrics.py", _HERE / "systems.py")
VARIANT_FILES = (_PRODUCT / "audio" / "array.py", _HERE / "onset.py")


def code_hash(system: str, settings: Settings) -> str:
    """A hash of what a system's figures depend on (its results are cached under it)."""
    h = hashlib.sha1()
    spec = SYSTEMS[system]
    for path in BASE_FILES + (VARIANT_FILES if spec.variant else ()):
        h.update(path.name.encode())
        h.update(path.read_bytes() if path.exists() else b"")
    h.update(f"{generate.GENERATOR_VERSION}{voices.corpus_tag()}".encode())
    h.update(settings.aec.model_dump_json().encode())
    h.update(settings.vad.model_dump_json().encode())
    return h.hexdigest()[:12]


def _results_dir(system: str, settings: Settings) -> Path:
    path = voices.cache_base() / "results" / code_hash(system, settings)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def measure(seed: int, systems: Sequence[str], settings: Settings) -> list[dict[str, Any]]:
    """Figures of each system on room ``seed`` (cached per system and room)."""
    out: list[dict[str, Any]] = []
    room = None
    labels = None
    for name in systems:
        path = _results_dir(name, settings) / f"{_slug(name)}-room-{seed}.json"
        if path.exists():
            out.append(json.loads(path.read_text()))
            continue
        if room is None or labels is None:
            room = generate.load(seed)
            labels = room_labels(room)
        run = SYSTEMS[name].run(room, settings)
        fig = room_figures(room, labels, run)
        fig["system"] = name
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(fig))
        tmp.replace(path)
        out.append(fig)
    return out


def _measure_niced(args: tuple[int, tuple[str, ...], Settings]) -> list[dict[str, Any]]:
    with contextlib.suppress(OSError):
        os.nice(10)  # a shared machine: the rooms run in the background
    return measure(*args)


def collect(seeds: Sequence[int], systems: Sequence[str], settings: Settings, jobs: int = 1) -> list[dict[str, Any]]:
    """Figures for every (system, room); rooms spread over ``jobs`` processes."""
    work = [(s, tuple(systems), settings) for s in seeds]
    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs) as pool:
            parts = list(pool.map(_measure_niced, work))
    else:
        parts = [measure(*w) for w in work]
    return [row for part in parts for row in part]


def summarise(rows: list[dict[str, Any]], systems: Sequence[str], split: str) -> dict[str, Any]:
    """Per system: overall, per-class and per signal-to-echo aggregates on one half (or ``all`` rooms)."""
    keep = [r for r in rows if split == "all" or r["split"] == split]
    summary: dict[str, Any] = {}
    for name in systems:
        mine = [r for r in keep if r["system"] == name]
        per_class = {c: aggregate([r for r in mine if r["class"] == c]) for c in generate.CLASSES
                     if any(r["class"] == c for r in mine)}
        by_ser = {}
        for lo, hi in SER_BANDS:
            sel = [r for r in mine if lo <= r["ser_db"] < hi]
            if sel:
                by_ser[f"SER {lo:+.0f}..{hi:+.0f} dB"] = aggregate(sel)
        summary[name] = {"overall": aggregate(mine), "per_class": per_class, "per_ser": by_ser}
    bare = summary.get(BARE, {}).get("overall", {}).get("cpu_us_per_frame")
    for name in systems:
        cpu = summary[name]["overall"]["cpu_us_per_frame"]
        summary[name]["overall"]["cpu_ratio_to_bare_aec3"] = cpu / bare if bare and cpu is not None else None
    return summary


def targets(summary: dict[str, Any], system: str = CHAIN) -> list[TargetCheck]:
    """The issue's targets for ``system`` (on the half the summary was made of)."""
    s = summary[system]
    o = s["overall"]
    checks = [
        TargetCheck(f"interruptions reported within 300 ms (SER >= {TARGET_SER_DB:g} dB)",
                    o["caught_300ms_ser_ge_-10"], f">= {TARGET_DETECT}", o["caught_300ms_ser_ge_-10"] >= TARGET_DETECT),
        TargetCheck("false speech per minute of agent speech (s)", o["false_speech_s_per_min"],
                    f"<= {TARGET_FALSE_S_PER_MIN}", o["false_speech_s_per_min"] <= TARGET_FALSE_S_PER_MIN),
    ]
    worst_sdr = min((c["sdr_db_mean"], k) for k, c in s["per_class"].items())
    checks.append(TargetCheck(f"double-talk SDR, worst class mean ({worst_sdr[1]}) dB", worst_sdr[0],
                              f">= {TARGET_SDR_DB}", worst_sdr[0] >= TARGET_SDR_DB))
    base = summary.get(AEC3_BASELINE)
    if base is not None:
        gaps = [(c["erle_db_mean"] - base["per_class"][k]["erle_db_mean"], k) for k, c in s["per_class"].items()
                if k in base["per_class"] and c["erle_db_mean"] is not None]
        worst = min(gaps)
        checks.append(TargetCheck(f"ERLE minus AEC3+NS's, worst class ({worst[1]}) dB", worst[0], ">= 0",
                                  worst[0] >= 0))
    return checks


QUALITY_COLUMNS = ["class", "system", "rooms", "interruptions", "<= 300 ms (SER >= -10 dB)", "<= 300 ms (all)",
                   "median latency s", "false speech s/min", "false starts /min", "recall", "SDR dB", "ERLE dB",
                   "ERLE echo dB"]
CPU_COLUMNS = ["system", "CPU us per 10 ms frame", "x one bare AEC3 call"]


def _quality_row(group: str, name: str, a: dict[str, Any]) -> list[str | float | int | None]:
    return [group, name, a["rooms"], a["interruptions"], a["caught_300ms_ser_ge_-10"], a["caught_300ms"],
            a["median_latency_s"], a["false_speech_s_per_min"], a["false_starts_per_min"], a["recall"],
            a["sdr_db_mean"], a["erle_db_mean"], a["erle_echo_db_mean"]]


def quality_rows(summary: dict[str, Any], systems: Sequence[str], *, per_class: bool = True,
                 per_ser: bool = False) -> list[list[str | float | int | None]]:
    """Rows grouped by class (or signal-to-echo band), the systems side by side within each group."""
    rows = [_quality_row("all", name, summary[name]["overall"]) for name in systems]
    if per_class:
        for cls in generate.CLASSES:
            rows += [_quality_row(cls, name, summary[name]["per_class"][cls]) for name in systems
                     if cls in summary[name]["per_class"]]
    if per_ser:
        bands = [band for band in summary[systems[0]]["per_ser"]] if systems else []
        for band in bands:
            rows += [_quality_row(band, name, summary[name]["per_ser"][band]) for name in systems
                     if band in summary[name]["per_ser"]]
    return rows


def cpu_rows(summary: dict[str, Any]) -> list[list[str | float | int | None]]:
    """Per system: CPU per frame and its ratio to one bare AEC3 call."""
    return [[name, s["overall"]["cpu_us_per_frame"], s["overall"]["cpu_ratio_to_bare_aec3"]]
            for name, s in summary.items()]


def _halves(split: str) -> str:
    return {"reporting": "odd seeds, never tuned on", "tuning": "even seeds"}.get(split, "all seeds")


def sections(summary: dict[str, Any], systems: Sequence[str], *, rooms: int, split: str) -> list[BenchSection]:
    """The report: per class with the baselines side by side (and the targets), per signal-to-echo band, CPU."""
    quality = [name for name in systems if name != BARE]
    where = f"{split} half of rooms 0-{rooms - 1} ({_halves(split)}), generator v{generate.GENERATOR_VERSION}"
    main = BenchSection(title=f"Rooms: per class, {where}", columns=QUALITY_COLUMNS,
                        rows=quality_rows(summary, quality))
    if CHAIN in summary:
        main.targets = targets(summary)
    main.notes = [
        "Rooms of kiosk_dev.rooms.generate (seeded, 40 s, a 4-microphone array and its loudspeaker, eight "
        "background classes); the chain and both baselines on microphone 0, the same rooms, the same run.",
        "Detection, false speech, SDR and ERLE as defined in dev/kiosk_dev/rooms/metrics.py; "
        "docs/aec.md (\"Rooms it was never tuned on\") and docs/vad.md (\"Barge-in in rooms it was never tuned "
        "on\") say what the figures mean and what was tried.",
    ]
    by_ser = BenchSection(title=f"Rooms: by signal-to-echo ratio at microphone 0, {split} half",
                          columns=QUALITY_COLUMNS, rows=quality_rows(summary, quality, per_class=False, per_ser=True))
    by_ser.rows = by_ser.rows[len(quality):]  # the "all" rows are in the table above
    cpu = BenchSection(title=f"Rooms: CPU per 10 ms frame (process time), {split} half", columns=CPU_COLUMNS,
                       rows=cpu_rows(summary))
    ratio = summary.get(CHAIN, {}).get("overall", {}).get("cpu_ratio_to_bare_aec3")
    cpu.notes = ["Each system's per-frame loop on the same rooms in the same run, on a shared machine: reported, "
                 "never asserted" + (f"; the configured chain costs {ratio:.2f} bare AEC3 calls" if ratio else "")
                 + ". `python -m kiosk_dev.rooms.cpu` breaks the chain down by stage."]
    return [main, by_ser, cpu]


def unavailable(systems: Sequence[str]) -> dict[str, str]:
    """The systems that cannot run here, with why and how to install what they need."""
    return {name: reason for name in systems if (reason := missing(name)) is not None}


def run(settings: Settings, *, rooms: int = DEFAULT_ROOMS, quick: bool = False, jobs: int = 1,
        split: str = "reporting", systems: Sequence[str] = DEFAULT_SYSTEMS) -> list[BenchSection]:
    """``kiosk bench audio --rooms N``: the sections of the report (renders rooms not yet in the cache)."""
    n = QUICK_ROOMS if quick else rooms
    seeds = generate.seeds_for(n, split)
    rows = collect(seeds, systems, settings, jobs)
    return sections(summarise(rows, systems, split), systems, rooms=n, split=split)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kiosk_dev.rooms.bench``: any registered systems, the target checks of every ``chain*`` one."""
    from kiosk.settings import Settings
    from kiosk_dev.bench import report

    parser = argparse.ArgumentParser(description="The room-corpus benchmark (default settings).")
    parser.add_argument("--rooms", type=int, default=DEFAULT_ROOMS, help=f"rooms 0..N-1 ({DEFAULT_ROOMS})")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ROOMS} rooms (every class in both halves)")
    parser.add_argument("--split", default="reporting", choices=("reporting", "tuning", "all"))
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                        help=f"comma-separated, from: {', '.join(SYSTEMS)}")
    parser.add_argument("--jobs", type=int, default=1, help="processes (rooms are independent)")
    parser.add_argument("--json", action="store_true", help="print every aggregate as JSON")
    parser.add_argument("--overall", action="store_true", help="only the overall rows")
    args = parser.parse_args(argv)
    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    skipped = unavailable(wanted)
    for reason in skipped.values():
        print(f"skipped: {reason}", file=sys.stderr)
    systems = [name for name in wanted if name not in skipped]
    if any(name.startswith(CHAIN) for name in systems) and AEC3_BASELINE not in systems:
        systems.append(AEC3_BASELINE)  # the ERLE target is judged against it
    n = QUICK_ROOMS if args.quick else args.rooms
    settings = Settings()
    rows = collect(generate.seeds_for(n, args.split), systems, settings, args.jobs)
    summary = summarise(rows, systems, args.split)
    checks = {name: targets(summary, name) for name in systems if name.startswith(CHAIN)}
    if args.json:
        print(report.dumps({"rooms": n, "split": args.split, "generator_version": generate.GENERATOR_VERSION,
                            "code_hash": {name: code_hash(name, settings) for name in systems},
                            "summary": summary, "skipped": skipped,
                            "targets": {name: [vars(t) for t in ts] for name, ts in checks.items()}}))
        return 0
    table = BenchSection(title=f"{args.split} half of rooms 0-{n - 1}", columns=QUALITY_COLUMNS,
                         rows=quality_rows(summary, systems, per_class=not args.overall, per_ser=not args.overall))
    print(table.to_markdown())
    print("| system | target | value | bound | met |\n|---|---|---|---|---|")
    for name, ts in checks.items():
        for t in ts:
            print(f"| {name} | {t.name} | {t.value:.3g} | {t.target} | {'yes' if t.met else 'NO'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The fleet's alert rules under test: promtool unit tests made from a real demo run, and the synthetic cases.

``kiosk dev fleet record`` (root: the local stack) runs the demo's kiosk (``kiosk_dev.demo``: the local stack, the
virtual room, the real ``kiosk.app.Kiosk``) through a fault script while a real Prometheus server (Debian's
``prometheus``) scrapes its ``/metrics`` with the kiosk job of ``fleet/prometheus/prometheus.yml`` every
``--interval`` seconds:

1. ``kiosk doctor audio``'s loopback sweep on the virtual devices, kept where the kiosk reads it;
2. the kiosk starts; two questions answered, a third interrupted by a press while the agent answers;
3. the link goes down and a visitor presses: the kiosk goes offline (``offline``) and stays so for
   ``OFFLINE_SECONDS``; the link comes back and the kiosk online again;
4. the session API refuses for lack of credits and a visitor presses (``credits_exhausted``);
5. the kiosk stops (its metrics port closes: the scrapes fail) for ``STOPPED_SECONDS``.

Then it reads the raw samples back from Prometheus (``{job="kiosk"}[...]``), puts them on the scrape grid
(a scrape that is missing ends its series with ``stale``, as Prometheus does), and writes
``fleet/prometheus/tests/recorded-demo.yml``: the input series and the alerts expected at the moments the series
themselves show (``recorded_tests``), e.g. KioskOffline firing 5 minutes after the kiosk reported offline and not
just before. ``kiosk dev fleet synthetic`` writes ``synthetic.yml``: what a short run cannot show (a message
pending over an hour, the AEC degraded, repeated device loss, a rolled-back update, a venue that stops pushing).
Both files' annotations are rendered from the rules file, so a reworded annotation is one re-run of the tool.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kiosk.errors import KioskError
from kiosk.events import Button
from kiosk.settings import Settings

_LOGGER = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
FLEET = ROOT / "fleet"
RULES = FLEET / "prometheus" / "kiosk-alerts.yml"
SCRAPE_EXAMPLE = FLEET / "prometheus" / "prometheus.yml"
TESTS = FLEET / "prometheus" / "tests"
RECORDED = TESTS / "recorded-demo.yml"
SYNTHETIC = TESTS / "synthetic.yml"

KIOSK_ID = "demo-1"
SITE = "lab"
INTERVAL_SECONDS = 5
OFFLINE_SECONDS = 6 * 60  # the alert waits 5 minutes
STOPPED_SECONDS = 5 * 60 + 30
STALE = "stale"
Value = float | str | None  # a sample, STALE, or None (no sample)


# ---------------------------------------------------------------------------------------- rules and alerts
def load_rules(path: Path = RULES) -> list[dict[str, Any]]:
    """The alerting rules of ``path`` (every group), as written."""
    data = yaml.safe_load(path.read_text())
    return [rule for group in data["groups"] for rule in group["rules"] if "alert" in rule]


_PLACEHOLDER = re.compile(r"\{\{\s*\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")


def render(template: str, labels: dict[str, str]) -> str:
    """Expand ``{{ $labels.NAME }}`` (the only template the rules' annotations use) as Prometheus does."""
    rest = _PLACEHOLDER.sub("", template)
    if "{{" in rest:
        raise KioskError("bad_annotation", f"an annotation uses a template other than {{{{ $labels.NAME }}}}: "
                         f"{template!r}; keep annotations to label placeholders so the tests can render them")
    return _PLACEHOLDER.sub(lambda m: labels.get(m.group(1), ""), template)


def expected_alert(rules: list[dict[str, Any]], name: str, series_labels: dict[str, str],
                   evidence: str | None = None) -> dict[str, Any]:
    """The ``exp_alerts`` entry for alert ``name`` (the rule with label ``evidence``, if several) on a series."""
    candidates = [r for r in rules if r["alert"] == name
                  and (evidence is None or r.get("labels", {}).get("evidence") == evidence)]
    if len(candidates) != 1:
        raise KioskError("no_such_rule", f"{len(candidates)} rules named {name} (evidence {evidence!r})")
    rule = candidates[0]
    labels = {k: v for k, v in series_labels.items() if k != "__name__"}
    labels.update(rule.get("labels", {}))
    annotations = {key: render(value, labels) for key, value in rule.get("annotations", {}).items()}
    return {"exp_labels": labels, "exp_annotations": annotations}


def alert_names(rules: list[dict[str, Any]]) -> list[str]:
    """Each alert name once, in the file's order."""
    return list(dict.fromkeys(r["alert"] for r in rules))


# ---------------------------------------------------------------------------------------- series
@dataclass
class Series:
    """One series on the test's grid: its labels (with ``__name__``) and a value per step."""

    labels: dict[str, str]
    values: list[Value] = field(default_factory=list)

    def selector(self) -> str:
        """``name{label="value",...}`` in promtool's series notation."""
        inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(self.labels.items()) if k != "__name__")
        return f"{self.labels['__name__']}{{{inner}}}"

    def at(self, index: int) -> Value:
        """The value at step ``index`` (None beyond the end)."""
        return self.values[index] if 0 <= index < len(self.values) else None


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def encode_values(values: Sequence[Value]) -> str:
    """In promtool's expanding notation: runs of one number as ``v+0xN``, of no sample as ``_xN``, ``stale``."""
    out: list[str] = []
    i = 0
    while i < len(values):
        value = values[i]
        j = i
        while j + 1 < len(values) and values[j + 1] == value and type(values[j + 1]) is type(value):
            j += 1
        run = j - i + 1
        if value is None:
            out.append("_" if run == 1 else f"_x{run}")
        elif isinstance(value, str):
            out.extend([value] * run)
        else:
            out.append(_number(value) if run == 1 else f"{_number(value)}+0x{run - 1}")
        i = j + 1
    while out and out[-1].startswith("_"):
        out.pop()
    return " ".join(out)


def to_grid(matrix: list[dict[str, Any]], start_seconds: float, interval_seconds: float,
            keep: Any = None) -> list[Series]:
    """Raw samples (a Prometheus range-vector result) on the grid ``start + i * interval``.

    A sample belongs to the nearest step. After the last sample of a run, a missing step is ``stale`` (Prometheus
    marks a series stale when a scrape fails or no longer has it; its API returns no markers), and further ones
    have no sample; the same at the end of a series that stops before the others (``end_stale``).
    ``keep(labels)`` chooses the series (default: all).
    """
    out: list[Series] = []
    for result in matrix:
        labels = {str(k): str(v) for k, v in result["metric"].items()}
        if keep is not None and not keep(labels):
            continue
        slots: dict[int, float] = {}
        for stamp, text in result["values"]:
            index = round((float(stamp) - start_seconds) / interval_seconds)
            if index >= 0:
                slots[index] = float(text)
        if not slots:
            continue
        values: list[Value] = [None] * (max(slots) + 1)
        for index, value in slots.items():
            values[index] = value
        for index in range(1, len(values)):
            if values[index] is None and isinstance(values[index - 1], float):
                values[index] = STALE
        out.append(Series(labels, values))
    end_stale(out)
    out.sort(key=lambda s: s.selector())
    return out


def end_stale(series: Sequence[Series]) -> None:
    """A series that ends before the others (its target stopped answering) gets ``stale`` after its last sample."""
    length = max((len(s.values) for s in series), default=0)
    for s in series:
        if len(s.values) < length and isinstance(s.values[-1], float):
            s.values.append(STALE)


def recorded_keep(labels: dict[str, str]) -> bool:
    """The series worth keeping from a recording: the kiosk's and ``up``, not buckets or scrape bookkeeping."""
    name = labels.get("__name__", "")
    if name == "up":
        return True
    return name.startswith("kiosk_") and not name.endswith(("_bucket", "_created"))


# ---------------------------------------------------------------------------------------- test files
def _duration(seconds: float) -> str:
    return f"{round(seconds)}s"


def test_file(header: str, groups: list[dict[str, Any]], evaluation_seconds: float) -> str:
    """A promtool test file (YAML) with a comment header; ``rule_files`` points at the rules beside it."""
    body = {"rule_files": ["../kiosk-alerts.yml"], "evaluation_interval": _duration(evaluation_seconds),
            "tests": groups}
    comment = "".join(f"# {line}".rstrip() + "\n" for line in header.strip().splitlines())
    return comment + str(yaml.safe_dump(body, sort_keys=False, width=1000, allow_unicode=False))


def _group(name: str, interval_seconds: float, series: Sequence[Series],
           checks: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": name, "interval": _duration(interval_seconds),
            "input_series": [{"series": s.selector(), "values": encode_values(s.values)} for s in series],
            "alert_rule_test": checks}


def _find(series: Sequence[Series], name: str, **labels: str) -> Series:
    for s in series:
        if s.labels.get("__name__") == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s
    raise KioskError("recording_incomplete", f"the recording has no series {name}{labels}: re-run "
                     "`kiosk dev fleet record` (it needs the whole fault script)")


def _first(values: Sequence[Value], start: int, test: Any) -> int | None:
    return next((i for i in range(start, len(values)) if test(values[i])), None)


def _is(value: Value, wanted: float) -> bool:
    return isinstance(value, float) and value == wanted


def recorded_tests(series: Sequence[Series], interval_seconds: float,
                   rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The alert checks a recording supports, at moments read off its own series.

    - before the first fault: no alert at all;
    - the kiosk reported ``offline``: KioskOffline not yet 5 minutes minus two steps after, firing at 5 minutes
      plus two steps; resolved two steps after the kiosk was online again;
    - the credits refusal counted: KioskCreditsExhausted not the step before, firing the step after;
    - the scrapes failed (``up`` 0): KioskUnreachable not yet at 5 minutes minus two steps, firing at 5 minutes
      plus a step;
    - KioskCreditsExhausted at every later moment within its 15-minute look-back;
    - the other alerts (messages pending, AEC degraded, device loss, update rolled back, memory high): silent at
      every one of those moments, as the demo gives them no cause.
    """
    step = interval_seconds
    offline = _find(series, "kiosk_offline_reason", reason="offline")
    credits = _find(series, "kiosk_api_refusals_total", reason="credits_exhausted")
    up = _find(series, "up")
    off_start = _first(offline.values, 0, lambda v: _is(v, 1.0))
    if off_start is None:
        raise KioskError("recording_incomplete", "the kiosk never reported offline in the recording")
    off_end = _first(offline.values, off_start, lambda v: not _is(v, 1.0))
    five = 300.0 / step
    if off_end is None or off_end - off_start < five + 3:
        raise KioskError("recording_incomplete", "the kiosk was offline for less than 5 minutes in the recording")
    credit_at = _first(credits.values, 1, lambda v: isinstance(v, float) and v > 0)
    if credit_at is None or not _is(credits.at(credit_at - 1), 0.0):
        raise KioskError("recording_incomplete", "no credits refusal counted from 0 in the recording")
    down = _first(up.values, credit_at, lambda v: _is(v, 0.0))
    if down is None or len(up.values) - down < five + 2:
        raise KioskError("recording_incomplete", "the recording does not cover 5 minutes of failed scrapes")

    def at(index: float) -> str:
        return _duration(index * step)

    moments: list[tuple[str, dict[str, list[dict[str, Any]]]]] = [
        (at(off_start - 1), {}),
        (at(off_start + five - 2), {}),
        (at(off_start + five + 2), {"KioskOffline": [expected_alert(rules, "KioskOffline", offline.labels)]}),
        (at(off_end + 2), {}),
        (at(credit_at - 1), {}),
        (at(credit_at + 1), {"KioskCreditsExhausted": [
            expected_alert(rules, "KioskCreditsExhausted", credits.labels)]}),
        (at(down + five - 2), {}),
        (at(down + five + 1), {"KioskUnreachable": [expected_alert(rules, "KioskUnreachable", up.labels)]}),
    ]
    # The credits alert looks back 15 minutes: it still fires at later moments of the run (even once the kiosk is
    # stopped, its last samples are in the window).
    window = 900.0 / step
    credits_alert = expected_alert(rules, "KioskCreditsExhausted", credits.labels)
    for eval_time, firing in moments:
        index = float(eval_time.removesuffix("s")) / step
        if abs(index - credit_at) <= 1 or abs(index - (credit_at + window)) <= 3:
            continue  # next to an edge of the window: the moments above say what they expect
        if credit_at < index < credit_at + window:
            firing.setdefault("KioskCreditsExhausted", [credits_alert])
    checks: list[dict[str, Any]] = []
    for eval_time, firing in moments:
        for name in alert_names(rules):
            checks.append({"eval_time": eval_time, "alertname": name, "exp_alerts": firing.get(name, [])})
    return checks


def recorded_file(series: Sequence[Series], interval_seconds: float, timeline: Sequence[tuple[float, str]],
                  rules: list[dict[str, Any]] | None = None) -> str:
    """The whole recorded test file: header (how it was made, the run's timeline), series, checks."""
    rules = rules if rules is not None else load_rules()
    lines = ["Recorded off a real demo run (kiosk dev fleet record): the kiosk's /metrics scraped by Prometheus",
             f"every {interval_seconds:g} s; regenerate with `sudo .venv/bin/kiosk dev fleet record`. Do not edit.",
             "The checks are read off the series themselves (kiosk_dev.fleet.recorded_tests).", "Timeline:"]
    lines += [f"  {offset:7.1f} s  {what}" for offset, what in timeline]
    group = _group("recorded demo run: questions, link down, credits exhausted, kiosk stopped", interval_seconds,
                   series, recorded_tests(series, interval_seconds, rules))
    return test_file("\n".join(lines), [group], interval_seconds)


def refresh_recorded(path: Path = RECORDED) -> Path:
    """Derive a recorded file's checks again from its series (after the checks or the annotations changed)."""
    text = path.read_text()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    series, interval = parse_recorded(text)
    group = yaml.safe_load(text)["tests"][0]
    group["alert_rule_test"] = recorded_tests(series, interval, load_rules())
    body = {"rule_files": ["../kiosk-alerts.yml"], "evaluation_interval": _duration(interval), "tests": [group]}
    path.write_text(header + str(yaml.safe_dump(body, sort_keys=False, width=1000, allow_unicode=False)))
    return path


def parse_recorded(text: str) -> tuple[list[Series], float]:
    """The series and the interval of a recorded test file (to check its checks are the ones derived)."""
    data = yaml.safe_load(text)
    group = data["tests"][0]
    interval = float(str(group["interval"]).removesuffix("s"))
    return [Series(_parse_selector(item["series"]), decode_values(item["values"]))
            for item in group["input_series"]], interval


_SELECTOR = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\}$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _parse_selector(text: str) -> dict[str, str]:
    match = _SELECTOR.match(text)
    if match is None:
        raise ValueError(f"not a series selector: {text!r}")
    labels = {"__name__": match.group(1)}
    for name, value in _LABEL.findall(match.group(2)):
        labels[name] = value.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
    return labels


def decode_values(text: str) -> list[Value]:
    """The inverse of ``encode_values``, and ``a+bxN``/``a-bxN`` runs (promtool's notation)."""
    out: list[Value] = []
    for token in text.split():
        if token == STALE:
            out.append(STALE)
        elif token.startswith("_"):
            out.extend([None] * (int(token[2:]) if token.startswith("_x") else 1))
        elif (match := _EXPANDING.fullmatch(token)) is not None:
            base, sign, step, count = match.groups()
            delta = float(step) if sign == "+" else -float(step)
            out.extend([float(base) + k * delta for k in range(int(count) + 1)])
        else:
            out.append(float(token))
    return out


_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_EXPANDING = re.compile(rf"({_NUMBER})([+-])(\d+(?:\.\d*)?)x(\d+)")


# ---------------------------------------------------------------------------------------- synthetic cases
def _labels(kiosk_id: str, site: str) -> dict[str, str]:
    return {"job": "kiosk", "instance": f"{kiosk_id}.example.net:9101", "kiosk_id": kiosk_id, "site": site}


A = _labels("b1-reception", "b1")
B = _labels("b2-lobby", "b2")


def _s(name: str, labels: dict[str, str], values: str, **extra: str) -> Series:
    return Series({"__name__": name, **labels, **extra}, decode_values(values))


def synthetic_groups(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cases a short recording cannot show, each firing for kiosk A and not for kiosk B."""
    def fire(name: str, series: Series, evidence: str | None = None) -> list[dict[str, Any]]:
        return [expected_alert(rules, name, series.labels, evidence)]

    def checks(name: str, moments: Sequence[tuple[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
        return [{"eval_time": t, "alertname": name, "exp_alerts": exp} for t, exp in moments]

    groups: list[dict[str, Any]] = []
    # A scraped kiosk whose scrapes fail from minute 5 on; B answers.
    up_a, up_b = _s("up", A, "1+0x4 0+0x14"), _s("up", B, "1+0x19")
    groups.append(_group("unreachable: scrapes fail for 5 minutes", 60, [up_a, up_b], checks(
        "KioskUnreachable", [("9m", []), ("10m", fire("KioskUnreachable", up_a)), ("19m", fire("KioskUnreachable",
                                                                                                up_a))])))
    # Pushed through an agent: A's samples stop arriving after minute 10 (no stale markers: the venue is cut off).
    up_a = _s("up", A, "1+0x10")
    groups.append(_group("unreachable: a pushed kiosk goes silent", 60, [up_a, _s("up", B, "1+0x30")], checks(
        "KioskUnreachable", [("14m", []), ("16m", fire("KioskUnreachable", up_a)),
                             ("30m", fire("KioskUnreachable", up_a))])))
    # A series that went stale (the agent or Prometheus marked it so): the same 5 minutes before it fires.
    up_a = _s("up", A, "1+0x10 stale")
    groups.append(_group("unreachable: a kiosk's series goes stale", 60, [up_a, _s("up", B, "1+0x30")], checks(
        "KioskUnreachable", [("11m", []), ("15m", []), ("16m", fire("KioskUnreachable", up_a))])))
    # Offline for a reason other than credits: maintenance for A (fires after 5 minutes); credits for B (its own).
    off_a = _s("kiosk_offline_reason", A, "0 1+0x10", reason="maintenance")
    off_b = _s("kiosk_offline_reason", B, "0 1+0x10", reason="credits_exhausted")
    groups.append(_group("offline: maintenance, not credits", 60, [off_a, off_b], checks(
        "KioskOffline", [("5m", []), ("6m", fire("KioskOffline", off_a))])))
    # The oldest message ages past an hour, then is delivered.
    age_a = _s("kiosk_spool_oldest_message_age_seconds", A, "3480+60x4 0+0x5")
    age_b = _s("kiosk_spool_oldest_message_age_seconds", B, "0+60x9")
    groups.append(_group("messages pending over an hour", 60, [age_a, age_b], checks(
        "KioskMessagesPending", [("2m", []), ("3m", fire("KioskMessagesPending", age_a)), ("6m", [])])))
    # The doctor's sweep did not verify the echo path: A uses voice barge-in (fires after 10 minutes), B does not.
    aec_a, vbi_a = _s("kiosk_doctor_last_aec_ok", A, "0+0x15"), _s("kiosk_voice_barge_in", A, "1+0x15")
    aec_b, vbi_b = _s("kiosk_doctor_last_aec_ok", B, "0+0x15"), _s("kiosk_voice_barge_in", B, "0+0x15")
    groups.append(_group("AEC degraded by the doctor's sweep", 60, [aec_a, vbi_a, aec_b, vbi_b], checks(
        "KioskAecDegraded", [("9m", []), ("10m", fire("KioskAecDegraded", aec_a, "doctor"))])))
    # Likely false barge-ins: A gets 4 within minutes, B 2.
    false_a = _s("kiosk_barge_ins_likely_false_total", A, "0 0 1 2 3 4+0x80")
    false_b = _s("kiosk_barge_ins_likely_false_total", B, "0 0 1 2+0x80")
    groups.append(_group("AEC degraded by likely false barge-ins", 60, [false_a, false_b], checks(
        "KioskAecDegraded", [("3m", []), ("5m", fire("KioskAecDegraded", false_a, "barge_ins")), ("70m", [])])))
    # Credits: A refused once (fires for 15 minutes), B never.
    ref_a = _s("kiosk_api_refusals_total", A, "0 0 1+0x30", reason="credits_exhausted")
    ref_b = _s("kiosk_api_refusals_total", B, "0+0x32", reason="credits_exhausted")
    groups.append(_group("credits exhausted", 60, [ref_a, ref_b], checks(
        "KioskCreditsExhausted", [("1m", []), ("2m", fire("KioskCreditsExhausted", ref_a)), ("20m", [])])))
    # Device lost 3 times within an hour (A), twice (B); an hour later A is quiet again.
    loss_a = _s("kiosk_device_losses_total", A, "0 1 2 3+0x80")
    loss_b = _s("kiosk_device_losses_total", B, "0 1 2+0x80")
    groups.append(_group("repeated device loss", 60, [loss_a, loss_b], checks(
        "KioskDeviceLossRepeated", [("2m", []), ("3m", fire("KioskDeviceLossRepeated", loss_a)), ("70m", [])])))
    # The last trial rolled back (A); B's committed; neither unknown (no series) nor B fires.
    rb_a = _s("kiosk_update_last_rolled_back", A, "1+0x5 0+0x5")
    rb_b = _s("kiosk_update_last_rolled_back", B, "0+0x10")
    groups.append(_group("update rolled back", 60, [rb_a, rb_b], checks(
        "KioskUpdateRolledBack", [("0m", fire("KioskUpdateRolledBack", rb_a)), ("7m", [])])))
    # Memory over 640 MiB: A climbs past it at minute 19 and stays there until minute 40, then restarts; B stays
    # just under it.
    mem_a = _s("process_resident_memory_bytes", A, "300000000+20000000x20 700000000+0x20 300000000+0x5")
    mem_b = _s("process_resident_memory_bytes", B, "600000000+0x45")
    groups.append(_group("memory close to the unit's limit", 60, [mem_a, mem_b], checks(
        "KioskMemoryHigh", [("33m", []), ("35m", fire("KioskMemoryHigh", mem_a)), ("43m", [])])))
    return groups


def synthetic_file(rules: list[dict[str, Any]] | None = None) -> str:
    """The synthetic test file."""
    rules = rules if rules is not None else load_rules()
    header = ("Synthetic series (kiosk dev fleet synthetic) for what a short demo run cannot show; regenerate with\n"
              "`.venv/bin/kiosk dev fleet synthetic`. Do not edit. recorded-demo.yml holds the recorded ones.")
    return test_file(header, synthetic_groups(rules), 60)


# ---------------------------------------------------------------------------------------- Prometheus
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrometheusServer:
    """Debian's ``prometheus`` scraping one kiosk, with its data in a temporary directory."""

    def __init__(self, directory: Path, target: str, interval_seconds: float) -> None:
        self.directory = directory
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = scrape_config(target, interval_seconds)
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start and wait until ready; ``KioskError`` when the binary is missing or does not come up."""
        binary = shutil.which("prometheus")
        if binary is None:
            raise KioskError("no_prometheus", "prometheus is not installed: apt-get install prometheus "
                             "(scripts/bootstrap does)")
        config = self.directory / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self._log = (self.directory / "prometheus.log").open("wb")
        self._process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={self.directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise KioskError("prometheus_failed", f"prometheus exited: see {self.directory / 'prometheus.log'}")
            with contextlib.suppress(OSError), urllib.request.urlopen(self.url + "/-/ready", timeout=1.0) as reply:
                if reply.status == 200:
                    return
            time.sleep(0.2)
        raise KioskError("prometheus_failed", "prometheus did not become ready within 30 s")

    def query(self, promql: str, at_seconds: float) -> list[dict[str, Any]]:
        """An instant query's result."""
        params = urllib.parse.urlencode({"query": promql, "time": f"{at_seconds:.3f}"})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{params}", timeout=30.0) as reply:
            data = json.loads(reply.read())
        if data.get("status") != "success":
            raise KioskError("prometheus_query", f"{promql}: {data.get('error')}")
        result: list[dict[str, Any]] = data["data"]["result"]
        return result

    def stop(self) -> None:
        """Stop it."""
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
            self._process = None
            self._log.close()


def scrape_config(target: str, interval_seconds: float) -> dict[str, Any]:
    """``fleet/prometheus/prometheus.yml``'s kiosk job pointed at one target, scraping every ``interval``."""
    example = yaml.safe_load(SCRAPE_EXAMPLE.read_text())
    job = next(j for j in example["scrape_configs"] if j["job_name"] == "kiosk")
    job = {**job, "scrape_interval": _duration(interval_seconds),
           "scrape_timeout": _duration(max(1, interval_seconds - 1)),
           "static_configs": [{"targets": [target], "labels": {"kiosk_id": KIOSK_ID, "site": SITE}}]}
    return {"global": {"scrape_interval": _duration(interval_seconds)}, "scrape_configs": [job]}


# ---------------------------------------------------------------------------------------- the recording
def _system_root(directory: Path) -> Path:
    """A scratch root for ``kiosk.update.status``: slot A booted and committed, image 2025.3.1, a committed trial."""
    from kiosk.update.gate import RECORD
    from kiosk.update.tryboot import AUTOBOOT, DEVICE_TREE

    root = directory / "root"
    (root / AUTOBOOT).parent.mkdir(parents=True, exist_ok=True)
    (root / AUTOBOOT).write_text("[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n")
    (root / DEVICE_TREE).mkdir(parents=True, exist_ok=True)
    (root / DEVICE_TREE / "partition").write_bytes((2).to_bytes(4, "big"))
    (root / DEVICE_TREE / "tryboot").write_bytes((0).to_bytes(4, "big"))
    (root / "usr/share/kiosk").mkdir(parents=True, exist_ok=True)
    (root / "usr/share/kiosk/image-version").write_text("2025.3.1\n")
    (root / RECORD).parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    (root / RECORD).write_text(json.dumps({
        "version": 1, "slot": "A", "image_version": "2025.3.1", "action": "commit",
        "reasons": ["kiosk.service came up, kiosk doctor and the voice self-test passed"], "kiosk_ready": True,
        "doctor": {"outcome": "pass"}, "voice": {"outcome": "pass"}, "started_unix": now - 600,
        "finished_unix": now - 400, "tryboot_flag": True, "marked": "good"}))
    return root


async def _record(settings: Settings, interval_seconds: float, offline_seconds: float,
                  stopped_seconds: float) -> tuple[list[Series], list[tuple[float, str]]]:
    """Run the fault script against the demo's kiosk under a real Prometheus; the series and the timeline."""
    from kiosk.app import Kiosk
    from kiosk.checks import Report
    from kiosk.doctor import keep_sweep, run_doctor
    from kiosk.state import Phase
    from kiosk_dev.demo import QUESTIONS, _Recorder, _scripted, demo_environment
    from kiosk_dev.speech import espeak, normalise
    from kiosk_dev.terminal import VirtualPanel

    loop = asyncio.get_running_loop()
    timeline: list[tuple[float, str]] = []
    with demo_environment(settings, real_devices=False) as env, \
            tempfile.TemporaryDirectory(prefix="kiosk-fleet-") as scratch:
        work = Path(scratch)
        cfg = env.settings.model_copy(update={"metrics": env.settings.metrics.model_copy(update={
            "kiosk_id": KIOSK_ID, "site": SITE, "doctor_record": work / "doctor-audio.json"})})
        report: Report = await asyncio.to_thread(run_doctor, cfg, ["audio"])
        kept = keep_sweep(report, cfg)
        _LOGGER.info("doctor sweep kept in %s: %s", kept, report.recommendation)
        kiosk = Kiosk(cfg, system_root=_system_root(work))
        panel = VirtualPanel(cfg.panel, cfg.interaction, kiosk.bus.post, loop=loop)
        kiosk.panel = panel
        recorder = _Recorder(loop)
        kiosk.listeners.append(recorder)
        await kiosk.start()
        assert kiosk.metrics_server is not None
        prometheus = PrometheusServer(work, f"127.0.0.1:{kiosk.metrics_server.port}", interval_seconds)
        prometheus.start()
        started = time.time()

        def mark(what: str) -> None:
            timeline.append((round(time.time() - started, 1), what))
            _LOGGER.info("fleet record: %s", what)

        try:
            mark("kiosk started, Prometheus scraping")
            await asyncio.sleep(3 * interval_seconds)
            exchanges = await _scripted(kiosk, panel, env.room, recorder, QUESTIONS)
            mark(f"two questions asked, {sum(e['answer_played'] for e in exchanges)} answered")
            # A third question, interrupted by a press once the answer plays.
            await recorder.wait_until(lambda: kiosk.controller is not None and kiosk.controller.phase is Phase.IDLE,
                                      30.0)
            panel.press()
            await asyncio.sleep(0.4)
            speech = normalise(espeak("Can you tell me where the cafe is?", "en-us"), -26.0)
            env.room.say(speech, name="third question")
            await asyncio.sleep(len(speech) / 16000 + 0.5)
            panel.release()
            if await recorder.wait_until(lambda: kiosk.controller is not None
                                         and kiosk.controller.phase is Phase.SPEAKING, 30.0):
                await asyncio.sleep(1.0)
                panel.press()
                await asyncio.sleep(0.3)
                panel.release()
                mark("third answer interrupted by a press")
            await asyncio.sleep(15.0)
            panel.press(Button.CANCEL)  # end the interrupted session
            panel.release(Button.CANCEL)
            await asyncio.sleep(3 * interval_seconds)
            env.stack.network.set_link(False)
            mark("link down")
            await asyncio.sleep(2.0)
            panel.press()
            await asyncio.sleep(0.3)
            panel.release()
            await recorder.wait_until(lambda: kiosk.controller is not None
                                      and kiosk.controller.phase is Phase.OFFLINE, 60.0)
            mark("a visitor pressed: the kiosk is offline")
            await asyncio.sleep(offline_seconds)
            env.stack.network.set_link(True)
            mark("link up")
            await recorder.wait_until(lambda: kiosk.controller is not None
                                      and kiosk.controller.phase is Phase.IDLE, 180.0)
            mark("the kiosk is online again")
            await asyncio.sleep(4 * interval_seconds)
            env.stack.fail("credits_exhausted")
            panel.press()
            await asyncio.sleep(0.3)
            panel.release()
            await recorder.wait_until(lambda: kiosk.controller is not None
                                      and kiosk.controller.phase is Phase.OFFLINE, 30.0)
            mark("credits exhausted: a visitor was refused")
            await asyncio.sleep(6 * interval_seconds)
            env.stack.fail("none")
            await kiosk.aclose()
            mark("kiosk stopped (its metrics port is closed)")
            await asyncio.sleep(stopped_seconds)
            end = time.time()
            mark("recording ends")
            span = int(end - started) + 60
            matrix = prometheus.query(f'{{job="kiosk"}}[{span}s]', end)
        finally:
            await kiosk.aclose()
            prometheus.stop()
    first = min(float(v[0]) for r in matrix if r["metric"].get("__name__") == "up" for v in r["values"])
    timeline = [(round(offset - (first - started), 1), what) for offset, what in timeline]
    return to_grid(matrix, first, interval_seconds, recorded_keep), timeline


def record(settings: Settings, out: Path, *, interval_seconds: float = INTERVAL_SECONDS,
           offline_seconds: float = OFFLINE_SECONDS, stopped_seconds: float = STOPPED_SECONDS) -> Path:
    """Enter the private network, run the recording, write the test file to ``out``."""
    from kiosk_dev.netns import enter_private_network

    enter_private_network()
    series, timeline = asyncio.run(_record(settings, interval_seconds, offline_seconds, stopped_seconds))
    out.write_text(recorded_file(series, interval_seconds, timeline))
    return out


# ---------------------------------------------------------------------------------------- command line
def _cmd_fleet(args: argparse.Namespace, settings: Settings) -> int:
    if args.fleet_command == "synthetic":
        args.out.write_text(synthetic_file())
        print(f"wrote {args.out}")
        return 0
    if args.checks_only:
        print(f"wrote {refresh_recorded(args.out)}")
        return 0
    path = record(settings, args.out, interval_seconds=args.interval)
    print(f"wrote {path}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``kiosk dev fleet record|synthetic`` (under ``kiosk dev``)."""
    fleet = subparsers.add_parser("fleet", help="make the alert rules' promtool tests (recorded and synthetic)",
                                  description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = fleet.add_subparsers(dest="fleet_command", metavar="ACTION", required=True)
    rec = sub.add_parser("record", help="record a demo run's metrics under Prometheus (root; about 15 minutes)")
    rec.add_argument("--out", type=Path, default=RECORDED, help=f"test file to write (default {RECORDED})")
    rec.add_argument("--interval", type=float, default=INTERVAL_SECONDS, help="scrape interval in seconds")
    rec.add_argument("--checks-only", action="store_true",
                     help="keep the recorded series, derive the checks again (after the rules' annotations changed)")
    syn = sub.add_parser("synthetic", help="write the synthetic cases' test file")
    syn.add_argument("--out", type=Path, default=SYNTHETIC, help=f"test file to write (default {SYNTHETIC})")
    fleet.set_defaults(handler=_cmd_fleet)


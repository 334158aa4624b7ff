"""The fleet's shipped monitoring (fleet/): alert rules checked and unit-tested with promtool, their tests made from a
recorded demo run and synthetic series, the dashboard's queries parsed and checked against the kiosk's metric
names, the scrape and push examples checked."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from kiosk.metrics import FILE_FIGURES, Metrics
from kiosk_dev import fleet

ROOT = Path(__file__).resolve().parents[2]
FLEET = ROOT / "fleet"
RULES = FLEET / "prometheus" / "kiosk-alerts.yml"
DASHBOARD = FLEET / "grafana" / "kiosk-fleet.json"
FLEET_DOC = ROOT / "docs" / "fleet.md"
# Series Prometheus itself makes (not the kiosk's).
PROMETHEUS_SERIES = {"up", "ALERTS"}

promtool = pytest.mark.needs_tool("promtool")


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, check=False)


def sample_names() -> set[str]:
    """Every sample name the kiosk exports (``_total``, ``_bucket``, ``_sum``, ``_count`` included)."""
    m = Metrics()
    m.set_info("a", "b", "1", "A")
    m.set_route("array")
    m.device_overruns.labels(device="array")
    m.device_underruns.labels(device="array")
    for name in FILE_FIGURES:
        m.files.set(name, 1.0)
    names = set()
    for line in m.exposition().decode().splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACES = re.compile(r"\{[^}]*\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers left once strings, selectors' label matchers and
    grouping lists are taken out (what remains of ours starts with ``kiosk_``; label names such as ``kiosk_id``
    only ever stand in those)."""
    text = _GROUPING.sub(" ", _BRACES.sub(" ", _STRINGS.sub(" ", expr)))
    return set(re.findall(r"\b(kiosk_[a-zA-Z0-9_]+|process_[a-z_]+|up|ALERTS)\b", text))


def test_metric_names_are_found_and_labels_are_not() -> None:
    expr = ('sum by (kiosk_id, le) (rate(kiosk_connect_seconds_bucket{kiosk_id=~"$kiosk_id"}[5m])) '
            'and on(kiosk_id) kiosk_online == 1 or label_replace(up, "kiosk_x", "$1", "a", "(.*)")')
    assert metric_names(expr) == {"kiosk_connect_seconds_bucket", "kiosk_online", "up"}


# ------------------------------------------------------------------------------------------- alert rules
@promtool
def test_the_rules_check() -> None:
    done = _promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr


@promtool
@pytest.mark.parametrize("name", ["recorded-demo.yml", "synthetic.yml"])
def test_the_rules_pass_their_unit_tests(name: str) -> None:
    done = _promtool("test", "rules", str(FLEET / "prometheus" / "tests" / name))
    assert done.returncode == 0, done.stdout + done.stderr


@promtool
def test_a_changed_rule_fails_its_tests(tmp_path: Path) -> None:
    """The tests can fail: the offline alert waiting 10 minutes instead of 5 breaks the recorded run's checks."""
    (tmp_path / "tests").mkdir()
    text = RULES.read_text()
    assert "for: 5m" in text
    (tmp_path / "kiosk-alerts.yml").write_text(text.replace("for: 5m", "for: 10m"))
    recorded = FLEET / "prometheus" / "tests" / "recorded-demo.yml"
    (tmp_path / "tests" / recorded.name).write_text(recorded.read_text())
    done = _promtool("test", "rules", str(tmp_path / "tests" / recorded.name))
    assert done.returncode != 0 and "KioskOffline" in done.stdout + done.stderr


def test_every_rule_reads_only_kiosk_metrics() -> None:
    exported = sample_names()
    for rule in fleet.load_rules():
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names - exported - PROMETHEUS_SERIES == set(), f"{rule['alert']} reads metrics the kiosk lacks"


def test_every_alert_says_what_to_do_and_has_a_runbook() -> None:
    doc = FLEET_DOC.read_text()
    alerts = doc.split("\n## Alerts", 1)[1]
    for rule in fleet.load_rules():
        notes = rule["annotations"]
        assert set(notes) == {"summary", "description", "runbook"}, rule["alert"]
        assert notes["runbook"] == f"docs/fleet.md, Alerts: {rule['alert']}"
        assert f"### {rule['alert']}" in alerts, f"docs/fleet.md has no runbook section for {rule['alert']}"
        for text in notes.values():
            fleet.render(text, {})  # only label placeholders (the tests render them)


def test_the_six_cases_of_the_brief_are_covered() -> None:
    """Offline > 5 min, messages pending > 1 h, AEC degraded, credits exhausted, repeated device loss, rollback;
    and memory close to the unit's limit (a kiosk that never found a quiet moment to restart in)."""
    names = set(fleet.alert_names(fleet.load_rules()))
    assert names == {"KioskUnreachable", "KioskOffline", "KioskMessagesPending", "KioskAecDegraded",
                     "KioskCreditsExhausted", "KioskDeviceLossRepeated", "KioskUpdateRolledBack", "KioskMemoryHigh"}


def _firing(path: Path) -> set[str]:
    data = yaml.safe_load(path.read_text())
    return {check["alertname"] for group in data["tests"] for check in group["alert_rule_test"]
            if check["exp_alerts"]}


def test_every_alert_is_seen_firing_and_the_recording_covers_its_part() -> None:
    tests = FLEET / "prometheus" / "tests"
    recorded, synthetic = _firing(tests / "recorded-demo.yml"), _firing(tests / "synthetic.yml")
    assert recorded == {"KioskOffline", "KioskCreditsExhausted", "KioskUnreachable"}
    assert recorded | synthetic == set(fleet.alert_names(fleet.load_rules()))


def test_the_synthetic_tests_are_what_the_tool_makes() -> None:
    assert (FLEET / "prometheus" / "tests" / "synthetic.yml").read_text() == fleet.synthetic_file(), \
        "re-run `kiosk dev fleet synthetic` after changing the rules or the cases"


def test_the_recorded_checks_are_derived_from_the_recorded_series() -> None:
    text = (FLEET / "prometheus" / "tests" / "recorded-demo.yml").read_text()
    assert text.startswith("# Recorded off a real demo run")
    series, interval = fleet.parse_recorded(text)
    committed = yaml.safe_load(text)["tests"][0]["alert_rule_test"]
    assert committed == fleet.recorded_tests(series, interval, fleet.load_rules()), \
        "re-run `kiosk dev fleet record` (or its checks changed: kiosk_dev.fleet.recorded_tests)"
    names = {s.labels["__name__"] for s in series}
    assert {"up", "kiosk_info", "kiosk_online", "kiosk_offline_reason", "kiosk_sessions_total",
            "kiosk_doctor_last_aec_ok", "kiosk_update_last_rolled_back"} <= names
    # Real target labels: the scrape example's identity, and the kiosk's own on kiosk_info kept apart.
    info = next(s for s in series if s.labels["__name__"] == "kiosk_info")
    assert info.labels["kiosk_id"] == fleet.KIOSK_ID and info.labels["exported_kiosk_id"] == fleet.KIOSK_ID
    assert info.labels["slot"] == "A" and info.labels["version"] == "2025.3.1"


# ------------------------------------------------------------------------------------------- the tool's notation
_values = st.lists(st.one_of(st.none(), st.just(fleet.STALE),
                             st.integers(-5, 5).map(float),
                             st.floats(allow_nan=False, allow_infinity=False, width=32)), max_size=40)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(_values)
def test_encoding_round_trips(values: list[Any]) -> None:
    decoded = fleet.decode_values(fleet.encode_values(values))
    expected = list(values)
    while expected and expected[-1] is None:
        expected.pop()  # trailing gaps are not written
    assert decoded == expected


def test_to_grid_marks_missing_scrapes_stale() -> None:
    matrix = [{"metric": {"__name__": "up", "job": "kiosk"},
               "values": [[100.0, "1"], [105.02, "1"], [109.98, "0"]]},
              {"metric": {"__name__": "kiosk_online", "job": "kiosk"},
               "values": [[100.01, "1"], [104.99, "1"]]}]
    grid = fleet.to_grid(matrix, 100.0, 5.0)
    by_name = {s.labels["__name__"]: s.values for s in grid}
    # The kiosk stopped answering (up 0): its series end stale, as Prometheus marks them.
    assert by_name == {"up": [1.0, 1.0, 0.0], "kiosk_online": [1.0, 1.0, fleet.STALE]}
    matrix[1]["values"].append([115.0, "1"])
    grid = fleet.to_grid(matrix, 100.0, 5.0)
    assert next(s for s in grid if s.labels["__name__"] == "kiosk_online").values == [1.0, 1.0, fleet.STALE, 1.0]


# ------------------------------------------------------------------------------------------- the dashboard
def _dashboard_queries() -> list[str]:
    data = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in data["panels"] for t in p.get("targets", [])]
    for variable in data["templating"]["list"]:
        if variable["type"] == "query":
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["definition"])
            assert inner is not None, variable["definition"]
            queries.append(inner.group(1))
    return queries


def _as_promql(query: str) -> str:
    """Grafana's variables replaced as Grafana does before the query reaches Prometheus."""
    return (query.replace("$__rate_interval", "5m").replace("$site", ".*").replace("$kiosk_id", ".*"))


def test_every_dashboard_query_uses_kiosk_metrics() -> None:
    exported = sample_names()
    queries = _dashboard_queries()
    assert len(queries) > 25
    used: set[str] = set()
    for query in queries:
        names = metric_names(query)
        assert names, query
        assert names - exported - PROMETHEUS_SERIES == set(), f"the dashboard reads metrics the kiosk lacks: {query}"
        used |= names
    # Every figure of the brief has a panel.
    for wanted in ("kiosk_online", "kiosk_route", "kiosk_doctor_last_aec_ok", "kiosk_barge_ins_likely_false_total",
                   "kiosk_barge_ins_likely_missed_total", "kiosk_sessions_total", "kiosk_estimated_credits_total",
                   "kiosk_spool_messages", "kiosk_spool_oldest_message_age_seconds", "kiosk_audio_stalls_total",
                   "kiosk_audio_recoveries_total", "kiosk_info", "kiosk_update_last_rolled_back"):
        assert wanted in used, wanted


def test_every_panel_filters_by_site_and_kiosk() -> None:
    data = json.loads(DASHBOARD.read_text())
    names = {v["name"] for v in data["templating"]["list"]}
    assert {"site", "kiosk_id", "datasource"} <= names
    for panel in data["panels"]:
        for target in panel.get("targets", []):
            assert 'site=~"$site"' in target["expr"] and 'kiosk_id=~"$kiosk_id"' in target["expr"], panel["title"]


@promtool
def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": _as_promql(q)} for i, q in enumerate(_dashboard_queries())]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    done = _promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "sum(up"}]}]}))
    assert _promtool("check", "rules", str(path)).returncode != 0  # the check can fail


# ------------------------------------------------------------------------------------------- scrape and push
@promtool
@pytest.mark.parametrize("name", ["prometheus.yml", "agent.yml"])
def test_the_scrape_examples_check(name: str, tmp_path: Path) -> None:
    # Beside a copy of the rules (prometheus.yml names them) and the password file agent.yml points at.
    config = yaml.safe_load((FLEET / "prometheus" / name).read_text())
    for write in config.get("remote_write", []):
        secret = tmp_path / "password"
        secret.write_text("x")
        write["basic_auth"]["password_file"] = str(secret)
    (tmp_path / "kiosk-alerts.yml").write_text(RULES.read_text())
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    done = _promtool("check", "config", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_examples_give_the_same_identity() -> None:
    """The kiosk job with kiosk_id and site target labels, in the scrape example, the agent and Alloy alike."""
    for name in ("prometheus.yml", "agent.yml"):
        job = next(j for j in yaml.safe_load((FLEET / "prometheus" / name).read_text())["scrape_configs"]
                   if j["job_name"] == "kiosk")
        assert job["honor_labels"] is False
        assert all(set(sc["labels"]) == {"kiosk_id", "site"} for sc in job["static_configs"])
    alloy = (FLEET / "alloy" / "kiosk.alloy").read_text()
    assert 'job_name        = "kiosk"' in alloy and '"kiosk_id" =' in alloy and '"site" =' in alloy
    assert "honor_labels    = false" in alloy and "prometheus.remote_write" in alloy


@pytest.mark.needs_tool("nft")
@pytest.mark.skipif(os.geteuid() != 0, reason="nft -c needs root")
def test_the_firewall_drop_in_loads_after_the_kiosk_table(tmp_path: Path) -> None:
    ruleset = (ROOT / "image" / "nftables.conf").read_text()
    drop_in = FLEET / "nftables" / "kiosk-metrics.nft"
    combined = tmp_path / "nftables.conf"
    combined.write_text(ruleset.replace('include "/etc/nftables.d/*.nft"', f'include "{drop_in}"'))
    done = subprocess.run(["nft", "-c", "-f", str(combined)], capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "tcp dport 9101" in drop_in.read_text()

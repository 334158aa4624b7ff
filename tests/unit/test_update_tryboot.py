"""kiosk.update.tryboot: RAUC's custom bootloader backend for the Pi's tryboot, as RAUC calls it.

The pure ``handle`` through RAUC's install / trial / commit / roll-back sequence, the strict ``autoboot.txt`` and
state parsers (fuzzed), and the backend run as a process against a scratch root (what RAUC executes: one word on
stdout, exit status 0, the files changed on disk only when they must).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.tryboot import IMAGE_AUTOBOOT, cell, scratch_root
from kiosk.update.tryboot import (
    AUTOBOOT,
    DEVICE_TREE,
    STATE,
    Autoboot,
    SlotState,
    TrybootError,
    handle,
    parse_autoboot,
    parse_state,
    render_autoboot,
    render_state,
)

ROOT = Path(__file__).resolve().parents[2]
# What rpi-image-gen's image-rota writes (image/gpt/ab_userdata/pre-image.sh).
A_COMMITTED = Autoboot(committed=2, trial=3)


def test_the_images_autoboot_parses_and_renders_back() -> None:
    autoboot = parse_autoboot(IMAGE_AUTOBOOT)
    assert autoboot == A_COMMITTED and autoboot.committed_slot == "A" and autoboot.trial_slot == "B"
    assert render_autoboot(autoboot) == IMAGE_AUTOBOOT
    swapped = render_autoboot(Autoboot(committed=3, trial=2))
    assert parse_autoboot(swapped) == Autoboot(committed=3, trial=2) and len(swapped) <= 512


@pytest.mark.parametrize(("text", "problem"), [
    (b"[all]\nboot_partition=2\n[tryboot]\nboot_partition=3\n", "tryboot_a_b=1"),
    (b"[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=2\n", "one each"),
    (b"[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=5\n", "one each"),
    (b"[all]\ntryboot_a_b=1\nboot_partition=2\n", "one each"),
    (b"[all]\ntryboot_a_b=1\nboot_partition=2\n[none]\nboot_partition=3\n", "[none]"),
    (b"[all]\ntryboot_a_b=1\nboot_partition=2\nkernel=x\n[tryboot]\nboot_partition=3\n", "expected"),
    (b"[all]\ntryboot_a_b=1\nboot_partition=2\nboot_delay=1\n[tryboot]\nboot_partition=3\n", "boot_delay"),
    (b"[all]\ntryboot_a_b=1\nboot_partition=2\nboot_partition=3\n[tryboot]\nboot_partition=3\n", "twice"),
    (b"tryboot_a_b=1\n", "expected"),
    (IMAGE_AUTOBOOT + b"#" * 600, "512"),
    (IMAGE_AUTOBOOT.replace(b"all", b"\xe4ll"), "ASCII"),
])
def test_autoboot_parser_refuses_what_it_would_not_rewrite_faithfully(text: bytes, problem: str) -> None:
    with pytest.raises(TrybootError) as caught:
        parse_autoboot(text)
    assert problem in caught.value.message


def test_comments_and_blank_lines_are_allowed() -> None:
    assert parse_autoboot(b"# A/B\n\n" + IMAGE_AUTOBOOT.replace(b"\n", b"\r\n")) == A_COMMITTED


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(max_size=700))
def test_autoboot_parser_fuzz_only_raises_its_own_error(data: bytes) -> None:
    try:
        autoboot = parse_autoboot(data)
    except TrybootError:
        return
    assert {autoboot.committed, autoboot.trial} == {2, 3}


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=200).map(str.encode),
                 st.fixed_dictionaries({"version": st.just(1), "pending": st.sampled_from([None, "A", "B", "C", 1]),
                                        "bad": st.lists(st.sampled_from(["A", "B", "Z", 3]), max_size=3)})
                 .map(lambda d: __import__("json").dumps(d).encode())))
def test_state_parser_fuzz_only_raises_its_own_error(data: bytes) -> None:
    try:
        state = parse_state(data)
    except TrybootError:
        return
    assert state.pending in (None, "A", "B") and state.bad <= {"A", "B"}
    assert parse_state(render_state(state)) == state


# ------------------------------------------------------------------------------ RAUC's call sequences
def _call(argv: list[str], autoboot: Autoboot, state: SlotState, booted: str | None) -> tuple[
        str | None, Autoboot, SlotState]:
    reply = handle(argv, autoboot, state, booted)
    return reply.output, reply.autoboot or autoboot, reply.state or state


def test_install_then_trial_then_commit() -> None:
    """RAUC's install (mark the target bad, write, set it primary), the trial boot, mark-good."""
    autoboot, state = A_COMMITTED, SlotState()
    assert _call(["get-primary"], autoboot, state, "A")[0] == "A"
    _, autoboot, state = _call(["set-state", "B", "bad"], autoboot, state, "A")  # before writing the slot
    assert _call(["get-state", "B"], autoboot, state, "A")[0] == "bad"
    _, autoboot, state = _call(["set-primary", "B"], autoboot, state, "A")  # after writing it
    assert autoboot == A_COMMITTED, "installing never changes the committed slot"
    assert state == SlotState(pending="B")
    assert _call(["get-primary"], autoboot, state, "A")[0] == "B"
    assert _call(["get-state", "B"], autoboot, state, "A")[0] == "good"
    # The trial boot (firmware booted partition 3): mark-good = set-state <booted> good commits.
    assert _call(["get-current"], autoboot, state, "B")[0] == "B"
    _, autoboot, state = _call(["set-state", "B", "good"], autoboot, state, "B")
    assert autoboot == Autoboot(committed=3, trial=2) and state == SlotState()
    assert _call(["get-primary"], autoboot, state, "B")[0] == "B"


def test_install_then_trial_then_roll_back() -> None:
    autoboot, state = A_COMMITTED, SlotState(pending="B")
    _, autoboot, state = _call(["set-state", "B", "bad"], autoboot, state, "B")  # mark-bad on the trial boot
    assert autoboot == A_COMMITTED, "a failed trial leaves autoboot.txt alone: the next boot is the committed slot"
    assert state == SlotState(pending=None, bad=frozenset({"B"}))
    assert _call(["get-primary"], autoboot, state, "A")[0] == "A"
    assert _call(["get-state", "B"], autoboot, state, "A")[0] == "bad"
    # The next installation into B makes it good again and waiting.
    _, autoboot, state = _call(["set-primary", "B"], autoboot, state, "A")
    assert state == SlotState(pending="B")


def test_mark_good_on_a_normal_boot_commits_nothing() -> None:
    autoboot, state = A_COMMITTED, SlotState(pending="B", bad=frozenset({"A"}))
    _, autoboot2, state2 = _call(["set-state", "A", "good"], autoboot, state, "A")
    assert autoboot2 == A_COMMITTED and state2 == SlotState(pending="B")
    # Marking the other slot good without booting it does not commit it either.
    _, autoboot3, _ = _call(["set-state", "B", "good"], autoboot, state, "A")
    assert autoboot3 == A_COMMITTED


def test_set_primary_of_the_committed_slot_cancels_a_waiting_trial() -> None:
    _, autoboot, state = _call(["set-primary", "A"], A_COMMITTED, SlotState(pending="B"), "A")
    assert autoboot == A_COMMITTED and state == SlotState()


def test_a_pending_committed_slot_is_no_trial() -> None:
    """A commit interrupted between autoboot.txt and the state file: get-primary stays right."""
    autoboot = Autoboot(committed=3, trial=2)
    assert _call(["get-primary"], autoboot, SlotState(pending="B"), "B")[0] == "B"
    assert _call(["get-primary"], autoboot, SlotState(pending="A", bad=frozenset({"A"})), "B")[0] == "B"


@pytest.mark.parametrize(("argv", "problem"), [
    (["get-current"], "not known"),
    (["get-state", "C"], "unknown slot"),
    (["set-state", "A", "maybe"], "good or bad"),
    (["set-primary"], "argument"),
    (["reboot"], "unknown command"),
    ([], "unknown command"),
])
def test_bad_calls_are_errors(argv: list[str], problem: str) -> None:
    with pytest.raises(TrybootError) as caught:
        handle(argv, A_COMMITTED, SlotState(), None)
    assert problem in caught.value.message


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.sampled_from(["get-primary", "set-primary", "get-state", "set-state"]),
                          st.sampled_from(["A", "B"]), st.sampled_from(["good", "bad"]),
                          st.sampled_from(["A", "B"])), max_size=20))
def test_any_call_sequence_keeps_autoboot_valid(calls: list[tuple[str, str, str, str]]) -> None:
    """Whatever RAUC asks, autoboot.txt always names both slots, and only a good trial changes [all]."""
    autoboot, state = A_COMMITTED, SlotState()
    for command, slot, verdict, booted in calls:
        argv = {"get-primary": [command], "set-primary": [command, slot], "get-state": [command, slot],
                "set-state": [command, slot, verdict]}[command]
        before = autoboot
        _, autoboot, state = _call(argv, autoboot, state, booted)
        assert parse_autoboot(render_autoboot(autoboot)) == autoboot
        if autoboot.committed != before.committed:
            assert argv == ["set-state", booted, "good"] and booted != before.committed_slot


# --------------------------------------------------------------------------------- as RAUC runs it
def backend(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "kiosk.update.tryboot", "--root", str(root), *argv],
                          capture_output=True, text=True, timeout=60, env=env, check=False)


def test_the_backend_process_through_an_update(tmp_path: Path) -> None:
    root = scratch_root(tmp_path, partition=2)
    assert backend(root, "get-primary").stdout == "A\n"
    assert backend(root, "get-current").stdout == "A\n"
    for argv in (["set-state", "B", "bad"], ["set-primary", "B"]):
        result = backend(root, *argv)
        assert result.returncode == 0 and result.stdout == "", result.stderr
    assert (root / AUTOBOOT).read_bytes() == IMAGE_AUTOBOOT
    assert backend(root, "get-primary").stdout == "B\n"
    assert (root / STATE).stat().st_mode & 0o777 == 0o644
    # The trial boot: the firmware booted partition 3 with the tryboot flag.
    (root / DEVICE_TREE / "partition").write_bytes(cell(3))
    (root / DEVICE_TREE / "tryboot").write_bytes(cell(1))
    assert backend(root, "get-current").stdout == "B\n"
    assert backend(root, "set-state", "B", "good").returncode == 0
    assert parse_autoboot((root / AUTOBOOT).read_bytes()) == Autoboot(committed=3, trial=2)
    assert backend(root, "get-primary").stdout == "B\n"
    assert backend(root, "get-state", "A").stdout == "good\n"


def test_the_backend_process_reports_errors_on_stderr(tmp_path: Path) -> None:
    root = scratch_root(tmp_path, partition=None)
    result = backend(root, "get-current")
    assert result.returncode != 0 and result.stdout == "" and "not known" in result.stderr
    (root / AUTOBOOT).write_bytes(b"[all]\nboot_partition=2\n")
    result = backend(root, "get-primary")
    assert result.returncode != 0 and "tryboot_a_b" in result.stderr
    (root / AUTOBOOT).unlink()
    result = backend(root, "get-primary")
    assert result.returncode != 0 and "/bootfs" in result.stderr
    (root / AUTOBOOT).write_bytes(IMAGE_AUTOBOOT)
    (root / STATE).parent.mkdir(parents=True)
    (root / STATE).write_text("{not json")
    result = backend(root, "get-state", "A")
    assert result.returncode != 0 and "remove it" in result.stderr


def test_the_image_wrapper_runs_the_module_isolated() -> None:
    wrapper = (ROOT / "image" / "rauc" / "rauc-tryboot-backend").read_text()
    assert 'exec /opt/kiosk/venv/bin/python -I -m kiosk.update.tryboot "$@"' in wrapper
    conf = (ROOT / "image" / "rauc" / "system.conf").read_text()
    assert "bootloader=custom" in conf and "bootloader-custom-backend=/usr/lib/kiosk/rauc-tryboot-backend" in conf
    assert sorted(set(__import__("re").findall(r"^bootname=(\w+)$", conf, flags=__import__("re").M))) == ["A", "B"]

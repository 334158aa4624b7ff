"""The memory restart's rule (kiosk.recycle): grown past the budget since the start, and quiet long enough."""

from __future__ import annotations

from pathlib import Path

from kiosk.recycle import MemoryRecycle, resident_mib


def test_the_first_reading_is_the_baseline_and_growth_alone_is_not_enough() -> None:
    recycle = MemoryRecycle(above_mib=100, idle_seconds=60)
    assert recycle.due(0.0, 150.0) is None and recycle.baseline_mib == 150.0
    recycle.note(True, 0.0)
    assert recycle.due(100.0, 249.0) is None  # quiet long enough, 99 MiB over the start
    why = recycle.due(100.0, 250.0)
    assert why is not None and "100 MiB over the start" in why and "100 s" in why


def test_anything_but_quiet_starts_the_wait_again() -> None:
    recycle = MemoryRecycle(above_mib=10, idle_seconds=60)
    recycle.due(0.0, 100.0)
    recycle.note(True, 0.0)
    recycle.note(True, 50.0)  # still quiet: the wait counts from 0
    recycle.note(False, 55.0)  # a visitor pressed the button
    assert recycle.due(100.0, 500.0) is None
    recycle.note(True, 70.0)
    assert recycle.due(129.0, 500.0) is None
    assert recycle.due(130.0, 500.0) is not None


def test_zero_means_never_and_an_unknown_size_never_restarts() -> None:
    never = MemoryRecycle(above_mib=0, idle_seconds=10)
    never.due(0.0, 100.0)
    never.note(True, 0.0)
    assert never.due(1e6, 1e6) is None
    blind = MemoryRecycle(above_mib=10, idle_seconds=10)
    blind.note(True, 0.0)
    assert blind.due(100.0, None) is None and blind.baseline_mib is None


def test_resident_memory_is_read_from_proc_and_follows_what_the_process_touches() -> None:
    before = resident_mib()
    assert before is not None and before > 1.0
    block = bytearray(64 * 1024 * 1024)  # zero-filled: every page is touched
    after = resident_mib()
    assert after is not None and after - before >= 48.0
    del block


def test_an_unreadable_statm_gives_no_reading(tmp_path: Path) -> None:
    assert resident_mib(tmp_path / "missing") is None
    for text in ("", "12", "12 lots", "\x00\xff"):
        (tmp_path / "statm").write_text(text)
        assert resident_mib(tmp_path / "statm") is None
    (tmp_path / "statm").write_text("100 256 10 1 0 50 0\n")
    page_mib = resident_mib(tmp_path / "statm")
    assert page_mib is not None and page_mib > 0

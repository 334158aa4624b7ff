from __future__ import annotations

import random

import pytest

from kiosk.link.backoff import Backoff


def test_ceiling_grows_exponentially_and_caps() -> None:
    b = Backoff(base_seconds=0.5, max_seconds=4.0, rng=random.Random(1))
    ceilings = []
    for _ in range(6):
        ceilings.append(b.ceiling_seconds())
        b.next_delay_seconds()
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_full_jitter_stays_within_ceiling_and_spreads() -> None:
    b = Backoff(base_seconds=1.0, max_seconds=8.0, rng=random.Random(7))
    for _ in range(3):
        b.next_delay_seconds()
    delays = []
    for _ in range(2000):
        b.attempt = 3
        delays.append(b.next_delay_seconds())
    assert all(0.0 <= d <= 8.0 for d in delays)
    # Full jitter: uniform over [0, ceiling], so the mean is near half the ceiling and both ends are used.
    assert 3.6 < sum(delays) / len(delays) < 4.4
    assert min(delays) < 0.5 and max(delays) > 7.5


def test_seeded_rng_is_deterministic() -> None:
    a = Backoff(rng=random.Random(42))
    b = Backoff(rng=random.Random(42))
    assert [a.next_delay_seconds() for _ in range(5)] == [b.next_delay_seconds() for _ in range(5)]


def test_reset_after_success_starts_over() -> None:
    b = Backoff(base_seconds=0.25, max_seconds=10.0, rng=random.Random(3))
    for _ in range(5):
        b.next_delay_seconds()
    assert b.ceiling_seconds() == 8.0
    b.reset()
    assert b.ceiling_seconds() == 0.25
    assert b.next_delay_seconds() <= 0.25


def test_huge_attempt_count_does_not_overflow() -> None:
    b = Backoff(base_seconds=1.0, max_seconds=30.0, rng=random.Random(0))
    b.attempt = 10_000
    assert b.ceiling_seconds() == 30.0


@pytest.mark.parametrize(("base", "cap", "factor"), [(0.0, 1.0, 2.0), (2.0, 1.0, 2.0), (1.0, 2.0, 0.5)])
def test_bad_parameters_are_refused(base: float, cap: float, factor: float) -> None:
    with pytest.raises(ValueError, match="backoff needs"):
        Backoff(base_seconds=base, max_seconds=cap, factor=factor)

"""Exponential backoff with full jitter: pure, clock-free, with an injectable seeded RNG.

``delay = uniform(0, min(cap, base * factor ** attempt))`` ("full jitter"): many kiosks that lost the
same backend at the same moment spread their retries instead of arriving together. ``reset()`` after a
success starts the sequence again from the base.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

_LOGGER = logging.getLogger(__name__)


@dataclass
class Backoff:
    """Delays for successive retries; call ``next_delay_seconds()`` per failure and ``reset()`` on success."""

    base_seconds: float = 0.5
    max_seconds: float = 30.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def __post_init__(self) -> None:
        if self.base_seconds <= 0 or self.max_seconds < self.base_seconds or self.factor < 1:
            raise ValueError(
                f"backoff needs 0 < base_seconds <= max_seconds and factor >= 1, got base {self.base_seconds}, "
                f"max {self.max_seconds}, factor {self.factor}"
            )

    def ceiling_seconds(self) -> float:
        """The upper bound of the next delay (before jitter)."""
        # Cap the exponent so huge attempt counts never overflow a float.
        exponent = min(self.attempt, 64)
        return float(min(self.max_seconds, self.base_seconds * self.factor**exponent))

    def next_delay_seconds(self) -> float:
        """The delay before the next retry (full jitter), and count the attempt."""
        delay = self.rng.uniform(0.0, self.ceiling_seconds())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """A success: the next failure starts again from ``base_seconds``."""
        self.attempt = 0

"""Pytest plugin: ``virtual_clock``, ``mock_pin_factory`` and ``make_rig`` (the behaviour rig on virtual time)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from kiosk.clock import VirtualClock
from kiosk.dev.behaviour import Rig, build_rig


@pytest.fixture
def virtual_clock() -> VirtualClock:
    """A virtual clock at t = 0."""
    return VirtualClock()


@pytest.fixture
def mock_pin_factory() -> Iterator[Any]:
    """A gpiozero MockFactory with PWM-capable pins, reset afterwards."""
    from gpiozero.pins.mock import MockFactory, MockPWMPin

    factory = MockFactory(pin_class=MockPWMPin)
    yield factory
    factory.reset()


@pytest.fixture
async def make_rig() -> AsyncIterator[Callable[..., Awaitable[Rig]]]:
    """A rig factory (``await make(mode=...)``); every rig it built is closed afterwards."""
    rigs: list[Rig] = []

    async def make(**kwargs: Any) -> Rig:
        rig = await build_rig(**kwargs)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        await rig.aclose()

"""Pytest fixtures for the offline fallback (a pytest plugin listed in tests/conftest.py).

- ``message_endpoint``: a running stand-in message endpoint (``kiosk.dev.message_endpoint``) on loopback;
  its ``url`` attribute is the upload URL, its token is ``device-secret``.
- ``spool``: an empty message spool in the test's temporary directory, closed afterwards.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from kiosk.dev.message_endpoint import MessageEndpoint
from kiosk.fallback.spool import Spool


class RunningEndpoint(MessageEndpoint):
    """A started endpoint with its URL."""

    url: str = ""


@pytest_asyncio.fixture
async def message_endpoint() -> AsyncIterator[RunningEndpoint]:
    """A stand-in message endpoint listening on 127.0.0.1 (any free port) for the test's duration."""
    endpoint = RunningEndpoint()
    endpoint.url = await endpoint.start()
    try:
        yield endpoint
    finally:
        await endpoint.aclose()


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    """An empty spool under ``tmp_path/spool``."""
    with Spool(tmp_path / "spool") as opened:
        yield opened

"""Command: ``kiosk link check`` (ask the configured session API for a session, and optionally join it)."""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from kiosk.settings import Settings

_LOGGER = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``link check``."""
    link = subparsers.add_parser("link", help="session API and LiveKit link tools")
    link_sub = link.add_subparsers(dest="link_command", metavar="ACTION", required=True)
    check = link_sub.add_parser("check", help="ask the configured session API for a session (and join it)",
                                description="Check the catalog and open a session with the configured source "
                                            "and credential; with --join also connect and wait for the agent.")
    check.add_argument("--join", action="store_true", help="also join the room and wait for the agent's audio")
    check.set_defaults(handler=_cmd_check)


# ---------------------------------------------------------------------------------------- link check
def _cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    """``kiosk link check``."""
    return asyncio.run(_check(settings, join=args.join))


async def _check(settings: Settings, *, join: bool) -> int:
    from kiosk.events import Event, SessionOpened
    from kiosk.link.livekit import LiveKitRoomLink
    from kiosk.link.session_api import SessionApi, SessionRefused
    from kiosk.transport import redact_url

    api = SessionApi.from_settings(settings)
    if not join:
        try:
            grant = await api.open_session()
        except SessionRefused as error:
            print(f"refused ({error.reason.value}): {error.message}")
            return 1
        finally:
            await api.aclose()
        profile = grant.profile.llm_model if grant.profile else "-"
        print(f"session {grant.session_id} ({profile}) at {redact_url(grant.livekit_url)}, expires "
              f"{grant.expires_at:%H:%M:%S}")
        return 0

    events: list[Event] = []

    class _Discard:
        async def write(self, pcm: Any) -> None:
            """Agent audio is not played by the check."""

        def clear(self) -> None:
            """Nothing queued."""

    link = LiveKitRoomLink(settings, events.append, _Discard(), session_api=api)
    try:
        await link.open()
    finally:
        await link.aclose()
    for event in events:
        print(event)
    return 0 if any(isinstance(e, SessionOpened) for e in events) else 1

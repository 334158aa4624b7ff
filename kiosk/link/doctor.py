"""``kiosk doctor network``: the session API reachable, the catalog's status, a session and a LiveKit connect."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pydantic import SecretStr

from kiosk.checks import Check, Verdict
from kiosk.link.session_api import SessionApi, SessionRefused
from kiosk.settings import Settings

# Where provisioning puts the device credential (kiosk.service hands it over with LoadCredential=).
CREDENTIAL_FILE = Path("/etc/kiosk/credentials/device-credential")


async def _network(settings: Settings, open_session: bool) -> list[Check]:
    s = settings.session
    checks: list[Check] = []
    credential = s.credential.get_secret_value() if s.credential is not None else ""
    if not credential:
        checks.append(Check("network", "device credential", Verdict.FAIL, "no device credential is provisioned",
                            "put device-credential in kiosk-provision/ on the boot partition and reboot, or "
                            f"write {CREDENTIAL_FILE} as root (mode 0600); run kiosk doctor as root to read it"))
    else:
        checks.append(Check("network", "device credential", Verdict.OK, "present (not shown)"))
    client = SessionApi(s)
    try:
        if s.source.value == "voice_api":
            for profile in s.profiles:
                try:
                    status = await client.model_status(profile.llm_model)
                except SessionRefused as error:
                    unreachable = error.reason.value in ("unreachable", "timeout")
                    checks.append(Check("network", "session API" if unreachable else f"catalog {profile.llm_model}",
                                        Verdict.FAIL, error.message,
                                        "check the network, DNS and session.api_url" if unreachable else None))
                    if unreachable:
                        return checks
                    continue
                checks.append(Check("network", f"catalog {profile.llm_model}",
                                    Verdict.OK if status == "available" else Verdict.WARN,
                                    f"reachable at {s.api_url}; status {status}",
                                    None if status == "available" else "the kiosk uses the next profile or goes "
                                    "offline until the model is available", {"status": status}))
        if not open_session:
            checks.append(Check("network", "LiveKit connect", Verdict.SKIP, "not tried (--no-session)"))
            return checks
        try:
            grant = await client.open_session()
        except SessionRefused as error:
            checks.append(Check("network", "session", Verdict.FAIL, error.message))
            return checks
        checks.append(Check("network", "session", Verdict.OK, f"session {grant.session_id} granted"))
        checks.append(await _livekit_connect(grant.livekit_url, grant.token.get_secret_value(),
                                             s.request_timeout_seconds * 2))
    finally:
        await client.aclose()
    return checks


async def _livekit_connect(url: str, token: str, timeout_seconds: float) -> Check:
    try:
        from livekit import rtc
    except ImportError as error:
        return Check("network", "LiveKit connect", Verdict.SKIP, f"not available ({error.name})")
    room = rtc.Room()
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        await asyncio.wait_for(room.connect(url, token, rtc.RoomOptions(auto_subscribe=False)), timeout_seconds)
    except (TimeoutError, rtc.ConnectError) as error:
        return Check("network", "LiveKit connect", Verdict.FAIL, f"could not join the room at {url}: "
                     f"{error or 'timed out'}", "check that UDP and TCP to the LiveKit server pass the site firewall")
    finally:
        connect_ms = round(1000.0 * (loop.time() - started))
    await room.disconnect()
    return Check("network", "LiveKit connect", Verdict.OK, f"joined and left the room in {connect_ms} ms",
                 figures={"connect_ms": connect_ms})


def check_network(settings: Settings, open_session: bool = True,
                  credential_file: Path = CREDENTIAL_FILE) -> list[Check]:
    """Session API reachable, catalog status per profile, then a session and a LiveKit connect test."""
    credential = settings.session.credential
    if credential is None or not credential.get_secret_value():
        # Run by hand there is no $CREDENTIALS_DIRECTORY (only the service gets one): read the provisioned file.
        try:
            value = credential_file.read_text().strip()
        except OSError:
            value = ""
        if value:
            settings = settings.model_copy(
                update={"session": settings.session.model_copy(update={"credential": SecretStr(value)})})
    return asyncio.run(_network(settings, open_session))

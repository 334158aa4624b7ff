"""``kiosk doctor network`` and ``kiosk doctor security`` (the network side).

``network``: the session API reachable, the catalog's status, a session and a LiveKit connect.
``security``: ``security_checks`` reports what the settings expose on the venue's network: the transport rule
(TLS everywhere but loopback; ``security.allow_insecure_transport`` is a failure), secrets carried in URLs,
and whether ``/metrics`` and ``/status`` are served beyond this machine.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import SecretStr

from kiosk.checks import Check, Verdict
from kiosk.link.replies import describe_error
from kiosk.link.session_api import SessionApi, SessionRefused
from kiosk.settings import SessionSource, Settings
from kiosk.transport import PLAIN_SCHEMES, is_loopback, redact_url

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
    client = SessionApi.from_settings(settings)
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
                                    f"reachable at {redact_url(s.api_url)}; status {status}",
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
        return Check("network", "LiveKit connect", Verdict.FAIL, f"could not join the room at {redact_url(url)}: "
                     f"{describe_error(error) if str(error) else 'timed out'}",
                     "check that UDP and TCP to the LiveKit server pass the site firewall")
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


def _configured_urls(settings: Settings) -> dict[str, str]:
    urls = {"delivery.url": settings.delivery.url}
    if settings.session.source is SessionSource.TOKEN_ENDPOINT:
        urls["session.token_endpoint_url"] = settings.session.token_endpoint_url
    else:
        urls["session.api_url"] = settings.session.api_url
    return {name: url for name, url in urls.items() if url is not None}


def security_checks(settings: Settings) -> list[Check]:
    """What the settings expose on the venue's network: transport, secrets in URLs, metrics exposure."""
    checks: list[Check] = []
    urls = _configured_urls(settings)
    if settings.security.allow_insecure_transport:
        plain = [name for name, url in urls.items() if _plain(url) and _off_machine(url)]
        checks.append(Check(
            "security", "transport", Verdict.FAIL,
            "security.allow_insecure_transport is on: plain http/ws to other hosts is accepted, for the configured "
            "URLs and for the LiveKit URL the session API hands out"
            + (f" ({', '.join(plain)} in the clear now)" if plain else ""),
            "a development setting: remove it and use https:// and wss:// (a development stack only may keep it)"))
    else:
        local = [name for name, url in urls.items() if _plain(url)]
        summary = "TLS (https/wss) for every URL, configured or handed out by the session API"
        if local:
            summary += f"; plain only to this machine ({', '.join(local)})"
        checks.append(Check("security", "transport", Verdict.OK, summary))
    carrying = [name for name, url in urls.items() if redact_url(url) != url]
    if carrying:
        checks.append(Check(
            "security", "secrets in URLs", Verdict.WARN,
            f"{', '.join(carrying)} carry a secret (user:password@ or a token in the query); it is redacted in "
            "logs and errors but stored in the settings and sent wherever the URL goes",
            "give the secret as the device credential (systemd credential 'device-credential') instead"))
    else:
        checks.append(Check("security", "secrets in URLs", Verdict.OK, "no configured URL carries a secret"))
    m = settings.metrics
    if not m.enabled:
        checks.append(Check("security", "metrics exposure", Verdict.OK, "/metrics and /status are not served"))
    elif is_loopback(m.host):
        checks.append(Check("security", "metrics exposure", Verdict.OK,
                            f"/metrics and /status only on this machine ({m.host}:{m.port})"))
    else:
        checks.append(Check(
            "security", "metrics exposure", Verdict.WARN,
            f"/metrics and /status are served to the network on {m.host}:{m.port} (metrics.expose_beyond_loopback): "
            "no personal data, but anyone there can read the kiosk's state and usage",
            "set metrics.host = \"127.0.0.1\" and scrape through an SSH tunnel or a local agent"))
    return checks


def _plain(url: str) -> bool:
    """Plain http/ws, whichever host."""
    return urlsplit(url).scheme.lower() in PLAIN_SCHEMES


def _off_machine(url: str) -> bool:
    return not is_loopback(urlsplit(url).hostname)

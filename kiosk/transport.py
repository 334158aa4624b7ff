"""Transport rules for every URL the kiosk talks to: TLS except on loopback, and no secrets in text.

The kiosk stands on a venue's shared network: a plain ``http://`` or ``ws://`` connection there can be read
and changed by anyone on it (the device credential, the visitor's voice, the agent's answers). So every
URL, configured or handed back by the session API, must be ``https://``/``wss://`` unless it points at
the kiosk itself (loopback) or ``security.allow_insecure_transport`` is set for a development stack
(``kiosk doctor security`` reports that as a failure).

``redact_url`` removes what a URL may carry that is secret (``user:password@``, a ``?token=``) before it
reaches a log line, an error message or ``kiosk config``.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from kiosk.errors import KioskError

SECURE_SCHEMES = ("https", "wss")
PLAIN_SCHEMES = ("http", "ws")
# Query parameters whose values are secret (compared in lower case, ignoring - and _).
_SECRET_PARAMETERS = re.compile(r"^(access)?token$|^(api)?key$|^secret$|^password$|^passwd$|^sig(nature)?$|^auth"
                                r"(orization)?$|^credential$|^jwt$|^session$")
REDACTED = "***"


class InsecureTransport(KioskError):
    """A URL would send the kiosk's traffic in the clear across a shared network."""

    def __init__(self, message: str) -> None:
        super().__init__("insecure_transport", message)


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` is this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_secure(url: str, what: str, *, allow_insecure: bool) -> None:
    """Raise ``InsecureTransport`` if ``url`` is plain http/ws to a host other than this machine.

    ``what`` names the URL for the message (e.g. "session.api_url"); ``allow_insecure`` is
    ``security.allow_insecure_transport`` (a development stack on a private network).
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in SECURE_SCHEMES or allow_insecure:
        return
    if scheme in PLAIN_SCHEMES and is_loopback(parts.hostname):
        return
    secure = "wss" if scheme == "ws" else "https"
    raise InsecureTransport(
        f"{what} is {redact_url(url)}: plain {scheme or 'unknown-scheme'} can be read and changed by anyone on the "
        f"venue's network; use {secure}://, or (a development stack only) set security.allow_insecure_transport")


def _secret_parameter(name: str) -> bool:
    return bool(_SECRET_PARAMETERS.match(name.lower().replace("-", "").replace("_", "")))


def redact_url(url: str) -> str:
    """``url`` with its user info and secret query values replaced by ``***`` (safe to log)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, REDACTED if _secret_parameter(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, "" if "=" in parts.fragment else parts.fragment))

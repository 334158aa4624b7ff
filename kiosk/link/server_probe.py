"""Is the LiveKit server there? A plain ``GET /`` on its URL, to tell a restarted server from a slow network.

While the rtc SDK reconnects, the room link asks this every ``PROBE_INTERVAL_SECONDS``. A server seen down
(connection refused, or a gateway in front of it answering 502-504) and then answering again has restarted:
its rooms, and the agent's job with them, are gone, and waiting for the SDK's own reconnect backoff and then for
an agent that may never rejoin keeps the visitor in silence for seconds (docs/livekit.md, "Reconnect policy").
A slow or absent network (timeouts, no route, a name that does not resolve), a TLS failure or any other reply
says nothing either way (``UNKNOWN``): the SDK's reconnect goes on as before.

Only the status line of the reply is used; the body is never read and redirects are not followed.
"""

from __future__ import annotations

import enum
import errno
from urllib.parse import urlsplit, urlunsplit

import aiohttp

PROBE_INTERVAL_SECONDS = 0.25
PROBE_TIMEOUT_SECONDS = 1.0
# A reverse proxy or load balancer in front of a server that is down answers these.
GATEWAY_DOWN = frozenset({502, 503, 504})


class ServerAnswer(enum.Enum):
    """What one probe says about the server."""

    UP = "up"  # a 2xx to GET /
    DOWN = "down"  # refused, or a gateway saying the server behind it is down
    UNKNOWN = "unknown"  # anything else: the network, TLS, a timeout, another status, a reply that is not HTTP


def probe_url(livekit_url: str) -> str:
    """The HTTP(S) root of a ``ws(s)://`` LiveKit URL, without its path, query and credentials."""
    parts = urlsplit(livekit_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((scheme, netloc, "/", "", ""))


async def probe(http: aiohttp.ClientSession, url: str, timeout_seconds: float = PROBE_TIMEOUT_SECONDS) -> ServerAnswer:
    """Ask ``url`` (from ``probe_url``) once; never raises for what the network or the server does."""
    try:
        async with http.get(url, allow_redirects=False,
                            timeout=aiohttp.ClientTimeout(total=timeout_seconds)) as reply:
            status = reply.status
    except aiohttp.ClientConnectorError as error:
        refused = isinstance(error.os_error, ConnectionRefusedError) or error.os_error.errno == errno.ECONNREFUSED
        return ServerAnswer.DOWN if refused else ServerAnswer.UNKNOWN
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError, UnicodeError):
        return ServerAnswer.UNKNOWN
    if 200 <= status < 300:
        return ServerAnswer.UP
    return ServerAnswer.DOWN if status in GATEWAY_DOWN else ServerAnswer.UNKNOWN

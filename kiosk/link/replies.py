"""Replies from servers the kiosk does not control: bounded, never followed elsewhere, never fatal.

The session API, the token endpoint and the message endpoint are reached across a venue's network and
may be broken or hostile (docs/security.md, "The network"). Everything here turns what such a server can
send into a value or a ``BadReply`` the caller maps to its own failure (the session API's
``malformed_reply``, a delivery attempt that is not acknowledged); nothing it sends may end the process:

- ``client_session``: an aiohttp session that asks for uncompressed bodies and does not inflate them
  (a small compressed body cannot grow into a large one), with aiohttp's header limits; callers pass
  ``allow_redirects=False`` on every request (a redirect is an answer, not an instruction);
- ``read_capped``: a body read up to a byte limit (``Content-Length`` checked first, then counted while
  streaming), never whole into memory;
- ``parse_json``: JSON with a depth limit (deep nesting is refused, not a ``RecursionError``);
- ``parse_retry_after``: ``Retry-After`` as delta-seconds or an HTTP date, clamped to
  ``RETRY_AFTER_MAX_SECONDS`` (``1e12``, ``NaN``, ``-5`` and nonsense are ignored);
- ``describe_error``: one printable, bounded line for an exception, every URL in it redacted.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
from datetime import UTC, datetime
from typing import Any

import aiohttp

from kiosk.transport import redact_url

# Largest reply body read from the session API or the token endpoint (a session reply is about 1 KB).
MAX_REPLY_BYTES = 64 * 1024
# Bytes of an error reply kept for the message.
EXCERPT_BYTES = 200
# Deepest JSON nesting accepted (the replies the kiosk reads are two levels deep).
MAX_JSON_DEPTH = 32
# Longest wait a server's Retry-After can ask for: a longer one is clamped, so no reply can keep the kiosk
# offline for long.
RETRY_AFTER_MAX_SECONDS = 300.0
# Longest line of text taken from an exception or a reply into a message.
MAX_DESCRIPTION_CHARS = 300

_DELTA_SECONDS = re.compile(r"^\d{1,12}(\.\d{1,6})?$")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


class BadReply(Exception):
    """A reply the kiosk refuses to use (too large, not JSON, too deeply nested); ``str()`` says which."""


def client_session(timeout_seconds: float) -> aiohttp.ClientSession:
    """An HTTP client for untrusted servers: a total timeout per request, uncompressed bodies only."""
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_seconds), auto_decompress=False,
                                 headers={"Accept-Encoding": "identity"})


async def read_capped(response: aiohttp.ClientResponse, max_bytes: int, *, truncate: bool = False) -> bytes:
    """At most ``max_bytes`` of the body; more raises ``BadReply`` (or, with ``truncate``, is left unread)."""
    declared = response.content_length
    if declared is not None and declared > max_bytes and not truncate:
        raise BadReply(f"the reply declares {declared} bytes, more than the {max_bytes} the kiosk reads")
    body = bytearray()
    while len(body) <= max_bytes:
        chunk = await response.content.read(max_bytes + 1 - len(body))
        if not chunk:
            return bytes(body)
        body += chunk
    if truncate:
        return bytes(body[:max_bytes])
    raise BadReply(f"the reply is longer than the {max_bytes} bytes the kiosk reads")


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth > MAX_JSON_DEPTH:
                return depth
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_json(body: bytes) -> Any:
    """The JSON value in ``body``; ``BadReply`` if it is not JSON or nests deeper than ``MAX_JSON_DEPTH``."""
    try:
        value = json.loads(body)
    except RecursionError:
        raise BadReply(f"the reply nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as error:  # includes UnicodeDecodeError and json.JSONDecodeError
        raise BadReply(f"the reply is not JSON ({describe_error(error)})") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise BadReply(f"the reply nests deeper than {MAX_JSON_DEPTH} levels")
    return value


def parse_retry_after(value: str | None, now: datetime | None = None,
                      max_seconds: float = RETRY_AFTER_MAX_SECONDS) -> float | None:
    """Seconds from a ``Retry-After`` header, clamped to ``[0, max_seconds]``; None if absent or unreadable.

    Delta-seconds (digits, a decimal fraction tolerated) or an HTTP date. Anything else (``1e12``, ``-5``,
    ``NaN``, ``inf``) is unreadable: the caller's own backoff decides instead.
    """
    if not value:
        return None
    value = value.strip()
    if _DELTA_SECONDS.match(value):
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), max_seconds)


def printable(text: str, limit: int = MAX_DESCRIPTION_CHARS) -> str:
    """``text`` on one line of printable ASCII, URLs redacted, at most ``limit`` characters."""
    text = _URL.sub(lambda m: redact_url(m.group()), text)
    text = _UNPRINTABLE.sub("?", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_error(error: BaseException) -> str:
    """One bounded line naming an exception (its type and text), with URLs redacted (safe to log)."""
    if isinstance(error, aiohttp.ClientResponseError):
        # Its str() carries the request URL (with any secret query); the URL is not needed here.
        text = f"{type(error).__name__}: {error.status} {error.message}"
    else:
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return printable(text)


def excerpt(body: bytes) -> str:
    """A short printable excerpt of an error reply's body (for a message)."""
    return printable(body[:EXCERPT_BYTES].decode("utf-8", errors="replace"), EXCERPT_BYTES)

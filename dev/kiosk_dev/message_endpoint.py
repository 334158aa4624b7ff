"""A stand-in message endpoint (aiohttp) for the demo and the tests: the receiving side of delivery.

It implements the protocol in docs/offline.md the way an operator's endpoint should: it checks the
bearer token (delivery's own credential), verifies the sealed file against the checksum in the metadata,
refuses anything that is not a sealed message (a kiosk must never send plain audio), stores each
``Idempotency-Key`` once and answers 2xx to a repeat (``201`` first time, ``200`` for a duplicate). Given the
operator's private key (``private_key``, ``--private-key FILE``) it also opens each message, refuses one that
does not open to a 16 kHz mono WAV, and keeps the WAV (and the agent's note, opened, when one came along), so
tests can prove the audio arrived intact. ``faults``
scripts misbehaviour, one entry consumed per request:

- ``fail``: answer 500 without storing;
- ``slow``: wait ``slow_seconds`` (past the kiosk's timeout) without storing;
- ``slow_after_store``: store, then wait ``slow_seconds`` before answering (the ack is lost to a timeout);
- ``drop_after_store``: store, then close the connection without an answer (the ack is lost);
- ``ok`` (or an empty script): behave.

``GET /health`` answers 200 (a probe target for tests of the offline probe); ``GET /received`` reports
what arrived (``summary()``), for tests whose endpoint runs in another process or namespace;
``POST /script {"faults": [...]}`` appends to the fault script at run time (the field bench).

Run alone: ``python -m kiosk_dev.message_endpoint --host H --port P [--private-key FILE] [--faults fail,ok,...]``
prints the upload URL and serves until killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import socket
import threading
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import BodyPartReader, web

from kiosk.errors import KioskError
from kiosk.fallback.sealing import MAGIC, unseal
from kiosk.fallback.spool import decode_message

_LOGGER = logging.getLogger(__name__)

FAULTS = frozenset({"ok", "fail", "slow", "slow_after_store", "drop_after_store"})

# The delivery credential the stand-in expects unless told otherwise (the demo's settings use it too).
DEFAULT_TOKEN = "dev-delivery-credential"


@dataclass(frozen=True)
class Received:
    """One stored message: the sealed file as sent and, with the operator's key, the WAV inside."""

    key: str
    metadata: dict[str, object]
    audio: bytes
    wav: bytes | None = None
    note: bytes | None = None  # the agent's sealed note (take_message), as sent
    note_text: str | None = None  # opened with the operator's key


@dataclass
class MessageEndpoint:
    """The stand-in endpoint; ``start()`` returns its URL."""

    token: str | None = DEFAULT_TOKEN
    private_key: bytes | None = None  # the operator's; None: store what arrives without opening it
    faults: deque[str] = field(default_factory=deque)
    slow_seconds: float = 3.0
    stored: dict[str, Received] = field(default_factory=dict)
    posts: Counter[str] = field(default_factory=Counter)  # requests per idempotency key
    store_count: Counter[str] = field(default_factory=Counter)  # times a key was stored (must stay 1)
    rejected: int = 0
    _runner: web.AppRunner | None = None

    def script(self, faults: Iterable[str]) -> None:
        """Append faults to the script."""
        self.faults.extend(faults)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            self.rejected += 1
            return web.json_response({"error": "bad credential"}, status=401)
        key = request.headers.get("Idempotency-Key", "")
        fault = self.faults.popleft() if self.faults else "ok"
        self.posts[key] += 1
        meta: dict[str, object] = {}
        audio = b""
        note: bytes | None = None
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    continue
                if part.name == "metadata":
                    loaded = json.loads(await part.text())
                    meta = loaded if isinstance(loaded, dict) else {}
                elif part.name == "audio":
                    audio = bytes(await part.read())
                elif part.name == "note":
                    note = bytes(await part.read())
        except (ValueError, AssertionError, RuntimeError) as error:
            self.rejected += 1
            return web.json_response({"error": f"not a multipart upload: {error}"}, status=400)
        if not key or meta.get("id") != key or hashlib.sha256(audio).hexdigest() != meta.get("sha256"):
            self.rejected += 1
            return web.json_response({"error": "key, metadata and audio do not match"}, status=400)
        if not audio.startswith(MAGIC):
            self.rejected += 1
            return web.json_response({"error": "not a sealed message: plain audio is never accepted"}, status=400)
        if (note is None) != ("note_sha256" not in meta) or (
                note is not None and (hashlib.sha256(note).hexdigest() != meta.get("note_sha256")
                                      or not note.startswith(MAGIC))):
            self.rejected += 1
            return web.json_response({"error": "the note and its metadata do not match (or it is not sealed)"},
                                     status=400)
        wav = None
        note_text = None
        if self.private_key is not None:
            try:
                wav = unseal(audio, self.private_key)
                decode_message(wav)
                if note is not None:
                    note_text = unseal(note, self.private_key).decode("utf-8")
            except (KioskError, UnicodeDecodeError) as error:
                self.rejected += 1
                why = error.message if isinstance(error, KioskError) else "the note is not UTF-8 text"
                return web.json_response({"error": f"the message does not open: {why}"}, status=400)
        if fault == "fail":
            return web.json_response({"error": "scripted failure"}, status=500)
        if fault == "slow":
            await asyncio.sleep(self.slow_seconds)
            return web.json_response({"error": "too late"}, status=503)
        duplicate = key in self.stored
        if not duplicate:
            self.stored[key] = Received(key, meta, audio, wav, note, note_text)
            self.store_count[key] += 1
        if fault == "slow_after_store":
            await asyncio.sleep(self.slow_seconds)
        elif fault == "drop_after_store":
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=200)
        return web.json_response({"id": key, "duplicate": duplicate}, status=200 if duplicate else 201)

    async def _health(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    def summary(self) -> dict[str, object]:
        """What arrived, for tests whose endpoint runs elsewhere.

        By key: the SHA-256 of each stored (sealed) message, stores and requests; rejections; and with the
        operator's key, each opened WAV's SHA-256 and length in seconds.
        """
        opened = {k: {"sha256": hashlib.sha256(v.wav).hexdigest(), "seconds": len(decode_message(v.wav)) / 16000}
                  for k, v in self.stored.items() if v.wav is not None}
        notes = {k: {"sha256": hashlib.sha256(v.note).hexdigest(), "opened_chars": len(v.note_text or "")}
                 for k, v in self.stored.items() if v.note is not None}
        return {"stored": {k: hashlib.sha256(v.audio).hexdigest() for k, v in self.stored.items()},
                "opened": opened, "notes": notes, "store_count": dict(self.store_count), "posts": dict(self.posts),
                "rejected": self.rejected}

    async def _received(self, _request: web.Request) -> web.Response:
        return web.json_response(self.summary())

    async def _script(self, request: web.Request) -> web.Response:
        body = await request.json()
        faults = body.get("faults") if isinstance(body, dict) else None
        if not isinstance(faults, list) or not all(f in FAULTS for f in faults):
            return web.json_response({"error": f"give {{'faults': [...]}} with each one of {sorted(FAULTS)}"},
                                     status=400)
        self.script(faults)
        return web.json_response({"queued": len(self.faults)})

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen and return the upload URL."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/messages", self._handle)
        app.router.add_get("/health", self._health)
        app.router.add_get("/received", self._received)
        app.router.add_post("/script", self._script)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        # Bind first so port 0 (any free port) can be reported.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        bound = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return f"http://{host}:{bound}/messages"

    async def aclose(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@contextlib.contextmanager
def endpoint_in_thread(endpoint: MessageEndpoint, host: str = "127.0.0.1") -> Iterator[str]:
    """Run ``endpoint`` on its own loop in a thread (for tests whose kiosk side is another process)."""
    loop = asyncio.new_event_loop()
    ready: asyncio.Future[str] = loop.create_future()

    async def main(stop: asyncio.Event) -> None:
        ready.set_result(await endpoint.start(host))
        await stop.wait()
        await endpoint.aclose()

    stop = asyncio.Event()
    # Thread boundary: the endpoint's loop lives in this thread; the test talks to it only by HTTP and
    # reads its counters after the work is done.
    thread = threading.Thread(target=loop.run_until_complete, args=(main(stop),), daemon=True)
    thread.start()
    url = asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.shield(ready), 10), loop).result()
    try:
        yield url
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def main(argv: list[str] | None = None) -> int:
    """Serve a stand-in endpoint until killed; print its upload URL first."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kiosk_dev.message_endpoint")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default=DEFAULT_TOKEN, help="the delivery credential to expect")
    parser.add_argument("--private-key", type=Path, default=None, metavar="FILE",
                        help="the operator's private key: open each message and refuse one that does not open")
    parser.add_argument("--faults", default="", help="comma-separated fault script (fail, slow, ...)")
    parser.add_argument("--slow-seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    from kiosk.fallback.sealing import read_private_key

    key = read_private_key(args.private_key) if args.private_key is not None else None
    endpoint = MessageEndpoint(token=args.token or None, private_key=key, slow_seconds=args.slow_seconds)
    endpoint.script(f for f in args.faults.split(",") if f)

    async def serve() -> None:
        print(await endpoint.start(args.host, args.port), flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

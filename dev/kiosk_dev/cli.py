"""The development commands, added to ``kiosk`` through the ``kiosk.commands`` entry point.

``kiosk bundle`` (``kiosk_dev.bundle``: the operator's signing key and signed provisioning bundles),
``kiosk release`` (``kiosk_dev.release``: the update CA and signed A/B update bundles),
``kiosk demo`` (``kiosk_dev.demo``), ``kiosk panel`` (``kiosk_dev.panel``), ``kiosk bench ...``
(``kiosk_dev.bench.cli``) and, here, ``kiosk dev stack``: the local stack (private network, LiveKit
server, stand-in API and agent). With a command after ``--`` the command runs inside the kiosk-side
private network with ``KIOSK_SESSION__API_URL`` and ``KIOSK_SESSION__CREDENTIAL`` pointing at the
stand-in API, and the stack stops when it exits (e.g. ``kiosk dev stack -- kiosk link check --join``).
Without one the stack runs until interrupted. Needs root (private network namespace).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import threading

from kiosk.settings import Settings

_LOGGER = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add every development command."""
    from kiosk_dev import bundle, demo, panel, release
    from kiosk_dev.bench import cli as bench_cli

    bundle.register(subparsers)
    release.register(subparsers)
    demo.register(subparsers)
    panel.register(subparsers)
    bench_cli.register(subparsers)
    dev = subparsers.add_parser("dev", help="local development stack")
    dev_sub = dev.add_subparsers(dest="dev_command", metavar="ACTION", required=True)
    stack = dev_sub.add_parser(
        "stack", help="run the local LiveKit stack (optionally a command inside its network)",
        description="Start a private network namespace with the real livekit-server, the stand-in voice-session "
                    "API and the stand-in agent; run COMMAND inside it (pointed at the stack) or wait for Ctrl-C.")
    stack.add_argument("--api-port", type=int, default=8080, help="port of the stand-in session API")
    stack.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS... to run inside the network")
    stack.set_defaults(handler=_cmd_stack)


def _cmd_stack(args: argparse.Namespace, settings: Settings) -> int:
    """``kiosk dev stack``."""
    from kiosk_dev.stack import LocalStack

    command = [a for a in args.command if a != "--"] if args.command else []
    with LocalStack(api_port=args.api_port) as stack:
        print(f"LiveKit server {stack.livekit_url}; stand-in session API {stack.api_url}", flush=True)
        if command:
            # The stack's private network is plain http/ws between two namespaces of this machine.
            env = {**os.environ, "KIOSK_SESSION__API_URL": stack.api_url,
                   "KIOSK_SESSION__CREDENTIAL": stack.credential, "KIOSK_SECURITY__ALLOW_INSECURE_TRANSPORT": "true"}
            return subprocess.run(command, env=env, check=False).returncode
        print("running; Ctrl-C stops it", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0

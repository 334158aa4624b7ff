"""Logging to stderr in a journald-friendly format (journald adds the time; priority prefixes map levels)."""

from __future__ import annotations

import logging
import os
import sys

# sd-daemon(3) priority prefixes: journald reads "<N>" at the start of a line as the priority.
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class _JournalFormatter(logging.Formatter):
    """``<prio>logger: message`` under journald, ``time level logger: message`` on a terminal."""

    def __init__(self, journal: bool) -> None:
        fmt = "%(name)s: %(message)s" if journal else "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
        super().__init__(fmt)
        self._journal = journal

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if self._journal:
            prio = _PRIORITY.get(record.levelno, 6)
            return "\n".join(f"<{prio}>{part}" for part in line.splitlines())
        return line


def setup_logging(level: str = "INFO") -> None:
    """Send every logger's records to stderr; under systemd (JOURNAL_STREAM set) use priority prefixes."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JournalFormatter(journal=bool(os.environ.get("JOURNAL_STREAM"))))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())

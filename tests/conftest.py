"""Shared fixtures: each area's fixtures live in the package (kiosk.dev) so the demo can use them too."""

from __future__ import annotations

pytest_plugins = ["kiosk.dev.pulse", "kiosk.dev.panel_fixtures", "kiosk.dev.stack", "kiosk.dev.fallback_fixtures"]

"""Shared fixtures: pytest plugins under tests/fixtures (the development code they use is in dev/kiosk_dev)."""

from __future__ import annotations

pytest_plugins = ["fixtures.pulse", "fixtures.panel", "fixtures.stack", "fixtures.fallback", "fixtures.tools",
                  "fixtures.early"]

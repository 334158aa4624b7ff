"""How the ``kiosk`` program ends: without finalising the interpreter once the rtc SDK's native threads exist."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_PROGRAM = """
import atexit, sys
atexit.register(lambda: print("finalised", flush=True))
from kiosk.__main__ import run
sys.argv = ["kiosk", "--config", sys.argv[1], "config"]
run()
"""


def _run(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _PROGRAM, str(config)], capture_output=True, text=True, timeout=120)


def test_the_program_leaves_without_finalising_and_keeps_its_output_and_status(tmp_path: Path) -> None:
    """The SDK's threads could call into a finalising interpreter and abort the process after its work was done
    (seen: ``kiosk audio process`` exiting -6 after writing its output). The commands load the SDK (the link
    registers its own), so ``run`` leaves with ``os._exit``: atexit handlers do not run, the output is flushed
    whole, and the status is the command's."""
    config = tmp_path / "kiosk.toml"
    config.write_text("")
    done = _run(config)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("}") and '"audio"' in done.stdout
    assert "finalised" not in done.stdout
    config.write_text("[audio]\nno_such_setting = 1\n")
    broken = _run(config)
    assert broken.returncode == 2 and "finalised" not in broken.stdout, broken.stderr

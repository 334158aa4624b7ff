"""The house's one direction: the product (``kiosk``) never imports development code, and its wheel is the product.

Development code (the local stack, stand-ins, benchmarks: ``kiosk_dev``) and the test tools sit above the
product; a Pi installs only the product's wheel. These tests read the imports of every product module, import
all of them with the development packages absent, and build the wheel.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import kiosk

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = Path(kiosk.__file__).parent
# Never imported by the product: development code, test tools, and what only they need (the room corpus's
# optional benchmark variants included: the Silero onset check and the native AEC3 binding).
FORBIDDEN = ("kiosk_dev", "pytest", "_pytest", "hypothesis", "pyroomacoustics", "fixtures", "livekit.api",
             "onnxruntime", "silero_vad", "pywebrtc_audio")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def test_product_modules_import_no_development_code() -> None:
    offenders = {str(path.relative_to(ROOT)): sorted(n for n in _imports(path) if _forbidden(n))
                 for path in PRODUCT.rglob("*.py")}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from kiosk_dev.stack import LocalStack\n    from livekit import api\n")
    assert sorted(n for n in _imports(module) if _forbidden(n)) == ["kiosk_dev.stack", "kiosk_dev.stack.LocalStack",
                                                                    "livekit.api"]


_BLOCKER = """
import importlib, pkgutil, sys
for name in {forbidden!r}:
    sys.modules[name] = None  # importing it raises ImportError, as when it is not installed
import kiosk
for info in pkgutil.walk_packages(kiosk.__path__, "kiosk."):
    if info.name != "kiosk.__main__":
        importlib.import_module(info.name)
import kiosk.__main__
print("imported", len([m for m in sys.modules if m.startswith("kiosk")]))
"""


def test_every_product_module_imports_without_the_development_packages() -> None:
    code = _BLOCKER.format(forbidden=list(FORBIDDEN))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("imported ")


def test_the_cli_adds_development_commands_only_from_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    from kiosk import __main__ as cli

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    commands = set(cli.build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert commands == {"config", "run", "audio", "devices", "link", "messages", "cues", "doctor", "selftest",
                        "update"}
    monkeypatch.undo()
    everything = set(cli.build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert {"demo", "panel", "bench", "dev", "bundle", "release"} <= everything


@pytest.mark.slow
def test_the_wheel_holds_only_the_product(tmp_path: Path) -> None:
    # No build isolation: the build tools are in the environment already, and the tests may run in a private
    # network namespace with no index to fetch them from.
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                             "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("kiosk-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"kiosk", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    assert "kiosk/data/cues/en/offline.wav" in names and "kiosk/py.typed" in names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("/METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert not [r for r in requires if r.startswith(("livekit-api", "pytest", "pyroomacoustics"))], requires

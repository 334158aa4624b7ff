"""Supply chain: the locks agree with the declarations, every pin is hashed, installs never skip the hashes,
the product declares what it imports, the Pi's wheelhouse is chosen for the Pi, and livekit-server is built
only from the pinned module and used only while it matches its recorded SHA-256."""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import os
import re
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from kiosk_dev.livekit_server import LIVEKIT_VERSION, LiveKitServerError, find_binary
from kiosk_dev.wheelhouse import (
    SOURCE_ONLY,
    LockError,
    Pin,
    for_target,
    manylinux_platforms,
    missing,
    parse_lock,
    target_environment,
)

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = ROOT / "requirements"
BOOTSTRAP = ROOT / "scripts" / "bootstrap"
DEV_MACHINE = target_environment("3.11", "x86_64")
PI = target_environment("3.13", "aarch64")
# Imported by the product only behind `except ImportError` (an optional speed-up, not a dependency).
OPTIONAL_IMPORTS = {"pyudev"}


def _lock(name: str) -> list[Pin]:
    return parse_lock((REQUIREMENTS / name).read_text())


def _pyproject(path: Path) -> dict[str, object]:
    data: dict[str, object] = tomllib.loads(path.read_text())
    return data


def _declared(path: Path, extra: str | None = None) -> list[Requirement]:
    project = _pyproject(path)["project"]
    assert isinstance(project, dict)
    found = [Requirement(r) for r in project["dependencies"]]
    if extra:
        found += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return [r for r in found if canonicalize_name(r.name) not in ("kiosk", "kiosk-dev")]


def _check_satisfied(requirements: list[Requirement], pins: list[Pin], where: str) -> None:
    versions = {p.name: p.version for p in pins}
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in versions, f"{requirement} is declared but not in {where}: run scripts/lock"
        assert requirement.specifier.contains(versions[name], prereleases=True), \
            f"{where} pins {name}=={versions[name]}, outside {requirement}: run scripts/lock"


# ------------------------------------------------------------------------------------------ the locks
@pytest.mark.parametrize("name", ["kiosk.lock", "dev.lock", "build.lock"])
def test_every_pin_is_exact_and_hashed(name: str) -> None:
    pins = _lock(name)
    assert pins and all(p.hashes for p in pins)
    # The local packages are never resolved from an index (a package there with the same name would win).
    assert not {"kiosk", "kiosk-dev"} & {p.name for p in pins}
    assert "-e " not in (REQUIREMENTS / name).read_text()


@pytest.mark.parametrize("environment", [DEV_MACHINE, PI], ids=["python3.11-x86_64", "python3.13-aarch64"])
def test_the_locks_satisfy_the_declarations(environment: dict[str, str]) -> None:
    product = for_target(_lock("kiosk.lock"), environment)
    _check_satisfied(_declared(ROOT / "pyproject.toml"), product, "requirements/kiosk.lock")
    dev = for_target(_lock("dev.lock"), environment)
    _check_satisfied(_declared(ROOT / "pyproject.toml"), dev, "requirements/dev.lock")
    _check_satisfied(_declared(ROOT / "dev" / "pyproject.toml", "test"), dev, "requirements/dev.lock")
    build_system = _pyproject(ROOT / "pyproject.toml")["build-system"]
    assert isinstance(build_system, dict)
    _check_satisfied([Requirement(r) for r in build_system["requires"]], for_target(_lock("build.lock"), environment),
                     "requirements/build.lock")
    # The tests run against the versions the Pi gets.
    dev_versions = {p.name: p.version for p in dev}
    assert {p.name: dev_versions.get(p.name) for p in product} == {p.name: p.version for p in product}


def test_the_lock_check_catches_a_stale_lock() -> None:
    pins = [Pin("numpy", "1.20.0", None, ("sha256:" + "0" * 64,))]
    with pytest.raises(AssertionError, match="outside numpy>=1.26"):
        _check_satisfied([Requirement("numpy>=1.26")], pins, "x")
    with pytest.raises(AssertionError, match="not in x"):
        _check_satisfied([Requirement("pynacl>=1.5")], pins, "x")


@pytest.mark.parametrize(("text", "why"), [
    ("numpy>=1.26 --hash=sha256:" + "0" * 64, "not pinned"),
    ("numpy==2.0", "no sha256 hash"),
    ("-e .", "editable"),
    ("--index-url https://example.org/simple", "options"),
])
def test_the_lock_parser_refuses_what_pip_would_not_hash(text: str, why: str) -> None:
    with pytest.raises(LockError, match=why):
        parse_lock(text + "\n")


def test_the_product_declares_every_package_it_imports() -> None:
    """``jwt`` was imported and not declared; every third-party import now names a declared distribution."""
    imported: set[str] = set()
    for path in (ROOT / "kiosk").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = {n for n in imported if n not in sys.stdlib_module_names and n != "kiosk"} - OPTIONAL_IMPORTS
    declared = {canonicalize_name(r.name) for r in _declared(ROOT / "pyproject.toml")}
    providers = importlib.metadata.packages_distributions()
    undeclared = {m: providers.get(m) for m in third_party
                  if not declared & {canonicalize_name(d) for d in providers.get(m, [])}}
    assert undeclared == {}, f"imported but not declared in pyproject.toml: {undeclared}"
    assert "jwt" in third_party and "pyjwt" in declared


# ------------------------------------------------------------------------------------------ installs
def test_bootstrap_installs_only_hashed_requirements() -> None:
    script = BOOTSTRAP.read_text()
    installs = [ln.strip() for ln in script.splitlines() if re.search(r'"\$\{pip\[@\]\}" install', ln)]
    assert installs == [
        '"${pip[@]}" install --require-hashes -r requirements/build.lock',
        '"${pip[@]}" install --require-hashes --no-build-isolation -r requirements/dev.lock',
        '"${pip[@]}" install --no-deps --no-build-isolation -e . -e ./dev',
    ]
    assert "--upgrade pip" not in script and "pip install -q -e" not in script


# ------------------------------------------------------------------------------------------ the wheelhouse
def test_the_pi_gets_its_own_versions_and_pyaudio_from_source() -> None:
    pins = _lock("kiosk.lock")
    pi = {p.name: p for p in for_target(pins, PI)}
    here = {p.name: p for p in for_target(pins, DEV_MACHINE)}
    numpy = [p for p in pins if p.name == "numpy"]
    if len(numpy) > 1:  # a marker split: each side gets exactly the one meant for it
        assert pi["numpy"].version != here["numpy"].version
    assert {n for n in pi if n in SOURCE_ONLY} == {"pyaudio"}
    assert all(p.marker is None or "win32" not in p.marker for p in pi.values())


def test_the_wheelhouse_platforms_cover_the_targets_glibc() -> None:
    tags = manylinux_platforms((2, 41), "aarch64")
    assert {"manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_28_aarch64", "manylinux_2_41_aarch64"} \
        <= set(tags) and "manylinux_2_42_aarch64" not in tags


def test_the_wheelhouse_check_names_what_is_missing(tmp_path: Path) -> None:
    pins = [Pin("numpy", "2.5.5", None, ("sha256:" + "0" * 64,)),
            Pin("pyaudio", "0.2.14", None, ("sha256:" + "1" * 64,))]
    (tmp_path / "numpy-2.5.5-cp313-cp313-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl").write_bytes(b"")
    assert missing(pins, tmp_path) == ["pyaudio==0.2.14"]
    (tmp_path / "PyAudio-0.2.14.tar.gz").write_bytes(b"")
    assert missing(pins, tmp_path) == []


# ------------------------------------------------------------------------------------------ livekit-server
FAKE_GO = """#!/bin/sh
# A stand-in for the Go toolchain (a real build takes minutes): prints the module's sums, "builds" a binary.
echo "$*" >>"$FAKE_GO_LOG"
case "$1 $2" in
  "mod download")
    printf '{\\n\\t"Path": "github.com/livekit/livekit-server",\\n'
    printf '\\t"Sum": "%s",\\n\\t"GoModSum": "%s"\\n}\\n' "$FAKE_SUM" "$FAKE_GOMOD_SUM" ;;
  "install -trimpath")
    printf 'livekit-server build %s\\n' "$(date +%s%N)" >"$GOBIN/server"; chmod 755 "$GOBIN/server" ;;
  *) exit 2 ;;
esac
"""


def _pinned(name: str) -> str:
    match = re.search(rf'^{name}="(h1:[^"]+)"', BOOTSTRAP.read_text(), flags=re.M)
    assert match, name
    return match.group(1)


@pytest.fixture
def fake_go(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    go = bin_dir / "go"
    go.write_text(FAKE_GO)
    go.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "XDG_CACHE_HOME": str(tmp_path / "cache"),
            "FAKE_GO_LOG": str(tmp_path / "go.log"), "FAKE_SUM": _pinned("LIVEKIT_SUM"),
            "FAKE_GOMOD_SUM": _pinned("LIVEKIT_GOMOD_SUM")}


def _bootstrap_livekit(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BOOTSTRAP), "livekit"], env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def test_livekit_is_not_built_from_a_module_that_does_not_match_the_pin(fake_go: dict[str, str]) -> None:
    fake_go["FAKE_SUM"] = "h1:" + "A" * 43 + "="
    result = _bootstrap_livekit(fake_go)
    assert result.returncode == 1 and "checksum mismatch" in result.stderr
    assert "install" not in Path(fake_go["FAKE_GO_LOG"]).read_text()
    assert not (Path(fake_go["XDG_CACHE_HOME"]) / "kiosk/bin" / f"livekit-server-{LIVEKIT_VERSION}").exists()


def test_a_changed_cached_binary_is_refused_and_rebuilt(fake_go: dict[str, str]) -> None:
    assert _bootstrap_livekit(fake_go).returncode == 0
    cache = Path(fake_go["XDG_CACHE_HOME"]) / "kiosk/bin"
    binary = cache / f"livekit-server-{LIVEKIT_VERSION}"
    record = (cache / f"livekit-server-{LIVEKIT_VERSION}.sha256").read_text().split()
    assert record == [hashlib.sha256(binary.read_bytes()).hexdigest(), binary.name]
    assert find_binary(cache) == binary
    assert _bootstrap_livekit(fake_go).returncode == 0  # nothing to do: one build so far
    assert Path(fake_go["FAKE_GO_LOG"]).read_text().count("install -trimpath") == 1
    # Someone replaces the cached binary: the stack refuses it, and bootstrap builds it again.
    binary.write_bytes(b"#!/bin/sh\necho not livekit\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(LiveKitServerError, match="does not match its recorded SHA-256"):
        find_binary(cache)
    result = _bootstrap_livekit(fake_go)
    assert result.returncode == 0 and "does not match its recorded SHA-256" in result.stderr
    assert Path(fake_go["FAKE_GO_LOG"]).read_text().count("install -trimpath") == 2
    assert find_binary(cache) == binary


def test_a_binary_without_a_record_is_not_used(tmp_path: Path) -> None:
    binary = tmp_path / f"livekit-server-{LIVEKIT_VERSION}"
    binary.write_bytes(b"\x7fELF")
    binary.chmod(0o755)
    with pytest.raises(LiveKitServerError, match="no recorded SHA-256"):
        find_binary(tmp_path)

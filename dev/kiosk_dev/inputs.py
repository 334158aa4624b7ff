"""Recorded benchmark inputs: render the synthetic audio once on one machine, replay the same samples on another.

The offline benchmark's inputs (espeak-ng speech, pyroomacoustics rooms, scenarios, backgrounds) are made by
tools outside the kiosk, and they are not the same everywhere: espeak-ng 1.52 (Debian trixie) renders some voice
variants differently from 1.51 and differently from one run to the next. To compare the kiosk's processing on two
machines (x86 against the emulated arm64 target), one machine records every input it makes into a directory
(``use(directory, mode="record")``) and the other replays them (``mode="replay"``), so both process the same
samples. Replaying also spares the emulated target the cost of making them.

Each recorded call is one ``.npz`` file named by the function and a hash of its arguments (plain values only:
a call with an array argument is never recorded). Files are read with ``allow_pickle=False``. A replay that
misses a file raises ``KioskError("bench_input_missing")`` naming it and the fix; a damaged file raises
``KioskError("bench_input_damaged")``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar, cast

import numpy as np
import numpy.typing as npt

from kiosk.errors import KioskError

Mode = Literal["record", "replay"]
Arrays = dict[str, npt.NDArray[Any]]
P = ParamSpec("P")
R = TypeVar("R")

_store: tuple[Path, Mode] | None = None
_PLAIN = (str, int, float, bool, type(None))


def use(directory: Path | None, mode: Mode = "replay") -> None:
    """Record inputs into ``directory`` or replay them from it; ``None`` makes them afresh (the default).

    Call it before the first input is made: functions that also cache per process keep what they returned.
    """
    global _store
    if directory is None:
        _store = None
        return
    if mode not in ("record", "replay"):
        raise ValueError(f"mode {mode!r}: use 'record' or 'replay'")
    if mode == "record":
        directory.mkdir(parents=True, exist_ok=True)
    elif not directory.is_dir():
        raise KioskError("bench_input_missing", f"{directory} is not a directory of recorded inputs: record them "
                         "first (python -m kiosk_dev.bench.compare report --record-inputs DIR ...)")
    _store = (directory, mode)


def active() -> tuple[Path, Mode] | None:
    """The directory and mode in force, if any."""
    return _store


def _plain(value: object) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def key(name: str, args: tuple[object, ...], kwargs: dict[str, object]) -> str:
    """The file name (without ``.npz``) of one call: the name and a hash of its arguments' ``repr``.

    ``repr`` of the plain values allowed is the same on every machine (floats print their shortest round-trip
    form), so both machines name a call alike.
    """
    text = repr((name, args, sorted(kwargs.items())))
    return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:20]}"


def _array(value: npt.NDArray[Any]) -> Arrays:
    return {"value": value}


def _unarray(arrays: Arrays) -> npt.NDArray[Any]:
    return arrays["value"]


def recorded(name: str, encode: Callable[[Any], Arrays] = _array,
             decode: Callable[[Arrays], Any] = _unarray) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate an input maker: its result is recorded or replayed while a store is in use.

    ``encode`` turns the result into named arrays, ``decode`` back (the default: the result is one array).
    """
    def wrap(make: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(make)
        def inner(*args: P.args, **kwargs: P.kwargs) -> R:
            store = _store
            if store is None or not (_plain(args) and _plain(tuple(kwargs.values()))):
                return make(*args, **kwargs)
            directory, mode = store
            path = directory / f"{key(name, args, dict(kwargs))}.npz"
            if mode == "replay":
                return cast(R, _load(path, name, decode))
            result = make(*args, **kwargs)
            _save(path, encode(result))
            return result
        return inner
    return wrap


def _load(path: Path, name: str, decode: Callable[[Arrays], Any]) -> Any:
    def damaged(reason: object) -> KioskError:
        return KioskError("bench_input_damaged", f"recorded input {path} cannot be read ({reason}): record the "
                          "inputs again (--record-inputs)")

    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise KioskError("bench_input_missing", f"no recorded input {path.name} ({name}) in {path.parent}: record "
                         "the inputs again with the same code (--record-inputs) on the machine compared "
                         "against") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise damaged(error) from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise damaged("not an .npz archive")
    try:
        with loaded:
            return decode({k: loaded[k] for k in loaded.files})
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as error:
        raise damaged(error) from None


def _save(path: Path, arrays: Arrays) -> None:
    part = path.with_name(path.name + ".part")
    with part.open("wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]  # numpy stubs type allow_pickle among the names
    os.replace(part, path)

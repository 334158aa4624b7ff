"""Property-based fuzzing of what reaches the kiosk from files: WAV bytes, cue files, settings files and the
recordings `kiosk audio process` reads. Every input either works or fails with the kiosk's own error (which
names the problem and the fix); nothing else escapes. A fixed budget (derandomized) keeps CI deterministic.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kiosk.audio.cues import CueError, load_cue, read_cue_file
from kiosk.audio.format import WavAudio, WavError, decode_wav, encode_wav
from kiosk.errors import ConfigError, InputError
from kiosk.settings import Settings, load_settings

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SLOW_FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

_VALID = encode_wav((np.sin(np.arange(1600) / 5.0) * 8000).astype(np.int16))
# Header fields of a canonical PCM WAV: (offset, struct format).
_FIELDS = [(4, "<I"), (16, "<I"), (20, "<H"), (22, "<H"), (24, "<I"), (28, "<I"), (32, "<H"), (34, "<H"), (40, "<I")]


@st.composite
def mangled_wavs(draw: st.DrawFn) -> bytes:
    """A valid WAV with header fields set to arbitrary values, bytes flipped, and maybe cut short."""
    data = bytearray(_VALID)
    for offset, fmt in draw(st.lists(st.sampled_from(_FIELDS), max_size=4)):
        limit = 2 ** (8 * struct.calcsize(fmt)) - 1
        struct.pack_into(fmt, data, offset, draw(st.integers(0, limit)))
    for position in draw(st.lists(st.integers(0, len(data) - 1), max_size=6)):
        data[position] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) if draw(st.booleans()) else bytes(data)


def _with_rate(rate_hz: int) -> bytes:
    data = bytearray(_VALID)
    struct.pack_into("<I", data, 24, rate_hz)
    return bytes(data)


wav_like = st.one_of(mangled_wavs(), st.binary(max_size=200), st.builds(lambda b: b"RIFF\0\0\0\0WAVE" + b,
                                                                          st.binary(max_size=120)))


@FUZZ
@given(wav_like)
def test_decode_wav_reads_or_says_why(data: bytes) -> None:
    try:
        wav = decode_wav(data)
    except WavError as error:
        assert str(error)
        return
    assert isinstance(wav, WavAudio) and wav.samples.ndim == 2 and wav.rate_hz > 0


@FUZZ
@given(wav_like)
def test_a_cue_file_is_used_or_refused_with_the_fix(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("cue") / "offline.wav"
    path.write_bytes(data)
    try:
        pcm = read_cue_file(path)
    except CueError as error:
        assert str(path) in error.message and ("sox" in error.message or "re-record" in error.message
                                               or "permissions" in error.message)
        return
    assert pcm.dtype == np.int16 and pcm.ndim == 1 and len(pcm) > 0


@SLOW_FUZZ
@given(wav_like)
def test_a_broken_operator_cue_still_plays_the_shipped_one(tmp_path_factory: pytest.TempPathFactory,
                                                           data: bytes) -> None:
    directory = tmp_path_factory.mktemp("cues")
    (directory / "en").mkdir()
    (directory / "en" / "error.wav").write_bytes(data)
    pcm = load_cue("error", "en", directory)
    assert pcm.dtype == np.int16 and len(pcm) > 0


# ------------------------------------------------------------------------------------------- settings
_TOML_KEYS = {name: list(type(getattr(Settings(), name)).model_fields) for name in Settings.model_fields
              if name != "log_level"}
_scalars = st.one_of(st.integers(-10**6, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                     st.booleans(), st.text(max_size=40))
_values = st.one_of(_scalars, st.lists(_scalars, max_size=4))


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if value != value else ("inf" if value == float("inf") else "-inf" if value == float("-inf")
                                             else repr(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)  # a TOML basic string (JSON escapes are TOML escapes)


@st.composite
def settings_files(draw: st.DrawFn) -> str:
    """A TOML file with the kiosk's own sections and keys (and some strangers), holding arbitrary values."""
    lines: list[str] = []
    for section in draw(st.lists(st.sampled_from(sorted(_TOML_KEYS)), max_size=4, unique=True)):
        lines.append(f"[{section}]")
        keys = _TOML_KEYS[section] + ["no_such_key"]
        for key in draw(st.lists(st.sampled_from(keys), max_size=4, unique=True)):
            lines.append(f"{key} = {_toml_value(draw(_values))}")
    return "\n".join(lines) + "\n"


def _load(tmp_path_factory: pytest.TempPathFactory, text: str | bytes) -> None:
    path = tmp_path_factory.mktemp("config") / "kiosk.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        loaded = load_settings(path)
    except ConfigError as error:
        assert error.message.startswith(("invalid configuration", "config file")), error.message
        return
    assert isinstance(loaded, Settings)


@FUZZ
@given(settings_files())
def test_a_settings_file_loads_or_names_the_field_and_fix(tmp_path_factory: pytest.TempPathFactory,
                                                          text: str) -> None:
    _load(tmp_path_factory, text)


@FUZZ
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300)))
def test_any_bytes_as_a_settings_file(tmp_path_factory: pytest.TempPathFactory, data: str | bytes) -> None:
    _load(tmp_path_factory, data)


# ------------------------------------------------------------------------------------ kiosk audio process
@SLOW_FUZZ
@given(mic=wav_like, ref=st.one_of(st.none(), st.just(_VALID), wav_like))
@example(mic=_with_rate(4294967295), ref=None)  # resampling from 4 GHz wanted 128 GB
@example(mic=_with_rate(7), ref=None)  # 0.1 s claimed as minutes
def test_audio_process_inputs(tmp_path_factory: pytest.TempPathFactory, mic: bytes, ref: bytes | None) -> None:
    """``ref`` None: the same file twice (two recordings that agree on a broken header pass the length check)."""
    from kiosk.audio.offline import process_files

    folder = tmp_path_factory.mktemp("process")
    (folder / "mic.wav").write_bytes(mic)
    (folder / "ref.wav").write_bytes(mic if ref is None else ref)
    try:
        result = process_files(Settings(), folder / "mic.wav", folder / "ref.wav", folder / "out.wav",
                               vad_path=folder / "vad.json", mic_channel="mix", ref_channel="mix")
    except InputError as error:
        assert "file" in error.message
        return
    assert len(result.cleaned) > 0 and Path(folder / "out.wav").exists()
    json.loads((folder / "vad.json").read_text())


_VALID_ARRAY = encode_wav(np.stack([(np.sin(np.arange(1600) / (5.0 + c)) * 8000).astype(np.int16)
                                    for c in range(4)], axis=1))


@st.composite
def mangled_array_wavs(draw: st.DrawFn) -> bytes:
    """A valid 4-channel WAV with header fields (channel count included) set to arbitrary values, maybe cut."""
    data = bytearray(_VALID_ARRAY)
    for offset, fmt in draw(st.lists(st.sampled_from(_FIELDS), max_size=3)):
        limit = 2 ** (8 * struct.calcsize(fmt)) - 1
        struct.pack_into(fmt, data, offset, draw(st.integers(0, limit)))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) if draw(st.booleans()) else bytes(data)


@SLOW_FUZZ
@given(mic=st.one_of(mangled_array_wavs(), wav_like))
@example(mic=_VALID_ARRAY)
def test_audio_process_beam_inputs(tmp_path_factory: pytest.TempPathFactory, mic: bytes) -> None:
    """``--mic-channel beam`` over any bytes: the beam over the array's channels, or the fix named."""
    from kiosk.audio.offline import process_files

    folder = tmp_path_factory.mktemp("beam")
    (folder / "mic.wav").write_bytes(mic)
    (folder / "ref.wav").write_bytes(_VALID)
    try:
        result = process_files(Settings(), folder / "mic.wav", folder / "ref.wav", folder / "out.wav",
                               mic_channel="beam")
    except InputError as error:
        assert "file" in error.message
        return
    assert len(result.cleaned) > 0 and Path(folder / "out.wav").exists()


def test_a_multi_channel_wav_round_trips() -> None:
    wav = decode_wav(_VALID_ARRAY)
    assert (wav.channels, wav.rate_hz, wav.sample_bits) == (4, 16000, 16)
    assert np.array_equal(np.rint(wav.samples * 32768).astype(np.int16)[:, 3],
                          (np.sin(np.arange(1600) / 8.0) * 8000).astype(np.int16))

"""A small ctypes binding over the system libspeexdsp: echo canceller, preprocessor, resampler.

Why a binding of our own: the PyPI ``speexdsp`` package (0.1.1) exposes only the echo canceller (not
the preprocessor's residual-echo and noise suppression, nor the resampler used for drift compensation)
and fails to import on Python 3.12+, while Raspberry Pi OS Trixie ships 3.13. ctypes needs no compiler
and no build step on the kiosk: the library (``libspeexdsp1``) is a Debian package.

Every object preallocates its ctypes buffers; the per-frame calls copy into them and call C, without
allocating Python objects beyond what ctypes itself needs for the call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from kiosk.errors import KioskError

_LOGGER = logging.getLogger(__name__)

Pcm = npt.NDArray[np.int16]

# speex_echo.h
SPEEX_ECHO_GET_FRAME_SIZE = 3
SPEEX_ECHO_SET_SAMPLING_RATE = 24
SPEEX_ECHO_GET_SAMPLING_RATE = 25
# speex_preprocess.h
SPEEX_PREPROCESS_SET_DENOISE = 0
SPEEX_PREPROCESS_SET_AGC = 2
SPEEX_PREPROCESS_SET_VAD = 4
SPEEX_PREPROCESS_SET_DEREVERB = 8
SPEEX_PREPROCESS_SET_NOISE_SUPPRESS = 18
SPEEX_PREPROCESS_SET_ECHO_SUPPRESS = 20
SPEEX_PREPROCESS_GET_ECHO_SUPPRESS = 21
SPEEX_PREPROCESS_SET_ECHO_SUPPRESS_ACTIVE = 22
SPEEX_PREPROCESS_GET_ECHO_SUPPRESS_ACTIVE = 23
SPEEX_PREPROCESS_SET_ECHO_STATE = 24
# speex_resampler.h
RESAMPLER_QUALITY_MAX = 10
RESAMPLER_QUALITY_VOIP = 3

_I16P = ctypes.POINTER(ctypes.c_int16)
_U32P = ctypes.POINTER(ctypes.c_uint32)


class SpeexError(KioskError):
    """libspeexdsp is missing or refused a call."""

    def __init__(self, message: str) -> None:
        super().__init__("speexdsp_error", message)


@functools.cache
def library() -> ctypes.CDLL:
    """Load libspeexdsp and declare the functions used here (once per process)."""
    name = ctypes.util.find_library("speexdsp") or "libspeexdsp.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError as error:
        raise SpeexError(f"cannot load libspeexdsp ({error}): install the Debian package libspeexdsp1 "
                         "(scripts/bootstrap does)") from None
    vp = ctypes.c_void_p
    sigs: dict[str, tuple[type | None, list[type]]] = {
        "speex_echo_state_init": (vp, [ctypes.c_int, ctypes.c_int]),
        "speex_echo_state_destroy": (None, [vp]),
        "speex_echo_cancellation": (None, [vp, _I16P, _I16P, _I16P]),
        "speex_echo_state_reset": (None, [vp]),
        "speex_echo_ctl": (ctypes.c_int, [vp, ctypes.c_int, vp]),
        "speex_preprocess_state_init": (vp, [ctypes.c_int, ctypes.c_int]),
        "speex_preprocess_state_destroy": (None, [vp]),
        "speex_preprocess_run": (ctypes.c_int, [vp, _I16P]),
        "speex_preprocess_ctl": (ctypes.c_int, [vp, ctypes.c_int, vp]),
        "speex_resampler_init_frac": (vp, [ctypes.c_uint32] * 6 + [ctypes.POINTER(ctypes.c_int)]),
        "speex_resampler_destroy": (None, [vp]),
        "speex_resampler_process_int": (ctypes.c_int, [vp, ctypes.c_uint32, _I16P, _U32P, _I16P, _U32P]),
        "speex_resampler_set_rate_frac": (ctypes.c_int, [vp] + [ctypes.c_uint32] * 4),
        "speex_resampler_get_input_latency": (ctypes.c_int, [vp]),
        "speex_resampler_get_output_latency": (ctypes.c_int, [vp]),
        "speex_resampler_reset_mem": (ctypes.c_int, [vp]),
        "speex_resampler_skip_zeros": (ctypes.c_int, [vp]),
    }
    for fname, (restype, argtypes) in sigs.items():
        func = getattr(lib, fname)
        func.restype = restype
        func.argtypes = argtypes
    return lib


def _int_ctl(ctl: Callable[..., int], state: int, request: int, value: int) -> None:
    arg = ctypes.c_int(value)
    if ctl(state, request, ctypes.byref(arg)) != 0:
        raise SpeexError(f"libspeexdsp refused control request {request} with value {value}")


class EchoState:
    """The speex MDF echo canceller: ``cancel(near, far) -> out`` on fixed-size int16 frames."""

    def __init__(self, frame_samples: int, filter_samples: int, rate_hz: int) -> None:
        self._lib = library()
        self.frame_samples = frame_samples
        self.filter_samples = filter_samples
        state = self._lib.speex_echo_state_init(frame_samples, filter_samples)
        if not state:
            raise SpeexError(f"speex_echo_state_init({frame_samples}, {filter_samples}) failed")
        self._state: int = state
        _int_ctl(self._lib.speex_echo_ctl, state, SPEEX_ECHO_SET_SAMPLING_RATE, rate_hz)
        self._near = (ctypes.c_int16 * frame_samples)()
        self._far = (ctypes.c_int16 * frame_samples)()
        self._out = (ctypes.c_int16 * frame_samples)()
        self._near_np = np.frombuffer(memoryview(self._near), dtype=np.int16)
        self._far_np = np.frombuffer(memoryview(self._far), dtype=np.int16)
        self.out: Pcm = np.frombuffer(memoryview(self._out), dtype=np.int16)
        self._near_p = ctypes.cast(self._near, _I16P)
        self._far_p = ctypes.cast(self._far, _I16P)
        self._out_p = ctypes.cast(self._out, _I16P)

    @property
    def handle(self) -> int:
        """The C state pointer (for the preprocessor's residual-echo link)."""
        return self._state

    def cancel(self, near: Pcm, far: Pcm) -> Pcm:
        """Cancel the echo of ``far`` in ``near``; returns a reused buffer valid until the next call."""
        self._near_np[:] = near
        self._far_np[:] = far
        self._lib.speex_echo_cancellation(self._state, self._near_p, self._far_p, self._out_p)
        return self.out

    def reset(self) -> None:
        """Forget the adapted filter."""
        self._lib.speex_echo_state_reset(self._state)

    def __del__(self) -> None:
        state = getattr(self, "_state", None)
        if state:
            self._lib.speex_echo_state_destroy(state)
            self._state = 0


class Preprocessor:
    """The speex preprocessor: noise suppression and, linked to an ``EchoState``, residual-echo suppression.

    ``echo_suppress_db`` is the most attenuation of residual echo while only the far end talks,
    ``echo_suppress_active_db`` while the near end talks too (less, to keep the visitor).
    """

    def __init__(self, frame_samples: int, rate_hz: int, *, echo: EchoState | None = None,
                 denoise: bool = True, noise_suppress_db: int = -15, echo_suppress_db: int = -40,
                 echo_suppress_active_db: int = -15) -> None:
        self._lib = library()
        self.frame_samples = frame_samples
        state = self._lib.speex_preprocess_state_init(frame_samples, rate_hz)
        if not state:
            raise SpeexError(f"speex_preprocess_state_init({frame_samples}, {rate_hz}) failed")
        self._state: int = state
        self._echo = echo  # kept alive: the C state points at it
        ctl = self._lib.speex_preprocess_ctl
        _int_ctl(ctl, state, SPEEX_PREPROCESS_SET_DENOISE, int(denoise))
        _int_ctl(ctl, state, SPEEX_PREPROCESS_SET_AGC, 0)
        _int_ctl(ctl, state, SPEEX_PREPROCESS_SET_DEREVERB, 0)
        _int_ctl(ctl, state, SPEEX_PREPROCESS_SET_NOISE_SUPPRESS, noise_suppress_db)
        if echo is not None:
            if ctl(state, SPEEX_PREPROCESS_SET_ECHO_STATE, ctypes.c_void_p(echo.handle)) != 0:
                raise SpeexError("speex_preprocess_ctl(SET_ECHO_STATE) failed")
            _int_ctl(ctl, state, SPEEX_PREPROCESS_SET_ECHO_SUPPRESS, echo_suppress_db)
            _int_ctl(ctl, state, SPEEX_PREPROCESS_SET_ECHO_SUPPRESS_ACTIVE, echo_suppress_active_db)
        self._buf = (ctypes.c_int16 * frame_samples)()
        self.out: Pcm = np.frombuffer(memoryview(self._buf), dtype=np.int16)
        self._buf_p = ctypes.cast(self._buf, _I16P)

    def get_int(self, request: int) -> int:
        """Read an integer control (e.g. ``SPEEX_PREPROCESS_GET_ECHO_SUPPRESS``)."""
        value = ctypes.c_int(0)
        if self._lib.speex_preprocess_ctl(self._state, request, ctypes.byref(value)) != 0:
            raise SpeexError(f"speex_preprocess_ctl({request}) failed")
        return value.value

    def run(self, frame: Pcm) -> Pcm:
        """Process one frame; returns a reused buffer valid until the next call."""
        self.out[:] = frame
        self._lib.speex_preprocess_run(self._state, self._buf_p)
        return self.out

    def __del__(self) -> None:
        state = getattr(self, "_state", None)
        if state:
            self._lib.speex_preprocess_state_destroy(state)
            self._state = 0


class Resampler:
    """The speex resampler with a fractional ratio, for drift compensation and rate conversion.

    ``set_ratio(in_rate, out_rate)`` takes integers (e.g. 1_000_100 : 1_000_000 for +100 ppm);
    ``process(block, out)`` consumes what it needs of ``block`` and fills ``out`` as far as it can,
    returning (consumed, produced).
    """

    def __init__(self, in_rate: int, out_rate: int, rate_hz: int = 16000, quality: int = RESAMPLER_QUALITY_MAX,
                 max_in_samples: int = 4096, max_out_samples: int = 4096) -> None:
        self._lib = library()
        err = ctypes.c_int(0)
        state = self._lib.speex_resampler_init_frac(1, in_rate, out_rate, rate_hz, rate_hz, quality,
                                                    ctypes.byref(err))
        if not state or err.value != 0:
            raise SpeexError(f"speex_resampler_init_frac({in_rate}/{out_rate}) failed with error {err.value}")
        self._state: int = state
        self._rate_hz = rate_hz
        self._in = (ctypes.c_int16 * max_in_samples)()
        self._out = (ctypes.c_int16 * max_out_samples)()
        self._in_np = np.frombuffer(memoryview(self._in), dtype=np.int16)
        self._out_np = np.frombuffer(memoryview(self._out), dtype=np.int16)
        self._in_p = ctypes.cast(self._in, _I16P)
        self._out_p = ctypes.cast(self._out, _I16P)
        self._in_len = ctypes.c_uint32(0)
        self._out_len = ctypes.c_uint32(0)
        self._in_len_p = ctypes.pointer(self._in_len)
        self._out_len_p = ctypes.pointer(self._out_len)

    @property
    def input_latency_samples(self) -> int:
        """The filter's delay in input samples."""
        return int(self._lib.speex_resampler_get_input_latency(self._state))

    def set_ratio(self, in_rate: int, out_rate: int) -> None:
        """Change the conversion ratio (smoothly; the filter state is kept)."""
        if self._lib.speex_resampler_set_rate_frac(self._state, in_rate, out_rate, self._rate_hz,
                                                   self._rate_hz) != 0:
            raise SpeexError(f"speex_resampler_set_rate_frac({in_rate}/{out_rate}) failed")

    def process(self, block: Pcm, out: Pcm) -> tuple[int, int]:
        """Resample ``block`` into ``out``; returns (input samples consumed, output samples written)."""
        n_in = min(len(block), len(self._in_np))
        n_out = min(len(out), len(self._out_np))
        self._in_np[:n_in] = block[:n_in]
        self._in_len.value = n_in
        self._out_len.value = n_out
        self._lib.speex_resampler_process_int(self._state, 0, self._in_p, self._in_len_p, self._out_p,
                                              self._out_len_p)
        produced = self._out_len.value
        out[:produced] = self._out_np[:produced]
        return self._in_len.value, produced

    def reset(self) -> None:
        """Clear the filter memory."""
        self._lib.speex_resampler_reset_mem(self._state)

    def __del__(self) -> None:
        state = getattr(self, "_state", None)
        if state:
            self._lib.speex_resampler_destroy(state)
            self._state = 0

"""A benchmark variant, not part of the product: Silero VAD (ONNX) confirms the onsets webrtcvad flags.

It needs ``onnxruntime`` and the model file from the ``silero-vad`` package, neither of which the product,
the development package or the tests depend on (``silero-vad`` declares torch, which the ONNX model does not
need). To run the variants that use it: ``pip install onnxruntime`` and ``pip install --no-deps silero-vad``.
Without them those variants are skipped with that message (``systems.missing``).

``SileroCheckedDetector`` wraps a ``VoiceDetector``. While the wrapped detector says "speech", the cleaned
audio of the candidate is run through Silero VAD's ONNX model (shipped in the ``silero-vad`` wheel; run by
``onnxruntime``, which has aarch64 wheels) every 32 ms, from a short warm-up on the audio just before the
candidate; a run of frames counts as speech only once one Silero window reached ``threshold``. Between
candidates the model does not run, so it costs nothing while nobody talks and webrtcvad is quiet.

Silero tells speech from non-speech (machinery, music, noise, clipping artefacts), not the visitor from
other voices: residual echo of the agent, a television or a neighbour still pass it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from kiosk.audio.format import FRAME_SAMPLES, RATE_HZ, Pcm
from kiosk.ports import VoiceDetector

INSTALL = "pip install onnxruntime && pip install --no-deps silero-vad"
NEEDS = ("onnxruntime", "silero_vad")

_WINDOW = 512  # Silero's window at 16 kHz
_CONTEXT = 64  # samples of the previous window it takes along
_WARMUP_WINDOWS = 3  # windows of history run before a candidate's first window
_RING = _WINDOW * (_WARMUP_WINDOWS + 1) + _CONTEXT + FRAME_SAMPLES
_END_FRAMES = 30  # a candidate run ends after 300 ms without the wrapped detector's speech


def silero_model_path() -> Path:
    """The ONNX model inside the installed ``silero-vad`` package (found without importing it: it needs torch)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the silero-vad package is not installed ({INSTALL})")
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "silero_vad.onnx"
        if path.exists():
            return path
    raise FileNotFoundError("silero-vad is installed but ships no data/silero_vad.onnx")


class SileroCheckedDetector:
    """``VoiceDetector``: the wrapped detector's speech, confirmed by Silero VAD once per candidate run."""

    def __init__(self, inner: VoiceDetector, *, threshold: float = 0.5, model_path: Path | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session: Any = ort.InferenceSession(str(model_path or silero_model_path()), options,
                                                  providers=["CPUExecutionProvider"])
        self._inner = inner
        self.threshold = threshold
        self._ring = np.zeros(_RING, dtype=np.float32)
        self._input = np.zeros((1, _WINDOW + _CONTEXT), dtype=np.float32)
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._sr = np.array(RATE_HZ, dtype=np.int64)
        self._feed = {"input": self._input, "state": self._state, "sr": self._sr}
        self._since = 0  # samples since the last Silero window
        self._quiet = _END_FRAMES
        self._active = False  # inside a candidate run
        self.confirmed = False
        self.probability = 0.0
        self.calls = 0

    def reset(self) -> None:
        """Forget the wrapped detector's state and the candidate run."""
        self._inner.reset()
        self._ring.fill(0.0)
        self._active = False
        self.confirmed = False
        self._quiet = _END_FRAMES

    def _run(self, end_offset: int) -> float:
        """Silero on the window ending ``end_offset`` samples before the newest (with its context)."""
        stop = _RING - end_offset
        self._input[0, :] = self._ring[stop - _WINDOW - _CONTEXT:stop]
        out, state = self._session.run(None, self._feed)
        self._state[...] = state
        self.calls += 1
        return float(out[0, 0])

    def is_speech(self, frame: Pcm) -> bool:
        """Feed one 10 ms frame of cleaned audio; True while confirmed speech is detected."""
        ring = self._ring
        ring[:-FRAME_SAMPLES] = ring[FRAME_SAMPLES:]
        np.multiply(frame, np.float32(1.0 / 32768.0), out=ring[-FRAME_SAMPLES:], casting="unsafe")
        raw = self._inner.is_speech(frame)
        self._since += FRAME_SAMPLES
        if raw:
            self._quiet = 0
            if not self._active:
                # A new candidate: warm the model up on the audio just before it, then judge its first window.
                self._active = True
                self.confirmed = False
                self._state.fill(0.0)
                for w in range(_WARMUP_WINDOWS, 0, -1):
                    self._run(w * _WINDOW)
                self.probability = self._run(0)
                self._since = 0
            elif not self.confirmed and self._since >= _WINDOW:
                self.probability = self._run(0)
                self._since = 0
            if self.probability >= self.threshold:
                self.confirmed = True
        else:
            self._quiet += 1
            if self._quiet >= _END_FRAMES:
                self._active = False
                self.confirmed = False
        return raw and self.confirmed

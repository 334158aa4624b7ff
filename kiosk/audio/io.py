"""PyAudio capture and playback, chosen by name, with the far-end reference kept beside the microphone.

Layout:

* capture and playback resolve to the same device: one full-duplex callback stream. Each callback copies
  the microphone block into the mic ring and the block it renders into the reference ring, so microphone
  and reference stay sample-aligned (one clock, one callback).
* different devices: an input stream and an output stream. The output callback puts what it rendered into
  the reference ring; the loop pairs each 10 ms microphone frame with the next 10 ms of reference (zeros
  when none is there yet, counted). Bulk delay and drift between the two clocks are left to the canceller.

The callbacks run on PortAudio's thread: they only copy into preallocated rings and bump counters. They
never block, log or raise (an exception would stop the stream); PyAudio itself hands in and expects
``bytes``, the one allocation per callback that cannot be avoided from Python.

On the loop side ``AudioIO.pull`` turns device-rate, multi-channel blocks into 16 kHz mono 10 ms frames:
channel select (``AudioSettings.channel``), mixdown (``"mix"``) or the array's fixed beamformer (``"beam"``,
``kiosk.audio.array``, designed for the device's rate and run on the interleaved blocks without allocating),
then the speex resampler when the device does not run at 16 kHz, then the rechunker.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiosk.audio.array import ArrayGeometry, FixedBeamformer
from kiosk.audio.buffers import BoundedRing, DropOldestRing, Samples, StreamCounters
from kiosk.audio.devices import DeviceInfo, list_devices, match_device, refresh_alsa_config, silence_alsa_errors
from kiosk.audio.format import FRAME_SAMPLES, RATE_HZ, Rechunker
from kiosk.errors import DeviceError
from kiosk.settings import AudioSettings

_LOGGER = logging.getLogger(__name__)

# PortAudio status flags (portaudio.h).
_INPUT_FLAGS = 0x1 | 0x2  # paInputUnderflow | paInputOverflow
_OUTPUT_FLAGS = 0x4 | 0x8  # paOutputUnderflow | paOutputOverflow
_INPUT_UNDERFLOW = 0x1
_PA_CONTINUE = 0
_MAX_DEVICE_BLOCK_SAMPLES = 16384  # largest callback block we prepare for (frames x channels)
_REF_RING_MS = 2000
_PLUGIN_CHANNEL_LIMIT = 8  # sound-server plugins advertise 32 channels; real arrays have <= 8


@dataclass(frozen=True)
class StreamLayout:
    """How the devices were opened."""

    capture: DeviceInfo
    playback: DeviceInfo
    duplex: bool
    rate_hz: int
    capture_channels: int
    channel: int | None  # None: mixdown, or the beam when ``beam`` is set
    beam: ArrayGeometry | None = None  # the fixed beamformer over these microphones

    def describe(self) -> str:
        """One line for logs and ``kiosk doctor``."""
        kind = "one duplex stream" if self.duplex else "two streams"
        if self.beam is not None:
            pick = f"beam over channels {self.beam.first_channel}-{self.beam.last_channel}"
        else:
            pick = "mix" if self.channel is None else f"channel {self.channel}"
        return (f"capture '{self.capture.name}' ({self.capture_channels} ch, {pick}), playback "
                f"'{self.playback.name}', {self.rate_hz} Hz, {kind}")


class _Converter:
    """Device-rate interleaved int16 -> 16 kHz mono int16 (channel select, mixdown or beam, resample)."""

    def __init__(self, rate_hz: int, channels: int, channel: int | None, beam: ArrayGeometry | None = None) -> None:
        self._channels = channels
        self._channel = channel
        self._geometry = beam
        self._beam: FixedBeamformer | None = None
        if beam is not None:
            # Designed for the device's rate: it runs before the resampler, on every block the ring hands over.
            self._beam = beam.beamformer(rate_hz, max_block_samples=_MAX_DEVICE_BLOCK_SAMPLES // channels)
        self._resampler: Any = None
        if rate_hz != RATE_HZ:
            from kiosk.audio.speex import RESAMPLER_QUALITY_VOIP, Resampler

            self._resampler = Resampler(rate_hz, RATE_HZ, quality=RESAMPLER_QUALITY_VOIP + 2)
        self._scratch: Samples = np.zeros(_MAX_DEVICE_BLOCK_SAMPLES, dtype=np.int16)

    def convert(self, block: Samples) -> Samples:
        """Mono 16 kHz samples for one interleaved device-rate block."""
        mono: Samples
        if self._beam is not None and self._geometry is not None:
            mono = self._beam.process(self._geometry.select(block, self._channels))
        elif self._channels > 1:
            frames = block.reshape(-1, self._channels)
            if self._channel is None:
                mono = frames.mean(axis=1, dtype=np.float32).astype(np.int16)
            else:
                mono = np.ascontiguousarray(frames[:, self._channel])
        else:
            mono = block
        if self._resampler is None:
            return mono
        out_parts = []
        offset = 0
        while offset < len(mono):
            consumed, produced = self._resampler.process(mono[offset:], self._scratch)
            out_parts.append(self._scratch[:produced].copy())
            offset += consumed
            if consumed == 0 and produced == 0:
                break
        result: Samples = np.concatenate(out_parts) if out_parts else mono[:0]
        return result


class _Upsampler:
    """16 kHz mono -> device rate for playout (identity when the device runs at 16 kHz)."""

    def __init__(self, rate_hz: int) -> None:
        self._resampler: Any = None
        if rate_hz != RATE_HZ:
            from kiosk.audio.speex import RESAMPLER_QUALITY_VOIP, Resampler

            self._resampler = Resampler(RATE_HZ, rate_hz, quality=RESAMPLER_QUALITY_VOIP + 2)
        self._scratch: Samples = np.zeros(_MAX_DEVICE_BLOCK_SAMPLES, dtype=np.int16)

    def convert(self, pcm: Samples) -> Samples:
        if self._resampler is None:
            return pcm
        parts = []
        offset = 0
        while offset < len(pcm):
            consumed, produced = self._resampler.process(pcm[offset:offset + 1024], self._scratch)
            parts.append(self._scratch[:produced].copy())
            offset += consumed
            if consumed == 0 and produced == 0:
                break
        result: Samples = np.concatenate(parts) if parts else pcm[:0]
        return result


class AudioIO:
    """Open capture and playback by name; rings, counters and 16 kHz frame pairs for the loop.

    ``open()`` and ``close()`` block (PortAudio); call them off the loop (``asyncio.to_thread``).
    Everything else is for the loop's thread, except the two callbacks.
    """

    def __init__(self, settings: AudioSettings, capture_device: str | None = None,
                 playback_device: str | None = None) -> None:
        self.settings = settings
        self.capture_name = capture_device or settings.capture_device
        self.playback_name = playback_device or settings.playback_device
        self.counters = StreamCounters()
        self.layout: StreamLayout | None = None
        self._pa: Any = None
        self._streams: list[Any] = []
        self._mic: DropOldestRing | None = None
        self._ref = DropOldestRing(1)
        self._playout = BoundedRing(1)
        self._out_block: Samples = np.zeros(_MAX_DEVICE_BLOCK_SAMPLES, dtype=np.int16)
        self._out_multi: Samples = np.zeros(_MAX_DEVICE_BLOCK_SAMPLES, dtype=np.int16)
        self._out_channels = 1
        self._mic_rechunk = Rechunker(FRAME_SAMPLES, RATE_HZ)
        self._ref_rechunk = Rechunker(FRAME_SAMPLES, RATE_HZ * _REF_RING_MS // 1000)
        self._mic_scratch: Samples = np.zeros(_MAX_DEVICE_BLOCK_SAMPLES, dtype=np.int16)
        self._ref_scratch: Samples = np.zeros(_MAX_DEVICE_BLOCK_SAMPLES, dtype=np.int16)
        self._mic_frame: Samples = np.zeros(FRAME_SAMPLES, dtype=np.int16)
        self._ref_frame: Samples = np.zeros(FRAME_SAMPLES, dtype=np.int16)
        self._mic_conv: _Converter | None = None
        self._ref_conv: _Converter | None = None
        self._up: _Upsampler | None = None
        self._capturing = False  # the microphone has delivered its first audio

    # ------------------------------------------------------------------ open / close (blocking)
    def open(self) -> StreamLayout:
        """Resolve the names, open and start the stream(s); raise ``DeviceError`` naming what failed."""
        import pyaudio

        silence_alsa_errors()
        refresh_alsa_config()  # a device plugged in or out since ALSA last read its configuration
        self._pa = pyaudio.PyAudio()
        try:
            devices = list_devices(self._pa)
            capture = match_device(self.capture_name, "capture", devices)
            playback = match_device(self.playback_name, "playback", devices)
            layout = self._layout(capture, playback)
            self._allocate(layout)
            self._start_streams(layout)
        except DeviceError:
            self.close()
            raise
        except OSError as error:
            self.close()
            raise DeviceError(f"opening capture '{self.capture_name}' / playback '{self.playback_name}' failed: "
                              f"{error}; check `kiosk devices` and that no other program holds the device",
                              "device_open_failed") from None
        self.layout = layout
        _LOGGER.info("audio: %s", layout.describe())
        return layout

    def _layout(self, capture: DeviceInfo, playback: DeviceInfo) -> StreamLayout:
        import pyaudio

        s = self.settings
        channel = s.channel if isinstance(s.channel, int) else None
        beam = ArrayGeometry.from_settings(s) if s.channel == "beam" else None
        channels = s.capture_channels
        if channels is None:
            if capture.max_input_channels <= _PLUGIN_CHANNEL_LIMIT:
                channels = capture.max_input_channels
            elif beam is not None:
                channels = beam.last_channel + 1
            else:
                channels = 2 if channel is None else channel + 1
        if channel is not None and channel >= channels:
            raise DeviceError(f"audio.channel is {channel} but '{capture.name}' is opened with {channels} "
                              f"channel(s); use a channel below {channels} or 'mix'", "device_channel")
        if beam is not None and beam.last_channel >= channels:
            raise DeviceError(f"audio.channel is 'beam' over capture channels {beam.first_channel}-{beam.last_channel} "
                              f"but '{capture.name}' is opened with {channels} channel(s); set audio.array_channels "
                              "and audio.array_first_channel to the array's microphones, or use a channel number",
                              "device_channel")
        rate = s.device_rate_hz
        if rate is None:
            try:
                ok = self._pa.is_format_supported(RATE_HZ, input_device=capture.index, input_channels=channels,
                                                  input_format=pyaudio.paInt16)
            except ValueError:
                ok = False
            rate = RATE_HZ if ok else capture.default_rate_hz
        return StreamLayout(capture=capture, playback=playback, duplex=capture.index == playback.index,
                            rate_hz=rate, capture_channels=channels, channel=channel, beam=beam)

    def _allocate(self, layout: StreamLayout) -> None:
        s = self.settings
        ch = layout.capture_channels
        self._mic = DropOldestRing(layout.rate_hz * ch * s.mic_ring_ms // 1000, align=ch)
        self._ref = DropOldestRing(layout.rate_hz * _REF_RING_MS // 1000)
        self._playout = BoundedRing(layout.rate_hz * s.playout_buffer_ms // 1000)
        self._mic_conv = _Converter(layout.rate_hz, ch, layout.channel, layout.beam)
        self._ref_conv = _Converter(layout.rate_hz, 1, None)
        self._up = _Upsampler(layout.rate_hz)
        self._mic_rechunk = Rechunker(FRAME_SAMPLES, max(RATE_HZ * s.mic_ring_ms // 1000, 4 * FRAME_SAMPLES))

    def _start_streams(self, layout: StreamLayout) -> None:
        import pyaudio

        common: dict[str, Any] = {"format": pyaudio.paInt16, "rate": layout.rate_hz,
                                  "frames_per_buffer": pyaudio.paFramesPerBufferUnspecified, "start": False}
        if layout.duplex:
            self._out_channels = layout.capture_channels
            self._streams = [self._pa.open(channels=layout.capture_channels, input=True, output=True,
                                           input_device_index=layout.capture.index,
                                           output_device_index=layout.playback.index,
                                           stream_callback=self._duplex_callback, **common)]
        else:
            self._streams = [
                self._pa.open(channels=layout.capture_channels, input=True, input_device_index=layout.capture.index,
                              stream_callback=self._input_callback, **common),
                self._pa.open(channels=1, output=True, output_device_index=layout.playback.index,
                              stream_callback=self._output_callback, **common),
            ]
        for stream in self._streams:
            stream.start_stream()

    def restart(self) -> StreamLayout:
        """Close and open the stream(s) again on the same devices, keeping the agent audio still to play.

        For a stream that runs but stopped delivering (a stall): the rings start afresh (the microphone and
        the reference are paired again from the first new block, as after ``open``), the queued playout goes
        on where it stopped. Blocking, like ``open``; ``DeviceError`` if the devices no longer open.
        """
        queued: Samples = np.zeros(self._playout.queued, dtype=np.int16)
        self._playout.read(queued)
        old_rate = self.layout.rate_hz if self.layout is not None else None
        self.close()
        self._capturing = False
        layout = self.open()
        if layout.rate_hz == old_rate:
            self._playout.write(queued)
        elif len(queued):
            # Drop: the device came back at another rate; the rest of the answer would play at the wrong pitch.
            self.counters.underrun_samples += len(queued)
        return layout

    def close(self) -> None:
        """Abort and close the streams and PortAudio (safe to call twice, and after a failure).

        Closing a running stream aborts it (PortAudio drops what the device still buffers) rather than stopping
        it, which would wait for the device to play that out: a stalled or just re-plugged device may never
        do so (measured on the rig: a stall restart blocked in the stop for 55 s). The agent audio still to
        play is in the playout ring, which ``restart`` keeps.
        """
        streams, self._streams = self._streams, []
        for stream in streams:
            # A device that is already gone fails to close cleanly; there is nothing left to do with it.
            with contextlib.suppress(OSError):
                stream.close()
        pa, self._pa = self._pa, None
        if pa is not None:
            pa.terminate()

    # ------------------------------------------------------------------ PortAudio thread
    # Thread boundary: these run on PortAudio's callback thread. They hand over through the rings only.
    def _duplex_callback(self, in_data: bytes | None, frame_count: int, _time: Any,
                         status: int) -> tuple[bytes, int]:
        c = self.counters
        c.callbacks += 1
        if status & _INPUT_FLAGS:
            c.input_xruns += 1
        if status & _OUTPUT_FLAGS:
            c.output_xruns += 1
        if status & _INPUT_UNDERFLOW:
            # Kept: PortAudio padded this block with zeros because no input was ready. Dropping it moved the
            # echo earlier against the reference at every such block (measured: the path shrank step by
            # step towards zero, where no canceller can follow); keeping it moves it later, which the
            # canceller's delay estimator follows. Counted.
            c.input_underflow_samples += frame_count
        if in_data is not None and self._mic is not None:
            block = np.frombuffer(in_data, dtype=np.int16)
            self._mic.write(block)
            c.captured_samples += len(block)
        return self._render(frame_count), _PA_CONTINUE

    def _input_callback(self, in_data: bytes | None, _frame_count: int, _time: Any,
                        status: int) -> tuple[None, int]:
        c = self.counters
        c.callbacks += 1
        if status & _INPUT_FLAGS:
            c.input_xruns += 1
        if in_data is not None and self._mic is not None:
            block = np.frombuffer(in_data, dtype=np.int16)
            self._mic.write(block)
            c.captured_samples += len(block)
        return None, _PA_CONTINUE

    def _output_callback(self, _in_data: bytes | None, frame_count: int, _time: Any,
                         status: int) -> tuple[bytes, int]:
        c = self.counters
        c.callbacks += 1
        if status & _OUTPUT_FLAGS:
            c.output_xruns += 1
        return self._render(frame_count), _PA_CONTINUE

    def _render(self, frame_count: int) -> bytes:
        channels = self._out_channels
        n = min(frame_count, _MAX_DEVICE_BLOCK_SAMPLES // channels)
        out = self._out_block[:n]
        had = self._playout.queued
        got = self._playout.read(out)  # zero-fills the rest of the buffer
        if had > 0 and got < n:
            # Zero-fill mid-stream: the agent's audio did not arrive in time; the visitor hears a gap.
            self.counters.underruns += 1
            self.counters.underrun_samples += n - got
        # The exact samples rendered (silence included) are the echo reference.
        self._ref.write(out)
        self.counters.played_samples += n
        data = out
        if channels > 1:
            # A duplex stream has as many output channels as input ones (PyAudio): the same signal on each.
            data = self._out_multi[: n * channels]
            data.reshape(n, channels)[:] = out[:, None]
        if frame_count > n:
            # Zero-fill: a device block beyond our preallocated size gets silence for the remainder.
            return data.tobytes() + bytes(2 * channels * (frame_count - n))
        return data.tobytes()

    # ------------------------------------------------------------------ loop side
    @property
    def active(self) -> bool:
        """Whether every stream is still running (a vanished device stops them)."""
        try:
            return bool(self._streams) and all(s.is_active() for s in self._streams)
        except OSError:
            return False

    def pump(self) -> int:
        """Move what the callbacks captured into the 16 kHz rechunkers; returns new mic samples (16 kHz)."""
        if self._mic is None or self._mic_conv is None or self._ref_conv is None:
            return 0
        n = self._mic.read(self._mic_scratch)
        self.counters.overrun_samples = self._mic.dropped_samples
        got = 0
        if n and not self._capturing:
            # Drop: the reference rendered before the microphone delivered anything has no microphone
            # audio to pair with (streams start apart); keeping it would pair the echo with a later reference.
            self._capturing = True
            self._ref.clear()
            self._ref_rechunk.clear()
        if n:
            mono = self._mic_conv.convert(self._mic_scratch[:n])
            self._mic_rechunk.push(mono)
            got = len(mono)
        m = self._ref.read(self._ref_scratch)
        if m:
            self._ref_rechunk.push(self._ref_conv.convert(self._ref_scratch[:m]))
        return got

    @property
    def pending_frames(self) -> int:
        """Whole 10 ms microphone frames ready for ``pull``."""
        return self._mic_rechunk.pending_samples // FRAME_SAMPLES

    def pull(self) -> tuple[Samples, Samples] | None:
        """The next (mic, reference) pair of 10 ms 16 kHz frames, or None; buffers are reused per call."""
        mic = self._mic_rechunk.pop()
        if mic is None:
            return None
        self._mic_frame[:] = mic
        ref = self._ref_rechunk.pop()
        if ref is None:
            # Zero-fill: the reference is behind the microphone (two streams start apart); no echo yet.
            self.counters.ref_missing_frames += 1
            self._ref_frame[:] = 0
        else:
            self._ref_frame[:] = ref
        return self._mic_frame, self._ref_frame

    def queue_playout(self, pcm: Samples) -> int:
        """Queue 16 kHz samples for playout as far as they fit; returns how many 16 kHz samples were taken."""
        if self._up is None:
            return 0
        rate = self.layout.rate_hz if self.layout is not None else RATE_HZ
        if rate == RATE_HZ:
            return self._playout.write(pcm)
        room_16k = self._playout.free * RATE_HZ // rate - 64  # the resampler may emit a few extra samples
        take = max(0, min(len(pcm), room_16k))
        if take:
            self._playout.write(self._up.convert(pcm[:take]))
        return take

    @property
    def playout_free_samples(self) -> int:
        """16 kHz samples that fit in the playout buffer now."""
        rate = self.layout.rate_hz if self.layout is not None else RATE_HZ
        return max(0, self._playout.free * RATE_HZ // rate - (64 if rate != RATE_HZ else 0))

    @property
    def playout_queued_samples(self) -> int:
        """16 kHz samples waiting to be played."""
        rate = self.layout.rate_hz if self.layout is not None else RATE_HZ
        return self._playout.queued * RATE_HZ // rate

    def clear_playout(self) -> None:
        """Drop queued playout audio (barge-in)."""
        self._playout.clear()

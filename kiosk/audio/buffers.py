"""Preallocated single-producer single-consumer sample rings between PortAudio's thread and the loop.

The producer and the consumer each own one counter (``written`` / ``read``, in samples since start); a
Python int assignment is atomic under the GIL, so neither side ever takes a lock or waits. The policy is in
the class name:

* ``DropOldestRing`` (microphone, echo reference): the producer always writes; if the consumer fell more
  than a ring behind, the consumer skips to the newest ``capacity`` samples and counts what it lost.
* ``BoundedRing`` (playout): the producer writes only into free space (the engine's ``write`` waits for
  it); the consumer reads what is there and zero-fills the rest of a device buffer, counting underruns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Samples = npt.NDArray[np.int16]


@dataclass
class StreamCounters:
    """What the audio thread and the readers counted; plain ints, read by metrics and tests."""

    callbacks: int = 0  # PortAudio callbacks seen
    captured_samples: int = 0  # device-rate samples (all channels) written into the mic ring
    played_samples: int = 0  # device-rate samples handed to the device
    overrun_samples: int = 0  # mic samples dropped because the loop fell behind (drop-oldest)
    underruns: int = 0  # device buffers that ran out of queued playout audio mid-stream (zero-filled)
    underrun_samples: int = 0  # samples zero-filled in those buffers
    input_xruns: int = 0  # PortAudio input overflow/underflow flags
    input_underflow_samples: int = 0  # duplex: microphone samples PortAudio padded with zeros (kept in the timeline)
    output_xruns: int = 0  # PortAudio output underflow/overflow flags
    ref_missing_frames: int = 0  # two-stream layout: 10 ms frames with no reference yet (zero-filled)


class _Ring:
    def __init__(self, capacity_samples: int, align: int = 1) -> None:
        if capacity_samples <= 0:
            raise ValueError("capacity_samples must be positive")
        capacity = -(-capacity_samples // align) * align  # whole device frames only
        self._buffer: Samples = np.zeros(capacity, dtype=np.int16)
        self.capacity = capacity
        self.align = align
        self.written = 0  # owned by the producer
        self.read_pos = 0  # owned by the consumer

    def _copy_in(self, data: Samples) -> None:
        n = len(data)
        cap = self.capacity
        if n > cap:
            data = data[n - cap:]
            self.written += n - cap
            n = cap
        start = self.written % cap
        first = min(n, cap - start)
        self._buffer[start:start + first] = data[:first]
        if first < n:
            self._buffer[: n - first] = data[first:]
        self.written += n

    def _copy_out(self, out: Samples, n: int) -> None:
        cap = self.capacity
        start = self.read_pos % cap
        first = min(n, cap - start)
        out[:first] = self._buffer[start:start + first]
        if first < n:
            out[first:n] = self._buffer[: n - first]
        self.read_pos += n


class DropOldestRing(_Ring):
    """Producer never waits; a consumer that fell behind loses the oldest audio (counted)."""

    def __init__(self, capacity_samples: int, align: int = 1) -> None:
        super().__init__(capacity_samples, align)
        self.dropped_samples = 0

    def write(self, data: Samples) -> None:
        """Producer (audio thread): append ``data``; never blocks, never allocates."""
        self._copy_in(data)

    @property
    def available(self) -> int:
        """Samples waiting for the consumer (at most ``capacity``)."""
        return min(self.written - self.read_pos, self.capacity)

    def read(self, out: Samples) -> int:
        """Consumer: copy up to ``len(out)`` of the oldest waiting samples into ``out``; returns the count."""
        backlog = self.written - self.read_pos
        if backlog > self.capacity:
            # Drop-oldest: the loop fell more than a ring behind; the newest audio is what matters now.
            lost = backlog - self.capacity
            self.dropped_samples += lost
            self.read_pos += lost
            backlog = self.capacity
        n = min(len(out), backlog)
        n -= n % self.align
        self._copy_out(out, n)
        return n

    def clear(self) -> None:
        """Consumer: forget everything waiting."""
        self.read_pos = self.written


class BoundedRing(_Ring):
    """Producer writes only into free space; the consumer zero-fills what is missing (counted)."""

    def __init__(self, capacity_samples: int, align: int = 1) -> None:
        super().__init__(capacity_samples, align)
        self._discard_to = 0  # set by the producer's clear(); the consumer skips up to it

    @property
    def queued(self) -> int:
        """Samples waiting to be played."""
        return max(0, self.written - max(self.read_pos, self._discard_to))

    @property
    def free(self) -> int:
        """Space the producer may fill now."""
        return self.capacity - (self.written - max(self.read_pos, self._discard_to))

    def write(self, data: Samples) -> int:
        """Producer (loop): append as much of ``data`` as fits; returns how many samples were taken."""
        n = min(len(data), self.free)
        if n > 0:
            self._copy_in(data[:n])
        return n

    def clear(self) -> None:
        """Producer: drop everything queued (barge-in); the consumer skips it at its next read."""
        self._discard_to = self.written

    def read(self, out: Samples) -> int:
        """Consumer (audio thread): fill ``out`` from the queue, zero-fill the rest; returns real samples."""
        discard = self._discard_to
        if self.read_pos < discard:
            self.read_pos = discard
        n = min(len(out), self.written - self.read_pos)
        self._copy_out(out, n)
        if n < len(out):
            # Zero-fill: nothing (more) to play; the device must still get a full buffer of silence.
            out[n:] = 0
        return n

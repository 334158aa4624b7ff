"""The live virtual room: the kiosk's speaker output comes back into its microphone, with a visitor.

A worker thread reads the speaker sink's monitor with ``parec --latency-msec=10``, passes it through
``kiosk_dev.roomsim.StreamingRoom`` (room impulse response, bulk delay, clock drift), adds scheduled
visitor speech and background noise, and writes the result with ``pacat --latency-msec=10`` into the room
sink, whose monitor is the kiosk's microphone (see ``kiosk_dev.pulse``). The room runs on the speaker
sink's clock: one 10 ms block out for every 10 ms block in.

(A second PortAudio duplex stream in another process got no callbacks through the pulse plugin; the
parec/pacat pipe does not have that problem, and its delay steps and drift are realistic trouble for an
echo canceller.)

It records when each visitor utterance was written (room time and monotonic time) so benchmarks can
score detections against the clean speech timeline.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import logging
import os
import subprocess
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import numpy.typing as npt

from kiosk_dev.pulse import ROOM_SINK, SPEAKER_SINK, PulseServer

_LOGGER = logging.getLogger(__name__)

RATE_HZ = 16000
BLOCK_SAMPLES = 160
_NOISE_LOOP_SECONDS = 20
# Audio waiting in a pipe beyond this means the path is growing (the pulse tools deliver and take in
# chunks of a few tens of ms, so less is ordinary jitter).
_MAX_BACKLOG_BYTES = 2 * RATE_HZ * 100 // 1000
_WRITER_RETRY_SECONDS = 0.5  # a writer that ended by itself is replaced at most this often (the sink may be gone)
Signal = npt.NDArray[np.float32]


@dataclass(eq=False)
class ScheduledSpeech:
    """One visitor utterance: where it sits on the room's timeline and when it was actually played."""

    name: str
    start_seconds: float  # room time (seconds of room output since start)
    end_seconds: float
    played_monotonic: float | None = None  # time.monotonic() when its first block went to the room sink
    audio: Signal | None = None
    ident: int = 0


def _pipe_bytes(fd: int) -> int:
    """Bytes waiting in a pipe (either end)."""
    buffer = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buffer, True)
    return int(buffer[0])


class _RoomWorker:
    """The room itself: parec -> room -> pacat on a thread (runs inside the room's own process)."""

    def __init__(self, server: PulseServer | None = None, *, seed: int = 0, delay_ms: float = 0.0,
                 drift_ppm: float = 0.0, echo_gain_db: float = -6.0, noise_kind: str | None = None,
                 noise_dbfs: float = -60.0, rir: Signal | None = None, speaker_sink: str = SPEAKER_SINK,
                 room_sink: str = ROOM_SINK) -> None:
        self._env = {**os.environ, **(server.env if server is not None else {})}
        self.seed = seed
        self.delay_ms = delay_ms
        self.drift_ppm = drift_ppm
        self.echo_gain = float(10 ** (echo_gain_db / 20))
        self.speaker_sink = speaker_sink
        self.room_sink = room_sink
        self._rir = rir
        self._room: Any = None  # kiosk_dev.roomsim.StreamingRoom, built in start()
        self._noise: Signal | None = None
        if noise_kind is not None:
            from kiosk_dev.roomsim import background

            noise = background(noise_kind, _NOISE_LOOP_SECONDS * RATE_HZ, seed + 1)
            self._noise = (noise * np.float32(10 ** (noise_dbfs / 20))).astype(np.float32)
        self._lock = threading.Lock()
        self._schedule: list[ScheduledSpeech] = []
        self.spoken: list[ScheduledSpeech] = []  # utterances that have finished playing, in order
        self.samples_out = 0
        self.skipped_in_samples = 0  # speaker audio dropped because this thread fell behind
        self.skipped_out_samples = 0  # room audio dropped because the room sink's writer fell behind
        self.writer_restarts = 0  # the room sink's writer replaced: fallen behind, or ended by itself
        self.writers_lost = 0  # ... of those, writers that ended by themselves (a stream error on a busy machine)
        self._writer_started = 0.0
        self.far_energy = 0.0  # sum of squares of what the speaker played (to check the room hears it)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._parec: subprocess.Popen[bytes] | None = None
        self._pacat: subprocess.Popen[bytes] | None = None
        self.error: str | None = None
        self.on_started: Callable[[ScheduledSpeech], None] = lambda _item: None
        self.on_spoken: Callable[[ScheduledSpeech], None] = lambda _item: None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start reading the speaker and writing the room."""
        from kiosk_dev.roomsim import StreamingRoom, room_impulse_response

        rir = self._rir if self._rir is not None else room_impulse_response(self.seed)
        self._room = StreamingRoom(rir, delay_ms=self.delay_ms, drift_ppm=self.drift_ppm)
        common = ["--raw", "--format=s16le", f"--rate={RATE_HZ}", "--channels=1", "--latency-msec=10"]
        self._parec = subprocess.Popen(["parec", "-d", f"{self.speaker_sink}.monitor", *common], env=self._env,
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._pacat = self._start_writer()
        self._writer_started = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(target=self._work, name="virtual-room", daemon=True)
        self._thread.start()

    def _start_writer(self) -> subprocess.Popen[bytes]:
        common = ["--raw", "--format=s16le", f"--rate={RATE_HZ}", "--channels=1", "--latency-msec=10"]
        return subprocess.Popen(["pacat", "-d", self.room_sink, *common], env=self._env, stdin=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)

    def _restart_writer(self) -> None:
        old = self._pacat
        self._pacat = self._start_writer()
        self._writer_started = time.monotonic()
        self.writer_restarts += 1
        if old is not None:
            old.kill()
            old.wait()

    def _replace_lost_writer(self) -> bool:
        """The writer ended by itself: start another (at most every half second; False until then).

        Seen in a field soak on a loaded machine: a pacat ended without being asked, the write failed, and the
        room stopped for good, so the kiosk heard none of the visitors' questions for the rest of the run.
        """
        if time.monotonic() - self._writer_started < _WRITER_RETRY_SECONDS:
            return False
        code = self._pacat.poll() if self._pacat is not None else None
        self.writers_lost += 1
        _LOGGER.warning("the room's writer ended (exit status %s); starting another", code)
        self._restart_writer()
        return True

    def stop(self) -> None:
        """Stop the thread and both processes (by their own ids)."""
        self._stop.set()
        for process in (self._parec, self._pacat):
            if process is not None and process.poll() is None:
                process.terminate()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for process in (self._parec, self._pacat):
            if process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=5)
        self._parec = self._pacat = None
        self._thread = None

    # ------------------------------------------------------------------ scheduling
    @property
    def now_seconds(self) -> float:
        """Room time: seconds of audio written to the room so far."""
        return self.samples_out / RATE_HZ

    def say(self, audio: Signal, *, at_seconds: float | None = None, name: str = "visitor",
            ident: int = 0) -> ScheduledSpeech:
        """Schedule visitor speech (16 kHz float) at room time ``at_seconds`` (default: as soon as possible)."""
        start = self.now_seconds + 0.02 if at_seconds is None else at_seconds
        item = ScheduledSpeech(name=name, start_seconds=start, end_seconds=start + len(audio) / RATE_HZ,
                               audio=np.asarray(audio, dtype=np.float32), ident=ident)
        with self._lock:
            self._schedule.append(item)
            self._schedule.sort(key=lambda s: s.start_seconds)
        return item

    def say_in(self, delay_seconds: float, audio: Signal, name: str = "visitor") -> ScheduledSpeech:
        """Schedule visitor speech ``delay_seconds`` from now (room time)."""
        return self.say(audio, at_seconds=self.now_seconds + delay_seconds, name=name)

    def speech_timeline(self) -> list[tuple[float, float]]:
        """(start, end) room seconds of every utterance played so far: the clean truth for scoring."""
        return [(s.start_seconds, s.end_seconds) for s in self.spoken]

    @property
    def busy(self) -> bool:
        """Whether scheduled speech is still waiting or playing."""
        with self._lock:
            return bool(self._schedule)

    # ------------------------------------------------------------------ worker thread
    def _read_block(self, fd: int, buffer: bytearray) -> bool:
        view = memoryview(buffer)
        got = 0
        while got < len(buffer):
            n = os.readv(fd, [view[got:]])
            if n == 0:
                return False
            got += n
        return True

    def _work(self) -> None:
        # Thread boundary: this thread owns the two pipes; the test/demo thread only adds to the schedule
        # (under the lock) and reads counters.
        assert self._parec is not None and self._pacat is not None
        assert self._parec.stdout is not None and self._pacat.stdin is not None
        fd = self._parec.stdout.fileno()
        raw = bytearray(BLOCK_SAMPLES * 2)
        out = self._pacat.stdin
        out_fd = out.fileno()
        try:
            while not self._stop.is_set():
                if not self._read_block(fd, raw):
                    break
                if _pipe_bytes(fd) > _MAX_BACKLOG_BYTES:
                    # Drop: this process was held up and the speaker audio piled up in the pipe; playing the
                    # pile would add its length to the echo path for good. Skipping it is a delay step, as
                    # real audio paths make; counted.
                    skipped = _pipe_bytes(fd) // 2 * 2
                    os.read(fd, skipped)
                    self.skipped_in_samples += skipped // 2
                if _pipe_bytes(out_fd) > _MAX_BACKLOG_BYTES:
                    # Drop: the room sink's writer fell behind and its pipe holds late room audio, which would
                    # lengthen the echo path for good. Restarting it discards the backlog (a short gap and a
                    # delay step back, as a re-buffering audio path makes); counted.
                    self.skipped_out_samples += _pipe_bytes(out_fd) // 2
                    self._restart_writer()
                    assert self._pacat is not None and self._pacat.stdin is not None
                    out = self._pacat.stdin
                    out_fd = out.fileno()
                far = np.frombuffer(bytes(raw), dtype="<i2").astype(np.float32) / 32768.0
                self.far_energy += float(np.dot(far, far))
                mix = self._room.process(far) * np.float32(self.echo_gain)
                self._add_speech(mix)
                if self._noise is not None:
                    start = self.samples_out % len(self._noise)
                    idx = (start + np.arange(BLOCK_SAMPLES)) % len(self._noise)
                    mix += self._noise[idx]
                pcm = np.clip(mix * 32768.0, -32768, 32767).astype("<i2")
                try:
                    out.write(pcm.tobytes())
                    out.flush()
                except (BrokenPipeError, OSError, ValueError):
                    if self._stop.is_set():
                        break
                    # Drop: this block, while no writer takes it (the room's time goes on); counted.
                    self.skipped_out_samples += BLOCK_SAMPLES
                    if self._replace_lost_writer():
                        assert self._pacat is not None and self._pacat.stdin is not None
                        out = self._pacat.stdin
                        out_fd = out.fileno()
                self.samples_out += BLOCK_SAMPLES
        except (BrokenPipeError, OSError, ValueError) as error:
            if not self._stop.is_set():
                # The room sink or the speaker monitor went away (a test unplugged the device).
                self.error = str(error)
                _LOGGER.info("virtual room stopped: %s", error)

    def _add_speech(self, mix: Signal) -> None:
        t0 = self.samples_out
        t1 = t0 + BLOCK_SAMPLES
        with self._lock:
            pending = list(self._schedule)
        for item in pending:
            start = int(round(item.start_seconds * RATE_HZ))
            assert item.audio is not None
            end = start + len(item.audio)
            if start >= t1:
                break
            if end <= t0:
                self._finish(item)
                continue
            if item.played_monotonic is None:
                item.played_monotonic = time.monotonic()
                self.on_started(item)
            a, b = max(start, t0), min(end, t1)
            mix[a - t0:b - t0] += item.audio[a - start:b - start]
            if end <= t1:
                self._finish(item)

    def _finish(self, item: ScheduledSpeech) -> None:
        with self._lock:
            if item not in self._schedule:
                return
            self._schedule.remove(item)
            item.audio = None
            self.spoken.append(item)
        self.on_spoken(item)


# ------------------------------------------------------------------------------------------ process
class VirtualRoom:
    """The room simulator in a process of its own; ``start()`` / ``stop()`` (or ``with``), scheduling APIs.

    Its own process keeps it clear of the kiosk's interpreter lock: in the same process as the engine it
    was held up often enough to skip seconds of audio on a loaded machine. Arguments as ``_RoomWorker``.
    """

    def __init__(self, server: PulseServer | None = None, *, seed: int = 0, delay_ms: float = 0.0,
                 drift_ppm: float = 0.0, echo_gain_db: float = -6.0, noise_kind: str | None = None,
                 noise_dbfs: float = -60.0, rir: Signal | None = None, speaker_sink: str = SPEAKER_SINK,
                 room_sink: str = ROOM_SINK) -> None:
        self._env = {**os.environ, **(server.env if server is not None else {})}
        self._config: dict[str, Any] = {
            "seed": seed, "delay_ms": delay_ms, "drift_ppm": drift_ppm, "echo_gain_db": echo_gain_db,
            "noise_kind": noise_kind, "noise_dbfs": noise_dbfs, "rir": rir, "speaker_sink": speaker_sink,
            "room_sink": room_sink}
        self._process: subprocess.Popen[bytes] | None = None
        self._send: Connection | None = None
        self._recv: Connection | None = None
        self._send_lock = threading.Lock()
        self._receiver: threading.Thread | None = None
        self._ready = threading.Event()
        self._items: dict[int, ScheduledSpeech] = {}
        self._next = 1
        self.spoken: list[ScheduledSpeech] = []
        self.samples_out = 0
        self.skipped_in_samples = 0
        self.skipped_out_samples = 0
        self.writer_restarts = 0
        self.far_energy = 0.0
        self.error: str | None = None

    def start(self) -> None:
        """Start the room process and wait until it runs."""
        import sys

        self._process = subprocess.Popen([sys.executable, "-m", "kiosk_dev.virtual_room"], env=self._env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self._process.stdin is not None and self._process.stdout is not None
        self._send = Connection(os.dup(self._process.stdin.fileno()), readable=False)
        self._recv = Connection(os.dup(self._process.stdout.fileno()), writable=False)
        self._send.send(self._config)
        self._receiver = threading.Thread(target=self._receive, name="virtual-room-rx", daemon=True)
        self._receiver.start()
        if not self._ready.wait(60):
            self.stop()
            raise RuntimeError("the virtual room did not start within 60 s")

    def restart(self) -> None:
        """Stop the room process and start a fresh one (after its sinks went away and came back)."""
        self.stop()
        self._ready.clear()
        self.error = None
        self.start()

    def _receive(self) -> None:
        # Thread boundary: reads the room process's reports; the caller's thread only reads the fields.
        assert self._recv is not None
        while True:
            try:
                message = self._recv.recv()
            except (EOFError, OSError):
                return
            kind = message[0]
            if kind == "ready":
                self._ready.set()
            elif kind == "tick":
                (_, self.samples_out, self.skipped_in_samples, self.skipped_out_samples, self.writer_restarts,
                 self.far_energy, self.error) = message
            elif kind == "started":
                _, ident, start, played = message
                item = self._items.get(ident)
                if item is not None:
                    duration = item.end_seconds - item.start_seconds
                    item.start_seconds, item.end_seconds, item.played_monotonic = start, start + duration, played
            elif kind == "spoken":
                item = self._items.pop(message[1], None)
                if item is not None:
                    self.spoken.append(item)

    def stop(self) -> None:
        """Stop the room process (by its own id)."""
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(OSError, ValueError), self._send_lock:
            assert self._send is not None
            self._send.send(("stop",))
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        for conn in (self._send, self._recv):
            if conn is not None:
                conn.close()
        if self._receiver is not None:
            self._receiver.join(timeout=5)
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()

    def __enter__(self) -> VirtualRoom:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def now_seconds(self) -> float:
        """Room time (as last reported, every 50 ms): seconds of audio written to the room so far."""
        return self.samples_out / RATE_HZ

    def say(self, audio: Signal, *, at_seconds: float | None = None, name: str = "visitor") -> ScheduledSpeech:
        """Schedule visitor speech (16 kHz float) at room time ``at_seconds`` (default: as soon as possible).

        The returned item's ``start_seconds`` and ``played_monotonic`` are filled in once it starts playing.
        """
        audio = np.asarray(audio, dtype=np.float32)
        start = self.now_seconds + 0.02 if at_seconds is None else at_seconds
        ident, self._next = self._next, self._next + 1
        item = ScheduledSpeech(name=name, start_seconds=start, end_seconds=start + len(audio) / RATE_HZ,
                               ident=ident)
        self._items[ident] = item
        with self._send_lock:
            assert self._send is not None
            self._send.send(("say", ident, name, at_seconds, audio))
        return item

    def say_in(self, delay_seconds: float, audio: Signal, name: str = "visitor") -> ScheduledSpeech:
        """Schedule visitor speech ``delay_seconds`` from now (room time)."""
        return self.say(audio, at_seconds=self.now_seconds + delay_seconds, name=name)

    def speech_timeline(self) -> list[tuple[float, float]]:
        """(start, end) room seconds of every utterance played so far: the clean truth for scoring."""
        return [(s.start_seconds, s.end_seconds) for s in self.spoken]

    @property
    def busy(self) -> bool:
        """Whether scheduled speech is still waiting or playing."""
        return bool(self._items)


def _child_main() -> None:
    """The room process: config from stdin, then commands; reports on stdout."""
    recv = Connection(os.dup(0), writable=False)
    send = Connection(os.dup(1), readable=False)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nothing else may write into the report channel
    config = recv.recv()
    lock = threading.Lock()

    def report(message: tuple[Any, ...]) -> None:
        with lock:
            send.send(message)

    worker = _RoomWorker(None, **config)
    worker.on_started = lambda item: report(("started", item.ident, item.start_seconds, item.played_monotonic))
    worker.on_spoken = lambda item: report(("spoken", item.ident))
    worker.start()
    report(("ready",))
    try:
        while True:
            if recv.poll(0.05):
                message = recv.recv()
                if message[0] == "stop":
                    break
                _, ident, name, at_seconds, audio = message
                worker.say(audio, at_seconds=at_seconds, name=name, ident=ident)
            report(("tick", worker.samples_out, worker.skipped_in_samples, worker.skipped_out_samples,
                    worker.writer_restarts, worker.far_energy, worker.error))
    except (EOFError, OSError):
        pass  # the parent went away: stop the room
    finally:
        worker.stop()


if __name__ == "__main__":
    _child_main()

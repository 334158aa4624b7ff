"""Per-room figures of one system's run, and their aggregation per room class and half.

Labels come from the room's parts (never from a system's output):

- the visitor's speech frames: frames of the clean visitor at microphone 0 within 25 dB of the
  interruption's loudest frame, pauses up to 200 ms filled; an interruption's *onset* is its first frame
  within 20 dB of that loudest frame;
- the visitor is *silent* outside ``[start - 0.1 s, end + 0.5 s]`` of every interruption (the reverberant
  tail and a detector's hold are not counted against anyone);
- the agent *speaks* where the echo at microphone 0 is within 30 dB of its active level (pauses up to
  300 ms filled); *agent-only* frames are those where the agent speaks and the visitor is silent.

Figures:

- an interruption is *caught within 300 ms* when the chain reports the visitor speaking (a VoiceStarted
  emitted, or a segment already open) at the end of some frame within 300 ms of the onset; the latency is
  from the onset to the end of the first such frame. ``strict`` counts only a VoiceStarted emitted in that
  window (a segment opened earlier by something else does not count);
- false speech: seconds inside reported speech segments (VoiceStarted.at_seconds to VoiceStopped.at_seconds,
  what ``kiosk audio process --vad`` writes) over agent-only frames, per minute of agent-only time; false
  VoiceStarted: barge-ins emitted while the visitor is silent, per minute of agent speech;
- recall / precision of the visitor's speech frames against the reported segments;
- double-talk SDR: BSS-Eval style (the system's clean target through the best fixed 512-tap filter) over
  the interruptions, all of which are spoken over the agent; the target is the visitor at microphone 0, or
  the visitor through the same fixed front end (beamformer) for array variants;
- ERLE: microphone 0 over the output on agent-only frames (backgrounds included, so noise suppression
  counts), and ``erle_echo_db`` on the agent-only frames where the echo stands 10 dB over the background.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from kiosk.audio.format import FRAME_SAMPLES, RATE_HZ
from kiosk_dev.bench.aec import sdr_db

if TYPE_CHECKING:
    from kiosk_dev.rooms.generate import Room

FRAME = FRAME_SAMPLES
FRAME_S = FRAME / RATE_HZ
DETECT_S = 0.3
TARGET_SER_DB = -10.0
Mask = npt.NDArray[np.bool_]


def frame_power(x: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """Mean power of each whole 10 ms frame of int16 samples, full scale 1."""
    n = len(x) // FRAME
    power: npt.NDArray[np.float64] = np.mean(np.square(x[: n * FRAME].astype(np.float64) / 32768.0).reshape(n, FRAME),
                                             axis=1)
    return power


def fill_gaps(mask: Mask, max_gap: int) -> Mask:
    """``mask`` with runs of up to ``max_gap`` False frames between True frames set True."""
    out = mask.copy()
    idx = np.flatnonzero(mask)
    if idx.size < 2:
        return out
    gaps = np.diff(idx)
    for i in np.flatnonzero((gaps > 1) & (gaps <= max_gap + 1)):
        out[idx[i]:idx[i + 1]] = True
    return out


@dataclass
class RoomLabels:
    """Per-frame labels of one room."""

    frames: int
    onsets: list[int]  # frame index of each interruption's onset
    visitor_speech: Mask
    visitor_silent: Mask
    agent: Mask
    agent_only: Mask
    echo_dominant: Mask
    spans: list[tuple[int, int]]  # interruption sample ranges


def room_labels(room: Room) -> RoomLabels:
    """Labels from a rendered room's parts (never from a system's output)."""
    n = room.mics.shape[1] // FRAME
    vp = frame_power(room.visitor[0])[:n]
    ep = frame_power(room.echo0)[:n]
    npow = frame_power(room.noise0)[:n]
    speech = np.zeros(n, dtype=bool)
    silent = np.ones(n, dtype=bool)
    onsets: list[int] = []
    spans: list[tuple[int, int]] = []
    for it in room.labels["interruptions"]:
        a, b = int(it["start_s"] / FRAME_S), min(n, int(math.ceil(it["end_s"] / FRAME_S)))
        seg = vp[a:b + 10]
        peak = float(seg.max())
        onset = a + int(np.argmax(seg >= peak * 10 ** (-20 / 10)))
        onsets.append(onset)
        speech[a:b + 10] |= seg >= peak * 10 ** (-25 / 10)
        silent[max(0, a - 10):min(n, b + 50)] = False
        spans.append((int(it["start_s"] * RATE_HZ), int(it["end_s"] * RATE_HZ)))
    speech = fill_gaps(speech, 20) & ~silent
    active = ep > 0
    level = float(np.sqrt(np.mean(ep[ep > ep.max() * 1e-4]))) ** 2 if active.any() else 0.0
    agent = fill_gaps(ep >= level * 10 ** (-30 / 10), 30)
    return RoomLabels(frames=n, onsets=onsets, visitor_speech=speech, visitor_silent=silent, agent=agent,
                      agent_only=agent & silent, echo_dominant=ep >= 10 * npow, spans=spans)


@dataclass
class RunOutput:
    """What a system produced on one room."""

    out: npt.NDArray[np.int16]  # cleaned mono output
    starts: list[int]  # frames whose processing emitted VoiceStarted
    stops: list[int]  # frames whose processing emitted VoiceStopped
    segments: list[tuple[float, float]]  # reported speech (VoiceStarted.at_seconds, VoiceStopped.at_seconds)
    target: npt.NDArray[np.float64]  # the clean visitor as this system's front end passes it (for SDR)
    cpu_s: float
    extra: dict[str, Any] = field(default_factory=dict)


def room_figures(room: Room, labels: RoomLabels, run: RunOutput) -> dict[str, Any]:
    """All figures of one run on one room (plain data)."""
    n = labels.frames
    in_speech = np.zeros(n, dtype=bool)
    events = sorted([(k, 1) for k in run.starts] + [(k, 0) for k in run.stops])
    state, last = False, 0
    for k, kind in events:
        if k >= n:
            break
        in_speech[last:k] = state
        state = kind == 1
        last = k
    in_speech[last:] = state
    # ``in_speech[k]``: a segment is open after frame k was processed.
    for k, kind in events:
        if kind == 1 and k < n:
            in_speech[k] = True
    seg_mask = np.zeros(n, dtype=bool)
    for a, b in run.segments:
        seg_mask[max(0, int(a / FRAME_S)):min(n, int(math.ceil(b / FRAME_S)))] = True
    starts = set(run.starts)
    inter: list[dict[str, Any]] = []
    for onset, it in zip(labels.onsets, room.labels["interruptions"], strict=True):
        window = in_speech[onset:onset + int(DETECT_S / FRAME_S)]
        hits = np.flatnonzero(in_speech[onset:onset + 300])
        latency = (int(hits[0]) + 1) * FRAME_S if hits.size else None
        strict = any(k in starts for k in range(onset, onset + int(DETECT_S / FRAME_S)))
        inter.append({"onset_s": onset * FRAME_S, "caught": bool(window.any()), "strict": strict,
                      "latency_s": latency, "pre_open": bool(in_speech[max(0, onset - 1)]),
                      "language": it["language"], "source": it["source"]})
    agent_only_s = float(labels.agent_only.sum()) * FRAME_S
    agent_s = float(labels.agent.sum()) * FRAME_S
    bg_only = ~labels.agent & labels.visitor_silent
    false_starts = sum(1 for k in run.starts if k < n and labels.visitor_silent[k] and labels.agent[k])
    false_starts_bg = sum(1 for k in run.starts if k < n and labels.visitor_silent[k] and not labels.agent[k])
    mic0 = room.mics[0].astype(np.float64)
    out = run.out.astype(np.float64)
    mp = frame_power(mic0)[:n]
    op = frame_power(out)[:n]
    m = labels.agent_only
    erle = 10 * math.log10(max(mp[m].sum(), 1e-20) / max(op[m].sum(), 1e-20)) if m.any() else None
    me = m & labels.echo_dominant
    erle_echo = (10 * math.log10(max(mp[me].sum(), 1e-20) / max(op[me].sum(), 1e-20))
                 if me.sum() > 100 else None)
    speech = labels.visitor_speech
    tp = float((seg_mask & speech).sum())
    spans = labels.spans
    sdr, _ = sdr_db(run.target, out / 32768.0, spans)
    return {
        "seed": room.spec.seed, "class": room.spec.room_class, "split": room.spec.split,
        "ser_db": room.spec.ser_db, "snr_db": room.spec.snr_db, "rt60_s": room.spec.rt60_s,
        "clipping": room.spec.clipping, "drift_ppm": room.spec.drift_ppm, "steps": len(room.spec.delay_steps),
        "interruptions": inter,
        "false_speech_s": float((seg_mask & m).sum()) * FRAME_S, "agent_only_s": agent_only_s, "agent_s": agent_s,
        "false_starts": false_starts, "false_speech_bg_s": float((seg_mask & bg_only).sum()) * FRAME_S,
        "bg_only_s": float(bg_only.sum()) * FRAME_S, "false_starts_bg": false_starts_bg,
        "recall": tp / max(float(speech.sum()), 1.0), "precision": tp / max(float(seg_mask.sum()), 1.0),
        "sdr_db": sdr, "erle_db": erle, "erle_echo_db": erle_echo,
        "cpu_us_per_frame": run.cpu_s / max(n, 1) * 1e6, **run.extra,
    }


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Pooled figures over rooms (detection over interruptions, false speech over agent-only time)."""
    inter = [i for r in rows for i in r["interruptions"]]
    target = [i for r in rows for i in r["interruptions"] if r["ser_db"] >= TARGET_SER_DB]
    lat = [i["latency_s"] for i in inter if i["latency_s"] is not None]
    agent_min = sum(r["agent_only_s"] for r in rows) / 60.0
    agent_all_min = sum(r["agent_s"] for r in rows) / 60.0
    bg_min = sum(r["bg_only_s"] for r in rows) / 60.0
    erle = [r["erle_db"] for r in rows if r["erle_db"] is not None]
    erle_echo = [r["erle_echo_db"] for r in rows if r["erle_echo_db"] is not None]
    sdr = [r["sdr_db"] for r in rows]
    return {
        "rooms": len(rows),
        "interruptions": len(inter),
        "caught_300ms": sum(i["caught"] for i in inter) / max(len(inter), 1),
        "caught_300ms_ser_ge_-10": sum(i["caught"] for i in target) / max(len(target), 1),
        "interruptions_ser_ge_-10": len(target),
        "strict_300ms": sum(i["strict"] for i in inter) / max(len(inter), 1),
        "caught_at_all": len(lat) / max(len(inter), 1),
        "median_latency_s": float(np.median(lat)) if lat else None,
        "false_speech_s_per_min": sum(r["false_speech_s"] for r in rows) / max(agent_min, 1e-9),
        "false_starts_per_min": sum(r["false_starts"] for r in rows) / max(agent_all_min, 1e-9),
        "false_speech_bg_s_per_min": sum(r["false_speech_bg_s"] for r in rows) / max(bg_min, 1e-9),
        "recall": float(np.mean([r["recall"] for r in rows])) if rows else None,
        "precision": float(np.mean([r["precision"] for r in rows])) if rows else None,
        "sdr_db_mean": float(np.mean(sdr)) if sdr else None,
        "sdr_db_min": float(np.min(sdr)) if sdr else None,
        "erle_db_mean": float(np.mean(erle)) if erle else None,
        "erle_echo_db_mean": float(np.mean(erle_echo)) if erle_echo else None,
        "cpu_us_per_frame": float(np.mean([r["cpu_us_per_frame"] for r in rows])) if rows else None,
    }

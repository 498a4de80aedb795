"""Chrome Trace Event JSON from engine events (opens in Perfetto and chrome://tracing).

Layout: one process ("kvscope engine"), one track (tid) per session, named
"<current name> (<id>)", plus track 0 for the shared prefix store. Turns,
prefill chunks and decode steps are complete (`X`) events whose start and
duration were read around the work itself, so they nest strictly per track
(`trace_problems` checks it); cache changes are instant (`i`) events. Times
are whole microseconds since the engine started.

Knows nothing about mx arrays; reads only the event dataclasses.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from kvscope.engine.atomic_io import atomic_write
from kvscope.engine.errors import InvalidRequestError
from kvscope.engine.events import (
    Event,
    GenerationFinished,
    PrefillChunk,
    SessionCreated,
    TokenSampled,
)

_PID = 1


def _args(ev: Event) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(ev):
        if f.name == "t_ms":
            continue
        v = getattr(ev, f.name)
        out[f.name] = (
            v
            if isinstance(v, (str, int, float, bool, type(None)))
            else json.loads(json.dumps(asdict(ev)[f.name], default=str))
        )
    return out


def _complete_span(ev: Event) -> tuple[str, str, float, float] | None:
    """(name, category, start ms, end ms) of events drawn as complete (X) slices.

    The engine stamps each such event with the time its work began and its
    duration, both read around the work itself, so a decode step lies inside
    its turn and ends where the next step begins.
    """
    if isinstance(ev, PrefillChunk):
        return "prefill", "prefill", ev.start_ms, ev.start_ms + ev.dur_ms
    if isinstance(ev, TokenSampled):
        return ("ttft" if ev.index == 0 else "decode"), "decode", ev.start_ms, ev.start_ms + ev.step_ms
    if isinstance(ev, GenerationFinished):
        return "turn", "turn", ev.start_ms, ev.start_ms + ev.dur_ms
    return None


def _us(ms: float) -> int:
    return int(round(ms * 1000.0))


def _track_names(events: list[Event], names: dict[str, str] | None) -> dict[str, str]:
    """Each session's current name (else its first one), made unique with its id."""
    out: dict[str, str] = {}
    for ev in events:
        if isinstance(ev, SessionCreated):
            out.setdefault(ev.session, ev.name)
    out.update(names or {})
    return {sid: f"{name} ({sid})" if name != sid else f"session {sid}" for sid, name in out.items()}


def trace_events(events: list[Event], names: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Convert engine events to Chrome trace events (one track per session, `names` = current names)."""
    labels = _track_names(events, names)
    tids: dict[str, int] = {}
    out: list[dict[str, Any]] = [
        {"ph": "M", "pid": _PID, "tid": 0, "name": "process_name", "args": {"name": "kvscope engine"}},
        {"ph": "M", "pid": _PID, "tid": 0, "name": "thread_name", "args": {"name": "prefix store"}},
    ]

    def tid_of(session: str | None) -> int:
        if session is None:
            return 0
        if session not in tids:
            tids[session] = len(tids) + 1
            name = labels.get(session, f"session {session}")
            out.append({"ph": "M", "pid": _PID, "tid": tids[session], "name": "thread_name", "args": {"name": name}})
        return tids[session]

    for ev in events:
        tid = tid_of(getattr(ev, "session", None))
        if isinstance(ev, SessionCreated):
            continue
        span = _complete_span(ev)
        if span is not None:
            name, cat, start_ms, end_ms = span
            ts = _us(start_ms)
            out.append(
                {
                    "ph": "X",
                    "pid": _PID,
                    "tid": tid,
                    "name": name,
                    "cat": cat,
                    "ts": ts,
                    "dur": max(_us(end_ms) - ts, 0),
                    "args": _args(ev),
                }
            )
        else:
            out.append(
                {
                    "ph": "i",
                    "s": "t",
                    "pid": _PID,
                    "tid": tid,
                    "name": type(ev).__name__,
                    "cat": "cache",
                    "ts": _us(ev.t_ms),
                    "args": _args(ev),
                }
            )
    # Turns are emitted after their steps; in the file every track runs forward in time, parents first.
    meta = [e for e in out if e["ph"] == "M"]
    timed = sorted((e for e in out if e["ph"] != "M"), key=lambda e: (e["ts"], -e.get("dur", 0)))
    return meta + timed


def trace_problems(doc: dict[str, Any]) -> list[str]:
    """What a strict trace viewer would reject: mis-nested or unordered slices, duplicate track names.

    Per track, complete slices must nest (a slice that starts inside another
    ends inside it too) and begin in timestamp order; every track's name is
    unique.
    """
    problems = []
    names: dict[tuple[int, int], str] = {}
    slices: dict[tuple[int, int], list[tuple[int, int, str]]] = {}
    for e in doc.get("traceEvents", []):
        track = (e.get("pid", 0), e.get("tid", 0))
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            names[track] = e["args"]["name"]
        elif e.get("ph") == "X":
            slices.setdefault(track, []).append((int(e["ts"]), int(e["ts"]) + int(e["dur"]), e["name"]))
    dupes = [n for n in set(names.values()) if list(names.values()).count(n) > 1]
    problems += [f"two tracks are named {n!r}" for n in sorted(dupes)]
    for track, spans in slices.items():
        if any(b[0] < a[0] for a, b in zip(spans, spans[1:])):
            problems.append(f"track {names.get(track, track)}: slices are not in timestamp order")
        stack: list[tuple[int, int, str]] = []
        for lo, hi, name in sorted(spans, key=lambda x: (x[0], -x[1])):
            while stack and stack[-1][1] <= lo:
                stack.pop()
            if stack and hi > stack[-1][1]:
                parent = stack[-1]
                problems.append(
                    f"track {names.get(track, track)}: {name} [{lo}, {hi}] overlaps {parent[2]} [{parent[0]}, {parent[1]}]"
                )
            stack.append((lo, hi, name))
    return problems


def write_trace(events: list[Event], path: str | os.PathLike[str], names: dict[str, str] | None = None) -> Path:
    """Write `{"traceEvents": [...]}` atomically; returns the path written."""
    path = Path(path)
    doc = {"traceEvents": trace_events(events, names), "displayTimeUnit": "ms"}
    return atomic_write(path, json.dumps(doc).encode())


def write_trace_checked(events: list[Event], path: str | os.PathLike[str], names: dict[str, str]) -> Path:
    """`write_trace`, with a failure to write said as an `InvalidRequestError` naming the path."""
    try:
        return write_trace(events, path, names)
    except OSError as exc:
        raise InvalidRequestError(f"cannot write trace to {path}: {exc.strerror or exc}") from exc

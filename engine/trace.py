"""Chrome Trace Event JSON from engine events (opens in Perfetto and chrome://tracing).

Layout: one process ("kvscope engine"), one track (tid) per session plus
track 0 for the shared prefix store. Prefill chunks and decode steps are
complete (`X`) events with `dur`; cache changes are instant (`i`) events.
Times are microseconds since the engine started.

Knows nothing about mx arrays; reads only the event dataclasses.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

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


def _complete_span(ev: Event) -> tuple[str, str, float] | None:
    """(name, category, duration ms) for events drawn as complete (X) slices."""
    if isinstance(ev, PrefillChunk):
        return "prefill", "prefill", ev.dur_ms
    if isinstance(ev, TokenSampled):
        return ("ttft" if ev.index == 0 else "decode"), "decode", ev.step_ms
    if isinstance(ev, GenerationFinished):
        return "turn", "turn", ev.dur_ms
    return None


def trace_events(events: list[Event]) -> list[dict[str, Any]]:
    """Convert engine events to Chrome trace events."""
    tids: dict[str, int] = {}
    out: list[dict[str, Any]] = [
        {"ph": "M", "pid": _PID, "tid": 0, "name": "process_name", "args": {"name": "kvscope engine"}},
        {"ph": "M", "pid": _PID, "tid": 0, "name": "thread_name", "args": {"name": "prefix store"}},
    ]

    def tid_of(session: str | None, name: str | None = None) -> int:
        if session is None:
            return 0
        if session not in tids:
            tids[session] = len(tids) + 1
            out.append(
                {
                    "ph": "M",
                    "pid": _PID,
                    "tid": tids[session],
                    "name": "thread_name",
                    "args": {"name": name or f"session {session}"},
                }
            )
        return tids[session]

    for ev in events:
        session = getattr(ev, "session", None)
        if isinstance(ev, SessionCreated):
            tid_of(ev.session, f"session {ev.name}")
            continue
        tid = tid_of(session)
        ts = ev.t_ms * 1000.0
        span = _complete_span(ev)
        if span is not None:  # an X event ends at the event's timestamp
            name, cat, dur_ms = span
            out.append(
                {
                    "ph": "X",
                    "pid": _PID,
                    "tid": tid,
                    "name": name,
                    "cat": cat,
                    "ts": ts - dur_ms * 1000.0,
                    "dur": dur_ms * 1000.0,
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
                    "ts": ts,
                    "args": _args(ev),
                }
            )
    return out


def write_trace(events: list[Event], path: str | os.PathLike[str]) -> Path:
    """Write `{"traceEvents": [...]}` atomically; returns the path written."""
    path = Path(path)
    doc = {"traceEvents": trace_events(events), "displayTimeUnit": "ms"}
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(doc, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path

"""The server's requests as records people (and the window) look at.

A `RequestRecord` is one request: who sent it, the session it became, its
numbers (prompt, cached, prefilled, TTFT, tok/s) and where its prefix broke.
The `RequestLog` keeps them in arrival order, numbers them, names each one
by its client and that client's request count ("agent-a #3"), remembers
which are pinned, tells listeners about every change (from any thread) and
appends request bodies to a `--record` JSON-lines file.

Knows nothing about mx, HTTP or Qt.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

Listener = Callable[["RequestRecord"], None]


@dataclass
class RequestRecord:
    id: int
    client: str
    step: int  # the client's request number, from 1
    endpoint: str  # "chat" | "completions"
    created: float  # unix time
    stream: bool
    workflow_step: int | None = None  # the step the client gave (header or metadata), if any
    session: str | None = None  # engine session id, once made
    status: str = "queued"  # queued | running | done | error | cancelled
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float = 0.0
    decode_tps: float = 0.0
    prefill_tps: float = 0.0
    finish_reason: str = ""
    error: str = ""
    prefix_break: dict[str, Any] = field(default_factory=dict)
    pinned: bool = False
    retired: bool = False  # its session was closed to stay under the budget
    last_used: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return f"{self.client} #{self.step}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["name"] = self.name
        d.pop("last_used")
        return d


class RequestLog:
    """Arrival-ordered records, thread-safe; listeners hear every change."""

    def __init__(self, record_path: str | Path | None = None, keep: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._records: dict[int, RequestRecord] = {}
        self._per_client: dict[str, int] = {}
        self._listeners: list[Listener] = []
        self._keep = keep
        self._record_path = Path(record_path) if record_path else None
        if self._record_path is not None:
            self._record_path.parent.mkdir(parents=True, exist_ok=True)
            self._record_path.touch()

    # ------------------------------------------------------------ changes
    def new(
        self,
        client: str,
        endpoint: str,
        stream: bool,
        body: dict[str, Any] | None = None,
        workflow_step: int | None = None,
    ) -> RequestRecord:
        with self._lock:
            step = self._per_client.get(client, 0) + 1
            self._per_client[client] = step
            rid = max(self._records, default=0) + 1
            rec = RequestRecord(rid, client, step, endpoint, time.time(), stream, workflow_step=workflow_step)
            self._records[rid] = rec
            for old in list(self._records)[: max(0, len(self._records) - self._keep)]:
                del self._records[old]
            if body is not None and self._record_path is not None:
                line = dict(body, agent=client, ts=round(rec.created, 3))
                if workflow_step is not None:  # only a step the client gave (see server/workflow.py)
                    line["step"] = workflow_step
                with self._record_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.changed(rec)
        return rec

    def update(self, rec: RequestRecord, **fields: Any) -> None:
        with self._lock:
            for k, v in fields.items():
                setattr(rec, k, v)
        self.changed(rec)

    def pin(self, rid: int, pinned: bool) -> RequestRecord:
        rec = self.get(rid)
        self.update(rec, pinned=pinned)
        return rec

    def changed(self, rec: RequestRecord) -> None:
        for fn in list(self._listeners):
            fn(rec)

    def subscribe(self, fn: Listener) -> Callable[[], None]:
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None

    # ------------------------------------------------------------ queries
    def get(self, rid: int) -> RequestRecord:
        with self._lock:
            return self._records[rid]

    def all(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records.values())

    def is_request_session(self, sid: str, name: str) -> bool:
        """Whether a just-created session belongs to a request (its record and name exist before it does)."""
        with self._lock:
            return any(
                r.session == sid or (r.session is None and r.name == name and r.status in ("queued", "running"))
                for r in self._records.values()
            )

    def by_session(self, sid: str) -> RequestRecord | None:
        with self._lock:
            return next((r for r in self._records.values() if r.session == sid), None)

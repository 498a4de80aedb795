"""Engine events: plain, immutable facts that cross threads safely.

Promises: no event holds an mx array (only ints, floats, strings, tuples and
numpy arrays), so the window, the trace exporter and tests can keep them.
Names are past-tense facts; cache events are named as vLLM's KV events.
Timestamps `t_ms` are milliseconds since the engine started (monotonic).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NewType

SessionId = NewType("SessionId", str)
BlockHash = NewType("BlockHash", str)


@dataclass(frozen=True, slots=True)
class Event:
    t_ms: float


@dataclass(frozen=True, slots=True)
class SessionCreated(Event):
    session: SessionId
    name: str


@dataclass(frozen=True, slots=True)
class SessionClosed(Event):
    session: SessionId


@dataclass(frozen=True, slots=True)
class TurnStarted(Event):
    session: SessionId
    prompt_tokens: int
    cached_tokens: int
    prefilled_tokens: int


@dataclass(frozen=True, slots=True)
class PrefillChunk(Event):
    session: SessionId
    start: int  # first token of the chunk, counted in this turn's prefill
    n_tokens: int
    total: int  # tokens prefilled in chunks this turn (the last prompt token is fed by decode)
    dur_ms: float
    start_ms: float = 0.0  # when the chunk's work began (same clock as t_ms)


@dataclass(frozen=True, slots=True)
class TokenSampled(Event):
    session: SessionId
    token_id: int
    text: str
    index: int  # 0 = first answer token
    step_ms: float  # time since the previous token (TTFT for index 0)
    start_ms: float = 0.0  # when this step's work began: the previous token (the turn's start for index 0)


@dataclass(frozen=True, slots=True)
class GenerationFinished(Event):
    session: SessionId
    text: str
    n_tokens: int
    finish_reason: str  # "stop", "length", "stop_string", "cancelled"
    ttft_ms: float
    decode_tps: float
    cached_tokens: int
    prefilled_tokens: int
    dur_ms: float
    start_ms: float = 0.0  # when the turn began (same clock as t_ms)


@dataclass(frozen=True, slots=True)
class BlockStored(Event):
    block_hashes: tuple[BlockHash, ...]
    parent_block_hash: BlockHash | None
    token_ids: tuple[int, ...]
    block_size: int
    session: SessionId | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved(Event):
    block_hashes: tuple[BlockHash, ...]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared(Event):
    pass


@dataclass(frozen=True, slots=True)
class PrefixEvictionDecided(Event):
    """The prefix store chose these blocks to evict (a `BlockRemoved` with the same hashes follows)."""

    policy: str  # "lru", "hot", "workflow"
    block_hashes: tuple[BlockHash, ...]
    reasons: tuple[str, ...]  # one per block, for a person: "workflow: planner not expected again"
    freed_bytes: int
    budget_bytes: int


@dataclass(frozen=True, slots=True)
class EngineError(Event):
    session: SessionId | None
    kind: str  # exception class name
    message: str


@dataclass(frozen=True, slots=True)
class CacheChanged(Event):
    """Base for the cache-surgery facts; `details` holds the fidelity report."""

    session: SessionId
    token_lo: int
    token_hi: int
    details: dict[str, Any] = field(default_factory=dict)


Subscriber = Callable[[Event], None]


class EventBus:
    """Fan-out of events to subscribers, plus the history traces are made from."""

    def __init__(self, max_history: int = 1_000_000) -> None:
        self._subs: list[Subscriber] = []
        self._lock = threading.Lock()
        self.history: list[Event] = []
        self._max_history = max_history
        self._t0 = time.perf_counter()

    def now_ms(self) -> float:
        return (time.perf_counter() - self._t0) * 1000.0

    def ms_at(self, perf_counter: float) -> float:
        """A `time.perf_counter()` reading on the events' clock."""
        return (perf_counter - self._t0) * 1000.0

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Call `fn(event)` for each event; returns a function that unsubscribes."""
        with self._lock:
            self._subs.append(fn)

        def unsubscribe() -> None:
            with self._lock:
                if fn in self._subs:
                    self._subs.remove(fn)

        return unsubscribe

    def emit(self, event: Event) -> None:
        with self._lock:
            self.history.append(event)
            if len(self.history) > self._max_history:
                del self.history[: len(self.history) // 10]
            subs = list(self._subs)
        for fn in subs:
            fn(event)


@dataclass(frozen=True, slots=True)
class RegionMasked(CacheChanged):
    layers: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class RegionUnmasked(CacheChanged):
    layers: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class SegmentSpliced(CacheChanged):
    source: str = ""  # session id or segment file
    delta: int = 0  # positions moved by


@dataclass(frozen=True, slots=True)
class ErratumAppended(CacheChanged):
    text: str = ""


@dataclass(frozen=True, slots=True)
class SpanDeleted(CacheChanged):
    shifted: bool = True


@dataclass(frozen=True, slots=True)
class DecisionApplied(CacheChanged):
    policy: str = ""
    kept_rows: tuple[int, ...] = ()  # per layer
    evicted_rows: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class SessionChanged(Event):
    """Anything else about a session changed (renamed, duplicated, undone, restored)."""

    session: SessionId
    what: str

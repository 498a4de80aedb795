"""The Engine: the one API the CLI, the window and scripts use.

Promises:
- every method is synchronous and must be called from one thread (the one
  that loaded the model: MLX streams belong to their thread), except
  `cancel`, `subscribe` and `events`, which are safe from any thread;
- errors are `KVScopeError`s with a message for a person, also emitted as
  `EngineError` events; after one, the engine and its sessions are usable;
- results and snapshots hold no mx arrays.

Cache surgery, compression and files live in their own modules and reach
the sessions through `Engine.session(sid)`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from kvscope.engine import blas
from kvscope.engine.blocks import DEFAULT_BLOCK_SIZE
from kvscope.engine.caches.layout import make_session_caches
from kvscope.engine.compression import AutoCompress, set_auto_compress
from kvscope.engine.editing import EditingMixin
from kvscope.engine.errors import InvalidRequestError, KVScopeError, MemoryBudgetError
from kvscope.engine.events import (
    EngineError,
    Event,
    EventBus,
    SessionChanged,
    SessionClosed,
    SessionCreated,
    SessionId,
)
from kvscope.engine.fidelity import FidelityReport, measure
from kvscope.engine.generation import SamplingParams
from kvscope.engine.kv_publisher import publisher_from_config
from kvscope.engine.lifecycle import LifecycleMixin, physical_memory_bytes
from kvscope.engine.model_loading import LoadedModel, load_model
from kvscope.engine.persistence import SessionStore
from kvscope.engine.prefix_store import PrefixStore, checked_policy
from kvscope.engine.session import Session
from kvscope.engine.snapshot import SessionSnapshot, take_snapshot
from kvscope.engine.trace import write_trace
from kvscope.engine.turns import TurnResult, run_turn


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = DEFAULT_BLOCK_SIZE
    prefill_chunk: int = 512
    prefix_budget_bytes: int = 1 << 30
    prefix_policy: str = "lru"  # prefix-store eviction: lru, hot, workflow (engine/prefix_policy.py)
    memory_budget_bytes: int | None = None  # None: half of physical memory
    persist: bool = False  # save sessions after every turn / edit and reopen them
    data_dir: str | None = None  # None: KVSCOPE_HOME or the platform's user data folder
    kv_events: str | None = None  # publish block events in vLLM's format to this ZMQ endpoint
    kv_events_replay: str | None = None  # ZMQ ROUTER endpoint for replay requests
    kv_events_topic: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class Engine(EditingMixin, LifecycleMixin):
    """Sessions over one loaded model, with a shared prefix store and events."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.bus = EventBus()
        self.lm: LoadedModel | None = None
        self.store: PrefixStore | None = None
        self._sessions: dict[SessionId, Session] = {}
        self._cancel: dict[SessionId, threading.Event] = {}
        self._next_number = 1  # session ids are s1, s2, ...; restored ones move it past theirs
        self._pieces: dict[int, str] = {}
        cfg = self.config
        budget = cfg.memory_budget_bytes
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0):
            raise InvalidRequestError(f"the memory budget must be a positive number of bytes, got {budget!r}")
        self.memory_budget_bytes = budget if budget is not None else physical_memory_bytes() // 2
        checked_policy(cfg.prefix_policy)
        self.persistence = SessionStore(Path(cfg.data_dir) if cfg.data_dir else None) if cfg.persist else None
        self.load_errors: list[str] = []
        self.auto_compress: AutoCompress | None = None  # default for new sessions
        self.kv_publisher = publisher_from_config(cfg.kv_events, cfg.kv_events_replay, cfg.kv_events_topic, self.bus)

    # ------------------------------------------------------------ model
    def load(self, id_or_path: str | os.PathLike[str] | None = None) -> LoadedModel:
        """Load a model (None = the bundled demo model); its saved sessions reopen."""
        lm = self._guard(None, lambda: load_model(id_or_path))
        for sid in list(self._sessions):
            self._drop(sid)
        if self.store is not None:
            self.store.clear()  # the old model's blocks are gone (consumers of the events learn it)
        self.lm = lm
        self._pieces = {}
        self.store = PrefixStore(
            lm.fingerprint,
            self.config.block_size,
            self.config.prefix_budget_bytes,
            self.bus.emit,
            self.bus.now_ms,
            self.store.policy.name if self.store is not None else self.config.prefix_policy,
        )
        self.restore_sessions()
        return lm

    @property
    def model(self) -> LoadedModel:
        if self.lm is None:
            raise InvalidRequestError("no model loaded: call Engine.load() first")
        return self.lm

    def info(self) -> dict[str, Any]:
        """Device, dtype, BLAS, model and memory, for `kvscope info` and the status bar."""
        b = blas.info()
        out: dict[str, Any] = {
            "device": str(mx.default_device()),
            "mlx": getattr(mx, "__version__", "?"),
            "blas": b.name,
            "blas_path": b.path,
            "blas_note": b.reason,
            "block_size": self.config.block_size,
            "prefix_budget_bytes": self.config.prefix_budget_bytes,
            "memory_budget_bytes": self.memory_budget_bytes,
            "data_dir": str(self.persistence.root.parent) if self.persistence else None,
            "load_errors": list(self.load_errors),
            "sessions": len(self._sessions),
            "cache_bytes": self.cache_bytes(),
            "prefix_store_bytes": self.store.nbytes if self.store else 0,
        }
        if self.lm is not None:
            lm = self.lm
            out.update(
                model=lm.name,
                model_path=str(lm.path),
                fingerprint=lm.fingerprint,
                dtype=lm.dtype,
                layers=lm.n_layers,
                kv_heads=lm.n_kv_heads,
                head_dim=lm.head_dim,
                rope=lm.rope.as_dict() if lm.rope else None,
                surgery_supported=lm.unsupported_reason is None,
                unsupported_reason=lm.unsupported_reason,
                cache_layout=lm.layout.as_dict() if lm.layout else None,
                cache_layout_text=lm.layout.describe() if lm.layout else "",
                operations=lm.support.as_rows() if lm.support else [],
            )
        return out

    # ------------------------------------------------------------ sessions
    def new_session(self, name: str | None = None, system: str | None = None) -> SessionId:
        lm = self.model
        sid = self.new_session_id()
        s = Session(sid, name or sid, make_session_caches(lm.model))
        if system:
            s.messages.append({"role": "system", "content": system})
        s.auto_compress = self.auto_compress
        self._register(s)
        self._persist_or_drop(sid)
        return sid

    def _register(self, s: Session) -> None:
        """Make `s` one of the engine's sessions (new, duplicated, restored or imported)."""
        self._sessions[s.id] = s
        self._cancel[s.id] = threading.Event()
        n = s.id[1:]
        if n.isdigit():
            self._next_number = max(self._next_number, int(n) + 1)
        self.bus.emit(SessionCreated(self.bus.now_ms(), s.id, s.name))

    def new_session_id(self) -> SessionId:
        """A fresh id, never one a saved session (of any model) already uses on disk."""
        while True:
            sid = SessionId(f"s{self._next_number}")
            self._next_number += 1
            if self.persistence is None or not self.persistence.folder(sid).exists():
                return sid

    def session(self, sid: SessionId) -> Session:
        try:
            return self._sessions[sid]
        except KeyError:
            raise InvalidRequestError(f"no session {sid!r}") from None

    def sessions(self) -> list[SessionId]:
        return list(self._sessions)

    def close_session(self, sid: SessionId) -> None:
        """Close a session and delete its saved copy (export it first to keep it)."""
        self._drop(sid)
        self.forget_saved(sid)

    def _drop(self, sid: SessionId) -> None:
        self.session(sid)
        del self._sessions[sid]
        self._cancel.pop(sid, None)
        if self.store is not None:
            self.store.release(sid)
        self.bus.emit(SessionClosed(self.bus.now_ms(), sid))

    def rename_session(self, sid: SessionId, name: str) -> None:
        s = self.session(sid)
        old, s.name = s.name, name
        try:
            self._guard(sid, lambda: self.persist(sid))
        except KVScopeError:
            s.name = old
            raise
        self.bus.emit(SessionChanged(self.bus.now_ms(), sid, "renamed"))

    def duplicate_session(self, sid: SessionId, name: str | None = None) -> SessionId:
        """A new session with a copy of `sid`'s messages and cache."""
        src = self.session(sid)
        self._guard(sid, lambda: self.ensure_budget_bytes(src.nbytes, "duplicating this session"))
        new = self.new_session_id()
        s = src.clone(new, name or f"{src.name} (copy)")
        self._register(s)
        self._persist_or_drop(new)
        return new

    def _persist_or_drop(self, sid: SessionId) -> None:
        """Save a just-registered session; if that fails it is not kept either."""
        try:
            self._guard(sid, lambda: self.persist(sid))
        except KVScopeError:
            self._drop(sid)
            raise

    # ------------------------------------------------------------ chat
    def chat(self, sid: SessionId, user_text: str, params: SamplingParams | None = None) -> TurnResult:
        """One turn: prefill what is not cached, generate, keep the cache (and save it)."""
        s = self.session(sid)
        s.require_idle("starting another turn")
        self._guard(sid, lambda: self.model.require("chat"))
        p = params or SamplingParams()
        store = self.store
        assert store is not None
        pending = user_text if s.n_tokens else "".join(m["content"] for m in s.messages) + user_text
        self._guard(sid, lambda: self.ensure_budget_for_text(pending, 32 + p.max_tokens, "this turn"))
        flag = self._cancel[sid]
        flag.clear()
        s.generating = True
        try:
            result: TurnResult = self._guard(
                sid,
                lambda: run_turn(s, self.model, store, self.bus, user_text, p, self.config.prefill_chunk, flag.is_set),
            )
        finally:
            s.generating = False
        s.undo_stack.clear()  # edits are undoable until the next turn
        self.persist(sid)
        return result

    def set_auto_compress(self, sid: SessionId | None, setting: AutoCompress | None) -> None:
        """Compress a session (or, with sid None, every new session) at each prefill or over a budget."""
        target = self if sid is None else self.session(sid)
        self._guard(sid, lambda: set_auto_compress(target, setting))

    def cancel(self, sid: SessionId) -> None:
        """Stop the session's generation at the next step (any thread)."""
        flag = self._cancel.get(sid)
        if flag is not None:
            flag.set()

    # ------------------------------------------------------------ views
    def subscribe(self, fn: Callable[[Event], None]) -> Callable[[], None]:
        return self.bus.subscribe(fn)

    @property
    def events(self) -> list[Event]:
        return list(self.bus.history)

    def snapshot(self, sid: SessionId) -> SessionSnapshot:
        s = self.session(sid)
        store = self.store
        assert store is not None
        tok = self.model.tokenizer
        return take_snapshot(
            s,
            self.config.block_size,
            store.root,
            self._pieces,
            lambda t: tok.decode([t]),
            store.sessions_of,
        )

    def measure_fidelity(
        self, sid: SessionId, operation: str, elapsed_ms: float = 0.0, rows_changed: int = 0, **extra: Any
    ) -> FidelityReport:
        """The session as it is now vs a full recompute of its visible tokens at their positions.

        For fidelity measured after an edit that ran with `fidelity=False` (the
        window defers it on long sessions); changes nothing.
        """
        s = self.session(sid)
        s.require_idle("measuring fidelity")
        result: FidelityReport = self._guard(
            sid, lambda: measure(self.model, s, operation, elapsed_ms, rows_changed, **extra)
        )
        return result

    def export_trace(self, path: str | os.PathLike[str]) -> Path:
        """Write all events so far as Chrome Trace Event JSON."""
        names = {sid: s.name for sid, s in self._sessions.items()}
        return self._guard(None, lambda: _write_trace_checked(self.events, path, names))

    # ------------------------------------------------------------ internals
    def _guard(self, sid: SessionId | None, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except KVScopeError as exc:
            self.bus.emit(EngineError(self.bus.now_ms(), sid, type(exc).__name__, str(exc)))
            raise
        except (MemoryError, RuntimeError) as exc:
            if (
                not isinstance(exc, MemoryError)
                and "alloc" not in str(exc).lower()
                and "memory" not in str(exc).lower()
            ):
                raise
            err = MemoryBudgetError(f"out of memory ({exc}): close or compress a session, or lower --memory-budget")
            self.bus.emit(EngineError(self.bus.now_ms(), sid, type(err).__name__, str(err)))
            raise err from exc


def _write_trace_checked(events: list[Event], path: str | os.PathLike[str], names: dict[str, str]) -> Path:
    try:
        return write_trace(events, path, names)
    except OSError as exc:
        raise InvalidRequestError(f"cannot write trace to {path}: {exc.strerror or exc}") from exc

"""The Engine: the one API the CLI, the window, the server and scripts use.

Promises:
- every method is synchronous and must be called from one thread (the one
  that loaded the model: MLX streams belong to their thread), except
  `cancel`, `subscribe` and `events`, which are safe from any thread;
- errors are `KVScopeError`s with a message for a person, also emitted as
  `EngineError` events; after one, the engine and its sessions are usable;
- results and snapshots hold no mx arrays.

The Engine is a facade over parts with one job each (see `parts`): the
session registry, the memory budget, the session files, the edit
transaction, the `Editor` and the `Splicer`. Its methods validate nothing
themselves and hold no logic beyond wiring the parts together.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvscope.engine import chat
from kvscope.engine.blocks import TokenState
from kvscope.engine.budget import MemoryBudget
from kvscope.engine.caches.layout import make_session_caches
from kvscope.engine.compression import AutoCompress, Decision, checked_auto_compress
from kvscope.engine.config import EngineConfig
from kvscope.engine.editing import Editor
from kvscope.engine.engine_info import engine_info
from kvscope.engine.events import Event, EventBus, SessionChanged, SessionId
from kvscope.engine.fidelity import FidelityReport, measure
from kvscope.engine.generation import SamplingParams
from kvscope.engine.kv_publisher import publisher_from_config
from kvscope.engine.model_loading import LoadedModel, load_model
from kvscope.engine.parts import EngineParts, LoadedState
from kvscope.engine.persistence import SessionStore
from kvscope.engine.prefix_store import PrefixStore
from kvscope.engine.prompt_turn import run_on_empty
from kvscope.engine.registry import SessionRegistry
from kvscope.engine.saved_sessions import SavedSessions
from kvscope.engine.session import Session
from kvscope.engine.snapshot import SessionSnapshot, take_snapshot
from kvscope.engine.splicing import SpliceOptions, Splicer
from kvscope.engine.surgery import Segment
from kvscope.engine.trace import write_trace_checked
from kvscope.engine.transaction import Transactions, guarded
from kvscope.engine.turns import PromptTokens, TurnContext, TurnResult, run_turn


class Engine:
    """Sessions over one loaded model, with a shared prefix store and events."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        # The parts hold no reference to the Engine (no cycle): dropping the
        # last reference to an Engine frees it at once, data-folder lock included.
        self.config = cfg = config or EngineConfig()
        self.bus = EventBus()
        self.auto_compress: AutoCompress | None = None  # default for new sessions
        self._pieces: dict[int, str] = {}
        self._loaded = loaded = LoadedState()
        self._files = files = SavedSessions(
            SessionStore(Path(cfg.data_dir) if cfg.data_dir else None) if cfg.persist else None
        )
        self._registry = registry = SessionRegistry(self.bus, files.taken)
        self._budget = MemoryBudget(cfg.memory_budget_bytes, registry.nbytes, lambda: loaded.store)

        def save(s: Session) -> None:
            if loaded.lm is not None and s.id in registry:
                files.save(s, loaded.lm)

        self._save = save
        self._tx = Transactions(self.bus, registry, save)
        self._parts = EngineParts(self.bus, registry, self._budget, self._tx, loaded.model, cfg.prefill_chunk)
        self._editor = Editor(self._parts)
        self._splicer = Splicer(self._parts, self._editor)
        self.kv_publisher = publisher_from_config(cfg.kv_events, cfg.kv_events_replay, cfg.kv_events_topic, self.bus)

    @property
    def lm(self) -> LoadedModel | None:
        """The loaded model, or None before `load`."""
        return self._loaded.lm

    @property
    def store(self) -> PrefixStore | None:
        """The loaded model's prefix store (read it; the engine changes it)."""
        return self._loaded.store

    # ------------------------------------------------------------ model
    def load(self, id_or_path: str | os.PathLike[str] | None = None) -> LoadedModel:
        """Load a model (None = the bundled demo model); its saved sessions reopen."""
        lm = self._guard(None, lambda: load_model(id_or_path))
        for sid in self._registry.ids():
            self._registry.remove(sid, self.store)
        if self.store is not None:
            self.store.clear()  # the old model's blocks are gone (consumers of the events learn it)
        self._pieces = {}
        self._loaded.lm = lm
        self._loaded.store = PrefixStore.for_model(lm.fingerprint, self.config, self.bus, self.store)
        for s in self._files.restore(lm, self._registry, self._budget.reserve):
            self._registry.add(s)
        return lm

    @property
    def model(self) -> LoadedModel:
        return self._loaded.model()

    def set_prefix_policy(self, name: str) -> None:
        """Evict prefix-store blocks by `name` (lru, hot, workflow) from now on; kept across model loads."""
        self._guard(None, lambda: self._store().set_policy(name))

    def note_request(self, sid: SessionId, agent: str, step: int | None = None) -> None:
        """Session `sid` serves `agent` at workflow `step`: for the workflow-aware prefix-store policy."""
        self._store().note_request(sid, agent, step)

    def info(self) -> dict[str, Any]:
        """Device, dtype, BLAS, model and memory, for `kvscope info` and the status bar."""
        return engine_info(self.lm, self.config, self._budget, len(self._registry), self.store, self._files)

    @property
    def memory_budget_bytes(self) -> int:
        return self._budget.limit

    @memory_budget_bytes.setter
    def memory_budget_bytes(self, limit: int) -> None:
        self._guard(None, lambda: self._budget.set_limit(limit))

    def cache_bytes(self) -> int:
        """Bytes of all session caches plus the prefix store."""
        return self._budget.used()

    @property
    def load_errors(self) -> list[str]:
        """What could not be reopened (and whether the data folder is read-only), from the last `load`."""
        return list(self._files.load_errors)

    @property
    def data_folder(self) -> Path | None:
        """The folder of saved sessions, one sub-folder each (None without persistence)."""
        return self._files.folder

    def close_data_folder(self) -> None:
        """Stop saving and let go of the data folder, so another process may write it."""
        self._files.close()

    # ------------------------------------------------------------ sessions
    def new_session(self, name: str | None = None, system: str | None = None) -> SessionId:
        sid = self._registry.new_id()
        s = Session(sid, name or sid, make_session_caches(self.model.model))
        if system:
            s.messages.append({"role": "system", "content": system})
        s.auto_compress = self.auto_compress
        self._add_saved(s)
        return sid

    def session(self, sid: SessionId) -> Session:
        """The live session, for reading (tests, the lab); change it only through Engine operations."""
        return self._registry.get(sid)

    def sessions(self) -> list[SessionId]:
        return self._registry.ids()

    def close_session(self, sid: SessionId) -> None:
        """Close a session and delete its saved copy (export it first to keep it)."""
        self._registry.remove(sid, self.store)
        self._files.forget(sid)

    def rename_session(self, sid: SessionId, name: str) -> None:
        def change(s: Session) -> None:
            s.name = name

        self._tx.run(sid, "renaming", change)
        self.bus.emit(SessionChanged(self.bus.now_ms(), sid, "renamed"))

    def duplicate_session(self, sid: SessionId, name: str | None = None) -> SessionId:
        """A new session with a copy of `sid`'s messages and cache."""
        src = self._registry.get(sid)
        self._guard(sid, lambda: self._budget.reserve(src.nbytes, "duplicating this session"))
        s = src.clone(self._registry.new_id(), name or f"{src.name} (copy)")
        self._add_saved(s)
        return s.id

    def restart(self, sid: SessionId, summary: str, name: str | None = None) -> SessionId:
        """A fresh session on the system prompt + `summary` (the alternative to compaction)."""
        s = self._registry.get(sid)
        system = next((m["content"] for m in s.messages if m["role"] == "system"), None)
        new = self.new_session(name or f"{s.name} (restart)", system)
        self._tx.run(
            new,
            "restarting",
            lambda t: self._editor.append_tokens_of(t, "user", f"[summary] {summary}", TokenState.COMPUTED),
        )
        return new

    def export_session(self, sid: SessionId, path: str | os.PathLike[str]) -> Path:
        """Write a session (transcript, operations, cache) as one `.kvsession` zip file."""
        s = self._registry.get(sid)
        return self._guard(sid, lambda: self._files.export(s, self.model, path))

    def import_session(self, path: str | os.PathLike[str], name: str | None = None) -> SessionId:
        """Open a `.kvsession` file as a new session (checked like a saved one, and against the budget)."""

        def run() -> Session:
            s = self._files.read_export(path, self.model, self._budget.free(), self._budget.reserve)
            s.id = self._registry.new_id()
            s.name = name or s.name
            return s

        s = self._guard(None, run)
        self._add_saved(s)
        return s.id

    # ------------------------------------------------------------ turns
    def chat(self, sid: SessionId, user_text: str, params: SamplingParams | None = None) -> TurnResult:
        """One turn: prefill what is not cached, generate, keep the cache (and save it)."""
        s = self._registry.get(sid)
        s.require_idle("starting another turn")
        self._guard(sid, lambda: self.model.require("chat"))
        p = params or SamplingParams()
        pending = user_text if s.n_tokens else "".join(m["content"] for m in s.messages) + user_text
        self._guard(sid, lambda: self._reserve_text(pending, 32 + p.max_tokens, "this turn"))
        result: TurnResult = self._turn(s, lambda ctx: run_turn(s, ctx, user_text, p))
        s.undo_stack.clear()  # edits are undoable until the next turn
        self._save(s)
        return result

    def run_prompt(
        self, sid: SessionId, prompt: PromptTokens, params: SamplingParams, cancelled: Callable[[], bool]
    ) -> TurnResult:
        """A turn from ready-made prompt ids on the empty session `sid` (what a server request is)."""
        s = self._registry.get(sid)
        s.require_idle("starting a request")
        ctx = TurnContext(self.model, self._store(), self.bus, self.config.prefill_chunk, cancelled)
        result: TurnResult = self._guard(sid, lambda: run_on_empty(s, ctx, prompt, params, self._parts))
        self._save(s)
        return result

    def set_auto_compress(self, sid: SessionId | None, setting: AutoCompress | None) -> None:
        """Compress a session (or, with sid None, every new session) at each prefill or over a budget."""
        checked = self._guard(sid, lambda: checked_auto_compress(setting))
        if sid is None:
            self.auto_compress = checked
        else:
            self._registry.get(sid).auto_compress = checked

    def cancel(self, sid: SessionId) -> None:
        """Stop the session's generation at the next step (any thread)."""
        self._registry.cancel(sid)

    # ------------------------------------------------------------ edits (see editing, splicing)
    def append_message(self, sid: SessionId, role: str, content: str) -> int:
        """Prefill a message (e.g. a long document) without generating. Returns its token count."""
        return self._editor.append_message(sid, role, content)

    def mask(
        self, sid: SessionId, lo: int, hi: int, layers: list[int] | None = None, fidelity: bool = True
    ) -> FidelityReport:
        """Hide tokens [lo, hi) from attention (reversible; positions unchanged)."""
        return self._editor.mask(sid, lo, hi, layers, fidelity, visible=False)

    def unmask(
        self, sid: SessionId, lo: int, hi: int, layers: list[int] | None = None, fidelity: bool = True
    ) -> FidelityReport:
        return self._editor.mask(sid, lo, hi, layers, fidelity, visible=True)

    def erratum(self, sid: SessionId, text: str, fidelity: bool = True) -> FidelityReport:
        """Append a correction (e.g. `[update] status -> open`); only its tokens are prefilled."""
        return self._editor.erratum(sid, text, fidelity)

    def delete_span(
        self, sid: SessionId, lo: int, hi: int, shift: bool = True, fidelity: bool = True
    ) -> FidelityReport:
        """Remove tokens [lo, hi) for real; `shift` closes the position gap."""
        return self._editor.delete_span(sid, lo, hi, shift, fidelity)

    def replace_span(self, sid: SessionId, lo: int, hi: int, text: str, fidelity: bool = True) -> FidelityReport:
        """Overwrite tokens [lo, hi) with `text`, recomputing only the new rows (later rows stay stale)."""
        return self._editor.replace_span(sid, lo, hi, text, fidelity)

    def compact(
        self, sid: SessionId, lo: int, hi: int, summary: str | None = None, fidelity: bool = True
    ) -> FidelityReport:
        """Summarise tokens [lo, hi), append the summary, mask the span, continue."""
        return self._editor.compact(sid, lo, hi, summary, fidelity)

    def summarize(self, sid: SessionId, max_tokens: int = 64) -> str:
        """Ask the model for a summary on a throw-away copy of the session."""
        return self._editor.summarize(sid, max_tokens)

    def compress(
        self,
        sid: SessionId,
        policy: str,
        keep_ratio: float | None = None,
        budget_tokens: int | None = None,
        **params: Any,
    ) -> Decision:
        """Apply a compression policy (see `kvscope.engine.compression.POLICIES`); undoable."""
        return self._editor.compress(sid, policy, keep_ratio, budget_tokens, params)

    def replay_decision(self, sid: SessionId, decision: Decision) -> None:
        """Apply a recorded decision's kept rows to a session holding the same cache; undoable."""
        self._editor.replay_decision(sid, decision)

    def undo(self, sid: SessionId) -> str:
        """Undo the last reversible edit (until the next chat turn). Returns its name."""
        return self._editor.undo(sid)

    def splice(
        self, dst: SessionId, src: SessionId, lo: int, hi: int, options: SpliceOptions | None = None
    ) -> FidelityReport:
        """Copy tokens [lo, hi) of session `src` into `dst` (where and how: `SpliceOptions`, default the end)."""
        return self._splicer.from_session(dst, src, lo, hi, options or SpliceOptions())

    def splice_segment(self, dst: SessionId, seg: Segment, options: SpliceOptions | None = None) -> FidelityReport:
        """Insert a segment's rows into `dst`, keys re-rotated to their new positions."""
        return self._splicer.segment(dst, seg, options or SpliceOptions())

    def splice_file(
        self,
        dst: SessionId,
        path: str | os.PathLike[str],
        options: SpliceOptions | None = None,
        prompt: str | None = None,
    ) -> FidelityReport:
        """Splice a segment file (or, with `prompt`, an mlx-lm prompt cache) into `dst`."""
        return self._splicer.from_file(dst, path, options or SpliceOptions(), prompt)

    def save_segment(self, sid: SessionId, lo: int, hi: int, path: str | os.PathLike[str]) -> Path:
        """Write tokens [lo, hi) of a session as a segment file."""
        return self._splicer.save(sid, lo, hi, path)

    # ------------------------------------------------------------ views
    def subscribe(self, fn: Callable[[Event], None]) -> Callable[[], None]:
        return self.bus.subscribe(fn)

    @property
    def events(self) -> list[Event]:
        return list(self.bus.history)

    def snapshot(self, sid: SessionId) -> SessionSnapshot:
        s, store, tok = self._registry.get(sid), self._store(), self.model.tokenizer
        return take_snapshot(
            s, self.config.block_size, store.root, self._pieces, lambda t: tok.decode([t]), store.sessions_of
        )

    def measure_fidelity(
        self, sid: SessionId, operation: str, elapsed_ms: float = 0.0, rows_changed: int = 0, **extra: Any
    ) -> FidelityReport:
        """The session as it is now vs a full recompute of its visible tokens at their positions.

        For fidelity measured after an edit that ran with `fidelity=False` (the
        window defers it on long sessions); changes nothing.
        """
        s = self._registry.get(sid)
        s.require_idle("measuring fidelity")
        return self._guard(sid, lambda: measure(self.model, s, operation, elapsed_ms, rows_changed, **extra))

    def export_trace(self, path: str | os.PathLike[str]) -> Path:
        """Write all events so far as Chrome Trace Event JSON."""
        names = self._registry.names()
        return self._guard(None, lambda: write_trace_checked(self.events, path, names))

    # ------------------------------------------------------------ wiring
    def _guard(self, sid: SessionId | None, fn: Callable[[], Any]) -> Any:
        return guarded(self.bus, sid, fn)

    def _store(self) -> PrefixStore:
        return self._loaded.prefix_store()

    def _add_saved(self, s: Session) -> None:
        """Register a new session and save it; if saving fails it is not kept either."""
        self._registry.add(s)
        try:
            self._guard(s.id, lambda: self._save(s))
        except Exception:
            self._registry.remove(s.id, self.store)
            raise

    def _reserve_text(self, text: str, extra_tokens: int, what: str) -> None:
        self._parts.reserve_tokens(len(chat.encode(self.model.tokenizer, text)) + extra_tokens, what)

    def _turn(self, s: Session, run: Callable[[TurnContext], TurnResult]) -> TurnResult:
        ctx = TurnContext(self.model, self._store(), self.bus, self.config.prefill_chunk, self._registry.arm(s.id))
        s.generating = True
        try:
            result: TurnResult = self._guard(s.id, lambda: run(ctx))
        finally:
            s.generating = False
        return result

"""Editing a session's cache in place: mask, erratum, delete, replace, compact, compress, undo.

Promises, for every operation:
- the model's support table is consulted first: an operation the model's
  cache kinds cannot do is refused before anything changes, one they can
  only approximate is labelled so in its report;
- it runs as one `Transactions.run` (refused while the session generates;
  validate and apply, measure, persist; a failure at any step leaves the
  session exactly as it was, in memory and on disk);
- it returns a `FidelityReport` against a full recompute of the same visible
  tokens (skip with `fidelity=False`), emits its event with that report in
  `details`, and is appended to the session's operations log;
- reversible operations can be undone until the next chat turn.

Splicing (segments between sessions and files) is in `splicing`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kvscope.engine import chat
from kvscope.engine.blocks import TokenState
from kvscope.engine.caches.sliding import check_layer_subset
from kvscope.engine.compression import Decision, compress_loaded, replay_on
from kvscope.engine.errors import InvalidRequestError
from kvscope.engine.events import (
    CacheChanged,
    ErratumAppended,
    EventBus,
    RegionMasked,
    RegionUnmasked,
    SessionChanged,
    SessionId,
    SpanDeleted,
)
from kvscope.engine.fidelity import FidelityReport, measure
from kvscope.engine.generation import SamplingParams, prefill
from kvscope.engine.parts import EngineParts
from kvscope.engine.prefix_store import PrefixStore
from kvscope.engine.rope import check_compatible
from kvscope.engine.session import Session
from kvscope.engine.surgery import compute_segment, delete_span, insert_segment, set_mask
from kvscope.engine.turns import TurnContext, run_turn

SUMMARY_REQUEST = "Summarize the conversation so far in one or two sentences."

Change = Callable[[Session], tuple[int, dict[str, Any]]]  # rows changed, details for the report
MakeEvent = Callable[[float, dict[str, Any]], CacheChanged]


class Editor:
    def __init__(self, parts: EngineParts) -> None:
        self._p = parts

    # ------------------------------------------------------------ the edit shape
    def edit(
        self, sid: SessionId, label: str, change: Change, event: MakeEvent, fidelity: bool = True, undoable: bool = True
    ) -> FidelityReport:
        """Run `change` as a transaction, measure it, log it, then announce it with `event`."""
        p = self._p
        p.registry.get(sid).require_idle(label)
        verdict = p.tx.guard(sid, lambda: p.model().require(label))  # refused before anything changes

        def apply(s: Session) -> FidelityReport:
            t0 = time.perf_counter()
            rows, extra = change(s)
            if verdict.status != "exact":  # e.g. masking a hybrid model: the report says approximate
                extra = {**extra, "approximate": verdict.reason}
            elapsed = (time.perf_counter() - t0) * 1000
            if fidelity:
                report = measure(p.model(), s, label, elapsed, rows, **extra)
            else:
                nan = float("nan")
                report = FidelityReport(label, nan, nan, nan, 0, elapsed, 0.0, rows, extra)
            s.operations.append({"op": label, **extra, "report": report.as_dict()})
            return report

        report = p.tx.run(sid, label, apply, undo_label=label if undoable else None)
        p.bus.emit(event(p.bus.now_ms(), report.as_dict()))
        return report

    def append_tokens_of(self, s: Session, role: str, content: str, origin: TokenState) -> int:
        """Append a chat message's template tokens to the cache without generating (inside a transaction)."""
        if not content.strip():
            raise InvalidRequestError(f"empty {role} text: nothing to append")
        lm = self._p.model()
        messages = s.messages + [{"role": role, "content": content}]
        delta = chat.delta_text(lm.tokenizer, s.transcript_text, messages, add_generation_prompt=False)
        if delta is None:
            delta = f"\n{content}\n"
        ids = chat.encode(lm.tokenizer, delta) if s.n_tokens else chat.encode(lm.tokenizer, delta, special=True)
        self._p.reserve_tokens(len(ids), f"appending {len(ids)} tokens")
        cancelled = self._p.registry.arm(s.id)
        s.append_tokens(ids, origin)
        prefill(lm.model, s.caches, ids, self._p.prefill_chunk, cancelled)  # cancellable; the transaction rolls back
        s.messages = messages
        s.transcript_text = chat.render(lm.tokenizer, messages, add_generation_prompt=False)
        return len(ids)

    # ------------------------------------------------------------ operations
    def append_message(self, sid: SessionId, role: str, content: str) -> int:
        s = self._p.registry.get(sid)
        n = self._p.tx.run(
            sid, "appending a message", lambda s: self.append_tokens_of(s, role, content, TokenState.COMPUTED)
        )
        s.undo_stack.clear()  # like a turn: what came before is no longer undoable
        return n

    def mask(
        self, sid: SessionId, lo: int, hi: int, layers: list[int] | None, fidelity: bool, visible: bool
    ) -> FidelityReport:
        def change(s: Session) -> tuple[int, dict[str, Any]]:
            check_layer_subset(s.caches, layers)
            return set_mask(s, lo, hi, visible, layers), {"lo": lo, "hi": hi, "layers": layers}

        kind = RegionUnmasked if visible else RegionMasked
        label = "unmask" if visible else "mask"
        return self.edit(sid, label, change, lambda t, d: kind(t, sid, lo, hi, d, tuple(layers or ())), fidelity)

    def erratum(self, sid: SessionId, text: str, fidelity: bool) -> FidelityReport:
        box: dict[str, int] = {}

        def change(s: Session) -> tuple[int, dict[str, Any]]:
            box["lo"] = s.n_tokens
            n = self.append_tokens_of(s, "user", text, TokenState.ERRATUM)
            return n, {"text": text, "prefilled_tokens": n}

        def event(t: float, d: dict[str, Any]) -> CacheChanged:
            return ErratumAppended(t, sid, box["lo"], box["lo"] + d["rows_changed"], d, text)

        return self.edit(sid, "erratum", change, event, fidelity)

    def delete_span(self, sid: SessionId, lo: int, hi: int, shift: bool, fidelity: bool) -> FidelityReport:
        def change(s: Session) -> tuple[int, dict[str, Any]]:
            check_compatible(self._p.model(), "deleting a span")
            closed = delete_span(self._p.model(), s, lo, hi, shift)
            return hi - lo, {"lo": lo, "hi": hi, "shift": shift, "positions_closed": closed}

        return self.edit(sid, "delete", change, lambda t, d: SpanDeleted(t, sid, lo, hi, d, shift), fidelity)

    def replace_span(self, sid: SessionId, lo: int, hi: int, text: str, fidelity: bool) -> FidelityReport:
        def change(s: Session) -> tuple[int, dict[str, Any]]:
            lm = self._p.model()
            check_compatible(lm, "replacing a span")
            ids = chat.encode(lm.tokenizer, text)
            if not ids:
                raise InvalidRequestError("replacement text is empty")
            delete_span(lm, s, lo, hi, shift=True)
            insert_segment(lm, s, compute_segment(lm, s, lo, ids), lo, TokenState.COMPUTED)
            return len(ids), {"lo": lo, "hi": hi, "text": text, "new_tokens": len(ids)}

        return self.edit(sid, "replace", change, lambda t, d: SpanDeleted(t, sid, lo, hi, d, True), fidelity)

    def compress(
        self, sid: SessionId, policy: str, keep_ratio: float | None, budget_tokens: int | None, params: dict[str, Any]
    ) -> Decision:
        p = self._p
        return p.tx.run(
            sid,
            "compressing",
            lambda s: compress_loaded(s, p.model(), p.bus, policy, keep_ratio, budget_tokens, **params),
            undo_label="compress",
        )

    def replay_decision(self, sid: SessionId, decision: Decision) -> None:
        self._p.tx.run(sid, "replaying a decision", lambda s: replay_on(s, self._p.bus, decision), "replay decision")

    def undo(self, sid: SessionId) -> str:
        def change(s: Session) -> str:
            if not s.undo_stack:
                raise InvalidRequestError(f"nothing to undo in session {s.name}")
            label, saved = s.undo_stack.pop()
            s.restore(saved)
            s.operations.append({"op": "undo", "undone": label})
            return label

        label = self._p.tx.run(sid, "undoing", change)
        self._p.bus.emit(SessionChanged(self._p.bus.now_ms(), sid, f"undo {label}"))
        return label

    # ------------------------------------------------------------ compaction
    def compact(self, sid: SessionId, lo: int, hi: int, summary: str | None, fidelity: bool) -> FidelityReport:
        text = summary if summary is not None else self.summarize(sid, 64)

        def change(s: Session) -> tuple[int, dict[str, Any]]:
            n = self.append_tokens_of(s, "user", f"[summary] {text}", TokenState.COMPUTED)
            rows = set_mask(s, lo, hi, False)
            return rows, {"lo": lo, "hi": hi, "summary": text, "summary_tokens": n}

        return self.edit(sid, "compact", change, lambda t, d: RegionMasked(t, sid, lo, hi, d), fidelity)

    def summarize(self, sid: SessionId, max_tokens: int) -> str:
        """Ask the model for a summary on a throw-away copy of the session."""
        s = self._p.registry.get(sid)
        fork = s.clone(SessionId(f"{sid}-summary"))
        scratch = PrefixStore("scratch", 16, 0, lambda e: None, lambda: 0.0)
        ctx = TurnContext(self._p.model(), scratch, EventBus(), self._p.prefill_chunk, lambda: False)
        res = run_turn(fork, ctx, SUMMARY_REQUEST, SamplingParams(max_tokens=max_tokens))
        return res.text.strip() or "(no summary)"

"""The editing half of the Engine API: mask, erratum, delete, splice, compact, undo.

Promises, for every operation:
- it is refused while the session generates (`BusyError`); it runs as a
  transaction — validate and apply, measure, persist — and a failure at any
  step leaves the session exactly as it was, in memory (restored from a
  clone, undo stack and log included) and on disk (not saved);
- it returns a `FidelityReport` against a full recompute of the same visible
  tokens (skip with `fidelity=False`), emits its event with that report in
  `details`, and is appended to the session's operations log;
- reversible operations can be undone until the next chat turn.

Mixed into `Engine`; uses only its public pieces (`session`, `model`, `bus`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kvscope.engine import chat
from kvscope.engine.blocks import TokenState
from kvscope.engine.caches.sliding import check_layer_subset
from kvscope.engine.errors import InvalidRequestError
from kvscope.engine.events import (
    CacheChanged,
    ErratumAppended,
    EventBus,
    RegionMasked,
    RegionUnmasked,
    SegmentSpliced,
    SessionChanged,
    SessionId,
    SpanDeleted,
)
from kvscope.engine.fidelity import FidelityReport, measure
from kvscope.engine.generation import SamplingParams, prefill
from kvscope.engine.model_loading import LoadedModel
from kvscope.engine.rope import check_compatible
from kvscope.engine.segment_file import check_segment, read_mlx_prompt_cache, read_segment, write_segment
from kvscope.engine.session import Session
from kvscope.engine.surgery import (
    Segment,
    compute_segment,
    delete_span,
    extract_segment,
    insert_segment,
    recompute_rows,
    set_mask,
)

UNDO_DEPTH = 8
SUMMARY_REQUEST = "Summarize the conversation so far in one or two sentences."


class EditingMixin:
    """Cache surgery methods of `Engine` (see the module docstring)."""

    bus: EventBus
    model: LoadedModel
    session: Callable[[SessionId], Session]
    _guard: Callable[..., Any]
    persist: Callable[[SessionId], None]
    ensure_budget: Callable[[int, str], None]
    _cancel: dict[SessionId, threading.Event]

    # ------------------------------------------------------------ plumbing
    def _edit(
        self,
        sid: SessionId,
        label: str,
        op: Callable[[Session], tuple[int, dict[str, Any]]],
        event: Callable[[float, dict[str, Any]], CacheChanged],
        fidelity: bool = True,
        undoable: bool = True,
    ) -> FidelityReport:
        s = self.session(sid)
        s.require_idle(label)
        verdict = self._guard(sid, lambda: self.model.require(label))  # refused before anything changes

        def run() -> FidelityReport:
            # A transaction: validate + apply (op), measure, persist; any failure puts everything back.
            saved, undo, n_ops = s.clone(), list(s.undo_stack), len(s.operations)
            t0 = time.perf_counter()
            try:
                rows, extra = op(s)
                if verdict.status != "exact":  # e.g. masking a hybrid model: the report says approximate
                    extra = {**extra, "approximate": verdict.reason}
                elapsed = (time.perf_counter() - t0) * 1000
                if fidelity:
                    report = measure(self.model, s, label, elapsed, rows, **extra)
                else:
                    nan = float("nan")
                    report = FidelityReport(label, nan, nan, nan, 0, elapsed, 0.0, rows, extra)
                s.operations.append({"op": label, **extra, "report": report.as_dict()})
                if undoable:
                    s.push_undo(label, saved, UNDO_DEPTH)
                self.persist(sid)
            except BaseException:
                s.restore(saved)
                s.undo_stack = undo
                del s.operations[n_ops:]
                raise
            self.bus.emit(event(self.bus.now_ms(), report.as_dict()))
            return report

        result: FidelityReport = self._guard(sid, run)
        return result

    def _append_message(self, s: Session, role: str, content: str, origin: TokenState) -> int:
        """Append a chat message's template tokens to the cache without generating."""
        if not content.strip():
            raise InvalidRequestError(f"empty {role} text: nothing to append")
        lm = self.model
        messages = s.messages + [{"role": role, "content": content}]
        delta = chat.delta_text(lm.tokenizer, s.transcript_text, messages, add_generation_prompt=False)
        if delta is None:
            delta = f"\n{content}\n"
        ids = chat.encode(lm.tokenizer, delta) if s.n_tokens else chat.encode(lm.tokenizer, delta, special=True)
        self.ensure_budget(len(ids), f"appending {len(ids)} tokens")
        flag = self._cancel[s.id]
        flag.clear()
        s.append_tokens(ids, origin)
        prefill(lm.model, s.caches, ids, 512, flag.is_set)  # cancellable between chunks; callers roll back
        s.messages = messages
        s.transcript_text = chat.render(lm.tokenizer, messages, add_generation_prompt=False)
        return len(ids)

    # ------------------------------------------------------------ operations
    def append_message(self, sid: SessionId, role: str, content: str) -> int:
        """Prefill a message (e.g. a long document) without generating. Returns its token count."""
        s = self.session(sid)
        s.require_idle("appending a message")
        saved = s.clone()

        def run() -> int:
            try:
                n = self._append_message(s, role, content, TokenState.COMPUTED)
                self.persist(sid)
            except BaseException:
                s.restore(saved)
                raise
            s.undo_stack.clear()
            return n

        result: int = self._guard(sid, run)
        return result

    def mask(
        self, sid: SessionId, lo: int, hi: int, layers: list[int] | None = None, fidelity: bool = True
    ) -> FidelityReport:
        """Hide tokens [lo, hi) from attention (reversible; positions unchanged)."""

        def op(s: Session) -> tuple[int, dict[str, Any]]:
            check_layer_subset(s.caches, layers)
            return set_mask(s, lo, hi, False, layers), {"lo": lo, "hi": hi, "layers": layers}

        return self._edit(sid, "mask", op, lambda t, d: RegionMasked(t, sid, lo, hi, d, tuple(layers or ())), fidelity)

    def unmask(
        self, sid: SessionId, lo: int, hi: int, layers: list[int] | None = None, fidelity: bool = True
    ) -> FidelityReport:
        def op(s: Session) -> tuple[int, dict[str, Any]]:
            check_layer_subset(s.caches, layers)
            return set_mask(s, lo, hi, True, layers), {"lo": lo, "hi": hi, "layers": layers}

        return self._edit(
            sid, "unmask", op, lambda t, d: RegionUnmasked(t, sid, lo, hi, d, tuple(layers or ())), fidelity
        )

    def erratum(self, sid: SessionId, text: str, fidelity: bool = True) -> FidelityReport:
        """Append a correction (e.g. `[update] status -> open`); only its tokens are prefilled."""
        box: dict[str, int] = {}

        def op(s: Session) -> tuple[int, dict[str, Any]]:
            box["lo"] = s.n_tokens
            n = self._append_message(s, "user", text, TokenState.ERRATUM)
            return n, {"text": text, "prefilled_tokens": n}

        return self._edit(
            sid,
            "erratum",
            op,
            lambda t, d: ErratumAppended(t, sid, box["lo"], box["lo"] + d["rows_changed"], d, text),
            fidelity,
        )

    def delete_span(
        self, sid: SessionId, lo: int, hi: int, shift: bool = True, fidelity: bool = True
    ) -> FidelityReport:
        """Remove tokens [lo, hi) for real; `shift` closes the position gap."""

        def op(s: Session) -> tuple[int, dict[str, Any]]:
            check_compatible(self.model, "deleting a span")
            closed = delete_span(self.model, s, lo, hi, shift)
            return hi - lo, {"lo": lo, "hi": hi, "shift": shift, "positions_closed": closed}

        return self._edit(sid, "delete", op, lambda t, d: SpanDeleted(t, sid, lo, hi, d, shift), fidelity)

    def replace_span(self, sid: SessionId, lo: int, hi: int, text: str, fidelity: bool = True) -> FidelityReport:
        """Overwrite tokens [lo, hi) with `text`, recomputing only the new rows (later rows stay stale)."""

        def op(s: Session) -> tuple[int, dict[str, Any]]:
            check_compatible(self.model, "replacing a span")
            ids = chat.encode(self.model.tokenizer, text)
            if not ids:
                raise InvalidRequestError("replacement text is empty")
            delete_span(self.model, s, lo, hi, shift=True)
            seg = compute_segment(self.model, s, lo, ids)
            insert_segment(self.model, s, seg, lo, TokenState.COMPUTED)
            return len(ids), {"lo": lo, "hi": hi, "text": text, "new_tokens": len(ids)}

        return self._edit(sid, "replace", op, lambda t, d: SpanDeleted(t, sid, lo, hi, d, True), fidelity)

    def splice_segment(
        self,
        dst: SessionId,
        seg: Segment,
        at: int | None = None,
        seam_repair: int = 0,
        reposition: bool = True,
        fidelity: bool = True,
        message: dict[str, str] | None = None,
    ) -> FidelityReport:
        """Insert a segment's rows at logical index `at` (None = end), keys re-rotated to their new positions.

        `message`: when the segment is one whole chat message spliced at the
        end, record it in the chat so later turns follow the template.
        """
        box: dict[str, int] = {}

        def op(s: Session) -> tuple[int, dict[str, Any]]:
            check_compatible(self.model, "splicing")
            check_segment(seg, self.model)  # ids inside the vocabulary, positions in range, shapes
            self.ensure_budget(seg.n_tokens, "this splice")
            where = s.n_tokens if at is None else at
            box["lo"] = where
            moved = seg if reposition else _unrotated(seg, s, where)
            delta = insert_segment(self.model, s, moved, where)
            if message is not None and at is None:
                s.messages = s.messages + [dict(message)]
                s.transcript_text = chat.render(self.model.tokenizer, s.messages, add_generation_prompt=False)
            repaired = 0
            if seam_repair > 0:
                repaired += recompute_rows(self.model, s, where, seam_repair)
                if where + seg.n_tokens < s.n_tokens:
                    repaired += recompute_rows(self.model, s, where + seg.n_tokens, seam_repair)
            return seg.n_tokens, {
                "at": where,
                "delta": delta,
                "seam_repair": seam_repair,
                "repaired_tokens": repaired,
                "source": seg.source,
                "reposition": reposition,
            }

        return self._edit(
            dst,
            "splice",
            op,
            lambda t, d: SegmentSpliced(
                t, dst, box["lo"], box["lo"] + seg.n_tokens, d, seg.source, int(d["extra"]["delta"])
            ),
            fidelity,
        )

    def splice(
        self,
        dst: SessionId,
        src: SessionId,
        lo: int,
        hi: int,
        at: int | None = None,
        seam_repair: int = 0,
        fidelity: bool = True,
        reposition: bool = True,
        message: dict[str, str] | None = None,
    ) -> FidelityReport:
        """Copy tokens [lo, hi) of session `src` into `dst` at `at` (None = end)."""
        s = self.session(src)
        self._guard(dst, lambda: check_compatible(self.model, "splice"))  # before reading the source rows
        seg = self._guard(src, lambda: extract_segment(s, lo, hi, self.model.tokenizer.decode(s.tokens[lo:hi])))
        return self.splice_segment(dst, seg, at, seam_repair, reposition, fidelity, message)

    def save_segment(self, sid: SessionId, lo: int, hi: int, path: str | os.PathLike[str]) -> Path:
        """Write tokens [lo, hi) of a session as a segment file."""
        s = self.session(sid)

        def run() -> Path:
            check_compatible(self.model, "segment files")
            seg = extract_segment(s, lo, hi, self.model.tokenizer.decode(s.tokens[lo:hi]))
            return write_segment(self.model, seg, path)

        result: Path = self._guard(sid, run)
        return result

    def splice_file(
        self,
        dst: SessionId,
        path: str | os.PathLike[str],
        at: int | None = None,
        seam_repair: int = 0,
        prompt: str | None = None,
        fidelity: bool = True,
    ) -> FidelityReport:
        """Splice a segment file (or, with `prompt`, an mlx-lm prompt cache) into `dst`."""
        self.session(dst)
        reserve = lambda n: self.ensure_budget(n, "this splice")  # noqa: E731 - before the tensors are read
        if prompt is not None:
            seg = self._guard(dst, lambda: read_mlx_prompt_cache(path, self.model, prompt, reserve))
        else:
            seg = self._guard(dst, lambda: read_segment(path, self.model, reserve))
        return self.splice_segment(dst, seg, at, seam_repair, fidelity=fidelity)

    def compress(
        self,
        sid: SessionId,
        policy: str,
        keep_ratio: float | None = None,
        budget_tokens: int | None = None,
        **params: Any,
    ) -> Any:
        """Apply a compression policy (see `kvscope.engine.compression.POLICIES`); undoable."""
        from kvscope.engine.compression import compress_session

        s = self.session(sid)
        s.require_idle("compressing")
        saved = s.clone()
        decision = self._guard(
            sid,
            lambda: _or_restore(
                s,
                saved,
                lambda: _then(
                    compress_session(self, sid, policy, keep_ratio, budget_tokens, **params), self.persist, sid
                ),
            ),
        )
        s.push_undo("compress", saved, UNDO_DEPTH)
        return decision

    def replay_decision(self, sid: SessionId, decision: Any) -> None:
        """Apply a recorded decision's kept rows to a session holding the same cache; undoable."""
        from kvscope.engine.compression import replay_decision

        s = self.session(sid)
        s.require_idle("replaying a decision")
        saved = s.clone()
        self._guard(
            sid, lambda: _or_restore(s, saved, lambda: _then(replay_decision(self, sid, decision), self.persist, sid))
        )
        s.push_undo("replay decision", saved, UNDO_DEPTH)

    def undo(self, sid: SessionId) -> str:
        """Undo the last reversible edit (until the next chat turn). Returns its name."""
        s = self.session(sid)
        s.require_idle("undoing")
        if not s.undo_stack:
            raise InvalidRequestError(f"nothing to undo in session {s.name}")
        label, saved = s.undo_stack.pop()
        s.restore(saved)
        s.operations.append({"op": "undo", "undone": label})
        self.persist(sid)
        self.bus.emit(SessionChanged(self.bus.now_ms(), sid, f"undo {label}"))
        return label

    # ------------------------------------------------------------ compaction
    def compact(
        self, sid: SessionId, lo: int, hi: int, summary: str | None = None, fidelity: bool = True
    ) -> FidelityReport:
        """Summarise tokens [lo, hi), append the summary, mask the span, continue."""
        text = summary if summary is not None else self.summarize(sid)
        box: dict[str, int] = {}

        def op(s: Session) -> tuple[int, dict[str, Any]]:
            box["n"] = self._append_message(s, "user", f"[summary] {text}", TokenState.COMPUTED)
            rows = set_mask(s, lo, hi, False)
            return rows, {"lo": lo, "hi": hi, "summary": text, "summary_tokens": box["n"]}

        return self._edit(sid, "compact", op, lambda t, d: RegionMasked(t, sid, lo, hi, d), fidelity)

    def summarize(self, sid: SessionId, max_tokens: int = 64) -> str:
        """Ask the model for a summary on a throw-away copy of the session."""
        from kvscope.engine.prefix_store import PrefixStore
        from kvscope.engine.turns import run_turn

        s = self.session(sid)
        fork = s.clone(SessionId(f"{sid}-summary"))
        scratch = PrefixStore("scratch", 16, 0, lambda e: None, lambda: 0.0)
        res = run_turn(
            fork,
            self.model,
            scratch,
            EventBus(),
            SUMMARY_REQUEST,
            SamplingParams(max_tokens=max_tokens),
            512,
            lambda: False,
        )
        return res.text.strip() or "(no summary)"

    def restart(self, sid: SessionId, summary: str, name: str | None = None) -> SessionId:
        """A fresh session on the system prompt + `summary` (the alternative to compaction)."""
        s = self.session(sid)
        system = next((m["content"] for m in s.messages if m["role"] == "system"), None)
        new = self.new_session(name or f"{s.name} (restart)", system)  # type: ignore[attr-defined]
        t = self.session(new)
        self._guard(new, lambda: self._append_message(t, "user", f"[summary] {summary}", TokenState.COMPUTED))
        return new  # type: ignore[no-any-return]


def _or_restore(s: Session, saved: Session, fn: Callable[[], Any]) -> Any:
    """Run `fn`; if it fails, put the session back as `saved` (an operation is a transaction)."""
    n_ops = len(s.operations)
    try:
        return fn()
    except BaseException:
        s.restore(saved)
        del s.operations[n_ops:]
        raise


def _then(result: Any, after: Callable[[SessionId], None], sid: SessionId) -> Any:
    """`result`, once `after(sid)` (the save that ends a transaction) has succeeded."""
    after(sid)
    return result


def _unrotated(seg: Segment, s: Session, at: int) -> Segment:
    """Negative control: book the rows at their new positions but keep the old key rotation."""
    base = s.positions[at] if at < s.n_tokens else s.caches[0].offset
    positions = np.arange(base, base + seg.extent, dtype=np.int64)[seg.positions - seg.positions[0]]
    return Segment(
        seg.token_ids, positions, seg.keys, seg.values, seg.visible, seg.text, f"{seg.source} (not repositioned)"
    )

"""Moving cache segments: between sessions, into and out of segment files.

    Engine.splice(dst, src, lo, hi, at)         rows of another session
    Engine.splice_file(dst, path, at)           a segment file (or an mlx-lm prompt cache)
    Engine.save_segment(sid, lo, hi, path)      rows out to a file

Promises:
- a splice runs as one edit (`Editor.edit`: refused before anything changes
  when the model's cache kinds cannot splice, a transaction, measured
  against a full recompute, logged, undoable);
- the inserted rows' keys are re-rotated to their new positions, O(L) in the
  segment's length (`reposition=False` keeps the old rotation: the negative
  control the window offers);
- a segment is checked against the model (vocabulary, positions, shapes) and
  counted against the memory budget before its tensors are read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvscope.engine import chat
from kvscope.engine.editing import Editor
from kvscope.engine.events import SegmentSpliced, SessionId
from kvscope.engine.fidelity import FidelityReport
from kvscope.engine.parts import EngineParts
from kvscope.engine.rope import check_compatible
from kvscope.engine.segment_file import check_segment, read_mlx_prompt_cache, read_segment, write_segment
from kvscope.engine.session import Session
from kvscope.engine.surgery import Segment, extract_segment, insert_segment, recompute_rows


@dataclass(frozen=True)
class SpliceOptions:
    """How a segment goes in.

    Attributes:
        at: logical token index to insert before (None = the end).
        seam_repair: tokens recomputed after each seam (0 = none).
        reposition: re-rotate keys to their new positions (False: the control).
        fidelity: measure against a full recompute.
        message: when the segment is one whole chat message spliced at the
            end, record it in the chat so later turns follow the template.
    """

    at: int | None = None
    seam_repair: int = 0
    reposition: bool = True
    fidelity: bool = True
    message: dict[str, str] | None = None


class Splicer:
    def __init__(self, parts: EngineParts, editor: Editor) -> None:
        self._p = parts
        self._editor = editor

    def segment(self, dst: SessionId, seg: Segment, opt: SpliceOptions) -> FidelityReport:
        """Insert `seg`'s rows into `dst` as `opt` says."""
        box: dict[str, int] = {}

        def change(s: Session) -> tuple[int, dict[str, Any]]:
            lm = self._p.model()
            check_compatible(lm, "splicing")
            check_segment(seg, lm)  # ids inside the vocabulary, positions in range, shapes
            self._p.reserve_tokens(seg.n_tokens, "this splice")
            where = s.n_tokens if opt.at is None else opt.at
            box["lo"] = where
            delta = insert_segment(lm, s, seg if opt.reposition else _unrotated(seg, s, where), where)
            if opt.message is not None and opt.at is None:
                s.messages = s.messages + [dict(opt.message)]
                s.transcript_text = chat.render(lm.tokenizer, s.messages, add_generation_prompt=False)
            repaired = 0
            if opt.seam_repair > 0:
                repaired += recompute_rows(lm, s, where, opt.seam_repair)
                if where + seg.n_tokens < s.n_tokens:
                    repaired += recompute_rows(lm, s, where + seg.n_tokens, opt.seam_repair)
            return seg.n_tokens, {
                "at": where,
                "delta": delta,
                "seam_repair": opt.seam_repair,
                "repaired_tokens": repaired,
                "source": seg.source,
                "reposition": opt.reposition,
            }

        def event(t: float, d: dict[str, Any]) -> SegmentSpliced:
            lo = box["lo"]
            return SegmentSpliced(t, dst, lo, lo + seg.n_tokens, d, seg.source, int(d["extra"]["delta"]))

        return self._editor.edit(dst, "splice", change, event, opt.fidelity)

    def from_session(self, dst: SessionId, src: SessionId, lo: int, hi: int, opt: SpliceOptions) -> FidelityReport:
        """Copy tokens [lo, hi) of session `src` into `dst`."""
        p = self._p
        s = p.registry.get(src)
        p.tx.guard(dst, lambda: check_compatible(p.model(), "splice"))  # before reading the source rows
        text = p.model().tokenizer.decode(s.tokens[lo:hi])
        seg = p.tx.guard(src, lambda: extract_segment(s, lo, hi, text))
        return self.segment(dst, seg, opt)

    def from_file(
        self, dst: SessionId, path: str | os.PathLike[str], opt: SpliceOptions, prompt: str | None
    ) -> FidelityReport:
        """Splice a segment file (or, with `prompt`, an mlx-lm prompt cache) into `dst`."""
        p = self._p
        p.registry.get(dst)

        def reserve(n: int) -> None:  # before the tensors are read
            p.reserve_tokens(n, "this splice")

        if prompt is not None:
            seg = p.tx.guard(dst, lambda: read_mlx_prompt_cache(path, p.model(), prompt, reserve))
        else:
            seg = p.tx.guard(dst, lambda: read_segment(path, p.model(), reserve))
        return self.segment(dst, seg, opt)

    def save(self, sid: SessionId, lo: int, hi: int, path: str | os.PathLike[str]) -> Path:
        """Write tokens [lo, hi) of a session as a segment file."""
        p = self._p
        s = p.registry.get(sid)

        def run() -> Path:
            lm = p.model()
            check_compatible(lm, "segment files")
            return write_segment(lm, extract_segment(s, lo, hi, lm.tokenizer.decode(s.tokens[lo:hi])), path)

        return p.tx.guard(sid, run)


def _unrotated(seg: Segment, s: Session, at: int) -> Segment:
    """Negative control: book the rows at their new positions but keep the old key rotation."""
    base = s.positions[at] if at < s.n_tokens else s.caches[0].offset
    positions = np.arange(base, base + seg.extent, dtype=np.int64)[seg.positions - seg.positions[0]]
    return Segment(
        seg.token_ids, positions, seg.keys, seg.values, seg.visible, seg.text, f"{seg.source} (not repositioned)"
    )

"""Cache surgery on a session: mask, delete, insert (splice), recompute rows.

Promises, for every layer at once:
- `set_mask` is logical and reversible: rows stay stored (aside, unattended),
  positions unchanged;
- `delete_span` drops rows for real; with `shift`, later rows are re-rotated
  back by the span's extent so positions stay contiguous, else a gap remains;
- `insert_segment` places rows computed elsewhere at logical index `at`: keys
  are re-rotated by the position delta with the model's own RoPE, later rows
  of the session move up by the segment's extent (keys re-rotated too);
- `recompute_rows` refreshes tokens [t, t + k) against the context before t
  (seam repair, in-place overwrite).

Position arithmetic of an insertion in the middle::

    before:  tokens 0..at-1 @ pos 0..P-1 | tokens at.. @ pos P..
    segment: m tokens computed @ pos q..q+e-1        (e = extent)
    after:   0..at-1 @ 0..P-1 | segment @ P..P+e-1 (delta = P - q) | old tail @ P+e..

Knows nothing about chat templates or events.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from kvscope.engine.blocks import TokenState
from kvscope.engine.errors import InvalidRequestError
from kvscope.engine.generation import forward
from kvscope.engine.kv_cache import ScopeKVCache
from kvscope.engine.model_loading import LoadedModel
from kvscope.engine.rope import key_rotation, reposition_rows, rotate_moved_values
from kvscope.engine.session import Session


@dataclass
class Segment:
    """Rows of a token span, per layer, with where they were computed."""

    token_ids: list[int]
    positions: np.ndarray  # [n] positions the keys are rotated at
    keys: list[mx.array]  # per layer [1, H, n, D]
    values: list[mx.array]
    visible: list[np.ndarray]  # per layer [n] bool
    text: str = ""
    source: str = ""

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def extent(self) -> int:
        return int(self.positions[-1] - self.positions[0] + 1) if self.n_tokens else 0


def check_span(s: Session, lo: int, hi: int) -> None:
    if not isinstance(lo, (int, np.integer)) or not isinstance(hi, (int, np.integer)):
        raise InvalidRequestError(f"span bounds must be integers, got {lo!r}, {hi!r}")
    if lo >= hi:
        raise InvalidRequestError(f"empty span [{lo}, {hi}): select at least one token")
    if lo < 0 or hi > s.n_tokens:
        raise InvalidRequestError(f"span [{lo}, {hi}) is out of range: session {s.name} has {s.n_tokens} tokens")


def _layers(s: Session, layers: list[int] | None) -> list[int]:
    if layers is None:
        return list(range(len(s.caches)))
    bad = [i for i in layers if not 0 <= i < len(s.caches)]
    if bad:
        raise InvalidRequestError(f"layers {bad} out of range: the model has {len(s.caches)} layers")
    return list(layers)


def set_mask(s: Session, lo: int, hi: int, visible: bool, layers: list[int] | None = None) -> int:
    """Mask (visible=False) or unmask tokens [lo, hi). Returns rows changed."""
    check_span(s, lo, hi)
    return sum(s.caches[i].set_visible(lo, hi, visible) for i in _layers(s, layers))


def extract_segment(s: Session, lo: int, hi: int, text: str = "") -> Segment:
    """Copy the rows of tokens [lo, hi); every layer must still hold all of them."""
    check_span(s, lo, hi)
    keys, values, visible = [], [], []
    for i, c in enumerate(s.caches):
        k, v, toks, vis = c.rows_of(lo, hi)
        if len(toks) != hi - lo:
            raise InvalidRequestError(
                f"tokens [{lo}, {hi}) have {hi - lo - len(toks)} evicted rows in layer {i}: "
                "only spans whose rows are all stored can be copied"
            )
        keys.append(k)
        values.append(v)
        visible.append(vis)
    mx.eval(keys + values)
    positions = s.caches[0].token_positions[lo:hi].copy()
    return Segment(list(s.tokens[lo:hi]), positions, keys, values, visible, text, s.id)


def _rotate(lm: LoadedModel, layer: int) -> Callable[[mx.array, int], mx.array]:
    return key_rotation(lm, layer)


def _position_at(s: Session, at: int) -> int:
    """Position of logical token `at`, or the next position when `at` is the end."""
    c = s.caches[0]
    return int(c.token_positions[at]) if at < s.n_tokens else c.offset


def delete_span(lm: LoadedModel, s: Session, lo: int, hi: int, shift: bool = True) -> int:
    """Remove tokens [lo, hi) physically. Returns the number of positions closed."""
    check_span(s, lo, hi)
    gap = _position_at(s, hi) - _position_at(s, lo)
    d_pos = -gap if shift else 0
    for i, c in enumerate(s.caches):
        c.delete_tokens(lo, hi, d_pos, _rotate(lm, i))
        rotate_moved_values(lm, i, c, lo, d_pos)  # MLA caches whose k_pe is the value tensor
    del s.tokens[lo:hi], s.origin[lo:hi]
    s.edited = True
    return gap if shift else 0


def insert_segment(
    lm: LoadedModel, s: Session, seg: Segment, at: int | None = None, origin: TokenState = TokenState.SPLICED
) -> int:
    """Splice `seg` in before logical token `at` (None = at the end). Returns the position delta."""
    at = s.n_tokens if at is None else at
    if not 0 <= at <= s.n_tokens:
        raise InvalidRequestError(f"insert position {at} is out of range: session {s.name} has {s.n_tokens} tokens")
    if len(seg.keys) != len(s.caches):
        raise InvalidRequestError(f"segment has {len(seg.keys)} layers, the model has {len(s.caches)}")
    m = seg.n_tokens
    delta = int(_position_at(s, at) - seg.positions[0])
    shift = seg.extent if at < s.n_tokens else 0
    for i, c in enumerate(s.caches):
        keys, values = reposition_rows(lm, i, seg.keys[i], seg.values[i], delta)
        c.insert_tokens(at, keys, values, seg.positions + delta, seg.visible[i], shift, _rotate(lm, i))
        rotate_moved_values(lm, i, c, at + seg.n_tokens, shift)
    s.tokens[at:at] = seg.token_ids
    s.origin[at:at] = [int(origin)] * m
    s.edited = True
    return delta


def _context_before(s: Session, t: int) -> list[ScopeKVCache]:
    """Copies of the caches holding only tokens < t, the next token at t's position."""
    pos = _position_at(s, t)
    out = []
    for c in s.caches:
        cc = c.truncated(t)
        cc.advance_to(pos)
        out.append(cc)
    return out


def recompute_rows(lm: LoadedModel, s: Session, t: int, k: int) -> int:
    """Recompute tokens [t, t + k) against the (visible) context before t. Returns tokens done."""
    k = min(k, s.n_tokens - t)
    if k <= 0:
        return 0
    tmp = _context_before(s, t)
    forward(lm.model, s.tokens[t : t + k], tmp)
    for c, cc in zip(s.caches, tmp):
        c.overwrite_rows(t, *cc.tail_rows(k))
    mx.eval([c.keys for c in s.caches])
    return k


def compute_segment(lm: LoadedModel, s: Session, at: int, token_ids: list[int]) -> Segment:
    """Rows for `token_ids` computed as if they stood at logical index `at` (context = tokens before it)."""
    tmp = _context_before(s, at)
    start = tmp[0].offset
    forward(lm.model, token_ids, tmp)
    m = len(token_ids)
    rows = [cc.tail_rows(m) for cc in tmp]
    keys, values = [r[0] for r in rows], [r[1] for r in rows]
    mx.eval(keys + values)
    return Segment(token_ids, np.arange(start, start + m, dtype=np.int64), keys, values, [np.ones(m, bool)] * len(tmp))

"""Cache surgery on a session: mask, delete, insert (splice), recompute rows.

Promises, for every layer at once:
- `set_mask` is logical and reversible: rows stay stored, positions unchanged;
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

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from kvscope.engine.blocks import TokenState
from kvscope.engine.errors import InvalidRequestError
from kvscope.engine.generation import forward
from kvscope.engine.kv_cache import ScopeKVCache
from kvscope.engine.model_loading import LoadedModel
from kvscope.engine.rope import reposition_rows
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
        rows = np.nonzero((c.row_token[: c.n_rows] >= lo) & (c.row_token[: c.n_rows] < hi))[0]
        if len(rows) != hi - lo:
            raise InvalidRequestError(
                f"tokens [{lo}, {hi}) have {hi - lo - len(rows)} evicted rows in layer {i}: "
                "only spans whose rows are all stored can be copied"
            )
        idx = mx.array(rows.astype(np.int32))
        k, v = c.state
        keys.append(mx.take(k, idx, axis=2))
        values.append(mx.take(v, idx, axis=2))
        visible.append(c.row_visible[rows].copy())
    mx.eval(keys + values)
    return Segment(list(s.tokens[lo:hi]), np.asarray(s.positions[lo:hi], np.int64), keys, values, visible, text, s.id)


def _first_row_at_or_after(c: ScopeKVCache, token: int) -> int:
    return int(np.searchsorted(c.row_token[: c.n_rows], token, side="left"))


def _shift_rows(lm: LoadedModel, c: ScopeKVCache, r0: int, d_tokens: int, d_pos: int, layer: int) -> None:
    """Move storage rows r0.. by d_tokens logical indices and d_pos positions."""
    n = c.n_rows
    if r0 >= n:
        return
    assert c.keys is not None
    c.row_token[r0:n] += d_tokens
    if d_pos and r0 < n:
        assert c.values is not None
        k, v = reposition_rows(lm, layer, c.keys[..., r0:n, :], c.values[..., r0:n, :], d_pos)
        c.keys[..., r0:n, :], c.values[..., r0:n, :] = k, v
        c.row_position[r0:n] += d_pos


def delete_span(lm: LoadedModel, s: Session, lo: int, hi: int, shift: bool = True) -> int:
    """Remove tokens [lo, hi) physically. Returns the number of positions closed."""
    check_span(s, lo, hi)
    n_del = hi - lo
    end = s.caches[0].offset
    gap = (s.positions[hi] if hi < s.n_tokens else end) - s.positions[lo]
    d_pos = -gap if shift else 0
    for i, c in enumerate(s.caches):
        tok = c.row_token[: c.n_rows]
        c.keep_rows((tok < lo) | (tok >= hi))
        _shift_rows(lm, c, _first_row_at_or_after(c, hi), -n_del, d_pos, i)
        c.next_token -= n_del
        c.offset += d_pos
    del s.tokens[lo:hi], s.origin[lo:hi], s.positions[lo:hi]
    s.positions[lo:] = [p + d_pos for p in s.positions[lo:]]
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
    m, extent = seg.n_tokens, seg.extent
    base = s.positions[at] if at < s.n_tokens else s.caches[0].offset
    delta = int(base - seg.positions[0])
    new_pos = seg.positions + delta
    for i, c in enumerate(s.caches):
        r0 = _first_row_at_or_after(c, at)
        _shift_rows(lm, c, r0, m, extent if at < s.n_tokens else 0, i)
        keys, values = reposition_rows(lm, i, seg.keys[i], seg.values[i], delta)
        if c.keys is None:
            c.update_and_fetch(keys, values)
            c.row_position[:m] = new_pos
            c.row_token[:m] = np.arange(at, at + m)
            c.next_token, c.offset = m, int(new_pos[-1]) + 1
        else:
            c.insert_rows(r0, keys, values, np.arange(at, at + m), new_pos)
            c.next_token += m
            c.offset += extent
        c.row_visible[r0 : r0 + m] = seg.visible[i]
        c._invalidate()
    shifted = [p + (extent if at < s.n_tokens else 0) for p in s.positions[at:]]
    s.tokens[at:at] = seg.token_ids
    s.origin[at:at] = [int(origin)] * m
    s.positions[at:] = [int(p) for p in new_pos] + shifted
    s.edited = True
    return delta


def recompute_rows(lm: LoadedModel, s: Session, t: int, k: int) -> int:
    """Recompute tokens [t, t + k) against the (visible) context before t. Returns tokens done."""
    k = min(k, s.n_tokens - t)
    if k <= 0:
        return 0
    tmp = []
    for c in s.caches:
        cc = c.copy()
        cc.keep_rows(cc.row_token[: cc.n_rows] < t)
        cc.next_token, cc.offset = t, int(s.positions[t])
        tmp.append(cc)
    forward(lm.model, s.tokens[t : t + k], tmp)
    for c, cc in zip(s.caches, tmp):
        rows = np.nonzero((c.row_token[: c.n_rows] >= t) & (c.row_token[: c.n_rows] < t + k))[0]
        src = mx.array((cc.n_rows - k + c.row_token[rows] - t).astype(np.int32))  # the k new rows of cc
        ks, vs = cc.state
        c.replace_rows(rows, mx.take(ks, src, axis=2), mx.take(vs, src, axis=2))
    mx.eval([c.keys for c in s.caches])
    return k


def compute_segment(lm: LoadedModel, s: Session, at: int, token_ids: list[int]) -> Segment:
    """Rows for `token_ids` computed as if they stood at logical index `at` (context = tokens before it)."""
    tmp = []
    for c in s.caches:
        cc = c.copy()
        cc.keep_rows(cc.row_token[: cc.n_rows] < at)
        cc.next_token = at
        cc.offset = int(s.positions[at]) if at < s.n_tokens else c.offset
        tmp.append(cc)
    start = tmp[0].offset
    forward(lm.model, token_ids, tmp)
    m = len(token_ids)
    keys = [mx.contiguous(cc.state[0][..., -m:, :]) for cc in tmp]
    values = [mx.contiguous(cc.state[1][..., -m:, :]) for cc in tmp]
    mx.eval(keys + values)
    return Segment(token_ids, np.arange(start, start + m, dtype=np.int64), keys, values, [np.ones(m, bool)] * len(tmp))

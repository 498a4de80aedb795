"""RowSets: one layer's stored rows — the attended set and the masked set — for `ScopeKVCache`.

Both sets are `RowStore`s (one row per token, every KV head alike) until a
head-wise eviction turns both into `HeadRowStore`s (each KV head holds its
own tokens). Every operation here is about rows only: which tokens have one,
which are visible, their K/V. Positions, `offset` and the cache protocol
stay with `ScopeKVCache`, which owns this object and never shares it.

Selections are elementwise predicates over `toks()` (`[n]` uniform,
`[heads, n]` head-wise), so most operations read the same for both kinds.
A token's row is visible or masked alike in every head that holds it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

import mlx.core as mx
import numpy as np

from kvscope.engine.head_rows import HeadRowStore
from kvscope.engine.row_store import RowStore, gather
from kvscope.engine.tensor_ops import concat_rows, take_rows

Rotate = Callable[[mx.array, int], mx.array]
RowMap = Callable[[mx.array, mx.array], tuple[mx.array, mx.array]]
Store: TypeAlias = RowStore | HeadRowStore
_I64 = np.int64


class RowSets:
    """The attended rows (`live`, with spare capacity) and the masked rows (`aside`)."""

    __slots__ = ("live", "aside")

    def __init__(self, live: Store | None = None, aside: Store | None = None) -> None:
        self.live: Store = live if live is not None else RowStore()
        self.aside: Store = aside if aside is not None else RowStore()

    # ------------------------------------------------------------ reading
    @property
    def is_headwise(self) -> bool:
        return isinstance(self.live, HeadRowStore)

    @property
    def n_kv_heads(self) -> int:
        keys = self.live.keys if self.live.keys is not None else self.aside.keys
        return 0 if keys is None else int(keys.shape[1])

    def visible(self) -> np.ndarray:
        return self.live.token_list()

    def masked(self) -> np.ndarray:
        return self.aside.token_list()

    def tokens(self) -> np.ndarray:
        """Every token with a row (in some head), ascending."""
        return np.union1d(self.visible(), self.masked()).astype(_I64)

    def head_tokens(self, visible: bool) -> list[np.ndarray]:
        rows = self.live if visible else self.aside
        if isinstance(rows, HeadRowStore):
            return [t[t >= 0].copy() for t in rows.toks()]
        return [rows.toks().copy() for _ in range(self.n_kv_heads)]

    def presence(self) -> np.ndarray:
        """`[kv_heads, n_rows]`: whether each head holds each row of `tokens()`."""
        toks = self.tokens()
        live, aside = self.live, self.aside
        if not isinstance(live, HeadRowStore) or not isinstance(aside, HeadRowStore):
            return np.ones((self.n_kv_heads, len(toks)), bool)
        return live.presence(toks) | aside.presence(toks)

    def nbytes(self) -> int:
        """Bytes of the used columns of both sets (head-wise: holes included, they are allocated)."""
        keys = self.live.keys if self.live.keys is not None else self.aside.keys
        values = self.live.values if self.live.values is not None else self.aside.values
        if keys is None or values is None or keys.shape[2] == 0:
            return 0
        per_row = keys.nbytes // keys.shape[2] + values.nbytes // values.shape[2]
        return per_row * (self.live.n + self.aside.n)

    def rows(self, lo: int, hi: int) -> tuple[mx.array, mx.array, np.ndarray, np.ndarray]:
        """(keys, values, tokens, visible) of tokens [lo, hi), one row per token in token order;
        head-wise: zeros where a head does not hold the token (see `presence`)."""
        parts = []
        for rows, vis in ((self.live, True), (self.aside, False)):
            t = rows.toks()
            sel = (t >= lo) & (t < hi)
            if sel.any():
                if isinstance(rows, HeadRowStore):
                    k, v, toks, _ = rows.union_rows(sel)
                else:
                    k, v, toks = rows.take(sel)
                parts.append((k, v, toks, np.full(len(toks), vis)))
        if not parts:
            store = self.live if self.live.keys is not None else self.aside
            if store.keys is None or store.values is None:
                raise ValueError("the cache holds no rows yet")
            return store.keys[..., :0, :], store.values[..., :0, :], np.zeros(0, _I64), np.zeros(0, bool)
        toks = np.concatenate([p[2] for p in parts])
        order = np.argsort(toks, kind="stable")
        keys = concat_rows([p[0] for p in parts])
        values = concat_rows([p[1] for p in parts])
        if len(parts) > 1:
            keys, values = gather(keys, order), gather(values, order)
        return keys, values, toks[order], np.concatenate([p[3] for p in parts])[order]

    # ------------------------------------------------------------ editing
    def keep_below(self, cut: int) -> None:
        """Drop the rows of tokens >= cut."""
        self.live.keep(self.live.toks() < cut)
        self.aside.keep(self.aside.toks() < cut)

    def move(self, lo: int, hi: int, visible: bool) -> int:
        """Mask (visible=False) or unmask the rows of tokens [lo, hi); returns tokens moved."""
        src, dst = (self.aside, self.live) if visible else (self.live, self.aside)
        t = src.toks()
        sel = (t >= lo) & (t < hi)
        if not sel.any():
            return 0
        keys, values, toks = src.take(sel)
        src.keep(~sel)
        dst.merge(keys, values, toks)  # type: ignore[arg-type]
        return len(toks) if toks.ndim == 1 else len(np.unique(toks[toks >= 0]))

    def drop(self, tokens: np.ndarray) -> int:
        """Drop the rows of `tokens` (in every head); returns rows (head-wise: head rows) dropped."""
        n = 0
        for rows in (self.live, self.aside):
            drop = np.isin(rows.toks(), tokens)
            if drop.any():
                n += int(drop.sum())
                rows.keep(~drop)
        return n

    def keep_heads(self, kept: list[np.ndarray]) -> int:
        """KV head h keeps the visible rows of `kept[h]`, drops its other visible rows; returns rows dropped."""
        if not self.is_headwise:
            self.live, self.aside = _per_head(self.live, self.aside), _per_head(self.aside, self.live)
        toks = self.live.toks()
        keep = np.stack([np.isin(toks[h], np.asarray(kept[h], _I64)) for h in range(len(kept))])
        dropped = int(((toks >= 0) & ~keep).sum())
        self.live.keep(keep)
        return dropped

    def split_heads(self, presence: np.ndarray, row_visible: np.ndarray) -> None:
        """Turn uniform rows (one per `row_visible` entry) into per-head rows held as `presence` says."""
        if presence.shape != (self.n_kv_heads, len(row_visible)):
            raise ValueError(
                f"head presence is {presence.shape}, not [kv heads, rows] = {(self.n_kv_heads, len(row_visible))}"
            )
        self.live, self.aside = _per_head(self.live, self.aside), _per_head(self.aside, self.live)
        for rows, sel in ((self.live, row_visible), (self.aside, ~row_visible)):
            rows.keep(presence[:, sel])

    def shift_from(self, token: int, d_tokens: int, d_pos: int, rotate: Rotate | None) -> None:
        for rows in (self.live, self.aside):
            assert isinstance(rows, RowStore)
            rows.shift_from(token, d_tokens, d_pos, rotate)

    def add(self, keys: mx.array, values: mx.array, tokens: np.ndarray, visible: np.ndarray) -> None:
        """Add rows of new tokens, visible where `visible` says (uniform sets)."""
        for rows, sel in ((self.live, visible), (self.aside, ~visible)):
            if sel.any():
                idx = np.nonzero(sel)[0]
                rows.merge(gather(keys, idx), gather(values, idx), tokens[idx])

    def overwrite(self, lo: int, keys: mx.array, values: mx.array) -> int:
        """Overwrite the K/V of tokens [lo, lo + m) where held (uniform sets); returns rows written."""
        m = keys.shape[2]
        written = 0
        for rows in (self.live, self.aside):
            t = rows.toks()
            sel = np.nonzero((t >= lo) & (t < lo + m))[0]
            if len(sel) and rows.keys is not None and rows.values is not None:
                src = mx.array((t[sel] - lo).astype(np.int32))
                dst = mx.array(sel.astype(np.int32))
                rows.keys[..., dst, :] = take_rows(keys, src)
                rows.values[..., dst, :] = take_rows(values, src)
                written += len(sel)
        return written

    def map(self, fn: RowMap) -> None:
        """Replace every stored row's K/V by `fn(keys, values)` (same shapes)."""
        for rows in (self.live, self.aside):
            if rows.n:
                keys, values = fn(*rows.kv())
                rows.set(keys, values, rows.toks())

    def copy(self) -> RowSets:
        return RowSets(self.live.copy(), self.aside.copy())

    @classmethod
    def from_rows(
        cls,
        keys: mx.array,
        values: mx.array,
        row_tokens: np.ndarray,
        row_visible: np.ndarray,
        n_tokens: int,
        presence: np.ndarray | None = None,
    ) -> RowSets:
        """Sets from rows in token order (one per token; `presence` splits them per head).

        Raises:
            ValueError: the lists disagree with each other, the tensors or `n_tokens`.
        """
        row_tokens = np.asarray(row_tokens, _I64)
        row_visible = np.asarray(row_visible, bool)
        if row_tokens.ndim != 1 or row_visible.shape != row_tokens.shape:
            raise ValueError("row lists must be flat and of one length")
        if keys.shape[2] != len(row_tokens) or values.shape[2] != len(row_tokens):
            raise ValueError(f"{keys.shape[2]} key rows for {len(row_tokens)} row tokens")
        if len(row_tokens) and (np.any(np.diff(row_tokens) <= 0) or row_tokens[0] < 0 or row_tokens[-1] >= n_tokens):
            raise ValueError(f"row tokens must be increasing and within the {n_tokens} tokens")
        out = cls()
        for rows, sel in ((out.live, row_visible), (out.aside, ~row_visible)):
            if sel.any():
                idx = np.nonzero(sel)[0]
                rows.set(gather(keys, idx), gather(values, idx), row_tokens[idx])
        if presence is not None and not np.asarray(presence, bool).all():
            out.split_heads(np.asarray(presence, bool), row_visible)
        return out


def _per_head(rows: Store, other: Store) -> HeadRowStore:
    """`rows` as a HeadRowStore in which every head holds every row (shaped like `other` when empty)."""
    if isinstance(rows, HeadRowStore):
        return rows
    if rows.n:
        return HeadRowStore.uniform(*rows.kv(), rows.toks())
    src = rows if rows.keys is not None else other
    assert src.keys is not None and src.values is not None, "the layer holds no rows"
    return HeadRowStore.uniform(src.keys[..., :0, :], src.values[..., :0, :], np.zeros(0, _I64))

"""Per-KV-head token states, for the window's views of head-wise compressed layers.

`head_token_states` refines the session's `[layers, tokens]` token states
per KV head: where a layer's heads hold different rows (head-wise
eviction), a token that some heads dropped reads `evicted` in those heads
only. Uniform layers are None (every head is the layer). Plain numpy, made
on the engine thread for a snapshot; knows nothing about the window.

    layer 1, head 0:  C C E E C C E C      C computed, E evicted, M masked
    layer 1, head 1:  C E C C C E E C
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvscope.engine.blocks import TokenState, block_states


def head_token_states(caches: list[Any], state: np.ndarray) -> tuple[np.ndarray | None, ...]:
    """Per layer, `[kv_heads, tokens]` uint8 TokenStates where heads differ, else None."""
    out: list[np.ndarray | None] = []
    n = state.shape[1]
    for i, c in enumerate(caches):
        if not getattr(c, "is_headwise", False):
            out.append(None)
            continue
        heads = np.repeat(state[i][None], c.n_kv_heads, axis=0)
        for h, (vis, hid) in enumerate(zip(c.head_tokens(True), c.head_tokens(False))):
            held = np.zeros(n, bool)
            held[vis[vis < n]] = True
            held[hid[hid < n]] = True
            heads[h, ~held] = TokenState.EVICTED
        out.append(heads)
    return tuple(out)


def head_block_states(heads: tuple[np.ndarray | None, ...], state: np.ndarray, block_size: int) -> np.ndarray | None:
    """`[layers, kv_heads, blocks]` most common state per head and block (None if no layer differs
    per head); uniform layers repeat the layer's state in every head."""
    n_heads = next((h.shape[0] for h in heads if h is not None), 0)
    if not n_heads:
        return None
    rows = [h if h is not None else np.repeat(state[i][None], n_heads, axis=0) for i, h in enumerate(heads)]
    return np.stack([block_states(r, block_size) for r in rows])


def head_occupancy(heads: np.ndarray, lo: int, hi: int) -> list[int]:
    """Rows each head holds (visible or masked) among tokens [lo, hi) of one layer."""
    span = heads[:, lo:hi]
    return [int(x) for x in (span != TokenState.EVICTED).sum(axis=1)]


def head_rows(name: str, i: int, value: Any, n_rows: int) -> np.ndarray | None:
    """A session file's `head_rows` (`[kv_heads][n_rows]` of 0/1: which head holds which row), checked.

    Raises:
        SegmentFileError: not a list of 0/1 lists of the layer's row count, or a row no head holds.
    """
    from kvscope.engine.errors import SegmentFileError

    if value is None:
        return None
    ok = (
        isinstance(value, list)
        and 0 < len(value) <= 4096
        and all(
            isinstance(r, list) and len(r) == n_rows and all(x in (0, 1) and type(x) is int for x in r) for r in value
        )
    )
    if not ok:
        raise SegmentFileError(f"session {name}: layer {i} head_rows must be one list of {n_rows} 0/1 per KV head")
    out = np.asarray(value, bool).reshape(len(value), n_rows)
    if n_rows and not out.any(axis=0).all():
        raise SegmentFileError(f"session {name}: layer {i} head_rows leave a row that no KV head holds")
    return out

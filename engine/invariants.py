"""Checks of every invariant the cache design relies on, for tests and benches.

`session_problems` and `store_problems` return plain sentences (empty = all
good); `check_engine` raises `InvariantError` listing them all. They read
only public state and change nothing, so they can run after every step of a
stateful test. `logits_vs_recompute` is the independent oracle: the cache's
next-token logits against a fresh prefill of the visible tokens at their
recorded positions.

Invariants, per session and layer:
- the layer has seen exactly the session's tokens (`n_tokens`), and the
  session's `tokens` and `origin` have one entry per token;
- positions are strictly increasing, non-negative, the same in every layer,
  and `offset` is one past the last one (0 when empty);
- visible and masked rows point at distinct tokens of the session, each list
  ascending, and the stored K/V hold exactly that many rows;
- `token_state()` marks masked exactly the masked rows and evicted exactly
  the tokens without a row;
- on a head-wise compressed layer, each KV head's visible and masked tokens
  are ascending and distinct, their unions are the layer's visible and
  masked tokens, and the buffer holds every head's rows.
Per prefix store: each block's hash is the chain hash of its parent and its
tokens, parents are stored, child counts match, and only open sessions hold
references.

Knows nothing about the window; imports no Qt.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import mlx.core as mx
import numpy as np

from kvscope.engine.blocks import TokenState, chain_hashes
from kvscope.engine.events import SessionId
from kvscope.engine.generation import forward
from kvscope.engine.kv_cache import ScopeKVCache
from kvscope.engine.model_loading import LoadedModel
from kvscope.engine.prefix_store import PrefixStore, StoredBlock
from kvscope.engine.session import Session


class InvariantError(AssertionError):
    """An engine invariant does not hold (a bug in kvscope, not bad input)."""


def _layer_problems(s: Session, i: int) -> list[str]:
    c = s.caches[i]
    where = f"session {s.name} layer {i}"
    out = []
    n = s.n_tokens
    if c.n_tokens != n:
        out.append(f"{where}: the cache has seen {c.n_tokens} tokens, the session {n}")
    pos = c.token_positions
    if len(pos) and (pos[0] < 0 or np.any(np.diff(pos) <= 0)):
        bad = int(np.nonzero(np.diff(pos) <= 0)[0][0]) + 1 if np.any(np.diff(pos) <= 0) else 0
        out.append(
            f"{where}: positions are not strictly increasing at token {bad} ({pos[max(bad - 1, 0)]}, {pos[bad]})"
        )
    want_offset = int(pos[-1]) + 1 if len(pos) else 0
    if c.offset != want_offset:
        out.append(f"{where}: offset {c.offset} is not one past the last position ({want_offset - 1})")
    vis, hid = c.visible_tokens, c.masked_tokens
    for name, toks in (("visible", vis), ("masked", hid)):
        if len(toks) and (np.any(np.diff(toks) <= 0) or toks[0] < 0 or toks[-1] >= max(n, c.n_tokens)):
            out.append(f"{where}: {name} rows do not point at distinct tokens of the session")
    if len(np.intersect1d(vis, hid)):
        out.append(f"{where}: tokens {np.intersect1d(vis, hid)[:5].tolist()} are both visible and masked")
    if c.n_rows and c.state[0].shape[2] != c.n_rows:
        out.append(f"{where}: {c.state[0].shape[2]} stored K/V rows for {c.n_rows} rows booked")
    if c.is_headwise:
        return out + _head_problems(c, where)
    if c.keys is not None and c.keys.shape[2] < c.n_visible:
        out.append(f"{where}: the attended buffer holds {c.keys.shape[2]} rows, fewer than {c.n_visible} visible")
    return out


def _head_problems(c: ScopeKVCache, where: str) -> list[str]:
    out = []
    for visible, union in ((True, c.visible_tokens), (False, c.masked_tokens)):
        heads = c.head_tokens(visible)
        name = "visible" if visible else "masked"
        if any(len(t) and np.any(np.diff(t) <= 0) for t in heads):
            out.append(f"{where}: a KV head's {name} rows are not ascending distinct tokens")
        joined = np.unique(np.concatenate(heads)) if heads else np.zeros(0, np.int64)
        if not np.array_equal(joined, union):
            out.append(f"{where}: the KV heads' {name} rows do not add up to the layer's {name} tokens")
    most = max((len(t) for t in c.head_tokens(True)), default=0)
    if c.keys is not None and c.keys.shape[2] < most:
        out.append(f"{where}: the attended buffer holds {c.keys.shape[2]} columns, fewer than a head's {most} rows")
    return out


def session_problems(s: Session) -> list[str]:
    """Every broken invariant of one session, as sentences."""
    out = []
    if len(s.origin) != s.n_tokens:
        out.append(f"session {s.name}: {len(s.origin)} origins for {s.n_tokens} tokens")
    for i in range(len(s.caches)):
        out += _layer_problems(s, i)
    if s.caches:
        first = s.caches[0].token_positions
        for i, c in enumerate(s.caches[1:], 1):
            if not np.array_equal(c.token_positions, first):
                diff = np.nonzero(c.token_positions[: len(first)] != first[: len(c.token_positions)])[0]
                at = int(diff[0]) if len(diff) else min(len(first), len(c.token_positions))
                out.append(f"session {s.name}: layer {i} puts token {at} at another position than layer 0")
    if out:
        return out
    state = s.token_state()
    for i, c in enumerate(s.caches):
        masked = np.nonzero(state[i] == TokenState.MASKED)[0]
        evicted = np.nonzero(state[i] == TokenState.EVICTED)[0]
        if not np.array_equal(masked, c.masked_tokens):
            out.append(f"session {s.name} layer {i}: the token states show other masked tokens than the cache")
        if not np.array_equal(evicted, np.setdiff1d(np.arange(s.n_tokens), c.row_token)):
            out.append(f"session {s.name} layer {i}: the token states show other evicted tokens than the cache")
    return out


def _chain(store: PrefixStore, b: StoredBlock) -> list[StoredBlock] | None:
    chain = [b]
    while chain[-1].parent is not None:
        parent = store.get(chain[-1].parent)
        if parent is None or len(chain) > len(store):
            return None
        chain.append(parent)
    return chain[::-1]


def store_problems(store: PrefixStore, open_sessions: Iterable[SessionId]) -> list[str]:
    """Every broken invariant of the prefix store, as sentences."""
    out = []
    live = set(open_sessions)
    children: Counter[str] = Counter()
    for b in store.blocks():
        chain = _chain(store, b)
        if chain is None:
            out.append(f"block {b.block_hash}: its parent chain is broken")
            continue
        ids = [t for blk in chain for t in blk.token_ids]
        if chain_hashes(ids, store.block_size, store.root)[-1:] != [b.block_hash]:
            out.append(f"block {b.block_hash}: its hash is not the chain hash of its tokens")
        if b.parent is not None:
            children[b.parent] += 1
        stale = b.sessions - live
        if stale:
            out.append(f"block {b.block_hash}: held by closed sessions {sorted(stale)}")
    for b in store.blocks():
        if store.children_count(b.block_hash) != children[b.block_hash]:
            out.append(
                f"block {b.block_hash}: the store counts {store.children_count(b.block_hash)} children, not {children[b.block_hash]}"
            )
    return out


def check_sessions(sessions: Iterable[Session], store: PrefixStore | None = None) -> None:
    """Raise `InvariantError` naming every broken invariant."""
    sessions = list(sessions)
    problems = [p for s in sessions for p in session_problems(s)]
    if store is not None:
        problems += store_problems(store, [s.id for s in sessions])
    if problems:
        raise InvariantError("; ".join(problems))


def logits_vs_recompute(lm: LoadedModel, s: Session, probe: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(cache logits, recompute logits) of `probe` after the session's visible tokens at their positions."""
    from kvscope.engine.fidelity import recompute_logits, visible_tokens

    got = forward(lm.model, probe, [c.copy() for c in s.caches])[0]
    want = recompute_logits(lm, *visible_tokens(s), probe)
    mx.eval(got, want)
    return np.array(got, np.float32), np.array(want, np.float32)

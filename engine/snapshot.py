"""Snapshots: what the window draws, as numpy arrays and plain values.

A snapshot is taken on the engine thread and handed to the UI thread; it
holds no mx arrays and never changes after it is made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kvscope.engine.blocks import block_states, chain_hashes
from kvscope.engine.caches.describe import layer_label, layer_note
from kvscope.engine.events import BlockHash, SessionId
from kvscope.engine.head_states import head_block_states, head_token_states
from kvscope.engine.session import Session, TurnStats


@dataclass(frozen=True)
class SessionSnapshot:
    session: SessionId
    name: str
    block_size: int
    n_layers: int
    token_ids: np.ndarray  # [tokens] int64
    token_text: tuple[str, ...]  # decoded piece per token
    positions: np.ndarray  # [tokens] RoPE position of each logical token
    token_state: np.ndarray  # [layers, tokens] uint8 TokenState
    block_state: np.ndarray  # [layers, blocks] uint8, most common state
    block_hashes: tuple[BlockHash | None, ...]  # None for a partial / edited block
    block_sessions: tuple[tuple[SessionId, ...], ...]  # sessions sharing each block
    scores: np.ndarray | None  # [layers, tokens] float32 of the last decision
    nbytes: int
    offset: int
    generating: bool
    messages: tuple[tuple[str, str], ...]
    turns: tuple[TurnStats, ...]
    layer_labels: tuple[str, ...] = ()  # per cache: "3 attn", "4 win 512", "5 state"
    layer_notes: tuple[str, ...] = ()  # per cache: what kind of cache it is, bytes, last token absorbed
    head_state: tuple[np.ndarray | None, ...] = ()  # per layer [kv_heads, tokens] where heads differ, else None
    head_block_state: np.ndarray | None = None  # [layers, kv_heads, blocks], None when no layer differs per head
    layer_budgets: tuple[int, ...] | None = None  # per layer budget of the last decision
    head_budgets: tuple[tuple[int, ...], ...] | None = None  # per layer, rows each KV head keeps (head-wise)

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def n_blocks(self) -> int:
        return self.block_state.shape[1]

    def block_span(self, block: int) -> tuple[int, int]:
        lo = block * self.block_size
        return lo, min(lo + self.block_size, self.n_tokens)


def take_snapshot(
    session: Session,
    block_size: int,
    root: str,
    piece: dict[int, str],
    decode_one: Callable[[int], str],
    sharing: Callable[[BlockHash], tuple[SessionId, ...]],
) -> SessionSnapshot:
    """Build a snapshot; `piece` memoises token texts across snapshots."""
    ids = np.asarray(session.tokens, np.int64)
    for t in set(session.tokens) - piece.keys():
        piece[t] = decode_one(t)
    state = session.token_state()
    n_blocks = -(-len(ids) // block_size)
    plain = session.plain_prefix_len()
    hashes: list[BlockHash | None] = list(chain_hashes(ids[: plain - plain % block_size], block_size, root))
    hashes += [None] * (n_blocks - len(hashes))
    scores = None
    heads = head_token_states(session.caches, state)
    decision = session.last_decision
    if decision is not None and getattr(decision, "token_scores", None) is not None:
        scores = decision.token_scores(len(ids))
    return SessionSnapshot(
        session=session.id,
        name=session.name,
        block_size=block_size,
        n_layers=len(session.caches),
        token_ids=ids,
        token_text=tuple(piece[t] for t in session.tokens),
        positions=np.asarray(session.positions, np.int64),
        token_state=state,
        block_state=block_states(state, block_size),
        block_hashes=tuple(hashes),
        block_sessions=tuple(sharing(h) if h else () for h in hashes),
        scores=scores,
        nbytes=session.nbytes,
        offset=session.caches[0].offset if session.caches else 0,
        generating=session.generating,
        messages=tuple((m["role"], m["content"]) for m in session.messages),
        turns=tuple(session.turns),
        layer_labels=tuple(layer_label(i, c) for i, c in enumerate(session.caches)),
        layer_notes=tuple(layer_note(c) for c in session.caches),
        head_state=heads,
        head_block_state=head_block_states(heads, state, block_size),
        layer_budgets=_layer_budgets(decision),
        head_budgets=_head_budgets(decision),
    )


def _layer_budgets(decision: object) -> tuple[int, ...] | None:
    layers = getattr(decision, "layers", None)
    return tuple(int(layer.budget) for layer in layers) if layers else None


def _head_budgets(decision: object) -> tuple[tuple[int, ...], ...] | None:
    hb = getattr(decision, "head_budgets", None)
    return tuple(tuple(int(x) for x in b) for b in hb) if hb else None

"""Prefix store: full blocks of K/V rows shared by all sessions of one model.

Promises:
- `match` finds the longest chain of stored full blocks that prefixes a token
  sequence (chain hashes, so a hit implies the whole prefix is identical);
- `insert` copies rows in (one copy per block, whatever the number of
  sessions), `acquire`/`release` count the sessions that use a block;
- under the byte budget, unreferenced leaf blocks are evicted in the order
  of the selected policy (`prefix_policy`: lru, hot, workflow; `set_policy`
  switches at any time), leaves before their parents; referenced blocks are
  never evicted. A block counts its hits (later prompts that matched it)
  and the agents that used it (`note_request` names a session's agent and
  workflow step, which also feeds the policy's step graph);
- every change is reported as `BlockStored` / `BlockRemoved` /
  `AllBlocksCleared` events, each eviction's choice (policy, blocks, a
  reason per block) as `PrefixEvictionDecided` just before its
  `BlockRemoved`.

A hit copies the rows into the session's own contiguous buffers: an O(L)
copy instead of an O(L^2) prefill. Knows nothing about chat templates.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx

from kvscope.engine.blocks import chain_hashes
from kvscope.engine.config import EngineConfig
from kvscope.engine.errors import InvalidRequestError
from kvscope.engine.events import (
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    Event,
    EventBus,
    PrefixEvictionDecided,
    SessionId,
)
from kvscope.engine.prefix_policy import POLICIES, EvictionPolicy, eviction_order
from kvscope.engine.tensor_ops import concat_rows, slice_rows


@dataclass(slots=True)
class StoredBlock:
    """One full block: its rows in every layer and who uses it."""

    block_hash: BlockHash
    parent: BlockHash | None
    token_ids: tuple[int, ...]
    keys: list[mx.array]  # per layer, [1, H, block_size, D]
    values: list[mx.array]
    nbytes: int
    sessions: set[SessionId] = field(default_factory=set)
    last_used: float = 0.0
    hits: int = 0  # later prompts that matched it
    agents: set[str] = field(default_factory=set)  # who used it (request metadata; see note_request)


class PrefixStore:
    """Longest-prefix matching over chain-hashed blocks, evicted by a selectable policy."""

    def __init__(
        self,
        root: str,
        block_size: int,
        budget_bytes: int,
        emit: Callable[[Event], None],
        now_ms: Callable[[], float],
        policy: str = "lru",
    ) -> None:
        self.root = root
        self.block_size = block_size
        self.budget_bytes = budget_bytes
        self._emit = emit
        self._now_ms = now_ms
        self._blocks: OrderedDict[BlockHash, StoredBlock] = OrderedDict()  # LRU order
        self._children: dict[BlockHash, int] = {}
        self._agent_of: dict[SessionId, str] = {}
        self.policy = EvictionPolicy(checked_policy(policy))

    @classmethod
    def for_model(cls, root: str, config: EngineConfig, bus: EventBus, previous: PrefixStore | None) -> PrefixStore:
        """A new model's store, by the configured policy or the one `previous` (the old model's) had switched to."""
        policy = previous.policy.name if previous is not None else config.prefix_policy
        return cls(root, config.block_size, config.prefix_budget_bytes, bus.emit, bus.now_ms, policy)

    def set_policy(self, name: str) -> None:
        """Evict by `name` from now on (the step graph learned so far is kept)."""
        self.policy = EvictionPolicy(checked_policy(name), self.policy.graph)
        self.evict_to_budget()

    def note_request(self, session: SessionId, agent: str, step: int | None = None) -> None:
        """`session` serves a request of `agent` at workflow `step`: its blocks are tagged with the agent."""
        self._agent_of[session] = agent
        self.policy.graph.observe(agent, step)

    # ------------------------------------------------------------ queries
    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._blocks.values())

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, h: object) -> bool:
        return h in self._blocks

    def blocks(self) -> list[StoredBlock]:
        """Every stored block, least recently used first (for checks and views; do not mutate)."""
        return list(self._blocks.values())

    def children_count(self, h: BlockHash) -> int:
        """How many stored blocks name `h` as their parent (the store's own count)."""
        return self._children.get(h, 0)

    def get(self, h: BlockHash) -> StoredBlock | None:
        return self._blocks.get(h)

    def sessions_of(self, h: BlockHash) -> tuple[SessionId, ...]:
        b = self._blocks.get(h)
        return tuple(sorted(b.sessions)) if b else ()

    def match(self, token_ids: list[int]) -> list[StoredBlock]:
        """Stored blocks forming the longest full-block prefix of `token_ids`."""
        out: list[StoredBlock] = []
        for h in chain_hashes(token_ids, self.block_size, self.root):
            b = self._blocks.get(h)
            if b is None:
                break
            out.append(b)
        return out

    # ------------------------------------------------------------ changes
    def load_rows(self, blocks: list[StoredBlock], session: SessionId) -> tuple[list[mx.array], list[mx.array]]:
        """Per-layer K and V for `blocks`, concatenated; marks them used by `session`."""
        now = time.monotonic()
        agent = self._agent_of.get(session)
        for b in blocks:
            b.sessions.add(session)
            b.last_used = now
            b.hits += 1
            if agent is not None:
                b.agents.add(agent)
            self._blocks.move_to_end(b.block_hash)
        n_layers = len(blocks[0].keys)
        keys = [concat_rows([b.keys[i] for b in blocks]) for i in range(n_layers)]
        values = [concat_rows([b.values[i] for b in blocks]) for i in range(n_layers)]
        return keys, values

    def insert(
        self,
        token_ids: list[int],
        keys: list[mx.array],
        values: list[mx.array],
        session: SessionId,
    ) -> int:
        """Store the full blocks of a plain prefix; rows i are token i.

        Args:
            token_ids: the prefix's tokens (only full blocks are stored).
            keys, values: per layer `[1, H, >= len(token_ids), D]` rows.
            session: the session that computed them (it references them).

        Returns:
            How many blocks were new.
        """
        bs = self.block_size
        hashes = chain_hashes(token_ids, bs, self.root)
        new: list[BlockHash] = []
        parent: BlockHash | None = None
        now = time.monotonic()
        agent = self._agent_of.get(session)
        for i, h in enumerate(hashes):
            b = self._blocks.get(h)
            if b is None:
                lo, hi = i * bs, (i + 1) * bs
                ks = [slice_rows(k, lo, hi) for k in keys]
                vs = [slice_rows(v, lo, hi) for v in values]
                nbytes = sum(k.nbytes + v.nbytes for k, v in zip(ks, vs))
                b = StoredBlock(h, parent, tuple(token_ids[lo:hi]), ks, vs, nbytes)
                self._blocks[h] = b
                if parent is not None:
                    self._children[parent] = self._children.get(parent, 0) + 1
                new.append(h)
            b.sessions.add(session)
            b.last_used = now
            if agent is not None:
                b.agents.add(agent)
            self._blocks.move_to_end(h)
            parent = h
        if new:
            mx.eval([t for h in new for t in self._blocks[h].keys + self._blocks[h].values])
            first = self._blocks[new[0]]
            toks = tuple(t for h in new for t in self._blocks[h].token_ids)
            self._emit(BlockStored(self._now_ms(), tuple(new), first.parent, toks, bs, session))
        self.evict_to_budget()
        return len(new)

    def release(self, session: SessionId) -> None:
        """The session no longer uses any block (closed or reset)."""
        for b in self._blocks.values():
            b.sessions.discard(session)
        self._agent_of.pop(session, None)
        self.evict_to_budget()

    def evict_to_budget(self, budget_bytes: int | None = None) -> int:
        """Evict unreferenced leaf blocks in the policy's order until under budget. Returns bytes freed."""
        budget = self.budget_bytes if budget_bytes is None else budget_bytes
        total = self.nbytes
        if total <= budget:
            return 0
        now = time.monotonic()
        freed = 0
        removed: list[BlockHash] = []
        reasons: list[str] = []
        order = eviction_order(
            self.policy, self._blocks, self.children_count, lambda b: not b.sessions, lambda b: b.block_hash
        )
        for victim in order:
            reasons.append(self.policy.reason(victim, now))
            self._remove(victim)
            removed.append(victim.block_hash)
            total -= victim.nbytes
            freed += victim.nbytes
            if total <= budget:
                break
        if removed:
            t = self._now_ms()
            self._emit(PrefixEvictionDecided(t, self.policy.name, tuple(removed), tuple(reasons), freed, budget))
            self._emit(BlockRemoved(t, tuple(removed)))
        return freed

    def clear(self) -> None:
        self._blocks.clear()
        self._children.clear()
        self._emit(AllBlocksCleared(self._now_ms()))

    def _remove(self, b: StoredBlock) -> None:
        del self._blocks[b.block_hash]
        if b.parent is not None and b.parent in self._children:
            self._children[b.parent] -= 1
            if self._children[b.parent] <= 0:
                del self._children[b.parent]


def checked_policy(policy: str) -> str:
    """`policy` if it names a prefix-store policy, else an `InvalidRequestError` listing them."""
    if policy not in POLICIES:
        raise InvalidRequestError(f"unknown prefix-store policy {policy!r}; choose from {', '.join(POLICIES)}")
    return policy

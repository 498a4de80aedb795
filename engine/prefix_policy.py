"""Prefix-store eviction policies: which unreferenced leaf block goes first under a byte budget.

One implementation for the engine's live `PrefixStore` and for `kvscope
replay`'s simulated store: both hand over their own block objects, which
need only `parent`, `last_used` (any clock that grows), `hits` (how often a
later prompt matched the block) and `agents` (who used it).

    lru       least recently used first
    hot       hotness-aware, after HotPrefix: the least reused first (ties: LRU),
              so the nodes of the prefix tree that are reused most stay
    workflow  workflow-aware, after KVFlow: the block whose agents run again
              furthest in the future first (ties: LRU); steps-to-execution
              come from the agent step graph `StepGraph` learns online from
              each request's agent and step, so a replay predicts what the
              live store would do. A block no agent used is not expected again.

Only leaves are evicted (a stored chain stays matchable from its root); a
parent becomes a candidate once its last child is gone. Knows nothing about
mx, tensors or where the blocks live.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Callable, Collection, Hashable, Iterator, Mapping
from typing import Protocol, TypeVar

POLICIES = ("lru", "hot", "workflow")


class BlockUse(Protocol):
    """What a policy reads of a stored block."""

    @property
    def parent(self) -> Hashable | None: ...
    @property
    def last_used(self) -> float: ...
    @property
    def hits(self) -> int: ...
    @property
    def agents(self) -> Collection[str]: ...


B = TypeVar("B", bound=BlockUse)
H = TypeVar("H", bound=Hashable)


class StepGraph:
    """The agent step graph, learned from the (agent, step) of each request in arrival order.

    Requests with the same `step` number run in the same step (a fan-out); a
    new step number, or none, starts the next step. An edge a -> b means b
    ran in the step right after one where a ran.
    """

    def __init__(self) -> None:
        self._next: dict[str, Counter[str]] = {}
        self._current: set[str] = set()
        self._previous: set[str] = set()
        self._step: int | None = None
        self._distances: dict[str, int] | None = None

    def observe(self, agent: str, step: int | None = None) -> None:
        if step is None or step != self._step or not self._current:
            self._previous, self._current = self._current, set()
        self._step = step
        self._current.add(agent)
        for a in self._previous:
            self._next.setdefault(a, Counter())[agent] += 1
        self._distances = None

    @property
    def running(self) -> frozenset[str]:
        """The agents of the latest step."""
        return frozenset(self._current)

    def edges(self) -> dict[str, dict[str, int]]:
        """Who followed whom and how often (for display)."""
        return {a: dict(c) for a, c in self._next.items()}

    def steps_until(self, agent: str) -> float:
        """Steps until `agent` runs again (1: in the next step), `inf` if the graph never leads back to it."""
        if self._distances is None:
            self._distances = self._bfs()
        return float(self._distances.get(agent, math.inf))

    def _bfs(self) -> dict[str, int]:
        dist: dict[str, int] = {}
        frontier = set(self._current)
        d = 0
        while frontier:
            d += 1
            nxt = {b for a in frontier for b in self._next.get(a, ())} - dist.keys()
            for b in nxt:
                dist[b] = d
            frontier = nxt
        return dist


class EvictionPolicy:
    """Orders evictable blocks; the smallest `key` goes first."""

    def __init__(self, name: str, graph: StepGraph | None = None, clock_unit: str = "s") -> None:
        """`clock_unit` names what `last_used` counts (seconds live, requests in a replay)."""
        if name not in POLICIES:
            raise ValueError(f"unknown prefix-store policy {name!r}; choose from {', '.join(POLICIES)}")
        self.name = name
        self.graph = graph if graph is not None else StepGraph()
        self.clock_unit = clock_unit

    def key(self, b: BlockUse) -> tuple[float, float]:
        if self.name == "hot":
            return (b.hits, b.last_used)
        if self.name == "workflow":
            return (-self._soonest(b), b.last_used)
        return (b.last_used, 0.0)

    def reason(self, b: BlockUse, now: float) -> str:
        """Why `b` was chosen, for a person (the event and the window show it)."""
        if self.name == "hot":
            return f"hot: reused {b.hits} time{'s' if b.hits != 1 else ''}"
        if self.name == "workflow":
            soonest = self._soonest(b)
            who = ", ".join(sorted(b.agents)) or "no agent"
            when = "not expected again" if math.isinf(soonest) else f"runs again in {int(soonest)} step(s)"
            return f"workflow: {who} {when}"
        return f"lru: last used {max(0.0, now - b.last_used):.3g} {self.clock_unit} ago"

    def _soonest(self, b: BlockUse) -> float:
        return min((self.graph.steps_until(a) for a in b.agents), default=math.inf)


def eviction_order(
    policy: EvictionPolicy,
    blocks: Mapping[H, B],
    n_children: Callable[[H], int],
    evictable: Callable[[B], bool],
    hash_of: Callable[[B], H],
) -> Iterator[B]:
    """Evictable leaf blocks, first victim first. The caller removes each yielded block (so its
    parent can become a leaf) before asking for the next; it may stop at any point."""
    tie = 0
    heap: list[tuple[tuple[float, float], int, H]] = []
    for h, b in blocks.items():
        if evictable(b) and not n_children(h):
            heap.append((policy.key(b), tie, h))
            tie += 1
    heapq.heapify(heap)
    while heap:
        _, _, h = heapq.heappop(heap)
        victim = blocks.get(h)
        if victim is None or n_children(h) or not evictable(victim):
            continue
        parent = victim.parent
        yield victim
        p = blocks.get(parent) if parent is not None else None  # type: ignore[arg-type]
        if p is not None and evictable(p) and not n_children(hash_of(p)):
            heapq.heappush(heap, (policy.key(p), tie, hash_of(p)))
            tie += 1

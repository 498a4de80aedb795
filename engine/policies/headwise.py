"""Head-wise budgets: each KV head keeps its own rows, scored by any policy.

Both wrap a scorer from the registry (`scorer="keydiff"` by default: query-
agnostic and without a window, so it fits any budget; `"snapkv"`, ... and
the scorer's own parameters pass through) and keep its protected rows
(sinks, recent window) in every head:

- `per_head`: every head keeps the layer's budget `b`, chosen by its own
  scores (no padding at all: every head holds `b` rows);
- `adakv` (Feng et al. 2024, kvpress `AdaKVPress`): the layer's `b * heads`
  rows are shared out by score: each head first keeps its protected rows and
  its top `floor * b` rows (the safeguard, kvpress's `alpha_safeguard`), then
  the rest is a top-k over the flattened heads' scores. Heads whose
  attention is concentrated give rows to heads whose attention is spread.
  `cap` (None = AdaKV as published) bounds a head at `cap * b` rows: the
  cache stores max-over-heads columns per layer, so one greedy head would
  otherwise hold on to the memory the others freed.

Across layers, the wrapped scorer's own rule applies: `adakv` over
`pyramidkv` or `dynamickv` moves budget between layers too.

    head 0:  ##..#.....##   4 + recent    scores concentrated
    head 1:  ###.##.####.## 9 + recent    scores spread
             budget per layer = b * heads, per head >= floor * b

Ties go to the later token, then the lower head. Knows nothing about
caches' storage (`ScopeKVCache.keep_head_tokens` applies the result).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from kvscope.engine.errors import InvalidRequestError
from kvscope.engine.policies.base import Candidates, Policy, ScoreInput, select
from kvscope.engine.policies.decision import LayerDecision


class HeadwisePolicy(Policy):
    """A scorer from the registry, with rows chosen per KV head (subclasses choose how)."""

    head_wise = True
    own: ClassVar[dict[str, Any]] = {"scorer": "keydiff"}

    def __init__(self, **params: Any) -> None:
        from kvscope.engine.policies import POLICIES, make_policy

        mine = {**self.own, **{k: v for k, v in params.items() if k in self.own}}
        name = mine["scorer"]
        cls = POLICIES.get(name) if isinstance(name, str) else None
        if cls is None or getattr(cls, "head_wise", False) or not cls.evicts:
            choices = ", ".join(n for n, c in POLICIES.items() if c.evicts and not getattr(c, "head_wise", False))
            raise InvalidRequestError(f"{self.name}: scorer must be one of {choices}; got {name!r}")
        self.inner = make_policy(name, **{k: v for k, v in params.items() if k not in self.own})
        self.params = {**mine, **self.inner.params}
        self.needs_attention = self.inner.needs_attention  # type: ignore[misc]
        self.reads_head_rows = self.inner.reads_head_rows  # type: ignore[misc]
        self._check_own()

    def _check_own(self) -> None:
        pass

    def score(self, inp: ScoreInput) -> list[np.ndarray]:
        return self.inner.score(inp)

    def n_recent(self, budget: int) -> int:
        return self.inner.n_recent(budget)

    def protected(self, cand: Candidates, budget: int) -> np.ndarray:
        return self.inner.protected(cand, budget)

    def allocate(self, budgets: list[int], scores: list[np.ndarray], floors: list[int], caps: list[int]) -> list[int]:
        return self.inner.allocate(budgets, scores, floors, caps)

    def keep_heads(
        self, scores: np.ndarray, cand: Candidates, protected: np.ndarray, budget: int, held: np.ndarray
    ) -> np.ndarray:
        """`[heads, n]` keep mask for one layer (`scores` is `[heads, n]`; a head keeps only rows it `held`)."""
        raise NotImplementedError

    def decide_layer(self, cand: Candidates, scores: np.ndarray, budget: int, held: np.ndarray) -> LayerDecision:
        """The layer's decision: per-head kept tokens and budgets, the union as `kept`.

        `held` (`[kv_heads, n]`): which head holds which candidate (all True on a uniform layer).
        """
        n_heads = held.shape[0]
        s = np.asarray(scores, np.float32)
        if s.shape[0] not in (1, n_heads):
            raise InvalidRequestError(f"{self.name}: {s.shape[0]} rows of scores for {n_heads} KV heads")
        s = np.where(held, np.broadcast_to(s, (n_heads, len(cand))), np.float32(np.nan))
        prot = self.protected(cand, budget)
        keep = self.keep_heads(s, cand, prot, budget, held) & held
        anyone = keep.any(axis=0)
        layer_score = np.nanmean(s, axis=0) if not np.isnan(s).all() else s[0]
        return LayerDecision(
            budget=int(budget),
            kept=cand.tokens[anyone],
            evicted=cand.tokens[~anyone],
            protected=cand.tokens[prot],
            scored_tokens=cand.tokens.copy(),
            scores=np.asarray(layer_score, np.float32),
            head_scores=s,
            head_kept=[cand.tokens[k] for k in keep],
            head_budgets=keep.sum(axis=1).astype(np.int64),
        )


class PerHead(HeadwisePolicy):
    name = "per_head"
    summary = "every KV head keeps the budget, chosen by its own scores"

    def keep_heads(
        self, scores: np.ndarray, cand: Candidates, protected: np.ndarray, budget: int, held: np.ndarray
    ) -> np.ndarray:
        return np.stack([_select_held(row, cand, protected, budget, h) for row, h in zip(scores, held)])


class AdaKV(HeadwisePolicy):
    name = "adakv"
    summary = "AdaKV: the layer's rows shared out across KV heads by score, with a per-head floor"
    own: ClassVar[dict[str, Any]] = {"scorer": "keydiff", "floor": 0.2, "cap": None}

    def _check_own(self) -> None:
        f, cap = self.params["floor"], self.params["cap"]
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= float(f) <= 1.0:
            raise InvalidRequestError(
                f"adakv: floor must be in [0, 1] (the share of the budget each head keeps), got {f!r}"
            )
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or float(cap) < 1.0):
            raise InvalidRequestError(
                f"adakv: cap must be None or >= 1 (a head's rows / the layer budget), got {cap!r}"
            )

    def keep_heads(
        self, scores: np.ndarray, cand: Candidates, protected: np.ndarray, budget: int, held: np.ndarray
    ) -> np.ndarray:
        n_heads, n = scores.shape
        floor = max(int(budget * float(self.params["floor"])), int(protected.sum()))
        keep = np.stack([_select_held(row, cand, protected, floor, h) for row, h in zip(scores, held)])
        left = min(budget * n_heads, int(held.sum())) - int(keep.sum())
        if left > 0:
            clean = np.where(np.isfinite(scores), scores, -np.inf)
            heads = np.repeat(np.arange(n_heads), n)
            toks = np.tile(cand.tokens, n_heads)
            flat = clean.reshape(-1)
            order = np.lexsort((heads, -toks, -flat))  # score desc, later token, lower head
            free = order[~keep.reshape(-1)[order] & held.reshape(-1)[order]]
            if self.params["cap"] is not None:  # a head past its cap takes no more rows
                room = int(np.ceil(float(self.params["cap"]) * budget)) - keep.sum(axis=1)
                fh = heads[free]
                rank = np.zeros(len(free), np.int64)
                for h in range(n_heads):
                    rank[fh == h] = np.arange(int((fh == h).sum()))
                free = free[rank < room[fh]]
            chosen = np.zeros(n_heads * n, bool)
            chosen[free[:left]] = True
            keep |= chosen.reshape(n_heads, n)
        return keep


def _select_held(
    scores: np.ndarray, cand: Candidates, protected: np.ndarray, budget: int, held: np.ndarray
) -> np.ndarray:
    """`select` among the rows a head holds: protected rows it holds, then its best, up to `budget`."""
    prot = protected & held
    return (
        select(np.where(held, scores, -np.inf), cand, prot, max(min(budget, int(held.sum())), int(prot.sum()))) & held
    )


def head_rows_input(caches: list[Any], policy: Policy) -> list[np.ndarray]:
    """Per layer, `[kv_heads, n_visible]` which head attends which visible token; refuses a policy that
    cannot score layers whose heads hold different rows (before any change)."""
    for i, c in enumerate(caches):
        if getattr(c, "is_headwise", False) and not policy.reads_head_rows:
            raise InvalidRequestError(
                f"compressing with {policy.name} is refused: layer {i} is already compressed head-wise (its KV "
                "heads hold different rows) and this policy reads one row per token; undo that compression first"
            )
    return [c.visible_presence() if hasattr(c, "visible_presence") else np.ones((1, c.n_visible), bool) for c in caches]


def budget_rows(presence: list[np.ndarray]) -> list[int]:
    """Rows a budget applies to per layer: the visible rows, or the mean rows per head on a head-wise layer."""
    return [int(round(p.sum() / max(p.shape[0], 1))) if not p.all() else p.shape[1] for p in presence]


def mask_absent(scores: list[np.ndarray], presence: list[np.ndarray]) -> list[np.ndarray]:
    """Scores with NaN where a head holds no row of the token (head-wise layers only)."""
    out = []
    for s, p in zip(scores, presence):
        if p.all():
            out.append(s)
        else:
            out.append(np.where(p, np.broadcast_to(s, p.shape), np.float32(np.nan)).astype(np.float32))
    return out


def check_head_decision(caches: list[Any], layers: list[LayerDecision]) -> None:
    """Refuse (before any change) a head-wise decision the caches cannot take."""
    from kvscope.engine.kv_cache import ScopeKVCache

    for i, (c, layer) in enumerate(zip(caches, layers)):
        if layer.head_kept is None:
            continue
        if type(c) is not ScopeKVCache:
            raise InvalidRequestError(
                f"layer {i}: head-wise eviction needs a plain full-attention layer, not a {type(c).__name__}"
            )
        if len(layer.head_kept) != c.n_kv_heads:
            raise InvalidRequestError(
                f"layer {i}: the decision names {len(layer.head_kept)} KV heads; the cache has {c.n_kv_heads}"
            )
        union = np.unique(np.concatenate([np.asarray(t, np.int64) for t in layer.head_kept] or [np.zeros(0, np.int64)]))
        if not np.array_equal(union, np.sort(layer.kept)):
            raise InvalidRequestError(f"layer {i}: the heads' kept tokens do not add up to the layer's kept tokens")

"""What every compression policy shares: candidates, budgets, protection, selection.

A policy turns a list of per-layer caches into one score per (layer, KV head,
candidate row); `select` keeps the protected rows (sinks, recent window) and
then the best-scored rest until the layer's budget is met.

    candidates of one layer = its *visible* rows (masked rows are a person's
    reversible choice: a policy neither scores nor evicts them)

    token:   0 1 2 3 | 4 5 6 7 8 9 10 11 | 12 13 14 15
             sinks   |  scored, top-k    | recent window
             (kept)  |                   | (kept)

Per-head policies score each KV head; by default the eviction is per layer
(head scores averaged into the layer score, all head scores recorded in the
decision). Head-wise policies (`head_wise = True`, policies/headwise.py)
choose rows per KV head instead.

Knows nothing about sessions, events or files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import mlx.nn as nn
import numpy as np

from kvscope.engine.errors import InvalidRequestError
from kvscope.engine.kv_cache import ScopeKVCache


@dataclass(frozen=True)
class Candidates:
    """The visible rows of one layer: rows of the attended buffer and their logical tokens."""

    rows: np.ndarray  # int64 rows of `cache.keys`, ascending
    tokens: np.ndarray  # int64 logical token of each row

    @classmethod
    def of(cls, cache: ScopeKVCache) -> Candidates:
        return cls(np.arange(cache.n_visible, dtype=np.int64), cache.visible_tokens.astype(np.int64))

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class ScoreInput:
    """What a policy may look at while deciding.

    Attributes:
        caches: the per-layer caches (never modified by scoring).
        candidates: visible rows per layer.
        token_ids: logical token ids, at least up to `caches[0].n_tokens`.
        model: the model, for policies that recompute attention (else None).
        tokenizer: the model's tokenizer, for policies that write a prompt of
            their own (kvzip's "repeat the context"); else None.
    """

    caches: list[ScopeKVCache]
    candidates: list[Candidates]
    token_ids: list[int]
    model: nn.Module | None = None
    tokenizer: Any = None


class Policy:
    """Base class. Subclasses set `name`, `defaults` and implement `score`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    needs_attention: ClassVar[bool] = False
    evicts: ClassVar[bool] = True  # False: keeps every row (quantization only)
    head_wise: ClassVar[bool] = False  # True: each KV head keeps its own rows (decide_layer)
    reads_head_rows: ClassVar[bool] = False  # True: scores caches whose heads hold different rows
    # (reads keys through `ScopeKVCache.visible_rows`, attention through `window_attention`)

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "none"
            raise InvalidRequestError(f"policy {self.name!r} has no parameter {unknown[0]!r} (parameters: {known})")
        self.params: dict[str, Any] = {**self.defaults, **params}
        for key in ("sinks", "recent", "window"):
            value = self.params.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise InvalidRequestError(f"{self.name}: {key} must be an integer >= 0, got {value!r}")

    # ------------------------------------------------------------ to override
    def score(self, inp: ScoreInput) -> list[np.ndarray]:
        """Per layer, `[kv_heads, n_candidates]` float32 scores (higher = keep)."""
        raise NotImplementedError

    def n_recent(self, budget: int) -> int:
        """Most recent candidate rows always kept, for a layer budget of `budget`."""
        return int(self.params.get("recent") or 0)

    def allocate(self, budgets: list[int], scores: list[np.ndarray], floors: list[int], caps: list[int]) -> list[int]:
        """Per-layer budgets. Uniform policies keep the requested ones."""
        return budgets

    # ------------------------------------------------------------ shared
    def protected(self, cand: Candidates, budget: int) -> np.ndarray:
        """Mask of candidates the policy promises to keep (sinks + recent window)."""
        sinks = int(self.params.get("sinks") or 0)
        recent = self.n_recent(budget)
        out = cand.tokens < sinks
        if recent > 0:  # the latest tokens, whatever their storage order
            out[np.argsort(cand.tokens, kind="stable")[-recent:]] = True
        return out


def select(scores: np.ndarray, cand: Candidates, protected: np.ndarray, budget: int) -> np.ndarray:
    """Keep mask: every protected row, then the best scores until `budget` rows.

    Ties go to the later token, so equal scores behave like a recency policy.
    """
    n_protected = int(protected.sum())
    if n_protected > budget:
        raise InvalidRequestError(
            f"budget of {budget} rows is smaller than the {n_protected} rows the policy promises to keep "
            "(sinks + recent window): raise the budget or lower `sinks` / `recent` / `window`"
        )
    keep = protected.copy()
    clean = np.where(np.isfinite(scores), scores, -np.inf)
    order = np.lexsort((-cand.tokens, -clean))  # primary: score desc; tie: later token first
    free = order[~protected[order]]
    keep[free[: budget - n_protected]] = True
    return keep


def layer_budgets(
    n_candidates: list[int], keep_ratio: float | None, budget_tokens: int | None, policy: str
) -> list[int]:
    """Rows to keep per layer from a keep ratio or a token budget.

    Raises:
        InvalidRequestError: when neither or both are given, or the budget is
            impossible (<= 0, ratio > 1, more tokens than the cache holds).
    """
    if (keep_ratio is None) == (budget_tokens is None):
        raise InvalidRequestError(f"{policy}: give exactly one of keep_ratio (0 < r <= 1) or budget_tokens")
    most = max(n_candidates, default=0)
    if most == 0:
        raise InvalidRequestError(f"{policy}: the cache has no visible rows to compress")
    if keep_ratio is not None:
        r = float(keep_ratio)
        if not 0.0 < r <= 1.0:
            raise InvalidRequestError(f"{policy}: keep_ratio must be in (0, 1], got {keep_ratio}")
        return [min(n, max(1, int(round(r * n)))) for n in n_candidates]
    assert budget_tokens is not None
    if isinstance(budget_tokens, bool) or not isinstance(budget_tokens, (int, np.integer)):
        raise InvalidRequestError(f"{policy}: budget_tokens must be an integer, got {budget_tokens!r}")
    if budget_tokens <= 0:
        raise InvalidRequestError(f"{policy}: budget_tokens must be >= 1, got {budget_tokens}")
    if budget_tokens > most:
        raise InvalidRequestError(
            f"{policy}: budget of {budget_tokens} tokens is more than the {most} visible rows the cache holds"
        )
    return [min(n, int(budget_tokens)) for n in n_candidates]


def fit_budgets(weights: np.ndarray, total: int, floors: list[int], caps: list[int]) -> list[int]:
    """Split `total` rows across layers in proportion to `weights`, within floors and caps.

    Water-filling: layers that hit their cap give the rest back to the others;
    rounding leftovers go to the largest remainders, so the sum is exact.
    """
    lo = np.asarray(floors, np.int64)
    hi = np.asarray(caps, np.int64)
    total = int(min(max(total, lo.sum()), hi.sum()))
    w = np.maximum(np.asarray(weights, np.float64), 0.0) + 1e-12
    alloc = lo.astype(np.float64)
    free = np.ones(len(w), bool)
    for _ in range(len(w) + 1):
        left = total - alloc.sum()
        if left <= 1e-9 or not free.any():
            break
        share = left * w * free / (w * free).sum()
        room = hi - alloc
        capped = free & (share >= room)
        if not capped.any():
            alloc += share
            break
        alloc[capped] = hi[capped]
        free &= ~capped
    out = np.minimum(np.floor(alloc + 1e-9).astype(np.int64), hi)
    for i in np.argsort(-(alloc - out), kind="stable"):
        if out.sum() >= total:
            break
        if out[i] < hi[i]:
            out[i] += 1
    return [int(x) for x in out]

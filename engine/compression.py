"""Compression glue: decide, apply, replay, record; and automatic compression.

Promises:
- `decide` never changes the caches (attention is recomputed on copies);
- `apply_decision` evicts with `ScopeKVCache.keep_rows`: evicted rows leave
  attention for good while `offset` (the next RoPE position) is untouched,
  so generation continues at the right positions;
- a session operation is atomic: an impossible request raises
  `InvalidRequestError` (or `UnsupportedModelError`) and leaves the session
  unchanged; a successful one is recorded in `session.operations`,
  `session.last_decision` and as a `DecisionApplied` event;
- replaying a decision on a copy of the same cache gives the same cache bit
  for bit (eviction by logical token; quantization is deterministic).

Eviction is per layer (different layers may keep different rows), or per KV
head for head-wise policies (`adakv`, `per_head`: policies/headwise.py, stored
by `ScopeKVCache.keep_head_tokens`, attended through engine/head_attention.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import mlx.nn as nn
import numpy as np

from kvscope.engine import head_attention
from kvscope.engine.blocks import TokenState
from kvscope.engine.caches import compress_scope as scope
from kvscope.engine.errors import InvalidRequestError
from kvscope.engine.events import DecisionApplied, EventBus
from kvscope.engine.kv_cache import ScopeKVCache
from kvscope.engine.model_loading import LoadedModel
from kvscope.engine.policies import POLICIES, make_policy
from kvscope.engine.policies.base import Candidates, Policy, ScoreInput, layer_budgets, select
from kvscope.engine.policies.decision import Decision, LayerDecision
from kvscope.engine.policies.headwise import (
    HeadwisePolicy,
    budget_rows,
    check_head_decision,
    head_rows_input,
    mask_absent,
)
from kvscope.engine.policies.quantization import check_bits, group_size_for, quantize_cache, quantized_nbytes
from kvscope.engine.session import Session

__all__ = [
    "POLICIES",
    "AutoCompress",
    "Decision",
    "apply_decision",
    "compress_caches",
    "compress_loaded",
    "decide",
    "maybe_compress_session",
    "replay_on",
]


def decide(
    policy: Policy,
    caches: list[ScopeKVCache],
    token_ids: list[int],
    model: nn.Module | None,
    keep_ratio: float | None,
    budget_tokens: int | None,
    quant_bits: int | None = None,
    scores: list[np.ndarray] | None = None,
    tokenizer: Any = None,
) -> Decision:
    """Score the caches' visible rows and choose what each layer keeps (no changes made).

    `scores` (from `policy.score` on the same caches) skips the scoring, so
    one scoring pass can serve several budgets. `tokenizer`: for policies
    that write their own prompt (kvzip's "repeat the context").
    """
    t0 = time.perf_counter()
    presence = head_rows_input(caches, policy)  # which head attends which visible token
    if isinstance(policy, HeadwisePolicy):
        head_attention.require(model)
    cands = [Candidates.of(c) for c in caches]
    if policy.evicts:
        budgets = layer_budgets(budget_rows(presence), keep_ratio, budget_tokens, policy.name)
    elif keep_ratio not in (None, 1.0) or budget_tokens is not None:
        raise InvalidRequestError(
            f"{policy.name} keeps every row; to evict too, choose an eviction policy and pass quant_bits"
        )
    else:
        budgets = [len(c) for c in cands]
    if policy.name == "quantize":
        quant_bits = int(policy.params["bits"])
    if quant_bits is not None:
        check_bits(quant_bits)
        group = group_size_for(caches[0].keys.shape[-1]) if caches and caches[0].keys is not None else None
    protected = [policy.protected(c, b) for c, b in zip(cands, budgets)]
    for i, (p, b) in enumerate(zip(protected, budgets)):
        if int(p.sum()) > b:
            select(np.zeros(len(p), np.float32), cands[i], p, b)  # raises with the message
    if scores is None:
        scores = policy.score(ScoreInput(caches, cands, token_ids, model, tokenizer))
    scores = mask_absent(scores, presence)  # head-wise layers: no score where a head holds no row
    floors = [int(p.sum()) for p in protected]
    budgets = policy.allocate(budgets, scores, floors, [len(c) for c in cands])
    layers = []
    for cand, s, b, held in zip(cands, scores, budgets, presence):
        if isinstance(policy, HeadwisePolicy):
            layers.append(policy.decide_layer(cand, s, b, held))
            continue
        layer_score = np.nanmean(s, axis=0) if s.shape[0] and not np.isnan(s).all() else s[0]
        prot = policy.protected(cand, b)
        keep = select(layer_score, cand, prot, b)
        layers.append(
            LayerDecision(
                budget=int(b),
                kept=cand.tokens[keep],
                evicted=cand.tokens[~keep],
                protected=cand.tokens[prot],
                scored_tokens=cand.tokens.copy(),
                scores=np.asarray(layer_score, np.float32),
                head_scores=np.asarray(s, np.float32),
            )
        )
    return Decision(
        policy=policy.name,
        params=dict(policy.params),
        layers=layers,
        keep_ratio=keep_ratio,
        budget_tokens=budget_tokens,
        quant_bits=quant_bits,
        group_size=group if quant_bits is not None else None,
        n_tokens=caches[0].n_tokens if caches else 0,
        bytes_before=sum(c.nbytes for c in caches),
        decide_ms=(time.perf_counter() - t0) * 1000,
    )


def _check_matches(caches: list[ScopeKVCache], decision: Decision) -> None:
    if len(caches) != len(decision.layers):
        raise InvalidRequestError(f"decision has {len(decision.layers)} layers; the cache has {len(caches)}")
    for i, (c, layer) in enumerate(zip(caches, decision.layers)):
        have = np.sort(Candidates.of(c).tokens)
        want = np.sort(np.concatenate([layer.kept, layer.evicted]))
        if not np.array_equal(have, want):
            raise InvalidRequestError(
                f"decision does not match this cache: layer {i} has {len(have)} visible rows, the decision "
                f"covers {len(want)} tokens (it was made on another cache or the cache changed since)"
            )


def apply_decision(caches: list[ScopeKVCache], decision: Decision) -> None:
    """Evict the decision's rows (and quantize the rest if it says so). Checks first, then edits."""
    _check_matches(caches, decision)
    check_head_decision(caches, decision.layers)
    if decision.quant_bits is not None and caches and caches[0].keys is not None:
        group_size_for(caches[0].keys.shape[-1])
    for c, layer in zip(caches, decision.layers):
        if layer.head_kept is not None:
            c.keep_head_tokens(layer.head_kept)
        else:
            c.evict_tokens(np.intersect1d(c.visible_tokens, layer.evicted))
        if decision.quant_bits is not None:
            quantize_cache(c, decision.quant_bits)
    decision.bytes_after = sum(c.nbytes for c in caches)
    if decision.quant_bits is not None:
        decision.quantized_bytes = sum(quantized_nbytes(c, decision.quant_bits) for c in caches)


def _split_params(params: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    params = dict(params)
    bits = params.pop("quant_bits", None)
    return params, (None if bits in (None, 0) else check_bits(bits))


def compress_caches(
    caches: list[ScopeKVCache],
    token_ids: list[int],
    model: nn.Module | None,
    policy: str,
    keep_ratio: float | None = None,
    budget_tokens: int | None = None,
    scores: list[np.ndarray] | None = None,
    tokenizer: Any = None,
    **params: Any,
) -> Decision:
    """Decide and apply in one go on bare caches (benchmarks, scripts).

    `params` go to the policy, except `quant_bits` (8 or 4), which quantizes
    the kept rows after eviction with any policy. `scores`: see `decide`.
    """
    policy_params, bits = _split_params(params)
    pol = make_policy(policy, **policy_params)
    decision = decide(pol, caches, token_ids, model, keep_ratio, budget_tokens, bits, scores, tokenizer)
    apply_decision(caches, decision)
    return decision


def score_caches(
    policy: str,
    caches: list[ScopeKVCache],
    token_ids: list[int],
    model: nn.Module | None,
    tokenizer: Any = None,
    **params: Any,
) -> list[np.ndarray]:
    """The policy's per-layer `[kv_heads, n_visible]` scores, for `decide(..., scores=...)`."""
    pol = make_policy(policy, **_split_params(params)[0])
    return pol.score(ScoreInput(caches, [Candidates.of(c) for c in caches], token_ids, model, tokenizer))


# ---------------------------------------------------------------- sessions
def _record(session: Session, bus: EventBus, decision: Decision, replay: bool) -> None:
    session.edited = True
    if decision.quant_bits is not None:
        for layer in decision.layers:
            for t in layer.kept[layer.kept < len(session.origin)]:
                session.origin[int(t)] = int(TokenState.QUANTIZED)
    decision.session = str(session.id)
    summary = decision.summary() | ({"replay": True} if replay else {})
    session.operations.append(summary)
    session.last_decision = decision
    evicted = [t for layer in decision.layers if len(layer.evicted) for t in (layer.evicted.min(), layer.evicted.max())]
    lo, hi = (int(min(evicted)), int(max(evicted)) + 1) if evicted else (0, decision.n_tokens)
    bus.emit(
        DecisionApplied(
            bus.now_ms(),
            session.id,
            lo,
            hi,
            details=summary,
            policy=decision.policy,
            kept_rows=decision.kept_counts,
            evicted_rows=decision.evicted_counts,
        )
    )


def compress_loaded(
    session: Session,
    lm: LoadedModel,
    bus: EventBus,
    policy: str,
    keep_ratio: float | None = None,
    budget_tokens: int | None = None,
    **params: Any,
) -> Decision:
    """Compress a session's cache with `policy` to a keep ratio or a per-layer token budget.

    Args:
        session / lm / bus: the session, its model, where the event goes.
        policy: a name from `POLICIES`.
        keep_ratio: fraction of each layer's visible rows to keep, in (0, 1].
        budget_tokens: visible rows to keep per layer (layer-wise policies
            keep this many on average).
        params: the policy's parameters, plus `quant_bits` (8 or 4) to
            quantize the kept rows.

    Returns:
        The applied decision (also in `session.last_decision`).

    Raises:
        InvalidRequestError: unknown policy or parameter, impossible budget.
        (`Engine.compress` runs this as a transaction: the session is then
        unchanged.)
    """
    session.require_idle("compressing")
    return _compress(session, lm, bus, policy, keep_ratio, budget_tokens, **params)


def _compress(
    session: Session,
    lm: LoadedModel,
    bus: EventBus,
    policy: str,
    keep_ratio: float | None,
    budget_tokens: int | None,
    **params: Any,
) -> Decision:
    verdict = lm.require("compress")
    policy_params, bits = _split_params(params)
    pol = make_policy(policy, **policy_params)
    caches, mla = session.caches, lm.support is not None and lm.support.mla
    scope.check_policy(pol, lm.name, caches, mla)  # non-plain layouts: the attention caches only
    if not any(c.n_rows for c in caches):
        raise InvalidRequestError(f"session {session.name} has no cached tokens to compress")
    if scope.is_scoped(caches, mla):
        decision = scope.decide_scoped(decide, pol, caches, session.tokens, lm.model, keep_ratio, budget_tokens, bits)
        scope.apply_scoped(apply_decision, caches, decision)
        if verdict.status != "exact":  # the record and the event say what was left alone and why
            decision.extra["approximate"] = verdict.reason
    else:
        decision = decide(pol, caches, session.tokens, lm.model, keep_ratio, budget_tokens, bits, None, lm.tokenizer)
        apply_decision(caches, decision)
    _record(session, bus, decision, replay=False)
    return decision


def replay_on(session: Session, bus: EventBus, decision: Decision) -> None:
    """Apply a recorded decision's kept rows to a session holding the same cache."""
    session.require_idle("replaying a decision")
    if len(scope.targets(session.caches)) != len(session.caches):
        scope.apply_scoped(apply_decision, session.caches, decision)  # non-plain layouts: attention caches only
    else:
        apply_decision(session.caches, decision)
    _record(session, bus, decision, replay=True)


# ---------------------------------------------------------------- automatic
TRIGGERS = ("prefill", "budget")


@dataclass(frozen=True)
class AutoCompress:
    """Compress without being asked.

    With a keep ratio and the "prefill" trigger every turn compresses the
    whole cache again (older turns shrink geometrically); a token budget
    keeps the cache at a fixed size instead.

    Attributes:
        policy / keep_ratio / budget_tokens / params: as `compress_loaded`.
        trigger: "prefill" compresses at the end of every prefill; "budget"
            compresses (after a prefill or at the end of a turn) once a
            layer holds more than `trigger_tokens` visible rows.
        trigger_tokens: the threshold for "budget".
    """

    policy: str
    keep_ratio: float | None = None
    budget_tokens: int | None = None
    trigger: str = "prefill"
    trigger_tokens: int | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutoCompress:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def validate(self) -> None:
        policy_params, _ = _split_params(self.params)
        make_policy(self.policy, **policy_params)
        if self.trigger not in TRIGGERS:
            raise InvalidRequestError(f"auto-compress trigger must be one of {TRIGGERS}, got {self.trigger!r}")
        if self.trigger == "budget":
            if not self.trigger_tokens or self.trigger_tokens < 1:
                raise InvalidRequestError("auto-compress on budget needs trigger_tokens >= 1")
            if self.budget_tokens is not None and self.budget_tokens >= self.trigger_tokens:
                raise InvalidRequestError("auto-compress budget_tokens must be below trigger_tokens")
        if POLICIES[self.policy].evicts:
            layer_budgets([1 << 30], self.keep_ratio, None if self.budget_tokens is None else 1, self.policy)

    def should_run(self, session: Session, when: str) -> bool:
        most = max((c.n_visible for c in session.caches), default=0)
        if most == 0 or (self.trigger == "prefill" and when != "prefill"):
            return False
        if self.trigger == "budget" and most <= int(self.trigger_tokens or 0):
            return False
        return not (self.budget_tokens is not None and most <= self.budget_tokens)


def checked_auto_compress(setting: AutoCompress | None) -> AutoCompress | None:
    """`setting`, validated (unknown policy or parameter, impossible trigger: `InvalidRequestError`)."""
    if setting is not None:
        setting.validate()
    return setting


def maybe_compress_session(session: Session, lm: LoadedModel, bus: EventBus, when: str) -> Decision | None:
    """Run the session's `auto_compress` setting if its trigger fires; `when` is "prefill" or "turn_end"."""
    setting: AutoCompress | None = getattr(session, "auto_compress", None)
    if setting is None or not setting.should_run(session, when):
        return None
    # Called from inside the turn (the session is marked generating): no busy check.
    return _compress(session, lm, bus, setting.policy, setting.keep_ratio, setting.budget_tokens, **setting.params)

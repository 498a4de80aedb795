"""Compression policies: which KV rows stay, as data.

`POLICIES` maps a registry name to its class (the UI menu and the CLI list
it); `make_policy(name, **params)` builds one or raises `InvalidRequestError`.
Deciding and applying live in `kvscope.engine.compression`.
"""

from __future__ import annotations

from typing import Any

from kvscope.engine.errors import InvalidRequestError
from kvscope.engine.policies.base import Candidates, Policy, ScoreInput, fit_budgets, layer_budgets, select
from kvscope.engine.policies.decision import Decision, LayerDecision
from kvscope.engine.policies.headwise import AdaKV, HeadwisePolicy, PerHead
from kvscope.engine.policies.layerwise import DynamicKV, PyramidKV
from kvscope.engine.policies.presses import ExpectedAttention, KVzip
from kvscope.engine.policies.quantization import Quantize
from kvscope.engine.policies.scorers import H2O, TOVA, KeyDiff, KeyNorm, RandomPolicy, SnapKV, StreamingLLM

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        StreamingLLM,
        H2O,
        SnapKV,
        TOVA,
        KeyNorm,
        KeyDiff,
        ExpectedAttention,
        RandomPolicy,
        PyramidKV,
        DynamicKV,
        Quantize,
    )
}
POLICIES.update({cls.name: cls for cls in (AdaKV, PerHead, KVzip)})  # head-wise wrappers over the scorers above


def make_policy(name: str, **params: Any) -> Policy:
    """Build the policy `name` with `params` (defaults filled in)."""
    cls = POLICIES.get(name)
    if cls is None:
        raise InvalidRequestError(f"unknown compression policy {name!r}; choose one of: {', '.join(POLICIES)}")
    return cls(**params)


__all__ = [
    "POLICIES",
    "Candidates",
    "Decision",
    "HeadwisePolicy",
    "LayerDecision",
    "Policy",
    "ScoreInput",
    "fit_budgets",
    "layer_budgets",
    "make_policy",
    "select",
]

"""A compression decision as data: what was kept, what was evicted, and why.

Promises:
- rows are named by *logical token index*, never by storage row, so a
  decision means the same thing on any copy of the cache it was made on;
- every scored row keeps its score (per layer, and per KV head where the
  policy scores heads), with the budget and the policy's parameters;
- `to_json` / `from_json` round-trip exactly (float32 scores survive JSON;
  non-finite scores are written as null and read back as NaN);
- `token_scores(n)` is the `[layers, tokens]` float32 view the window draws;
- a head-wise decision also names, per layer and KV head, the tokens the
  head keeps (`head_kept`) and its budget (`head_budgets`); `kept` is then
  the union over heads and `evicted` the tokens no head keeps. Files
  without these fields are per-layer decisions, as before.

Knows nothing about mx arrays, sessions or events.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FORMAT_VERSION = 1


def _ints(a: Any) -> np.ndarray:
    return np.asarray(a, np.int64).reshape(-1)


def _floats_out(a: np.ndarray) -> list[Any]:
    return [float(x) if math.isfinite(float(x)) else None for x in np.asarray(a, np.float32).reshape(-1)]


def _floats_in(values: list[Any]) -> np.ndarray:
    return np.asarray([np.nan if x is None else x for x in values], np.float32)


@dataclass
class LayerDecision:
    """One layer: kept / evicted tokens and the score of every scored row.

    Attributes:
        budget: rows this layer was allowed to keep (visible rows only).
        kept: logical tokens whose rows stay, ascending.
        evicted: logical tokens whose rows were dropped, ascending.
        protected: tokens kept unconditionally (sinks, recent window).
        scored_tokens: token of each entry of `scores` / `head_scores`.
        scores: `[n]` float32 layer score (the mean over heads) used to rank.
        head_scores: `[kv_heads, n]` float32 per-head scores (1 row when the
            policy does not score heads).
        head_kept: head-wise decisions only: per KV head, the tokens it keeps.
        head_budgets: head-wise decisions only: `[kv_heads]` rows each head keeps.
    """

    budget: int
    kept: np.ndarray
    evicted: np.ndarray
    protected: np.ndarray
    scored_tokens: np.ndarray
    scores: np.ndarray
    head_scores: np.ndarray
    head_kept: list[np.ndarray] | None = None
    head_budgets: np.ndarray | None = None

    @property
    def is_headwise(self) -> bool:
        return self.head_kept is not None

    def head_keep_mask(self, n_tokens: int) -> np.ndarray:
        """`[kv_heads, n_tokens]` bool: which head keeps which token (one row per layer decision)."""
        heads = self.head_kept if self.head_kept is not None else [self.kept]
        out = np.zeros((len(heads), n_tokens), bool)
        for h, toks in enumerate(heads):
            out[h, toks[toks < n_tokens]] = True
        return out

    def to_dict(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.head_kept is not None:
            extra["head_kept"] = [_ints(t).tolist() for t in self.head_kept]
            extra["head_budgets"] = _ints(self.head_budgets if self.head_budgets is not None else []).tolist()
        return {
            **extra,
            "budget": int(self.budget),
            "kept": _ints(self.kept).tolist(),
            "evicted": _ints(self.evicted).tolist(),
            "protected": _ints(self.protected).tolist(),
            "scored_tokens": _ints(self.scored_tokens).tolist(),
            "scores": _floats_out(self.scores),
            "head_scores": [_floats_out(h) for h in self.head_scores],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerDecision:
        n = len(d["scored_tokens"])
        heads = [_floats_in(h) for h in d.get("head_scores", [])]
        head_kept = d.get("head_kept")
        if head_kept is not None and (
            not isinstance(head_kept, list) or len(d.get("head_budgets") or []) != len(head_kept)
        ):
            raise ValueError("head_kept and head_budgets must be lists with one entry per KV head")
        return cls(
            budget=int(d["budget"]),
            kept=_ints(d["kept"]),
            evicted=_ints(d["evicted"]),
            protected=_ints(d.get("protected", [])),
            scored_tokens=_ints(d["scored_tokens"]),
            scores=_floats_in(d["scores"]),
            head_scores=np.stack(heads) if heads else np.zeros((0, n), np.float32),
            head_kept=None if head_kept is None else [_ints(t) for t in head_kept],
            head_budgets=None if head_kept is None else _ints(d["head_budgets"]),
        )


@dataclass
class Decision:
    """Which rows a policy kept in each layer, with scores, budget and parameters.

    Attributes:
        policy: registry name (`snapkv`, `streaming_llm`, ...).
        params: the policy's parameters, defaults filled in.
        keep_ratio / budget_tokens: what was asked (one of them, or neither
            for quantization only).
        quant_bits: 8 or 4 when the kept rows were quantized, else None.
        n_tokens: logical tokens in the cache when the decision was made.
        bytes_before / bytes_after: float32 bytes of the stored rows.
        quantized_bytes: bytes the kept rows would take quantized (or None).
        session: the session it was made on (informative only).
    """

    policy: str
    params: dict[str, Any]
    layers: list[LayerDecision]
    keep_ratio: float | None = None
    budget_tokens: int | None = None
    quant_bits: int | None = None
    group_size: int | None = None
    n_tokens: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    quantized_bytes: int | None = None
    session: str | None = None
    decide_ms: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------ views
    @property
    def kept_counts(self) -> tuple[int, ...]:
        return tuple(len(layer.kept) for layer in self.layers)

    @property
    def evicted_counts(self) -> tuple[int, ...]:
        return tuple(len(layer.evicted) for layer in self.layers)

    @property
    def is_headwise(self) -> bool:
        return any(layer.is_headwise for layer in self.layers)

    @property
    def head_budgets(self) -> list[list[int]] | None:
        """Per layer, the rows each KV head keeps (head-wise decisions), else None."""
        if not self.is_headwise:
            return None
        return [
            [int(x) for x in (layer.head_budgets if layer.head_budgets is not None else [])] for layer in self.layers
        ]

    def token_scores(self, n_tokens: int) -> np.ndarray:
        """`[layers, n_tokens]` float32 layer scores; NaN where a token has none."""
        out = np.full((len(self.layers), n_tokens), np.nan, np.float32)
        for i, layer in enumerate(self.layers):
            ok = layer.scored_tokens < n_tokens
            out[i, layer.scored_tokens[ok]] = layer.scores[ok]
        return out

    def summary(self) -> dict[str, Any]:
        """A small JSON-able record for `session.operations` and event details."""
        return {
            "op": "compress",
            "policy": self.policy,
            "params": dict(self.params),
            "keep_ratio": self.keep_ratio,
            "budget_tokens": self.budget_tokens,
            "quant_bits": self.quant_bits,
            "n_tokens": self.n_tokens,
            "kept": list(self.kept_counts),
            "evicted": list(self.evicted_counts),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "quantized_bytes": self.quantized_bytes,
            "decide_ms": round(self.decide_ms, 3),
            **({"head_budgets": self.head_budgets} if self.is_headwise else {}),
            # non-plain layouts (caches.compress_scope): which caches were compressed, and the label
            **{k: v for k, v in self.extra.items() if k in ("layers_compressed", "approximate")},
        }

    # ------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "kvscope.decision",
            "version": FORMAT_VERSION,
            **{k: v for k, v in self.summary().items() if k not in ("op", "kept", "evicted", "head_budgets")},
            "group_size": self.group_size,
            "session": self.session,
            "extra": self.extra,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Decision:
        from kvscope.engine.errors import InvalidRequestError

        if d.get("format") != "kvscope.decision" or d.get("version") != FORMAT_VERSION:
            raise InvalidRequestError(
                f"not a kvscope decision (format {d.get('format')!r}, version {d.get('version')!r}; "
                f"expected 'kvscope.decision' version {FORMAT_VERSION})"
            )
        try:
            return cls(
                policy=str(d["policy"]),
                params=dict(d.get("params") or {}),
                layers=[LayerDecision.from_dict(x) for x in d["layers"]],
                keep_ratio=d.get("keep_ratio"),
                budget_tokens=d.get("budget_tokens"),
                quant_bits=d.get("quant_bits"),
                group_size=d.get("group_size"),
                n_tokens=int(d.get("n_tokens", 0)),
                bytes_before=int(d.get("bytes_before", 0)),
                bytes_after=int(d.get("bytes_after", 0)),
                quantized_bytes=d.get("quantized_bytes"),
                session=d.get("session"),
                decide_ms=float(d.get("decide_ms", 0.0)),
                extra=dict(d.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRequestError(f"decision file is missing or has a bad field: {exc}") from exc

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Decision:
        from kvscope.engine.errors import InvalidRequestError

        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"decision is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise InvalidRequestError("decision JSON must be an object")
        return cls.from_dict(data)

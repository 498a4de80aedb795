"""The uniform-budget policies: every layer keeps the same number of rows.

- `streaming_llm`: attention sinks + the most recent rows (Xiao et al. 2023).
- `random`: uniform random rows, seeded: the baseline every policy must beat.
- `key_norm`: keep keys with the *lowest* L2 norm (Devoto et al. 2024,
  kvpress `KnormPress`); per KV head, averaged per layer.
- `h2o`: observed attention, the mean attention each row received from the
  observed queries (all tokens by default), plus a recent window that takes
  `recent_fraction` of the budget (Zhang et al. 2023, "heavy hitters").
  With `window=None` the whole context is re-fed on a copy; on an edited
  cache (masked or evicted rows) those queries see the rows the copy holds.
- `snapkv`: attention of the last `window` queries, mean-pooled over
  `kernel` neighbouring rows before the window (zero-padded at the ends, as
  SnapKV's and kvpress's `avg_pool1d`); the window itself is always kept
  (Li et al. 2024).
- `keydiff`: keep the keys least like the layer's average key direction,
  per KV head (Park et al. 2025, kvpress `KeyDiffPress`); query-agnostic.
- `tova`: the attention the last query pays to each row, averaged over the
  heads of a layer (Oren et al. 2024, kvpress `TOVAPress`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import mlx.core as mx
import numpy as np

from kvscope.engine.errors import InvalidRequestError
from kvscope.engine.policies.attention import window_attention
from kvscope.engine.policies.base import Policy, ScoreInput
from kvscope.engine.tensor_ops import take_rows


class StreamingLLM(Policy):
    name = "streaming_llm"
    reads_head_rows = True
    summary = "attention sinks + most recent rows"
    defaults: ClassVar[dict[str, Any]] = {"sinks": 4}

    def n_recent(self, budget: int) -> int:
        return max(0, budget - int(self.params["sinks"]))

    def score(self, inp: ScoreInput) -> list[np.ndarray]:
        return [c.tokens.astype(np.float32)[None] for c in inp.candidates]


class RandomPolicy(Policy):
    name = "random"
    reads_head_rows = True
    summary = "uniform random rows (baseline), seeded"
    defaults: ClassVar[dict[str, Any]] = {"seed": 0, "sinks": 0, "recent": 0}

    def score(self, inp: ScoreInput) -> list[np.ndarray]:
        rng = np.random.default_rng(int(self.params["seed"]))
        return [rng.random(len(c)).astype(np.float32)[None] for c in inp.candidates]


class KeyNorm(Policy):
    name = "key_norm"
    reads_head_rows = True
    summary = "lowest key L2 norm per KV head"
    defaults: ClassVar[dict[str, Any]] = {"sinks": 0, "recent": 0}

    def score(self, inp: ScoreInput) -> list[np.ndarray]:
        return [-np.array(mx.sqrt((keys**2).sum(axis=-1)), np.float32) for keys in _candidate_keys(inp)]


def _candidate_keys(inp: ScoreInput) -> list[mx.array]:
    """Per layer, the candidates' keys as float32 `[kv_heads, n, head_dim]`."""
    out = []
    for cache, cand in zip(inp.caches, inp.candidates):
        keys = cache.visible_rows()[0]  # one row per visible token (head-wise: zeros where a head has none)
        out.append(take_rows(keys, mx.array(cand.rows.astype(np.int32)))[0].astype(mx.float32))
    return out


def _need_model(inp: ScoreInput, name: str) -> Any:
    if inp.model is None:
        raise InvalidRequestError(f"{name} needs the model to recompute attention; none was given")
    return inp.model


class H2O(Policy):
    name = "h2o"
    reads_head_rows = True
    summary = "observed attention (heavy hitters) + recent window"
    needs_attention = True
    defaults: ClassVar[dict[str, Any]] = {"window": None, "recent_fraction": 0.5, "sinks": 0}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        f = self.params["recent_fraction"]
        if not isinstance(f, (int, float)) or not 0.0 <= float(f) < 1.0:
            raise InvalidRequestError(f"h2o: recent_fraction must be in [0, 1), got {f!r}")

    def n_recent(self, budget: int) -> int:
        return int(budget * float(self.params["recent_fraction"]))

    def score(self, inp: ScoreInput) -> list[np.ndarray]:
        att = window_attention(_need_model(inp, self.name), inp.caches, inp.token_ids, self.params["window"])
        out = []
        for mass, cand in zip(att.mass, inp.candidates):
            seen = np.maximum(att.seen_by[cand.tokens], 1.0)
            out.append((mass[:, cand.tokens] / seen).astype(np.float32))
        return out


class SnapKV(Policy):
    name = "snapkv"
    reads_head_rows = True
    summary = "attention of the last queries (observation window), pooled"
    needs_attention = True
    defaults: ClassVar[dict[str, Any]] = {"window": 32, "kernel": 5, "sinks": 0}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        k = self.params["kernel"]
        if not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise InvalidRequestError(f"{self.name}: kernel must be an odd integer >= 1, got {k!r}")
        if not self.params["window"]:
            raise InvalidRequestError(f"{self.name}: window must be >= 1 (the observed queries)")

    def n_recent(self, budget: int) -> int:
        return int(self.params["window"])

    def score(self, inp: ScoreInput) -> list[np.ndarray]:
        att = window_attention(_need_model(inp, self.name), inp.caches, inp.token_ids, self.params["window"])
        kernel = int(self.params["kernel"])
        out = []
        for mass, cand in zip(att.mass, inp.candidates):
            s = mass[:, cand.tokens] / max(float(att.seen_by.max()), 1.0)
            before = np.nonzero(cand.tokens < att.window_start)[0]
            before = before[np.argsort(cand.tokens[before], kind="stable")]
            if kernel > 1 and len(before):  # pool the rows before the window, zero-padded (SnapKV's, kvpress's)
                box = np.ones(kernel) / kernel
                s[:, before] = np.stack([np.convolve(row, box, mode="same") for row in s[:, before]])
            out.append(s.astype(np.float32))
        return out


class KeyDiff(Policy):
    name = "keydiff"
    reads_head_rows = True
    summary = "keys least like the average key direction, per KV head"
    defaults: ClassVar[dict[str, Any]] = {"sinks": 0, "recent": 0}

    def score(self, inp: ScoreInput) -> list[np.ndarray]:
        out = []
        for keys in _candidate_keys(inp):
            unit = keys / mx.maximum(mx.sqrt((keys**2).sum(axis=-1, keepdims=True)), 1e-12)
            anchor = unit.mean(axis=1, keepdims=True)  # [H, 1, D]
            anchor = anchor / mx.maximum(mx.sqrt((anchor**2).sum(axis=-1, keepdims=True)), 1e-12)
            out.append(-np.array((unit * anchor).sum(axis=-1), np.float32))  # minus cosine to the anchor
        return out


class TOVA(Policy):
    name = "tova"
    reads_head_rows = True
    summary = "attention of the last query, averaged over heads"
    needs_attention = True
    defaults: ClassVar[dict[str, Any]] = {"sinks": 0, "recent": 1}

    def score(self, inp: ScoreInput) -> list[np.ndarray]:
        att = window_attention(_need_model(inp, self.name), inp.caches, inp.token_ids, 1)
        return [
            mass[:, cand.tokens].mean(axis=0, keepdims=True).astype(np.float32)
            for mass, cand in zip(att.mass, inp.candidates)
        ]

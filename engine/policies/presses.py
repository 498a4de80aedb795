"""Two presses from kvpress's catalogue that look past the keys: ExpectedAttention and KVzip.

- `expected_attention` (kvpress `ExpectedAttentionPress`): the attention that
  *future* queries are expected to pay each row. The queries of the context
  (pre-RoPE, the first `sinks` tokens left out) give a mean `mu` and a
  covariance `S` per query head; RoPE averaged over the next `future`
  positions `R` moves them there (`R mu`, `R S R^T`); a key `k` then expects
  `exp(k.R mu / sqrt(d) + k^T R S R^T k / (2d))` — softmaxed over the
  non-sink rows, averaged over the query heads of its KV head, times `||v||`.
  Sinks score above every row. Query-agnostic: it needs no question.
- `kvzip` (Kim et al. 2025, kvpress `KVzipPress`): query-agnostic importance
  from a context-reconstruction pass. After the context, the model is fed
  "Repeat the previous context exactly." + the chat's generation prompt + the
  context again (in chunks of `chunk` tokens; later chunks start with the
  previous chunk's last 8 tokens); a row's score is the most attention any
  reconstruction query pays it (max over queries and the query heads of its
  KV head), the softmax taken over the sinks, the chunk being reconstructed
  and the reconstruction tokens. The chat template's frame before the first
  user message (`prefix`) is not reconstructed: its rows score 0, except the
  `sinks` first tokens, which score above every row. The budget is global:
  the `heads x layers` rows with the lowest scores go, wherever they are
  (`layerwise=True`: the same number in every layer), so each KV head of each
  layer keeps its own rows.

Both compute in float32 on copies of the caches. Knows nothing about
sessions, events or files.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import mlx.core as mx
import numpy as np

from kvscope.engine.errors import InvalidRequestError
from kvscope.engine.policies.attention import _attention_modules
from kvscope.engine.policies.base import Candidates, Policy, ScoreInput
from kvscope.engine.policies.headwise import HeadwisePolicy
from kvscope.engine.policies.queries import context_queries, feed_recording, mean_rotation
from kvscope.engine.tensor_ops import take_rows

REPEAT_FIRST = "\n\nRepeat the previous context exactly."
REPEAT_NEXT = "\n\nRepeat the part of the previous context exactly, starting with"
OVERLAP = 8  # tokens of the previous chunk that open the next reconstruction prompt
Q_BLOCK = 512  # reconstruction queries per attention block (bounds the [heads, q, k] tensor)


def _need(inp: ScoreInput, what: str, name: str) -> Any:
    value = getattr(inp, what)
    if value is None:
        raise InvalidRequestError(f"{name} needs the {what} to score rows; none was given")
    return value


def _rows(cache: Any, rows: np.ndarray) -> tuple[mx.array, mx.array]:
    """Keys and values of `rows` as float32 `[kv_heads, n, head_dim]`."""
    idx = mx.array(rows.astype(np.int32))
    return (
        take_rows(cache.keys, idx)[0].astype(mx.float32),
        take_rows(cache.values, idx)[0].astype(mx.float32),
    )


class ExpectedAttention(Policy):
    name = "expected_attention"
    summary = "expected attention of future queries (query statistics, RoPE averaged ahead), times ||v||"
    needs_attention = True
    defaults: ClassVar[dict[str, Any]] = {"sinks": 4, "future": 512, "covariance": True, "vnorm": True}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        f = self.params["future"]
        if isinstance(f, bool) or not isinstance(f, int) or f < 1:
            raise InvalidRequestError(f"expected_attention: future must be an integer >= 1, got {f!r}")

    def protected(self, cand: Candidates, budget: int) -> np.ndarray:
        return np.zeros(len(cand), bool)  # sinks are kept by their score, as kvpress does

    def score(self, inp: ScoreInput) -> list[np.ndarray]:
        model = _need(inp, "model", self.name)
        n_sink = int(self.params["sinks"])
        attns = _attention_modules(model)
        queries = context_queries(model, inp.caches, inp.token_ids)
        n = inp.caches[0].n_tokens
        if n <= n_sink:
            raise InvalidRequestError(f"expected_attention: the context must hold more than {n_sink} tokens")
        out = []
        for attn, q, cache, cand in zip(attns, queries, inp.caches, inp.candidates):
            out.append(self._layer(attn, q[:, n_sink:], cache, cand, n, n_sink))
        return out

    def _layer(self, attn: Any, q: mx.array, cache: Any, cand: Candidates, n: int, n_sink: int) -> np.ndarray:
        n_q, _, d = q.shape
        mu = q.mean(axis=1)  # [Hq, D]
        rot = mean_rotation(attn.rope, d, n, int(self.params["future"]))
        mu_r = mu @ rot.T
        sink = cand.tokens < n_sink
        keys, values = _rows(cache, cand.rows[~sink])
        n_kv = keys.shape[0]
        k = mx.repeat(keys, n_q // n_kv, axis=0)  # query head h reads KV head h // group
        s = (k @ mu_r[:, :, None])[..., 0] / math.sqrt(d)
        if self.params["covariance"]:
            centred = q - mu[:, None, :]
            cov = (centred.transpose(0, 2, 1) @ centred) / q.shape[1]
            cov_r = rot @ cov @ rot.T
            s = s + ((k @ cov_r) * k).sum(axis=-1) / d / 2
        p = mx.softmax(s, axis=-1).reshape(n_kv, n_q // n_kv, -1).mean(axis=1)
        if self.params["vnorm"]:
            p = p * mx.sqrt((values**2).sum(axis=-1))
        scores = np.array(p, np.float32)
        full = np.empty((n_kv, len(cand)), np.float32)
        full[:, ~sink] = scores
        full[:, sink] = (scores.max() if scores.size else 0.0) + 1.0
        return full


def chat_frame(tokenizer: Any) -> tuple[int, list[int]]:
    """(tokens of the chat template before a user message's text, ids of the template after it).

    kvpress's recipe: render one user message "dummy context" + a separator
    with the generation prompt, and split around them. Without a chat
    template: no prefix and a newline.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        return 0, list(tokenizer.encode("\n", add_special_tokens=False))
    dummy = "dummy context"
    sep = "\n" + "#" * len(dummy)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": dummy + sep}], add_generation_prompt=True, tokenize=False, enable_thinking=False
    )
    context, suffix = str(text).split(sep)
    prefix = context.split(dummy)[0]
    return (
        len(tokenizer.encode(prefix, add_special_tokens=False)),
        list(tokenizer.encode(suffix, add_special_tokens=False)),
    )


def _reconstruction_max(q: mx.array, keys: mx.array, n_before: int, n_chunk: int) -> np.ndarray:
    """`[kv_heads, n_chunk]`: max attention any query pays each chunk row.

    `keys` = [sinks..., chunk... (`n_before` rows in all), reconstruction...];
    the reconstruction queries see every sink and chunk row, and the
    reconstruction rows causally. The softmax denominator adds the two parts'
    log-sum-exps, so only the chunk's probabilities are ever formed.
    """
    n_q, n_rep, d = q.shape
    n_kv = keys.shape[0]
    group = n_q // n_kv
    scale = 1.0 / math.sqrt(d)
    k_ctx = keys[:, :n_before].transpose(0, 2, 1)
    k_rep = keys[:, n_before:].transpose(0, 2, 1)
    best = mx.zeros((n_kv, n_chunk), mx.float32)
    cols = mx.arange(n_rep)[None, :]
    for lo in range(0, n_rep, Q_BLOCK):
        hi = min(lo + Q_BLOCK, n_rep)
        qb = q[:, lo:hi].reshape(n_kv, group * (hi - lo), d)
        rows = mx.tile(mx.arange(lo, hi), (group,))[:, None]
        ctx = (qb @ k_ctx) * scale  # [Hkv, G*b, n_before]
        # Reconstruction rows at or after `hi` are masked for the whole block: never formed.
        rep = mx.where(cols[:, :hi] <= rows, (qb @ k_rep[:, :, :hi]) * scale, mx.array(-np.inf, mx.float32))
        lse = mx.logaddexp(mx.logsumexp(ctx, axis=-1), mx.logsumexp(rep, axis=-1))
        # max over queries of exp(.) = exp(max over queries of .): exp runs on [Hkv, n_chunk] only.
        best = mx.maximum(best, mx.exp((ctx[:, :, n_before - n_chunk :] - lse[..., None]).max(axis=1)))
        mx.eval(best)
    return np.array(best, np.float32)


class KVzip(HeadwisePolicy):
    name = "kvzip"
    summary = "KVzip: max attention from a context-reconstruction pass; global budget over layers and heads"
    own: ClassVar[dict[str, Any]] = {}
    defaults: ClassVar[dict[str, Any]] = {"sinks": 4, "chunk": 2048, "layerwise": False}
    needs_attention = True

    def __init__(self, **params: Any) -> None:
        Policy.__init__(self, **params)
        c = self.params["chunk"]
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise InvalidRequestError(f"kvzip: chunk must be an integer >= 1, got {c!r}")
        self._counts: list[int] = []

    def protected(self, cand: Candidates, budget: int) -> np.ndarray:
        return np.zeros(len(cand), bool)  # sinks are kept by their score, as kvpress does

    def n_recent(self, budget: int) -> int:
        return 0

    def score(self, inp: ScoreInput) -> list[np.ndarray]:
        model = _need(inp, "model", self.name)
        tokenizer = _need(inp, "tokenizer", self.name)
        n_sink, size = int(self.params["sinks"]), int(self.params["chunk"])
        n = inp.caches[0].n_tokens
        prefix, suffix = chat_frame(tokenizer)
        ctx = list(inp.token_ids[prefix:n])
        chunks = [ctx[i : i + size] for i in range(0, len(ctx), size)]
        n_kv = [c.n_kv_heads for c in inp.caches]
        score = [np.zeros((h, n), np.float32) for h in n_kv]
        start = prefix
        for i, chunk in enumerate(chunks):
            if i == 0:
                ask = list(tokenizer.encode(REPEAT_FIRST, add_special_tokens=False))
            else:
                ask = list(tokenizer.encode(REPEAT_NEXT, add_special_tokens=False)) + chunks[i - 1][-OVERLAP:]
            ids = ask + list(suffix) + chunk
            queries, copies = feed_recording(model, inp.caches, ids)
            end = start + len(chunk)
            sink = min(n_sink, start)
            for layer, (q, c) in enumerate(zip(queries, copies)):
                toks = np.asarray(c.visible_tokens)
                rows = np.concatenate(
                    [
                        np.nonzero(toks < sink)[0],
                        np.nonzero((toks >= start) & (toks < end))[0],
                        np.nonzero(toks >= n)[0],
                    ]
                )
                keys, _ = _rows(c, rows)
                in_chunk = toks[(toks >= start) & (toks < end)]
                n_before = int((toks < sink).sum()) + len(in_chunk)
                score[layer][:, in_chunk] = _reconstruction_max(q, keys, n_before, len(in_chunk))
            start = end
        top = max(float(s.max()) for s in score) + 1.0
        for s in score:
            s[:, :n_sink] = top
        return [s[:, cand.tokens] for s, cand in zip(score, inp.candidates)]

    def allocate(self, budgets: list[int], scores: list[np.ndarray], floors: list[int], caps: list[int]) -> list[int]:
        """Rows kept per layer and head from one global ranking (kvpress's non-layerwise rule)."""
        heads = [s.shape[0] for s in scores]
        keep_total = sum(b * h for b, h in zip(budgets, heads))
        if self.params["layerwise"]:
            self._counts = [b * h for b, h in zip(budgets, heads)]
        else:
            flat = np.concatenate([np.where(np.isfinite(s), s, -np.inf).reshape(-1) for s in scores])
            layer_of = np.concatenate([np.full(s.size, i) for i, s in enumerate(scores)])
            order = np.argsort(-flat, kind="stable")
            self._counts = np.bincount(layer_of[order[:keep_total]], minlength=len(scores)).tolist()
        return [max(1, round(c / h)) for c, h in zip(self._counts, heads)]

    def keep_heads(
        self, scores: np.ndarray, cand: Candidates, protected: np.ndarray, budget: int, held: np.ndarray
    ) -> np.ndarray:
        count = self._counts.pop(0) if self._counts else budget * scores.shape[0]
        n_heads, n = scores.shape
        count = min(count, int(held.sum()))
        flat = np.where(np.isfinite(scores) & held, scores, -np.inf).reshape(-1)
        heads = np.repeat(np.arange(n_heads), n)
        toks = np.tile(cand.tokens, n_heads)
        order = np.lexsort((heads, -toks, -flat))  # score desc, later token, lower head
        keep = np.zeros(n_heads * n, bool)
        keep[order[:count]] = True
        return keep.reshape(n_heads, n)

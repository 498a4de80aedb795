"""Run a chat on raw kvscope caches and read what the experiments measure.

The experiments need things the Engine's chat API does not return: the
logits of a teacher-forced answer, the K/V rows of given tokens, and the
same chat run twice with one edit between. This module does that on plain
lists of `ScopeKVCache` (one per layer), the same cache class and the same
mask operation (`set_visible`) the Engine's sessions use, so "compact" here
is the Engine's compaction (summary appended, span masked) on raw caches.

Promises:
- `render_chat` gives the chat template's tokens and the token span of every
  message, or raises ValueError when the template does not render a chat as
  a prefix of its continuation (then spans would be meaningless);
- `feed` returns log-probs at every fed position; `teacher_force` scores an
  answer after a prompt and leaves the caches as they were;
- `token_rows` reads the K/V rows of logical tokens [lo, hi) per layer as
  numpy, whatever rows were masked or evicted before them.

Knows nothing about episodes, probes or statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from kvscope.engine import chat
from kvscope.engine.kv_cache import ScopeKVCache
from kvscope.engine.model_loading import LoadedModel

PREFILL_CHUNK = 512
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class RenderedChat:
    """Tokens of a chat (generation prompt opened when asked) and each message's token span."""

    tokens: list[int]
    spans: list[tuple[int, int]]  # one (lo, hi) per message; the generation prompt is after the last


def _encode(tok: Any, messages: Messages, generation_prompt: bool) -> list[int]:
    return chat.encode(tok, chat.render(tok, messages, generation_prompt))


def render_chat(tok: Any, messages: Messages, generation_prompt: bool = True) -> RenderedChat:
    """The chat's tokens and per-message token spans (from prefix renders)."""
    tokens = _encode(tok, messages, generation_prompt)
    spans, lo = [], 0
    for i in range(len(messages)):
        hi = len(_encode(tok, messages[: i + 1], False))
        if _encode(tok, messages[: i + 1], False) != tokens[:hi]:
            raise ValueError(f"the chat template does not render message {i} as a prefix of the chat")
        spans.append((lo, hi))
        lo = hi
    return RenderedChat(tokens, spans)


def fresh_caches(lm: LoadedModel) -> list[ScopeKVCache]:
    """One empty kvscope cache per layer; refuses models whose layers it cannot stand in for."""
    lm.require_supported("this experiment")
    return [ScopeKVCache() for _ in range(lm.n_layers)]


def feed(lm: LoadedModel, caches: list[ScopeKVCache], tokens: list[int]) -> mx.array:
    """Feed `tokens` in chunks; log-probs (float32) at every fed position, shape (len, vocab)."""
    outs = []
    for i in range(0, len(tokens), PREFILL_CHUNK):
        logits = lm.model(mx.array(tokens[i : i + PREFILL_CHUNK])[None], cache=caches)[0].astype(mx.float32)
        out = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(out)
        outs.append(out)
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)


def copy_caches(caches: list[ScopeKVCache]) -> list[ScopeKVCache]:
    return [c.copy() for c in caches]


@dataclass(frozen=True)
class Forced:
    """A teacher-forced answer: per-token log-probs and whether greedy picked each token."""

    logprobs: np.ndarray  # (n_answer,)
    greedy_hit: np.ndarray  # (n_answer,) bool
    rows: np.ndarray  # (n_answer, vocab) log-probs at each answer step

    @property
    def logprob(self) -> float:
        return float(self.logprobs.sum())

    @property
    def exact(self) -> bool:
        """Greedy decoding reproduces the whole answer (end-of-turn included)."""
        return bool(self.greedy_hit.all())


def teacher_force(lm: LoadedModel, caches: list[ScopeKVCache], prompt: list[int], answer: list[int]) -> Forced:
    """Feed `prompt` then `answer[:-1]`; score every answer token; roll the caches back."""
    lp = feed(lm, caches, prompt + answer[:-1])
    n = len(prompt)
    rows = np.array(lp[n - 1 : n - 1 + len(answer)])
    ids = np.array(answer)
    for c in caches:
        c.trim(len(prompt) + len(answer) - 1)
    picked = rows[np.arange(len(answer)), ids]
    return Forced(picked, rows.argmax(axis=1) == ids, rows)


def token_rows(caches: list[ScopeKVCache], lo: int, hi: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, (keys, values) of logical tokens [lo, hi) as (heads, n, dim) float32 numpy."""
    out = []
    for c in caches:
        keys, values, tokens, _ = c.rows_of(lo, hi)
        if len(tokens) != hi - lo:
            raise ValueError(f"tokens [{lo}, {hi}) are not all stored in the cache")
        out.append((np.array(keys[0].astype(mx.float32)), np.array(values[0].astype(mx.float32))))
    return out


def write_rows(dst: list[ScopeKVCache], src: list[ScopeKVCache], lo: int, hi: int, layers: list[int]) -> None:
    """Copy the K/V of tokens [lo, hi) from `src` into `dst` for `layers` (same positions in both)."""
    for layer in layers:
        d, s = dst[layer], src[layer]
        keys, values, s_tokens, _ = s.rows_of(lo, hi)
        if len(s_tokens) != hi - lo or len(d.rows_of(lo, hi)[2]) != hi - lo:
            raise ValueError(f"tokens [{lo}, {hi}) must be stored in both caches")
        if not np.array_equal(d.token_positions[lo:hi], s.token_positions[lo:hi]):
            raise ValueError(f"tokens [{lo}, {hi}) sit at different positions in the two caches")
        d.overwrite_rows(lo, keys, values)


class _Recorder:
    """Stands in for one decoder layer and keeps what it returns (attributes pass through)."""

    def __init__(self, layer: Any, sink: list[mx.array]) -> None:
        self._layer, self._sink = layer, sink

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self._layer(*args, **kwargs)
        self._sink.append(out[0] if isinstance(out, tuple) else out)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._layer, name)


def _layer_list(lm: LoadedModel) -> list[Any]:
    inner = getattr(lm.model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, list) or len(layers) != lm.n_layers:
        raise ValueError(f"cannot find the decoder layers of {lm.name} (expected model.model.layers)")
    return layers


def feed_hidden(lm: LoadedModel, caches: list[ScopeKVCache], tokens: list[int]) -> list[np.ndarray]:
    """Feed `tokens`; per layer, the residual stream after that layer, (len, hidden) float32 numpy."""
    layers = _layer_list(lm)
    originals = list(layers)
    per_chunk: list[list[mx.array]] = []
    try:
        for i in range(0, len(tokens), PREFILL_CHUNK):
            sink: list[mx.array] = []
            layers[:] = [_Recorder(layer, sink) for layer in originals]
            logits = lm.model(mx.array(tokens[i : i + PREFILL_CHUNK])[None], cache=caches)
            mx.eval(logits, *sink)
            per_chunk.append(sink)
    finally:
        layers[:] = originals
    return [
        np.concatenate([np.array(chunk[layer][0].astype(mx.float32)) for chunk in per_chunk], axis=0)
        for layer in range(lm.n_layers)
    ]

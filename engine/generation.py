"""The model loop: chunked prefill and pipelined decode over kvscope caches.

Promises:
- `prefill` feeds tokens in chunks, calls back after each chunk (for
  progress events) and checks for cancellation between chunks;
- `decode` yields one `Step` per sampled token; it queues the forward pass
  that feeds a token before reading that token back, as mlx-lm's
  `generate_step` does, so graph building overlaps compute and speed
  matches plain mlx-lm;
- when a generator stops, the caches hold exactly the tokens the caller
  kept (a speculatively fed row is trimmed off), so the caller's
  bookkeeping (session tokens) stays exact.

Must run on the thread that owns the model. Knows nothing about sessions,
events or chat templates.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.sample_utils import make_sampler

from kvscope.engine.caches.adopted import note_feed
from kvscope.engine.errors import CancelledError
from kvscope.engine.kv_cache import ScopeKVCache


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. `temperature == 0` is greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "stop" in known:
            known["stop"] = tuple(known["stop"])
        return cls(**known)

    def validate(self) -> None:
        from kvscope.engine.errors import InvalidRequestError

        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass(frozen=True)
class Step:
    token_id: int
    logprobs: mx.array  # [vocab] log-softmax of the logits that produced it
    started: float  # perf_counter when this step's work began (the previous yield)
    ended: float  # perf_counter when the token was read back

    @property
    def step_ms(self) -> float:
        return (self.ended - self.started) * 1000


def forward(model: nn.Module, token_ids: list[int] | mx.array, caches: list[ScopeKVCache]) -> mx.array:
    """Run tokens through the model on `caches`; returns logits `[1, n, vocab]`."""
    ids = token_ids if isinstance(token_ids, mx.array) else mx.array(token_ids)
    note_feed(caches, int(ids.shape[0]))
    return model(ids[None], cache=caches)


def prefill(
    model: nn.Module,
    caches: list[ScopeKVCache],
    token_ids: list[int],
    chunk_size: int,
    cancelled: Callable[[], bool] = lambda: False,
    on_chunk: Callable[[int, int, float, float], None] | None = None,
) -> None:
    """Feed `token_ids` into the caches in chunks (no logits kept).

    Raises:
        CancelledError: between chunks if `cancelled()` turns true; the chunks
            already fed stay in the caches (the caller rolls back).
    """
    done = 0
    while done < len(token_ids):
        if cancelled():
            raise CancelledError(f"prefill cancelled after {done} of {len(token_ids)} tokens")
        chunk = token_ids[done : done + chunk_size]
        t0 = time.perf_counter()
        forward(model, chunk, caches)
        mx.eval([c.keys for c in caches])
        if on_chunk is not None:  # (first token, tokens, perf_counter at start, at end)
            on_chunk(done, len(chunk), t0, time.perf_counter())
        done += len(chunk)


def make_token_sampler(params: SamplingParams) -> Callable[[mx.array], mx.array]:
    if params.seed is not None:
        mx.random.seed(params.seed)
    top_p = params.top_p if params.top_p < 1.0 else 0.0
    return make_sampler(temp=params.temperature, top_p=top_p)


def decode(
    model: nn.Module,
    caches: list[ScopeKVCache],
    last_prompt_token: int,
    params: SamplingParams,
    keep_going: Callable[[int], bool],
) -> Iterator[Step]:
    """Sample up to `params.max_tokens` tokens after `last_prompt_token`.

    `last_prompt_token` is fed first (it is the one prompt token prefill left
    out, so its logits pick the first answer token). While the budget lasts,
    the forward pass that feeds a sampled token is queued *before* the token
    is read back, as mlx-lm's `generate_step` does, so building the next
    graph overlaps the current step's compute (on a small model that is a
    quarter of the time per token). `keep_going(token_id)` then decides: if
    False, the row that token added to each cache is trimmed off again, so
    the caches hold exactly the fed tokens. Every kept token is fed before
    return; the last yielded one is not.
    """
    sampler = make_token_sampler(params)

    def step(y: mx.array) -> tuple[mx.array, mx.array]:
        note_feed(caches, 1)
        logits = model(y[None], cache=caches)[:, -1, :]
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        return sampler(logprobs), logprobs.squeeze(0)

    y, logprobs = step(mx.array([last_prompt_token]))
    mx.async_eval(y, logprobs)
    t_prev = time.perf_counter()
    for n in range(params.max_tokens):
        budget = n + 1 < params.max_tokens
        if budget:  # speculative: feeds y before we know whether the answer goes on
            next_y, next_logprobs = step(y)
            mx.async_eval(next_y, next_logprobs)
        token = int(y.item())  # type: ignore[arg-type]
        go_on = budget and keep_going(token)
        if budget and not go_on:
            for c in caches:
                c.trim(1)
        now = time.perf_counter()
        yield Step(token, logprobs, t_prev, now)
        t_prev = now
        if not go_on:
            return
        if n % 256 == 255:
            mx.clear_cache()
        y, logprobs = next_y, next_logprobs

"""The default runner: a plain mlx-lm model and a fresh mlx-lm prompt cache.

Promises: `MlxRunner(model, eos_token_ids)` satisfies `scoring.Runner` for any
model that obeys mlx-lm's cache protocol. Per call it prefills the prompt in
chunks into `make_prompt_cache(model)`, teacher-forces the answer to get its
log-prob, rewinds the cache (trim, or a fresh prefill when the cache cannot
trim) and greedy-decodes. It is the full-cache reference the engine's
compressed/masked/spliced runners are compared against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

from kvscope.engine.tasks.scoring import EXTRA_DECODE_TOKENS, RunResult

PREFILL_CHUNK = 512


class MlxRunner:
    """Greedy decode + answer log-prob on a full (uncompressed) mlx-lm cache."""

    def __init__(
        self,
        model: Callable[..., mx.array],
        eos_token_ids: Iterable[int],
        cache_factory: Callable[[Any], list[Any]] = make_prompt_cache,
    ) -> None:
        self._model = model
        self._eos = set(eos_token_ids)
        self._cache_factory = cache_factory

    def _step(self, tokens: list[int], cache: list[Any]) -> mx.array:
        """Feed `tokens`; return log-probs at every fed position (L, vocab)."""
        logits = self._model(mx.array([tokens]), cache=cache)[0].astype(mx.float32)
        out = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(out)
        return out

    def _prefill(self, prompt: list[int]) -> tuple[list[Any], mx.array]:
        cache = self._cache_factory(self._model)
        last = mx.zeros((0,))
        for i in range(0, len(prompt), PREFILL_CHUNK):
            last = self._step(prompt[i : i + PREFILL_CHUNK], cache)[-1]
        return cache, last

    def __call__(self, prompt_tokens: list[int], answer_tokens: list[int]) -> RunResult:
        if not prompt_tokens or not answer_tokens:
            raise ValueError("prompt and answer must both be non-empty")
        cache, last = self._prefill(prompt_tokens)
        logprob = cast(float, last[answer_tokens[0]].item())
        if len(answer_tokens) > 1:
            forced = self._step(answer_tokens[:-1], cache)
            idx = mx.arange(len(answer_tokens) - 1)
            logprob += cast(float, forced[idx, mx.array(answer_tokens[1:])].sum().item())
            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, len(answer_tokens) - 1)
            else:
                cache, last = self._prefill(prompt_tokens)
        generated: list[int] = []
        for _ in range(len(answer_tokens) + EXTRA_DECODE_TOKENS):
            token = cast(int, mx.argmax(last).item())
            generated.append(token)
            if token in self._eos:
                break
            last = self._step([token], cache)[-1]
        return RunResult(generated, logprob)

"""The compression benchmark: what the model still recalls from a compressed cache.

For each recall episode (`kvscope.engine.tasks`) the context is prefilled
once into kvscope caches; every (policy, keep ratio) variant then works on a
copy: score (once per policy and episode), evict, optionally quantize, feed
the rest of the prompt, teacher-force the answer for its log-prob and
greedy-decode it. The full cache goes through the same code at ratio 1.

Two modes, saying what the policy may see:

    context  (default, query-agnostic): compress the chat *before* the
             question turn, then feed the question. The policy cannot know
             what will be asked (kvpress's question-agnostic setting).
    question (query-aware): compress the whole prompt but its last token;
             the observation window of SnapKV & co. then holds the question.

Knows nothing about files or the command line (see `compression_report`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from kvscope.engine import chat
from kvscope.engine.compression import compress_caches, score_caches
from kvscope.engine.generation import prefill
from kvscope.engine.kv_cache import ScopeKVCache
from kvscope.engine.model_loading import LoadedModel
from kvscope.engine.policies import POLICIES
from kvscope.lab.stats import Estimate, accuracy

EXTRA_DECODE_TOKENS = 3
PREFILL_CHUNK = 512


@dataclass(frozen=True)
class Variant:
    """One benchmark row: a policy at a keep ratio (None = keep every row)."""

    label: str
    policy: str | None  # None = the full cache
    keep_ratio: float | None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BenchConfig:
    policies: tuple[str, ...] = ("streaming_llm", "h2o", "snapkv", "key_norm", "random", "pyramidkv", "dynamickv")
    ratios: tuple[float, ...] = (0.75, 0.5, 0.25, 0.125)
    contexts: tuple[int, ...] = (1024, 2048)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    n_per_cell: int = 4
    seed: int = 0
    mode: str = "context"
    quant_bits: tuple[int, ...] = (8, 4)
    combined: str | None = "snapkv"  # this policy is also run with 4-bit quantization
    kind: str = "recall"  # or "decision" (a record's field decides a yes/no answer)

    def variants(self) -> list[Variant]:
        out = [Variant("full cache", None, None)]
        for p in self.policies:
            out += [Variant(p, p, r) for r in self.ratios]
        out += [Variant(f"quantize {b}-bit", "quantize", None, {"bits": b}) for b in self.quant_bits]
        if self.combined and 4 in self.quant_bits:
            out += [Variant(f"{self.combined} + 4-bit", self.combined, r, {"quant_bits": 4}) for r in self.ratios]
        return out


@dataclass
class Outcome:
    """One variant on one episode."""

    context: int
    depth: float
    correct: bool
    answer_logprob: float
    kl: float
    cache_bytes: int
    decode_tokens: int
    decode_s: float
    fact_kept: float  # share of the fact's token rows still in the cache, mean over layers


@dataclass
class BenchResult:
    config: BenchConfig
    model: str
    variants: list[Variant]
    outcomes: dict[str, list[Outcome]]  # by variant key
    seconds: float

    @staticmethod
    def key(v: Variant) -> str:
        return f"{v.label}@{v.keep_ratio}"


def _logprobs(model: Any, tokens: list[int], caches: list[ScopeKVCache]) -> mx.array:
    logits = model(mx.array(tokens)[None], cache=caches)[0].astype(mx.float32)
    out = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    mx.eval(out)
    return out


def _scalar(x: mx.array) -> float:
    return float(np.asarray(x))


def answer(
    model: Any, caches: list[ScopeKVCache], rest: list[int], answer_ids: list[int], eos: set[int]
) -> tuple[list[int], float, np.ndarray, int, float]:
    """Feed `rest`, score `answer_ids` by teacher forcing, then greedy-decode.

    Returns:
        (generated tokens, answer log-prob, first-answer-token log-probs,
        decode steps timed, seconds they took).
    """
    first = _logprobs(model, rest, caches)[-1]
    logprob = _scalar(first[answer_ids[0]])
    if len(answer_ids) > 1:
        forced = _logprobs(model, answer_ids[:-1], caches)
        idx = mx.arange(len(answer_ids) - 1)
        logprob += _scalar(forced[idx, mx.array(answer_ids[1:])].sum())
        for c in caches:
            c.trim(len(answer_ids) - 1)
    generated: list[int] = []
    last, n_steps, t_steps = first, 0, 0.0
    for _ in range(len(answer_ids) + EXTRA_DECODE_TOKENS):
        token = int(_scalar(mx.argmax(last)))
        generated.append(token)
        if token in eos:
            break
        t0 = time.perf_counter()
        last = _logprobs(model, [token], caches)[-1]
        t_steps += time.perf_counter() - t0
        n_steps += 1
    return generated, logprob, np.array(first), n_steps, t_steps


def _context_len(tok: Any, episode: Any, prompt: list[int], mode: str) -> int:
    if mode == "question":
        return len(prompt) - 1
    ids = chat.encode(tok, chat.render(tok, list(episode.messages[:-1]), add_generation_prompt=False))
    n = 0
    for a, b in zip(ids, prompt):
        if a != b:
            break
        n += 1
    return min(n, len(prompt) - 1)


def run_benchmark(
    lm: LoadedModel, config: BenchConfig, progress: Callable[[str], None] = lambda s: None
) -> BenchResult:
    """Run every variant on every episode; see the module docstring."""
    from kvscope.engine.tasks import answer_tokens, make_episodes, prompt_tokens
    from kvscope.engine.tasks.scoring import eos_ids, generated_text

    if config.mode not in ("context", "question"):
        raise ValueError(f"mode must be 'context' or 'question', got {config.mode!r}")
    tok, model = lm.tokenizer, lm.model
    eos = eos_ids(tok)
    variants = config.variants()
    outcomes: dict[str, list[Outcome]] = {BenchResult.key(v): [] for v in variants}
    t_start = time.perf_counter()
    for ctx in config.contexts:
        for depth in config.depths:
            episodes = make_episodes(config.kind, config.n_per_cell, ctx, depth, config.seed, tok)
            for ep in episodes:
                prompt, ans = prompt_tokens(tok, ep), answer_tokens(tok, ep.answer)
                n_ctx = _context_len(tok, ep, prompt, config.mode)
                base = [ScopeKVCache() for _ in range(lm.n_layers)]
                prefill(model, base, prompt[:n_ctx], PREFILL_CHUNK)
                full_first: np.ndarray | None = None
                scored: dict[str, list[np.ndarray]] = {}
                for v in variants:
                    caches = [c.copy() for c in base]
                    params = dict(v.params)
                    if v.policy == "random":
                        params["seed"] = config.seed * 100_003 + ep.index
                    fact_kept = 1.0
                    if v.policy is not None:
                        if POLICIES[v.policy].evicts and v.policy not in scored:
                            policy_params = {k: x for k, x in params.items() if k != "quant_bits"}
                            scored[v.policy] = score_caches(v.policy, base, prompt[:n_ctx], model, tok, **policy_params)
                        d = compress_caches(
                            caches,
                            prompt[:n_ctx],
                            model,
                            v.policy,
                            v.keep_ratio,
                            None,
                            scored.get(v.policy),
                            tok,
                            **params,
                        )
                        n_bytes = d.quantized_bytes if d.quantized_bytes is not None else d.bytes_after
                        fact = np.arange(*ep.fact_tokens)
                        # per KV head where heads keep their own rows (head-wise policies)
                        width = int(fact.max()) + 1
                        fact_kept = float(np.mean([layer.head_keep_mask(width)[:, fact].mean() for layer in d.layers]))
                    else:
                        n_bytes = sum(c.nbytes for c in caches)
                    gen, lp, first, n_steps, secs = answer(model, caches, prompt[n_ctx:], ans, eos)
                    if full_first is None:
                        full_first = first
                    p = np.exp(full_first)
                    kl = float(np.sum(p * (full_first - first)))
                    correct = generated_text(tok, gen) == ep.answer
                    outcomes[BenchResult.key(v)].append(
                        Outcome(ctx, depth, correct, lp, kl, n_bytes, n_steps, secs, fact_kept)
                    )
                progress(f"context {ctx} depth {depth:.2f} episode {ep.index}: {time.perf_counter() - t_start:.0f}s")
    return BenchResult(config, lm.name, variants, outcomes, time.perf_counter() - t_start)


@dataclass(frozen=True)
class Row:
    label: str
    keep_ratio: float | None
    accuracy: dict[int, float]  # by context length
    accuracy_all: float
    accuracy_ratio: float  # vs the full cache
    answer_logprob: float
    logprob_ratio: float  # policy / full (1 = same, > 1 = less likely)
    kl: float
    cache_bytes: float  # mean over episodes at the longest context
    decode_tps: float
    fact_kept: float  # share of the fact's rows kept (1 = the needle survived everywhere)
    accuracy_ci: Estimate  # accuracy over every episode with its Wilson 95% interval
    correct: tuple[bool, ...]  # per episode, in run order (the same episodes for every variant)


def summarize(result: BenchResult) -> list[Row]:
    """One row per variant, ratios taken against the full cache."""
    rows: list[Row] = []
    full: Row | None = None
    longest = max(result.config.contexts)
    for v in result.variants:
        outs = result.outcomes[BenchResult.key(v)]
        acc = {c: float(np.mean([o.correct for o in outs if o.context == c])) for c in result.config.contexts}
        acc_all = float(np.mean([o.correct for o in outs]))
        lp = float(np.mean([o.answer_logprob for o in outs]))
        steps = sum(o.decode_tokens for o in outs)
        secs = sum(o.decode_s for o in outs)
        row = Row(
            label=v.label,
            keep_ratio=v.keep_ratio,
            accuracy=acc,
            accuracy_all=acc_all,
            accuracy_ratio=acc_all / full.accuracy_all if full and full.accuracy_all else math.nan,
            answer_logprob=lp,
            logprob_ratio=lp / full.answer_logprob if full and full.answer_logprob else math.nan,
            kl=float(np.mean([o.kl for o in outs])),
            cache_bytes=float(np.mean([o.cache_bytes for o in outs if o.context == longest])),
            decode_tps=steps / secs if secs > 0 else math.nan,
            fact_kept=float(np.mean([o.fact_kept for o in outs])),
            accuracy_ci=accuracy([o.correct for o in outs]),
            correct=tuple(o.correct for o in outs),
        )
        if v.policy is None:
            full = row
            row = Row(**{**row.__dict__, "accuracy_ratio": 1.0, "logprob_ratio": 1.0})
        rows.append(row)
    return rows

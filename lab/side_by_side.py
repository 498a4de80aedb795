"""kvscope's half of the side-by-side check against NVIDIA kvpress (the MLX side).

Promises:
- `export_episodes` writes the recall episodes (`kvscope.engine.tasks`) as
  token ids — prompt, answer, end-of-turn ids, and per mode how many prompt
  tokens are compressed — so kvscope and kvpress (`tools/kvpress_runner.py`,
  in its own venv) compress exactly the same tokens;
- `run_kvscope` runs kvscope's policies on those ids the way the runner runs
  kvpress's presses (prefill the first `n_ctx` tokens, compress to kvpress's
  row count `max(1, int(n * (1 - compression_ratio)))`, feed the rest,
  greedy-decode `len(answer) + 3` tokens) and writes the same JSON lines:
  generated ids and, per layer and KV head, the kept rows as a packed bit mask;
- `PAIRS` names, for each press both have, kvscope's policy and the
  parameters that make it kvpress's recipe: a kvpress `ScorerPress` keeps
  its top rows per KV head, so its twin is kvscope's `per_head` over the
  same scorer (SnapKV with kvpress's 64-query window).

Lines already in the output are skipped (an interrupted run resumes). Knows
nothing about torch; the comparison and the report live in
`kvscope.lab.side_by_side_report`.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvscope.engine.model_loading import LoadedModel

EXTRA_DECODE_TOKENS = 3
PREFILL_CHUNK = 512
MODES = ("context", "question")


@dataclass(frozen=True)
class Pair:
    """A press both sides have: kvpress's name, kvscope's policy and its parameters."""

    press: str
    policy: str
    params: dict[str, Any] = field(default_factory=dict)


PAIRS: dict[str, Pair] = {
    p.press: p
    for p in (
        Pair("knorm", "per_head", {"scorer": "key_norm"}),
        Pair("snapkv", "per_head", {"scorer": "snapkv", "window": 64}),
        Pair("streaming_llm", "streaming_llm"),
        Pair("keydiff", "per_head", {"scorer": "keydiff"}),
        Pair("tova", "tova"),
        Pair("expected_attention", "per_head", {"scorer": "expected_attention"}),
        Pair("kvzip", "kvzip"),
        Pair("adakv_expected_attention", "adakv", {"scorer": "expected_attention"}),
        Pair("random", "per_head", {"scorer": "random"}),
        # kvscope only (no kvpress twin): the layer-wise policies, every head keeping the same rows
        Pair("kvscope:keydiff", "keydiff"),
        Pair("kvscope:snapkv", "snapkv"),
    )
}


def n_kept(n: int, keep: float) -> int:
    """kvpress's row count for a keep ratio (`compute_n_kept(n, 1 - keep)`), float ops included."""
    compression_ratio = 1.0 - keep
    if compression_ratio >= 1.0:
        return 0
    return max(1, int(n * (1 - compression_ratio)))


def pack(mask: np.ndarray) -> str:
    return base64.b64encode(np.packbits(np.asarray(mask, np.uint8)).tobytes()).decode("ascii")


def unpack(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(text), np.uint8))[:n].astype(bool)


def _context_len(tok: Any, messages: Iterable[dict[str, str]], prompt: list[int]) -> int:
    head = tok.apply_chat_template(list(messages)[:-1], add_generation_prompt=False, tokenize=False)
    ids = tok.encode(str(head), add_special_tokens=False)
    n = 0
    for a, b in zip(ids, prompt):
        if a != b:
            break
        n += 1
    return min(n, len(prompt) - 1)


def export_episodes(
    lm: LoadedModel, model_dir: str, contexts: Iterable[int], depths: Iterable[float], n: int, seed: int
) -> dict[str, Any]:
    """The episodes as token ids, for both sides (see the module docstring)."""
    from kvscope.engine.tasks import answer_tokens, make_episodes, prompt_tokens
    from kvscope.engine.tasks.scoring import eos_ids

    tok = lm.tokenizer
    out = []
    for ctx in contexts:
        for depth in depths:
            for ep in make_episodes("recall", n, ctx, depth, seed, tok):
                prompt = prompt_tokens(tok, ep)
                out.append(
                    {
                        "id": f"{ctx}:{depth}:{ep.index}",
                        "context": ctx,
                        "depth": depth,
                        "index": ep.index,
                        "seed": seed * 100_003 + ep.index,
                        "prompt_ids": prompt,
                        "answer_ids": answer_tokens(tok, ep.answer),
                        "answer": ep.answer,
                        "fact_tokens": list(ep.fact_tokens),
                        "eos_ids": sorted(eos_ids(tok)),
                        "n_ctx": {"context": _context_len(tok, ep.messages, prompt), "question": len(prompt) - 1},
                    }
                )
    out.sort(key=lambda e: (e["index"], e["context"], e["depth"]))  # a partial run covers every cell
    return {"format": "kvscope.side_by_side.episodes", "model": model_dir, "seed": seed, "episodes": out}


def kept_masks(decision: Any, n_ctx: int, n_heads: int) -> list[np.ndarray]:
    """`[kv_heads, n_ctx]` kept mask per layer; a layer-wide decision keeps the same rows in every head."""
    out = []
    for layer in decision.layers:
        heads = getattr(layer, "head_kept", None)
        mask = np.zeros((n_heads, n_ctx), bool)
        if heads is not None and len(heads):
            for h, toks in enumerate(heads):
                mask[h, np.asarray(toks, np.int64)] = True
        else:
            mask[:, np.asarray(layer.kept, np.int64)] = True
        out.append(mask)
    return out


def _done(path: Path) -> set[tuple[str, str, str, float]]:
    if not path.exists():
        return set()
    keys = set()
    for line in path.read_text().splitlines():
        r = json.loads(line)
        keys.add((r["episode"], r["mode"], r["press"], float(r["keep"])))
    return keys


def greedy(model: Any, caches: list[Any], rest: list[int], n_steps: int, eos: set[int]) -> tuple[list[int], int, float]:
    """Feed `rest`, then greedy-decode up to `n_steps` tokens (stop at end-of-turn), as the
    kvpress runner does. Returns (tokens, decode steps timed, their seconds)."""
    import mlx.core as mx

    from kvscope.engine.generation import forward

    logits = forward(model, rest, caches)
    generated: list[int] = []
    steps, secs = 0, 0.0
    while True:
        token = int(np.asarray(mx.argmax(logits[0, -1])))
        generated.append(token)
        if token in eos or len(generated) == n_steps:
            return generated, steps, secs
        t0 = time.perf_counter()
        logits = forward(model, [token], caches)
        mx.eval(logits)
        secs += time.perf_counter() - t0
        steps += 1


def _answer_record(
    lm: LoadedModel, ep: dict[str, Any], mode: str, press: str, keep: float, caches: list[Any], masks: Any, t0: float
) -> dict[str, Any]:
    n_ctx = int(ep["n_ctx"][mode])
    n_bytes = sum(c.nbytes for c in caches)
    rest = list(ep["prompt_ids"])[n_ctx:]
    n_steps = len(ep["answer_ids"]) + EXTRA_DECODE_TOKENS
    gen, steps, secs = greedy(lm.model, caches, rest, n_steps, set(ep["eos_ids"]))
    return {
        "episode": ep["id"],
        "mode": mode,
        "press": press,
        "keep": keep,
        "n_ctx": n_ctx,
        "generated": gen,
        "kept": None if masks is None else [[pack(h) for h in layer] for layer in masks],
        "seconds": round(time.perf_counter() - t0, 3),
        "cache_bytes": int(n_bytes),
        "decode_steps": int(steps),
        "decode_s": float(secs),
    }


def run_episode(
    lm: LoadedModel, ep: dict[str, Any], mode: str, pairs: list[Pair], ratios: list[float], skip: set[tuple[str, float]]
) -> list[dict[str, Any]]:
    """Every (press, keep) of one episode and mode not in `skip`, as `tools/kvpress_runner.py` runs them:
    one prefill, one scoring pass per press, one decision per keep ratio (on a copy)."""
    from kvscope.engine.compression import compress_caches, score_caches
    from kvscope.engine.generation import prefill
    from kvscope.engine.kv_cache import ScopeKVCache

    prompt = list(ep["prompt_ids"])
    n_ctx = int(ep["n_ctx"][mode])
    if ("full", 1.0) in skip and all((p.press, float(k)) in skip for p in pairs for k in ratios):
        return []  # all done: no prefill
    t0 = time.perf_counter()
    base = [ScopeKVCache() for _ in range(lm.n_layers)]
    prefill(lm.model, base, prompt[:n_ctx], PREFILL_CHUNK)
    out = []
    full = _answer_record(lm, ep, mode, "full", 1.0, [c.copy() for c in base], None, t0)
    if ("full", 1.0) not in skip:
        out.append(full)
    # Every record carries the full cache's decode timed in this very run: the report's
    # "decode tok/s ÷ full" never pairs timings taken on another day or another load.
    baseline = {"baseline_steps": full["decode_steps"], "baseline_s": full["decode_s"]}
    n_heads = base[0].n_kv_heads
    for pair in pairs:
        todo = [k for k in ratios if (pair.press, k) not in skip]
        if not todo:
            continue
        t0 = time.perf_counter()
        params = dict(pair.params)
        if "random" in (pair.policy, params.get("scorer")):
            params["seed"] = int(ep["seed"])
        scores = score_caches(pair.policy, base, prompt[:n_ctx], lm.model, lm.tokenizer, **params)
        for keep in todo:
            caches = [c.copy() for c in base]
            d = compress_caches(
                caches, prompt[:n_ctx], lm.model, pair.policy, None, n_kept(n_ctx, keep), scores, lm.tokenizer, **params
            )
            masks = kept_masks(d, n_ctx, n_heads)
            out.append({**_answer_record(lm, ep, mode, pair.press, keep, caches, masks, t0), **baseline})
            t0 = time.perf_counter()
    return out


def run_kvscope(
    lm: LoadedModel,
    episodes: dict[str, Any],
    out: Path,
    presses: Iterable[str],
    ratios: Iterable[float],
    modes: Iterable[str] = MODES,
    max_episodes: int | None = None,
    masks_for: int = 10,
    shard: tuple[int, int] = (0, 1),
    progress: Callable[[str], None] = lambda s: None,
    also_done: Iterable[Path] = (),
    redo: bool = False,
) -> None:
    """Every (episode, mode, press, ratio) not yet in `out` (nor in `also_done`), appended as JSON lines.
    `redo`: run them all again (a timing pass: the report takes decode speeds from every record)."""
    pairs = [PAIRS[p] for p in presses]
    done = set() if redo else _done(out).union(*(_done(p) for p in also_done))
    ratios = [float(k) for k in ratios]
    with out.open("a") as f:
        for ep in episodes["episodes"]:
            if max_episodes is not None and ep["index"] >= max_episodes:
                continue
            if ep["index"] % shard[1] != shard[0]:
                continue
            for mode in modes:
                skip = {(p, k) for (e, m, p, k) in done if e == ep["id"] and m == mode}
                for r in run_episode(lm, ep, mode, pairs, ratios, skip):
                    if ep["index"] >= masks_for:
                        r["kept"] = None
                    f.write(json.dumps(r) + "\n")
                f.flush()
            progress(f"kvscope: episode {ep['id']} done")

"""Run NVIDIA kvpress's own presses on kvscope's exported recall episodes (torch side).

Runs inside the kvpress venv (`tools/kvpress_env.sh install`), never in
kvscope's: it imports torch, transformers and kvpress, and nothing of kvscope.

    python tools/kvpress_runner.py EPISODES.json OUT.jsonl [--presses ...] [--ratios 0.5 0.25]

Input: the JSON `kvscope.lab.side_by_side.export_episodes` writes: the model
folder, and per episode the prompt token ids, the answer token ids, the
end-of-turn ids and, per mode, how many prompt tokens are compressed
(`n_ctx`). Both sides read these ids, so they compress the same tokens.

For each (episode, mode) the model (the demo folder loaded as a Hugging Face
`LlamaForCausalLM`, float32, sdpa attention) prefills the first `n_ctx`
tokens once, keeping each attention layer's hook arguments; every press and
keep ratio then runs kvpress's own `forward_hook` (its `compress`, its
scoring) on a copy of that cache — what prefilling inside `with press(model):`
does, since the hook runs after a layer's attention (checked: the same kept
rows and answers as the context-manager path on the demo episodes).
`KVzipPress` runs through its own context manager (prefill + context
reconstruction) once, its ratio-independent scores then serving each ratio
through its own `compress_post`. The rest of the prompt is fed with RoPE
positions continuing after the context (kvpress's `generate_answer`) and the
answer greedy-decoded for `len(answer) + 3` tokens (stop at end-of-turn), as
kvscope's side does. One JSON line per run:

    {"episode", "mode", "press", "keep", "generated": [ids],
     "kept": [[base64 packed bit mask per KV head] per layer] (or null), "n_ctx", "seconds"}

Kept rows are read from the cache itself, not re-derived: a press that prunes
(every ScorerPress) gathers key rows, so each kept row is found by its bytes
among the rows before compression; a press that masks (AdaKV, KVzip) leaves
the rows and names the masked ones in `module.masked_key_indices`. Lines
already in OUT are skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

EXTRA_DECODE_TOKENS = 3
PRESSES = (
    "knorm",
    "snapkv",
    "streaming_llm",
    "keydiff",
    "tova",
    "expected_attention",
    "kvzip",
    "adakv_expected_attention",
    "random",
)


def make_press(name: str, compression_ratio: float, seed: int) -> Any:
    import kvpress

    cr = compression_ratio
    simple = {
        "knorm": kvpress.KnormPress,
        "snapkv": kvpress.SnapKVPress,
        "streaming_llm": kvpress.StreamingLLMPress,
        "keydiff": kvpress.KeyDiffPress,
        "tova": kvpress.TOVAPress,
        "expected_attention": kvpress.ExpectedAttentionPress,
        "kvzip": kvpress.KVzipPress,
    }
    if name in simple:
        return simple[name](compression_ratio=cr)
    if name == "adakv_expected_attention":
        return kvpress.AdaKVPress(press=kvpress.ExpectedAttentionPress(compression_ratio=cr))
    if name == "random":
        return kvpress.RandomPress(compression_ratio=cr, seed=seed)
    raise SystemExit(f"unknown press {name!r}; choose from {', '.join(PRESSES)}")


def pack(mask: np.ndarray) -> str:
    return base64.b64encode(np.packbits(mask.astype(np.uint8)).tobytes()).decode("ascii")


class KeptRecorder:
    """Wraps a press's `compress` to find, per layer and KV head, which rows it kept."""

    def __init__(self, n_layers: int) -> None:
        self.kept: list[np.ndarray | None] = [None] * n_layers

    def wrap(self, press: Any) -> None:
        original = press.compress

        def compress(module: Any, hidden_states: Any, keys: Any, values: Any, attentions: Any, kwargs: Any) -> Any:
            out_k, out_v = original(module, hidden_states, keys, values, attentions, kwargs)
            self.kept[int(module.layer_idx)] = _match_rows(keys, out_k)
            return out_k, out_v

        press.compress = compress

    def finish(self, model: Any, n_ctx: int) -> list[np.ndarray]:
        """Kept masks `[kv_heads, n_ctx]` per layer, masked rows (AdaKV, KVzip) removed."""
        out = []
        n_kv = model.config.num_key_value_heads
        for i, layer in enumerate(model.model.layers):
            kept = self.kept[i]
            if kept is None:
                kept = np.ones((n_kv, n_ctx), bool)
            masked = getattr(layer.self_attn, "masked_key_indices", None)
            if masked is not None:
                _, heads, seqs = (t.cpu().numpy() for t in masked)
                # masked indices name positions of the (unpruned) cache rows
                kept = kept.copy()
                kept[heads, seqs] = False
            out.append(kept)
        return out


def _match_rows(before: torch.Tensor, after: torch.Tensor) -> np.ndarray:
    """`[kv_heads, n_before]` mask of the rows of `before` found (bit for bit) in `after`."""
    b = before[0].detach().contiguous().numpy()
    a = after[0].detach().contiguous().numpy()
    mask = np.zeros(b.shape[:2], bool)
    for h in range(b.shape[0]):
        index = {b[h, i].tobytes(): i for i in range(b.shape[1])}
        for row in a[h]:
            i = index.get(row.tobytes())
            if i is None:
                raise RuntimeError("a kept key row matches no row of the cache before compression")
            mask[h, i] = True
    return mask


def _greedy(model: Any, cache: Any, rest: list[int], n_steps: int, eos: set[int], start: int) -> list[int]:
    """kvpress's `generate_answer`: RoPE positions continue after the context (position_ids),
    whatever number of rows the compressed cache holds."""
    pos = torch.arange(start, start + len(rest)).unsqueeze(0)
    out = model(input_ids=torch.tensor([rest]), past_key_values=cache, position_ids=pos)
    pos = pos[:, -1:] + 1
    generated: list[int] = []
    for _ in range(n_steps):
        token = int(out.logits[0, -1].argmax())
        generated.append(token)
        if token in eos or len(generated) == n_steps:
            break
        out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, position_ids=pos)
        pos = pos + 1
    return generated


def prefill_recorded(model: Any, ctx: list[int]) -> tuple[Any, dict[int, tuple[dict[str, Any], Any]]]:
    """Prefill without a press, keeping each attention layer's hook arguments (kwargs, output)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    records: dict[int, tuple[dict[str, Any], Any]] = {}

    def hook(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        records[int(module.layer_idx)] = (dict(kwargs), output)

    handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
    try:
        model.model(input_ids=torch.tensor([ctx]), past_key_values=cache)
    finally:
        for h in handles:
            h.remove()
    return cache, records


def apply_press(model: Any, press: Any, full: Any, records: dict[int, tuple[dict[str, Any], Any]]) -> Any:
    """kvpress's own `forward_hook` of `press`, layer by layer, on a copy of the full cache.

    Equivalent to prefilling inside `with press(model):`: the hook runs after a
    layer's attention, so a layer's compression never changes what later layers
    see during the prefill; only the cache it leaves behind differs.
    """
    cache = copy.deepcopy(full)
    press.post_init_from_model(model)
    for layer in model.model.layers:
        layer.self_attn.rotary_emb = model.model.rotary_emb
    for layer in model.model.layers:
        kwargs, output = records[int(layer.self_attn.layer_idx)]
        press.forward_hook(layer.self_attn, [], {**kwargs, "past_key_values": cache}, output)
    return cache


def _clear_masks(model: Any) -> None:
    for layer in model.model.layers:  # a masking press leaves its indices on the module
        layer.self_attn.masked_key_indices = None


def _record(ep: dict[str, Any], mode: str, press: str, keep: float, gen: list[int], masks: Any, t0: float) -> dict:
    return {
        "episode": ep["id"],
        "mode": mode,
        "press": press,
        "keep": keep,
        "n_ctx": int(ep["n_ctx"][mode]),
        "generated": gen,
        "kept": None if masks is None else [[pack(h) for h in layer] for layer in masks],
        "seconds": round(time.perf_counter() - t0, 3),
    }


def run_episode(
    model: Any, ep: dict[str, Any], mode: str, presses: list[str], ratios: list[float], skip: set[tuple[str, float]]
) -> list[dict[str, Any]]:
    """Every (press, keep) of one episode and mode not in `skip`: full cache first, kvzip last."""
    prompt = ep["prompt_ids"]
    n_ctx = int(ep["n_ctx"][mode])
    eos = set(ep["eos_ids"])
    n_steps = len(ep["answer_ids"]) + EXTRA_DECODE_TOKENS
    out = []
    t0 = time.perf_counter()
    with torch.no_grad():
        full, records = prefill_recorded(model, prompt[:n_ctx])
        if ("full", 1.0) not in skip:
            gen = _greedy(model, copy.deepcopy(full), prompt[n_ctx:], n_steps, eos, n_ctx)
            out.append(_record(ep, mode, "full", 1.0, gen, None, t0))
        for name in presses:
            if name == "kvzip":
                continue
            for keep in ratios:
                if (name, keep) in skip:
                    continue
                t0 = time.perf_counter()
                press = make_press(name, 1.0 - keep, seed=int(ep["seed"]))
                rec = KeptRecorder(model.config.num_hidden_layers)
                rec.wrap(press)
                _clear_masks(model)
                cache = apply_press(model, press, full, records)
                masks = rec.finish(model, n_ctx)
                gen = _greedy(model, cache, prompt[n_ctx:], n_steps, eos, n_ctx)
                _clear_masks(model)
                out.append(_record(ep, mode, name, keep, gen, masks, t0))
        todo = [k for k in ratios if ("kvzip", k) not in skip]
        if "kvzip" in presses and todo:
            out += run_kvzip(model, ep, mode, todo)
    return out


@torch.no_grad()
def run_kvzip(model: Any, ep: dict[str, Any], mode: str, ratios: list[float]) -> list[dict[str, Any]]:
    """KVzipPress through its own context manager (prefill + context reconstruction) at the
    first ratio; its scores (`score_val`, ratio-independent) then serve the other ratios
    through its own `compress_post`."""
    import kvpress
    from transformers import DynamicCache

    prompt = ep["prompt_ids"]
    n_ctx = int(ep["n_ctx"][mode])
    eos = set(ep["eos_ids"])
    n_steps = len(ep["answer_ids"]) + EXTRA_DECODE_TOKENS
    t0 = time.perf_counter()
    press = kvpress.KVzipPress(compression_ratio=1.0 - ratios[0])
    stash: dict[str, torch.Tensor] = {}
    original = press.compress_post

    def compress_post(model_: Any) -> None:
        stash["score"] = press.score_val.clone()
        original(model_)

    press.compress_post = compress_post  # type: ignore[method-assign]
    cache = DynamicCache(config=model.config)
    _clear_masks(model)
    with press(model):
        model.model(input_ids=torch.tensor([prompt[:n_ctx]]), past_key_values=cache)
    out = []
    for i, keep in enumerate(ratios):
        if i > 0:
            t0 = time.perf_counter()
            again = kvpress.KVzipPress(compression_ratio=1.0 - keep)
            again.score_val = stash["score"].clone()
            again.compress_post(model)
        masks = KeptRecorder(model.config.num_hidden_layers).finish(model, n_ctx)
        gen = _greedy(model, copy.deepcopy(cache), prompt[n_ctx:], n_steps, eos, n_ctx)
        out.append(_record(ep, mode, "kvzip", keep, gen, masks, t0))
        _clear_masks(model)
    return out


def _cache_kvzip_tokenizer() -> None:
    """KVzipPress loads the tokenizer from disk on every use; load it once (same object, same ids)."""
    import functools

    from kvpress.presses import kvzip_press
    from transformers import AutoTokenizer

    class _Cached:
        from_pretrained = staticmethod(functools.lru_cache(maxsize=4)(AutoTokenizer.from_pretrained))

    kvzip_press.AutoTokenizer = _Cached  # type: ignore[attr-defined]


def load_model(folder: str) -> Any:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("episodes")
    p.add_argument("out")
    p.add_argument("--presses", nargs="+", default=list(PRESSES))
    p.add_argument("--ratios", nargs="+", type=float, default=[0.75, 0.5, 0.25])
    p.add_argument("--modes", nargs="+", default=["context", "question"])
    p.add_argument("--max-episodes", type=int, default=None, help="per (context, depth) cell")
    p.add_argument("--masks-for", type=int, default=10, help="record kept masks for episodes with index < N")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shard", default="0/1", help="i/n: run the episodes whose index %% n == i")
    p.add_argument("--also-done", nargs="*", default=[], help="more output files whose runs count as done")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    data = json.loads(Path(a.episodes).read_text())
    model = load_model(data["model"])
    _cache_kvzip_tokenizer()
    done = set()
    out_path = Path(a.out)
    for path in [out_path, *map(Path, a.also_done)]:
        if path.exists():
            for line in path.read_text().splitlines():
                r = json.loads(line)
                done.add((r["episode"], r["mode"], r["press"], r["keep"]))
    i, n = (int(x) for x in a.shard.split("/"))
    episodes = [
        e for e in data["episodes"] if (a.max_episodes is None or e["index"] < a.max_episodes) and e["index"] % n == i
    ]
    with out_path.open("a") as f:
        for ep in episodes:
            for mode in a.modes:
                skip = {(p, k) for (e, m, p, k) in done if e == ep["id"] and m == mode}
                for r in run_episode(model, ep, mode, a.presses, a.ratios, skip):
                    if ep["index"] >= a.masks_for:
                        r["kept"] = None
                    f.write(json.dumps(r) + "\n")
                f.flush()
            print(f"kvpress_runner: episode {ep['id']} done", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sys.exit(main())

"""Turn benchmark rows into a markdown report and a PNG plot.

matplotlib is optional and imported lazily (Agg backend, no window): without
it the report is written without the plot and says so.
"""

from __future__ import annotations

import math
from pathlib import Path

from kvscope.lab.compression_bench import BenchConfig, Row
from kvscope.lab.stats import mcnemar


def _pct(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.0%}"


def _num(x: float, fmt: str) -> str:
    return "—" if math.isnan(x) else format(x, fmt)


def format_table(rows: list[Row], config: BenchConfig) -> str:
    """A markdown table: one row per (policy, keep ratio)."""
    ctx_cols = " | ".join(f"acc {c // 1024}k" if c % 1024 == 0 else f"acc {c}" for c in config.contexts)
    head = (
        f"| policy | keep | fact rows kept | {ctx_cols} | acc, all [95% CI] | acc vs full | answer log-prob | log-prob ratio | next-token KL "
        f"| cache KiB @{max(config.contexts)} | decode tok/s |"
    )
    sep = "|" + "---|" * (head.count("|") - 1)
    lines = [head, sep]
    for r in rows:
        keep = "100%" if r.keep_ratio is None else f"{r.keep_ratio:.1%}".replace(".0%", "%")
        accs = " | ".join(_pct(r.accuracy[c]) for c in config.contexts)
        lines.append(
            f"| {r.label} | {keep} | {_pct(r.fact_kept)} | {accs} | {r.accuracy_ci.fmt()} | {_pct(r.accuracy_ratio)} | {_num(r.answer_logprob, '.2f')} "
            f"| {_num(r.logprob_ratio, '.2f')} | {_num(r.kl, '.4f')} | {r.cache_bytes / 1024:,.0f} "
            f"| {_num(r.decode_tps, '.0f')} |"
        )
    return "\n".join(lines)


LAYERWISE = ("pyramidkv", "dynamickv")  # SnapKV scores with per-layer budgets: compared against snapkv


def paired_comparisons(rows: list[Row]) -> str:
    """At each keep ratio, the two most accurate eviction policies compared on the same episodes.

    Returns markdown: one line per ratio with both accuracies, the McNemar
    discordant counts and p, and which other policies' Wilson intervals
    overlap the leader's (those cannot be told apart from it on this run);
    then each layer-wise policy against uniform SnapKV on the same episodes.
    """
    lines = []
    ratios = sorted({r.keep_ratio for r in rows if r.keep_ratio is not None}, reverse=True)
    for ratio in ratios:
        at = sorted(
            (r for r in rows if r.keep_ratio == ratio and "+" not in r.label),
            key=lambda r: r.accuracy_ci.value,
            reverse=True,
        )
        if len(at) < 2:
            continue
        a, b = at[0], at[1]
        test = mcnemar(a.correct, b.correct)
        tied = [r.label for r in at[1:] if r.accuracy_ci.hi >= a.accuracy_ci.lo]
        verdict = "different" if test.p_value < 0.05 else "not separable"
        lines.append(
            f"- keep {ratio:.1%}: **{a.label}** {a.accuracy_ci.fmt()} vs **{b.label}** {b.accuracy_ci.fmt()}, "
            f"McNemar {test.fmt()} ({verdict}); intervals overlapping the leader's: {', '.join(tied) or 'none'}."
        )
        uniform = next((r for r in at if r.label == "snapkv"), None)
        for layered in (r for r in at if r.label in LAYERWISE and uniform is not None):
            assert uniform is not None
            t = mcnemar(layered.correct, uniform.correct)
            lines.append(
                f"  - layer-wise vs uniform at equal bytes: **{layered.label}** {layered.accuracy_ci.fmt()} vs "
                f"snapkv {uniform.accuracy_ci.fmt()}, McNemar {t.fmt()}."
            )
    return "\n".join(lines)


def headline(rows: list[Row], ratio: float = 0.5) -> str:
    """One sentence: best and random policy at `ratio`, against the full cache.

    Ranked by accuracy share, then answer log-prob; when the full cache
    recalls nothing, accuracy shares are undefined and log-probs decide.
    """
    at = [r for r in rows if r.keep_ratio == ratio and "+" not in r.label]
    full = next((r for r in rows if r.label == "full cache"), None)
    if not at or full is None:
        return ""
    rnd = next((r for r in at if r.label == "random"), None)
    keeper = max(at, key=lambda r: r.fact_kept)
    needle = f"At {ratio:.0%}, **{keeper.label}** keeps the most of the fact's rows ({_pct(keeper.fact_kept)})"
    needle += f", random {_pct(rnd.fact_kept)}. " if rnd is not None else ". "
    return needle + _accuracy_sentence(at, full, rnd, ratio)


def _accuracy_sentence(at: list[Row], full: Row, rnd: Row | None, ratio: float) -> str:
    if full.accuracy_all > 0:
        best = max(at, key=lambda r: (r.accuracy_ratio, r.answer_logprob))
        text = (
            f"At {ratio:.0%} of the rows the best policy, **{best.label}**, keeps "
            f"{_pct(best.accuracy_ratio)} of full-cache recall accuracy ({_pct(best.accuracy_all)} vs "
            f"{_pct(full.accuracy_all)})"
        )
        if rnd is not None:
            text += f"; **random** keeps {_pct(rnd.accuracy_ratio)}"
        return text + "."
    best = max(at, key=lambda r: r.answer_logprob)
    text = (
        f"The full cache recalls none of these episodes, so accuracy ratios are undefined. By answer "
        f"log-prob at {ratio:.0%} of the rows, the answer is most likely under **{best.label}** "
        f"({best.answer_logprob:.2f}; full cache {full.answer_logprob:.2f})"
    )
    if rnd is not None:
        text += f"; **random** gets {rnd.answer_logprob:.2f}"
    return text + "."


def plot(tables: dict[str, list[Row]], path: Path) -> bool:
    """Accuracy and answer log-prob vs keep ratio, one column per mode. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, len(tables), figsize=(6.5 * len(tables), 8.4), squeeze=False)
    for col, (mode, rows) in enumerate(tables.items()):
        full = next(r for r in rows if r.label == "full cache")
        labels = dict.fromkeys(r.label for r in rows if r.keep_ratio is not None)
        for ax, metric, name, scale in (
            (axes[0][col], "accuracy_all", "recall accuracy (%)", 100.0),
            (axes[1][col], "answer_logprob", "answer log-prob (mean)", 1.0),
        ):
            for label in labels:
                pts = sorted((r.keep_ratio, r) for r in rows if r.label == label and r.keep_ratio)
                xs = [100 * x for x, _ in pts]
                ys = [scale * getattr(r, metric) for _, r in pts]
                style = "--" if label == "random" else ("-." if "+" in label else "-")
                if metric == "accuracy_all":  # Wilson 95% intervals
                    # clamped at 0: at 100% the interval's top is 1 up to rounding
                    err = [[max(0.0, y - scale * r.accuracy_ci.lo) for y, (_, r) in zip(ys, pts)]]
                    err.append([max(0.0, scale * r.accuracy_ci.hi - y) for y, (_, r) in zip(ys, pts)])
                    ax.errorbar(xs, ys, yerr=err, fmt=style, marker="o", capsize=2, label=label)
                else:
                    ax.plot(xs, ys, style, marker="o", label=label)
            ax.axhline(scale * getattr(full, metric), color="black", lw=1, label="full cache")
            ax.set_xscale("log", base=2)
            ax.set_xticks([12.5, 25, 50, 75, 100], ["12.5", "25", "50", "75", "100"])
            ax.set_xlabel("rows kept (%)")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
        axes[0][col].set_ylim(-3, 103)
        axes[0][col].set_title(f"{mode} mode")
    axes[1][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


INTRO = """# Compression policies: what the model still recalls

`kvscope bench compression` measures every policy in `kvscope.engine.policies`
on held-out recall episodes (`kvscope.engine.tasks`, kind `recall`): a fact
such as *The phone extension of Maya is 017.* hides at a given depth among
distractor facts and filler; the question comes as its own user turn.

How one episode runs (`lab/compression_bench.py`): the context is prefilled
once into kvscope caches; every policy and keep ratio then works on a copy:
score the visible rows, evict (`ScopeKVCache.evict_tokens`: positions stay, so
generation continues at the right RoPE positions), optionally quantize, feed
the rest of the prompt, teacher-force the answer for its log-prob and
greedy-decode it. The full cache runs through the same code.

- **context mode** (query-agnostic): the chat *before* the question turn is
  compressed, then the question is fed. No policy can know what will be asked.
- **question mode** (query-aware): the whole prompt but its last token is
  compressed, so the observation window of SnapKV, PyramidKV and DynamicKV
  holds the question (SnapKV's own setting).

Columns: *acc, all* = accuracy over every episode of the run with its Wilson
95% interval (n in the run line); the paired comparisons under each table test
the two most accurate policies at each keep ratio with an exact McNemar test
on the same episodes. *fact rows kept* = share of the fact's token rows (the needle) still
in the cache after compression, averaged over layers and episodes — a property
of the policy alone, whatever the model makes of it; accuracy = exact match of the greedy answer; *acc vs full* = accuracy
as a share of the full cache's; *answer log-prob* = teacher-forced sum over the
answer tokens (mean over episodes); *log-prob ratio* = policy / full (1 = same,
above 1 = the answer became less likely); *next-token KL* = KL(full ‖ policy)
of the first answer token's distribution; *cache KiB* = stored K/V bytes at the
longest context (quantized rows counted as they would be stored: packed values
plus a scale and a bias per group of 64); *decode tok/s* = greedy steps on the
compressed cache (small answers, so noisy; the machine was shared).
"""

POLICY_NOTES = """## Policies (defaults)

| name | keeps | parameters |
|---|---|---|
| `streaming_llm` | attention sinks + the most recent rows | `sinks=4` |
| `h2o` | mean attention each row received from all queries of the context (recomputed while deciding), plus a recent window | `recent_fraction=0.5`, `window=None` (all queries) |
| `snapkv` | attention of the last `window` queries, mean-pooled over `kernel` rows; the window is always kept | `window=32`, `kernel=5` |
| `key_norm` | keys with the lowest L2 norm (per KV head, averaged) | `sinks=0`, `recent=0` |
| `random` | uniform random rows (seeded) — the baseline | `seed` |
| `keydiff` | keys least like the layer's mean key direction, per KV head (query-agnostic) | `sinks=0`, `recent=0` |
| `tova` | attention of the last query, averaged over heads | `sinks=0`, `recent=1` |
| `expected_attention` | attention future queries are expected to pay (mean and covariance of the context's queries, RoPE averaged over the next `future` positions), times the value norm; sinks kept (kvpress `ExpectedAttentionPress`) | `sinks=4`, `future=512` |
| `kvzip` | max attention from a context-reconstruction pass ("Repeat the previous context exactly." + the context again); one budget over all layers and KV heads, so each head keeps its own rows (kvpress `KVzipPress`) | `sinks=4`, `chunk=2048`, `layerwise=False` |
| `pyramidkv` | SnapKV scores; a fixed pyramid of per-layer budgets (layer 0 keeps most) with the same total | `beta=20` |
| `dynamickv` | SnapKV scores; per-layer budgets proportional to the rows each layer needs to cover `mass` of its attention on this input | `mass=0.9` |
| `quantize` | every row, K/V quantized to 8 or 4 bits (mlx affine, group 64), dequantized in place | `bits` |

Any eviction policy also takes `quant_bits=8|4` to quantize what it keeps
(the `snapkv + 4-bit` rows). Eviction is per layer; per-head scores are
recorded in the decision (`head_scores`) but `ScopeKVCache` stores rows per
layer, so every head of a layer keeps the same rows.
"""


def write_report(
    tables: dict[str, list[Row]],
    config: BenchConfig,
    model: str,
    seconds: float,
    md_path: Path,
    png_path: Path,
    command: str,
) -> bool:
    """Write the markdown report (and the PNG next to it); returns whether the plot was drawn."""
    drawn = plot(tables, png_path)
    n = len(config.depths) * config.n_per_cell
    parts = [
        INTRO,
        f"Run: `{command}` — model `{model}`, {config.kind} episodes, contexts {', '.join(map(str, config.contexts))} tokens, "
        f"fact depths {', '.join(f'{d:g}' for d in config.depths)}, {n} episodes per context "
        f"({config.n_per_cell} per depth, seed {config.seed}), so n = {n * len(config.contexts)} episodes behind "
        f"every accuracy interval; {seconds:.0f} s in all.\n",
    ]
    if drawn:
        parts.append(f"![recall accuracy vs rows kept]({png_path.name})\n")
    else:
        parts.append("(matplotlib is not installed: no plot; `pip install matplotlib` and re-run.)\n")
    for mode, rows in tables.items():
        parts += [f"## {mode} mode\n", headline(rows) + "\n", format_table(rows, config) + "\n"]
        parts += ["Paired comparisons (the same episodes under both policies):\n", paired_comparisons(rows) + "\n"]
    parts.append(POLICY_NOTES)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(parts), encoding="utf-8")
    return drawn

"""The experiments' results as markdown tables (n and 95% intervals in every row) and PNG plots.

The CLI prints these tables and docs/experiments.md quotes them, so both
show the same numbers. matplotlib is optional and imported lazily (Agg, no
window): `plot_*` return False without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvscope.lab.experiments import Tally
from kvscope.lab.kv_patching import SITES, PatchResult
from kvscope.lab.leakage import CONDITIONS, LeakResult


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def leakage_behaviour_table(result: LeakResult) -> str:
    """Compact vs restart vs full cache: exact answers, digits predicted, answer log-prob."""
    rows = [
        [r.condition, str(r.exact.n), r.exact.fmt(), r.digits.fmt(), r.logprob.fmt(pct=False, digits=2)]
        for r in result.behaviour()
    ]
    table = _table(
        ["strategy", "n", "exact answer [Wilson 95%]", "digits predicted [bootstrap 95%]", "answer log-prob"], rows
    )
    paired = "\n".join(f"- {k}: {v}" for k, v in result.paired().items())
    return f"{table}\n\nPaired, compact vs restart on the same episodes:\n{paired}"


def leakage_probe_table(result: LeakResult) -> str:
    """Held-out digit accuracy of the linear probe per condition, site and layer (chance 10%)."""
    probe = result.probe()
    head = ["probe on", "layer"] + [f"{c} [95%]" for c in CONDITIONS] + ["restart, shuffled labels"]
    rows = []
    for site in ("kv", "hidden"):
        for layer in range(result.n_layers):
            cells = {p.condition: p for p in probe if p.site == site and p.layer == layer}
            label = "cached K/V" if site == "kv" else "hidden state after the layer"
            rows.append(
                [label, str(layer)] + [cells[c].accuracy.fmt() for c in CONDITIONS] + [cells["restart"].shuffled.fmt()]
            )
    n = len(result.outcomes)
    return f"{_table(head, rows)}\n\nn = {n} episodes; the number's first digit; chance = 10%; 5-fold held-out ridge probe."


def patching_table(result: PatchResult) -> str:
    """Share of the logit difference each patch recovers, and how often the decision flips."""
    rows = [[r.condition, str(r.share.n), r.share.fmt(), r.picks_new.fmt(), f"{r.mean_ld:+.2f}"] for r in result.rows()]
    head = ["condition", "n", "share of LD recovered [bootstrap 95%]", "states the new value [Wilson 95%]", "mean LD"]
    tests = [
        ("erratum", "field, all layers"),
        ("erratum", "recompute (counterfactual)"),
        ("field, all layers", "downstream, all layers"),
    ]
    paired = "\n".join(f"- {a} vs {b}: McNemar {result.paired(a, b)}" for a, b in tests)
    note = (
        f"LD = log p(new value) - log p(old value) at the value the reply states; {result.skipped} episodes "
        "skipped (no opposite value with the same token count)."
    )
    return f"{_table(head, rows)}\n\n{note}\n\nPaired (states the new value):\n{paired}"


def tally_table(tallies: list[Tally]) -> str:
    """Accuracy with Wilson intervals, TTFT and prefill per strategy; McNemar of each against the first."""
    rows = [
        [t.name, str(t.n), t.accuracy_ci.fmt(), f"{t.median_ttft_ms:.1f}", f"{t.mean_prefilled:.1f}"] for t in tallies
    ]
    table = _table(["strategy", "n", "accuracy [Wilson 95%]", "median TTFT ms", "prefilled tokens"], rows)
    if len(tallies) < 3:
        return table
    a, b = tallies[1], tallies[2]
    return f"{table}\n\nPaired: {a.name} vs {b.name}, McNemar {a.versus(b).fmt()}"


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_leakage(result: LeakResult, path: Path) -> bool:
    """Probe accuracy per layer with 95% intervals, one line per condition, K/V and hidden side by side."""
    plt = _pyplot()
    if plt is None:
        return False
    probe = result.probe()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, site, title in ((axes[0], "kv", "cached K/V of turn n+1"), (axes[1], "hidden", "hidden state of turn n+1")):
        for cond in CONDITIONS:
            pts = sorted((p.layer, p.accuracy) for p in probe if p.site == site and p.condition == cond)
            xs = [x for x, _ in pts]
            ys = [100 * e.value for _, e in pts]
            err = [[100 * (e.value - e.lo) for _, e in pts], [100 * (e.hi - e.value) for _, e in pts]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=cond)
        ax.axhline(10, color="black", lw=1, ls="--", label="chance")
        ax.set_xticks(range(result.n_layers))
        ax.set_xlabel("layer")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out digit accuracy (%)")
    axes[1].legend(fontsize=8)
    return _save(plt, fig, path)


def plot_patching(result: PatchResult, path: Path) -> bool:
    """Share of the logit difference recovered per layer and site, with bootstrap intervals."""
    plt = _pyplot()
    if plt is None:
        return False
    rows = {r.condition: r for r in result.rows()}
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.25
    labels = [f"layer {i}" for i in range(result.n_layers)] + ["all layers"]
    for k, site in enumerate(SITES):
        ests = [rows[f"{site}, {lab}"].share for lab in labels]
        xs = [i + (k - 1) * width for i in range(len(labels))]
        err = [[100 * (e.value - e.lo) for e in ests], [100 * (e.hi - e.value) for e in ests]]
        ax.bar(xs, [100 * e.value for e in ests], width, yerr=err, capsize=3, label=f"patch {site}")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("share of logit difference recovered (%)")
    ax.axhline(100, color="black", lw=1)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: Path) -> bool:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True

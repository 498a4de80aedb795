"""Draw the demo model's training curve (docs/demo-model-training.png).

Reads <model>/training_log.jsonl written by tools/train_demo_model.py. Needs
matplotlib, which is a docs-only tool here (`pip install matplotlib`), never a
runtime dependency.

    python tools/plot_demo_training.py [--log PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def smooth(values: list[float], k: int = 25) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc = v if i == 0 else acc + (v - acc) / min(i + 1, k)
        out.append(acc)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--log", type=Path, default=REPO / "assets/models/kvscope-demo/training_log.jsonl")
    ap.add_argument("--out", type=Path, default=REPO / "docs/demo-model-training.png")
    ap.add_argument("--phases", default="", help="steps where a --resume phase began, comma-separated")
    ap.add_argument("--probe-n", default="16", help="episodes per probe cell (the trainer's --probe-n), e.g. 16-24")
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in args.log.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss_answer" in r]
    evals = [r for r in rows if any(k.startswith("heldout_") for k in r)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    # Drill-only steps log 0 for the chat losses, chat-only steps 0 for the drill.
    for key, label in (
        ("loss_answer", "chat answers"),
        ("loss_context", "other chat tokens"),
        ("loss_drill", "copy drills"),
    ):
        pts = [(r["t"] / 60, r[key]) for r in train if r.get(key, 0.0) > 0.0]
        if pts:
            ax1.plot([t for t, _ in pts], smooth([v for _, v in pts]), label=label)
    ax1.set(xlabel="wall time (min, CPU)", ylabel="cross-entropy (smoothed)", title="Training loss", yscale="log")
    ax1.legend()
    keys = sorted({k for r in evals for k in r if k.startswith("heldout_")})
    for key in keys:
        pts = [(r["t"] / 60, r[key]) for r in evals if key in r]
        ax2.plot(*zip(*pts), marker="o", ms=3, label=key.removeprefix("heldout_"))
    starts = {int(x) for x in args.phases.split(",") if x}
    for r in train:
        if r["step"] in starts:
            for ax in (ax1, ax2):
                ax.axvline(r["t"] / 60, color="grey", ls="--", lw=0.8)
    ax2.set(
        xlabel="wall time (min)",
        ylabel="exact match",
        ylim=(-0.02, 1.02),
        title=f"Held-out probe ({args.probe_n} episodes a cell, depth 0.5)",
    )
    ax2.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

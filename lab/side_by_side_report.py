"""The side-by-side report: kvscope's presses against kvpress's own, from the runs' JSON lines.

Promises:
- both sides are graded by one function (the greedy text up to end-of-turn
  equals the expected reply, `kvscope.engine.tasks.scoring`), on the same
  episode ids;
- accuracy comes with its Wilson 95% interval and n; "vs full" is the paired
  ratio sum(correct) / sum(correct of the full cache) over the same
  episodes, with a percentile bootstrap interval;
- kept-row agreement is the Jaccard index |A ∩ B| / |A ∪ B| of the rows each
  side keeps, per layer and KV head, on the same input (episodes whose masks
  were recorded), reported as the mean and the minimum over episodes and heads;
- `render` returns markdown; `write_section` puts it between fixed markers in
  a file, replacing an earlier version and leaving the rest untouched.

Knows nothing about models or caches.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvscope.lab.side_by_side import PAIRS, unpack
from kvscope.lab.stats import Estimate, accuracy, bootstrap_ratio, mcnemar

START = "<!-- kvpress-side-by-side:start -->"
END = "<!-- kvpress-side-by-side:end -->"
Key = tuple[str, str, float]  # mode, press, keep


@dataclass
class Runs:
    """Graded records of both sides: side -> (mode, press, keep) -> episode id -> record."""

    correct: dict[str, dict[Key, dict[str, bool]]] = field(default_factory=dict)
    records: dict[str, dict[Key, dict[str, dict[str, Any]]]] = field(default_factory=dict)
    # kvscope records timed beside the full cache in their own run (every file, repeats included)
    timed: dict[Key, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))


def load_runs(work: Path, tokenizer: Any, episodes_path: Path) -> Runs:
    """Every `kvpress-*.jsonl` and `kvscope-*.jsonl` in `work`, graded (first record of a key wins)."""
    from kvscope.engine.tasks.scoring import generated_text

    answers = {e["id"]: e["answer"] for e in json.loads(episodes_path.read_text())["episodes"]}
    runs = Runs()
    for side in ("kvpress", "kvscope"):
        runs.correct[side] = defaultdict(dict)
        runs.records[side] = defaultdict(dict)
        for path in sorted(work.glob(f"{side}-*.jsonl")):
            for line in path.read_text().splitlines():
                r = json.loads(line)
                if r["episode"] not in answers:
                    continue
                key = (r["mode"], r["press"], float(r["keep"]))
                r["_file"] = path.name
                if "baseline_s" in r:
                    runs.timed[key].append(r)
                if r["episode"] in runs.records[side][key]:
                    continue
                runs.records[side][key][r["episode"]] = r
                runs.correct[side][key][r["episode"]] = (
                    generated_text(tokenizer, r["generated"]) == answers[r["episode"]]
                )
    return runs


def jaccard(a: list[list[str]], b: list[list[str]], n: int) -> np.ndarray:
    """`[layers, heads]` Jaccard of two records' kept masks."""
    out = np.zeros((len(a), len(a[0])))
    for i, (la, lb) in enumerate(zip(a, b)):
        for h, (ha, hb) in enumerate(zip(la, lb)):
            x, y = unpack(ha, n), unpack(hb, n)
            union = int((x | y).sum())
            out[i, h] = (x & y).sum() / union if union else 1.0
    return out


def _acc(correct: dict[str, bool]) -> Estimate:
    return accuracy(list(correct.values()))


def _vs_full(correct: dict[str, bool], full: dict[str, bool]) -> Estimate:
    ids = [e for e in correct if e in full]
    return bootstrap_ratio([float(correct[e]) for e in ids], [float(full[e]) for e in ids])


def _decode_ratio(
    timed: list[dict[str, Any]], recs: dict[str, dict[str, Any]], full: dict[str, dict[str, Any]]
) -> float:
    """Decode tok/s on the compressed cache ÷ the full cache's, timed in the same run: from each
    record's own baseline where records have one; else (older records) only pairs from one file."""
    if timed:  # (steps, seconds) on the compressed cache and on the full cache, per record
        runs = [(r["decode_steps"], r["decode_s"], r["baseline_steps"], r["baseline_s"]) for r in timed]
    else:
        ids = [e for e in recs if e in full and recs[e]["_file"] == full[e]["_file"]]
        runs = [
            (recs[e].get("decode_steps", 0), recs[e].get("decode_s", 0.0), full[e].get("decode_steps", 0),
             full[e].get("decode_s", 0.0))
            for e in ids
        ]  # fmt: skip
    steps, secs, f_steps, f_secs = (sum(col) for col in zip(*runs)) if runs else (0, 0.0, 0, 0.0)
    return (steps / secs) / (f_steps / f_secs) if secs and f_secs and f_steps else math.nan


def _freed(recs: dict[str, dict[str, Any]], full: dict[str, dict[str, Any]]) -> float:
    ids = [e for e in recs if e in full and "cache_bytes" in recs[e]]
    if not ids:
        return math.nan
    return 1.0 - sum(recs[e]["cache_bytes"] for e in ids) / sum(full[e]["cache_bytes"] for e in ids)


def _fmt(e: Estimate | None) -> str:
    return "—" if e is None or e.n == 0 else f"{e.fmt()} ({e.n})"


def _pct(x: float) -> str:
    return "—" if math.isnan(x) else f"{100 * x:.0f}%"


def _jaccard_cells(runs: Runs, key: Key) -> tuple[str, str, int]:
    a = runs.records["kvscope"].get(key, {})
    b = runs.records["kvpress"].get(key, {})
    per = []
    for ep, ra in a.items():
        rb = b.get(ep)
        if rb is None or not ra.get("kept") or not rb.get("kept"):
            continue
        per.append(jaccard(ra["kept"], rb["kept"], int(ra["n_ctx"])))
    if not per:
        return "—", "—", 0
    stack = np.stack(per)  # [episodes, layers, heads]
    layers = " / ".join(f"{x:.3f}" for x in stack.mean(axis=(0, 2)))
    return layers, f"{stack.min():.3f}", len(per)


def _presses(runs: Runs, mode: str) -> list[str]:
    seen = {k[1] for side in runs.records.values() for k in side if k[0] == mode}
    order = [p for p in PAIRS if p in seen] + sorted(seen - set(PAIRS) - {"full"})
    return order


def mode_table(runs: Runs, mode: str) -> str:
    """One row per (press, keep): both sides' accuracy, vs full, agreement, Jaccard, bytes, decode."""
    full_k = {s: runs.correct[s].get((mode, "full", 1.0), {}) for s in runs.correct}
    full_r = runs.records["kvscope"].get((mode, "full", 1.0), {})
    lines = [
        "| press (kvscope policy) | keep | kvpress acc [95% CI] (n) | kvscope acc [95% CI] (n) | kvscope vs full "
        "[95% CI] | same answer | kept-row Jaccard L0 / L1 / L2 (min) | bytes freed | decode tok/s ÷ full |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines.append(
        f"| full cache | 100% | {_fmt(_acc(full_k['kvpress']) if full_k['kvpress'] else None)} | "
        f"{_fmt(_acc(full_k['kvscope']) if full_k['kvscope'] else None)} | 100% | "
        f"{_agreement(runs, (mode, 'full', 1.0))} | — | 0% | 1.00 |"
    )
    for press in _presses(runs, mode):
        if press == "full":
            continue
        keeps = sorted({k[2] for s in runs.records.values() for k in s if k[:2] == (mode, press)}, reverse=True)
        pair = PAIRS.get(press)
        label = f"{press} ({_policy_label(pair)})" if pair else press
        for keep in keeps:
            key = (mode, press, keep)
            kp = runs.correct["kvpress"].get(key)
            ks = runs.correct["kvscope"].get(key)
            ks_recs = runs.records["kvscope"].get(key, {})
            vs = _vs_full(ks, full_k["kvscope"]) if ks else None
            layers, lo, _ = _jaccard_cells(runs, key)
            lines.append(
                f"| {label} | {100 * keep:g}% | {_fmt(_acc(kp) if kp else None)} | {_fmt(_acc(ks) if ks else None)} | "
                f"{vs.fmt() if vs and vs.n else '—'} | {_agreement(runs, key)} | "
                f"{layers + (f' ({lo})' if lo != '—' else '')} | {_pct(_freed(ks_recs, full_r))} | "
                f"{_ratio(_decode_ratio(runs.timed.get(key, []), ks_recs, full_r))} |"
            )
    return "\n".join(lines)


def _ratio(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.2f}"


def _policy_label(pair: Any) -> str:
    extra = {k: v for k, v in pair.params.items() if k != "scorer"}
    inner = pair.params.get("scorer")
    text = f"{pair.policy}({inner})" if inner else pair.policy
    if extra:
        text += " " + ", ".join(f"{k}={v}" for k, v in extra.items())
    return f"`{text}`"


def _agreement(runs: Runs, key: Key) -> str:
    """Share of common episodes where both sides generated exactly the same tokens."""
    a = runs.records["kvscope"].get(key, {})
    b = runs.records["kvpress"].get(key, {})
    ids = [e for e in a if e in b]
    if not ids:
        return "—"
    same = sum(a[e]["generated"] == b[e]["generated"] for e in ids)
    return f"{same}/{len(ids)}"


def best(runs: Runs, side: str, mode: str, keep: float, min_n: int) -> tuple[str, dict[str, bool]] | None:
    """The most accurate press of `side` at `keep` among cells with at least `min_n` episodes."""
    cells = [
        (sum(v.values()) / len(v), p, v)
        for (m, p, k), v in runs.correct[side].items()
        if m == mode and k == keep and p != "full" and len(v) >= min_n
    ]
    if not cells:
        return None
    acc, press, correct = max(cells, key=lambda c: (c[0], len(c[2])))
    return press, correct


def headline(runs: Runs, min_n: int = 100, min_n_kvpress: int = 50) -> str:
    """The issue's targets: best kvscope press (cells of >= `min_n` episodes) vs full, and vs
    kvpress's best (cells of >= `min_n_kvpress`), query-agnostic."""
    mode = "context"
    full = runs.correct["kvscope"].get((mode, "full", 1.0), {})
    full_kp = runs.correct["kvpress"].get((mode, "full", 1.0), {})
    out = []
    for keep, target in ((0.5, 0.95), (0.25, 0.90)):
        ours = best(runs, "kvscope", mode, keep, min_n)
        theirs = best(runs, "kvpress", mode, keep, min_n_kvpress)
        if ours is None:
            out.append(f"- keep {100 * keep:g}%: no kvscope press has {min_n} episodes yet.")
            continue
        press, correct = ours
        vs = _vs_full(correct, full)
        met = "**met**" if vs.value >= target else "**not met**"
        text = (
            f"- keep {100 * keep:g}% (target ≥ {100 * target:g}% of full): kvscope's best, **{press}**, "
            f"{_fmt(_acc(correct))} against the full cache's {_fmt(_acc(full))}: "
            f"{100 * vs.value:.0f}% of full [{100 * vs.lo:.0f}–{100 * vs.hi:.0f}] — {met}"
        )
        if vs.value >= target and vs.lo < target:
            text += f" (the interval's low end, {100 * vs.lo:.0f}%, is below the target)"
        if theirs is not None:
            tp, tc = theirs
            ids = [e for e in correct if e in tc]
            m = mcnemar([correct[e] for e in ids], [tc[e] for e in ids])
            text += (
                f"; kvpress's best, **{tp}**, {_fmt(_acc(tc))} ({100 * _vs_full(tc, full_kp).value:.0f}% of its full "
                f"cache); paired on {len(ids)} episodes, kvscope's {press} vs kvpress's {tp}: McNemar "
                f"{m.only_a} vs {m.only_b}, p = {m.p_value:.2g}"
            )
            twin = runs.correct["kvscope"].get((mode, tp, keep), {})
            if twin and tp != press:
                text += f"; kvscope's own {tp} (the twin of kvpress's) {_fmt(_acc(twin))}"
        out.append(text + ".")
    return "\n".join(out)


def render(runs: Runs, note: str = "") -> str:
    parts = [START, "## Side by side with NVIDIA kvpress (issue 21)", ""]
    if note:
        parts += [note, ""]
    parts += ["### Targets (query-agnostic, 2,048 tokens)", "", headline(runs), ""]
    for mode in ("context", "question"):
        if not any(k[0] == mode for side in runs.correct.values() for k in side):
            continue
        title = "question not in view (context mode)" if mode == "context" else "question in view (question mode)"
        parts += [f"### {title}", "", mode_table(runs, mode), ""]
    parts.append(END)
    return "\n".join(parts)


def write_section(path: Path, text: str) -> None:
    """Replace the text between the markers in `path` (append the section when absent)."""
    old = path.read_text() if path.exists() else ""
    if START in old and END in old:
        head, rest = old.split(START, 1)
        tail = rest.split(END, 1)[1]
        new = head + text + tail
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new)

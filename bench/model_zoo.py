"""The model zoo: every text architecture module of the installed mlx-lm, as a tiny random model.

For each module of `mlx_lm/models/` that defines a text model, build a tiny
random model (tests/zoo_configs.py), load it through `Engine.load(folder)`,
check greedy chat parity against plain `mlx_lm.stream_generate` (fresh
session, second turn, second session on the same message) and run every
cache operation: exact (checked against a recompute), measured (fidelity
shown) or refused before anything changed. `--bits 4 8` adds quantized
builds (chat parity and every operation, as the float32 build). Prints a table (markdown with --markdown) and a
one-line summary.

    nice -n 10 .venv/bin/python bench/model_zoo.py [--only llama qwen3_next] [--bits 4 8] [--markdown]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from zoo_configs import ZOO  # noqa: E402
from zoo_harness import MLX_LM_DIFFERS, OPERATIONS, SKIP, ArchResult, check_arch  # noqa: E402

import kvscope.engine  # noqa: E402,F401  - BLAS preload before mlx

NOT_MODELS = {
    "activations",
    "base",
    "bitlinear_layers",
    "cache",
    "gated_delta",
    "mla",
    "pipeline",
    "rope_utils",
    "ssm",
    "switch_layers",
    "__init__",
}


def installed_modules() -> list[str]:
    import mlx_lm.models

    folder = Path(mlx_lm.models.__file__).parent
    return sorted(p.stem for p in folder.glob("*.py") if p.stem not in NOT_MODELS)


def _cell(v: str) -> str:
    if v.startswith("refused"):
        return "refused"
    return v.split(":")[0] if v.startswith(("CRASH", "MISMATCH", "CHANGED")) else v


def row(r: ArchResult, markdown: bool) -> str:
    parity = (
        "/".join("ok" if r.parity.get(k) else "X" for k in ("turn 1", "turn 2", "new session")) if r.parity else "-"
    )
    if r.parity and not all(r.parity.values()) and r.arch in MLX_LM_DIFFERS:
        parity += f" (mlx-lm differs: {MLX_LM_DIFFERS[r.arch]})"
    cells = [r.name, r.status if r.status != "ok" else "", r.layout, parity] + [
        _cell(r.ops.get(op, "-")) for op in OPERATIONS
    ]
    if r.status != "ok":
        cells[1] = f"{r.status}: {r.reason[:90]}"
    return "| " + " | ".join(cells) + " |" if markdown else "  ".join(cells)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", help="module names (default: all installed)")
    p.add_argument("--bits", nargs="*", type=int, default=[], help="also check quantized builds (4 8)")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--shard", default="1/1", help="k/n: check every n-th module starting at the k-th (parallel runs)")
    p.add_argument("--no-ops", action="store_true", help="chat parity only")
    p.add_argument("--quantized-only", action="store_true", help="with --bits: skip the float32 build")
    p.add_argument("--one", help=argparse.SUPPRESS)  # the child process of `isolated`
    p.add_argument("--one-bits", type=int, nargs="*", default=[0], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        for bits in args.one_bits:
            r = run_one(args.one, bits, not args.no_ops)
            if r.bits is None and r.status != "ok":
                break
        return
    k, n = (int(x) for x in args.shard.split("/"))
    mods = (args.only or installed_modules())[k - 1 :: n]
    missing = [m for m in mods if m not in ZOO]
    results: list[ArchResult] = []
    header = ["arch", "status", "cache layout", "chat parity (turn1/turn2/new session)", *OPERATIONS]
    print("| " + " | ".join(header) + " |" if args.markdown else "  ".join(header))
    if args.markdown:
        print("|" + "---|" * len(header))
    for m in mods:
        if m in missing and m not in SKIP:
            r = ArchResult(m, status="skipped", reason="no zoo config: add one to tests/zoo_configs.py")
            results.append(r)
            print(row(r, args.markdown), flush=True)
            continue
        builds = ([] if args.quantized_only else [None]) + list(args.bits)
        for r in isolated_builds(m, builds, not args.no_ops):
            results.append(r)
            print(row(r, args.markdown), flush=True)
    summarize(results)


def isolated_builds(arch: str, builds: list[int | None], ops: bool) -> list[ArchResult]:
    """Every build of one module in one child process (one import of mlx and mlx-lm); a build
    the child did not report (it died) is retried alone, so a crash inside mlx is one row."""
    cmd = [sys.executable, __file__, "--one", arch, "--one-bits", *(str(b or 0) for b in builds)]
    proc = subprocess.run(cmd + ([] if ops else ["--no-ops"]), capture_output=True, text=True)
    done = [ArchResult(**json.loads(ln)) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    out = list(done)
    for b in builds[len(done) :]:
        if out and out[0].bits is None and out[0].status != "ok":
            break  # the float32 build did not run: its quantized builds are not tried
        out.append(isolated(arch, b, ops))
    return out


def isolated(arch: str, bits: int | None, ops: bool) -> ArchResult:
    """check_arch in a child process: a crash inside mlx itself (a segfault) is one row, not the end of the sweep."""
    cmd = [sys.executable, __file__, "--one", arch, "--one-bits", str(bits or 0)] + ([] if ops else ["--no-ops"])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        why = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        tail = (proc.stderr.strip().splitlines() or [""])[-1][:200]
        return ArchResult(arch, bits, status="crash", reason=f"the process died ({why}): {tail}")
    return ArchResult(**json.loads(lines[-1]))


def run_one(arch: str, bits: int, ops: bool) -> ArchResult:
    r = check_arch(arch, bits or None, ops=ops)
    print(json.dumps(dataclasses.asdict(r)), flush=True)
    return r


def _op_counts(results: list[ArchResult]) -> str:
    ops = [v for r in results for v in r.ops.values()]
    exact = sum(v.startswith("exact") for v in ops)
    measured = sum(v.startswith("measured") for v in ops)
    refused = sum(v.startswith("refused") for v in ops)
    bad = sum(v.startswith(("CRASH", "MISMATCH", "CHANGED")) for v in ops)
    return f"{exact} exact, {measured} measured, {refused} refused, {bad} crashes or mismatches"


def summarize(results: list[ArchResult]) -> None:
    base = [r for r in results if r.bits is None]
    quant = [r for r in results if r.bits is not None]
    built = [r for r in base if r.status != "skipped"]
    skipped = [r for r in base if r.status == "skipped"]
    crashed = [r for r in results if r.crashes]
    parity = [r for r in built if r.status == "ok" and not r.mismatches]
    qparity = [r for r in quant if r.status == "ok" and not r.mismatches]
    qbuilt = [r for r in quant if r.status != "skipped"]
    print(
        f"\nSUMMARY: {len(base)} modules, {len(built)} built ({len(skipped)} skipped), "
        f"chat parity {len(parity)}/{len(built)}; quantized builds: chat parity {len(qparity)}/{len(qbuilt)} "
        f"({len(quant) - len(qbuilt)} not quantizable); "
        f"operations (float32): {_op_counts(base)}; operations (quantized): {_op_counts(quant)}; "
        f"{len(crashed)} models with a crash"
    )
    for r in skipped + [r for r in quant if r.status == "skipped"]:
        print(f"  skipped {r.name}: {r.reason}")
    for r in results:
        for c in r.crashes:
            print(f"  CRASH {r.name}: {c[:300]}")
        if r.mismatches:
            print(f"  MISMATCH {r.name}: {', '.join(r.mismatches)}")


if __name__ == "__main__":
    main()

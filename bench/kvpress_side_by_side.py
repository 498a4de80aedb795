"""kvscope's presses side by side with NVIDIA kvpress's own, on the same model and episodes.

Not part of the default test run. Steps (each resumable; results live outside
the repository, in --work, default ~/.cache/kvscope/side_by_side):

    python bench/kvpress_side_by_side.py export  --contexts 2048 -n 34      # episodes as token ids
    python bench/kvpress_side_by_side.py kvpress --modes context            # kvpress's presses (torch venv)
    python bench/kvpress_side_by_side.py kvscope --modes context            # kvscope's twins (MLX)
    python bench/kvpress_side_by_side.py report  [--write docs/compression.md]
    python bench/kvpress_side_by_side.py fixture                            # tests/fixtures/kvpress-*.json

`kvpress` makes (or reuses) the venv with `tools/kvpress_env.sh install` and
runs `tools/kvpress_runner.py` in it under `nice -n 10`; `kvscope` runs
`kvscope.lab.side_by_side`. Both append JSON lines (one per episode, mode,
press and keep ratio) and skip what is already there (in any result file of
--work); `--shard i/n` splits the episodes between processes. Every kvscope
record carries the full cache's decode timed in the same run, so the
report's decode ratio never pairs timings from different runs; `kvscope
--timing` runs cells again (on a quiet machine) just for those timings. `report` reads every `kvpress-*.jsonl` and
`kvscope-*.jsonl` in --work and prints (or writes into the docs, between
markers) the accuracy table with Wilson intervals and the kept-row Jaccard.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "assets/models/kvscope-demo"
FIXTURE = ROOT / "tests" / "fixtures" / "kvpress-0.5.5-decisions.json"


def _kvpress_python() -> str:
    env_py = os.environ.get("KVSCOPE_KVPRESS_PYTHON")
    if env_py:
        return env_py
    out = subprocess.run(
        [str(ROOT / "tools" / "kvpress_env.sh"), "install"], check=True, capture_output=True, text=True
    )
    return out.stdout.strip().splitlines()[-1]


def _run_kvpress(episodes: Path, out: Path, args: list[str]) -> None:
    py = _kvpress_python()
    nice = ["nice", "-n", "10"] if os.nice(0) < 10 else []  # already niced: do not stack it
    cmd = [*nice, py, str(ROOT / "tools" / "kvpress_runner.py"), str(episodes), str(out), *args]
    subprocess.run(cmd, check=True, cwd=ROOT)


def _other_runs(work: Path, side: str, out: Path) -> list[Path]:
    """The side's other result files in `work`: their runs count as done, so any shard or tag resumes."""
    return [p for p in sorted(work.glob(f"{side}-*.jsonl")) if p != out]


def cmd_export(a: argparse.Namespace) -> None:
    from kvscope.engine.model_loading import load_model
    from kvscope.lab.side_by_side import export_episodes

    lm = load_model(str(ROOT / MODEL))
    data = export_episodes(lm, str(ROOT / MODEL), a.contexts, a.depths, a.n, a.seed)
    path = a.work / a.episodes
    path.write_text(json.dumps(data))
    print(f"{len(data['episodes'])} episodes -> {path}")


def cmd_kvpress(a: argparse.Namespace) -> None:
    extra = ["--modes", *a.modes, "--ratios", *map(str, a.ratios), "--shard", a.shard, "--presses", *a.presses]
    if a.max_episodes is not None:
        extra += ["--max-episodes", str(a.max_episodes)]
    tag = "-".join(a.modes) + ("" if a.shard == "0/1" else "-" + a.shard.replace("/", "of"))
    out = a.work / f"kvpress-{tag}.jsonl"
    extra += ["--also-done", *map(str, _other_runs(a.work, "kvpress", out))]
    _run_kvpress(a.work / a.episodes, out, extra)


def cmd_kvscope(a: argparse.Namespace) -> None:
    from kvscope.engine.model_loading import load_model
    from kvscope.lab.side_by_side import run_kvscope

    lm = load_model(str(ROOT / MODEL))
    i, n = (int(x) for x in a.shard.split("/"))
    tag = "-".join(a.modes) + ("" if a.shard == "0/1" else "-" + a.shard.replace("/", "of"))
    data = json.loads((a.work / a.episodes).read_text())
    out = a.work / f"kvscope-{tag}{'-timing' if a.timing else ''}.jsonl"
    others = _other_runs(a.work, "kvscope", out)
    run_kvscope(lm, data, out, a.presses, a.ratios, a.modes, a.max_episodes, 10, (i, n), print, others, a.timing)


def cmd_report(a: argparse.Namespace) -> None:
    from kvscope.engine.model_loading import load_model
    from kvscope.lab.side_by_side_report import load_runs, render, write_section

    lm = load_model(str(ROOT / MODEL))
    runs = load_runs(a.work, lm.tokenizer, a.work / a.episodes)
    text = render(runs, a.note)
    if a.write:
        write_section(Path(a.write), text)
        print(f"wrote the side-by-side section of {a.write}")
    else:
        print(text)


def cmd_fixture(a: argparse.Namespace) -> None:
    """One short episode, kvpress's decisions on it at keep 0.5: what the default test suite compares with."""
    import tempfile

    from kvscope.engine.model_loading import load_model
    from kvscope.lab.side_by_side import export_episodes

    lm = load_model(str(ROOT / MODEL))
    data = export_episodes(lm, MODEL, [512], [0.5], 1, 0)
    with tempfile.TemporaryDirectory() as tmp:
        eps, out = Path(tmp) / "episodes.json", Path(tmp) / "kvpress.jsonl"
        eps.write_text(json.dumps(data))
        _run_kvpress(eps, out, ["--modes", "context", "--ratios", "0.5", "--masks-for", "1"])
        records = [json.loads(line) for line in out.read_text().splitlines()]
    for r in records:
        r.pop("seconds", None)
    versions = subprocess.run(
        [
            _kvpress_python(),
            "-c",
            "import kvpress, importlib.metadata as m, torch, transformers;"
            "print(m.version('kvpress'), torch.__version__, transformers.__version__)",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    fixture = {
        "format": "kvscope.kvpress_fixture",
        "kvpress": versions[0],
        "torch": versions[1],
        "transformers": versions[2],
        "episodes": data,
        "records": records,
    }
    FIXTURE.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"{len(records)} kvpress decisions -> {FIXTURE}")


def main(argv: list[str] | None = None) -> int:
    from kvscope.lab.side_by_side import MODES, PAIRS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("export", "kvpress", "kvscope", "report", "fixture"):
        s = sub.add_parser(name)
        s.add_argument("--work", type=Path, default=Path.home() / ".cache" / "kvscope" / "side_by_side")
        s.add_argument("--episodes", default="episodes-2048.json")
        if name == "export":
            s.add_argument("--contexts", nargs="+", type=int, default=[2048])
            s.add_argument("--depths", nargs="+", type=float, default=[0.1, 0.5, 0.9])
            s.add_argument("-n", type=int, default=34, help="episodes per (context, depth)")
            s.add_argument("--seed", type=int, default=0)
        if name in ("kvpress", "kvscope"):
            kvpress_names = [k for k in PAIRS if not k.startswith("kvscope:")]
            s.add_argument("--presses", nargs="+", default=kvpress_names if name == "kvpress" else list(PAIRS))
            s.add_argument("--ratios", nargs="+", type=float, default=[0.75, 0.5, 0.25])
            s.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
            s.add_argument("--max-episodes", type=int, default=None, help="episodes per (context, depth)")
            s.add_argument("--shard", default="0/1", help="i/n: the episodes whose index %% n == i")
            if name == "kvscope":
                s.add_argument(
                    "--timing",
                    action="store_true",
                    help="run everything again into kvscope-*-timing.jsonl (decode speeds on a quiet machine)",
                )
        if name == "report":
            s.add_argument("--write", default=None, help="a markdown file to put the section in")
            s.add_argument("--note", default="", help="a paragraph on how the run was made")
    a = p.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    {
        "export": cmd_export,
        "kvpress": cmd_kvpress,
        "kvscope": cmd_kvscope,
        "report": cmd_report,
        "fixture": cmd_fixture,
    }[a.cmd](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())

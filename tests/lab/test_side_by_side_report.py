"""The side-by-side report's decode column pairs only timings taken in one run.

Result files from different days (a loaded machine, then a quiet one) must not
be divided by each other: a compressed cache timed on a quiet machine against
a full cache timed under load read 16x "faster" before this.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from kvscope.lab.side_by_side_report import _decode_ratio, load_runs


class _Tok:
    eos_token_id = 2

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


def _rec(episode: str, press: str, steps: int, secs: float, **extra: float) -> dict:
    keep = 1.0 if press == "full" else 0.5
    return {"episode": episode, "mode": "context", "press": press, "keep": keep, "generated": [1],
            "decode_steps": steps, "decode_s": secs, **extra}  # fmt: skip


def _write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_decode_ratio_uses_each_runs_own_baseline(tmp_path: Path) -> None:
    episodes = tmp_path / "episodes.json"
    episodes.write_text(json.dumps({"episodes": [{"id": "a", "answer": "1"}, {"id": "b", "answer": "1"}]}))
    _write(tmp_path / "kvscope-loaded.jsonl", [_rec("a", "full", 10, 1.0), _rec("b", "full", 10, 1.0)])
    # later, on a quiet machine: 10x faster for both caches; the press 1.2x the full cache's speed
    _write(tmp_path / "kvscope-quiet.jsonl", [_rec("a", "p", 12, 0.1, baseline_steps=10, baseline_s=0.1)])
    runs = load_runs(tmp_path, _Tok(), episodes)
    key = ("context", "p", 0.5)
    full = runs.records["kvscope"][("context", "full", 1.0)]
    assert math.isclose(_decode_ratio(runs.timed[key], runs.records["kvscope"][key], full), 1.2)
    # without a baseline, records of different files are not paired at all (no 12x from mixed days)
    _write(tmp_path / "kvscope-quiet.jsonl", [_rec("a", "p", 12, 0.1)])
    runs = load_runs(tmp_path, _Tok(), episodes)
    assert not runs.timed[key]
    assert math.isnan(_decode_ratio(runs.timed[key], runs.records["kvscope"][key], full))
    # within one file they are
    _write(tmp_path / "kvscope-loaded.jsonl", [_rec("a", "full", 10, 1.0), _rec("a", "p", 12, 1.0)])
    runs = load_runs(tmp_path, _Tok(), episodes)
    full = runs.records["kvscope"][("context", "full", 1.0)]
    assert math.isclose(_decode_ratio(runs.timed[key], runs.records["kvscope"][key], full), 1.2)

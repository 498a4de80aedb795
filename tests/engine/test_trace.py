"""Traces nest strictly per track, with current, unique track names (what Perfetto requires)."""

from __future__ import annotations

import json
from pathlib import Path

from kvscope.engine import Engine, EngineConfig, SamplingParams
from kvscope.engine.splicing import SpliceOptions
from kvscope.engine.trace import trace_problems


def test_a_multi_session_trace_with_edits_nests(llama_dir: Path, tmp_path: Path) -> None:
    eng = Engine(EngineConfig(block_size=8, prefill_chunk=8))  # several prefill chunks per turn
    eng.load(llama_dir)
    system = "you are a code locker . " * 4
    a, b = eng.new_session("twin", system=system), eng.new_session("twin", system=system)  # one name twice
    for sid in (a, b):
        eng.chat(sid, "what is the code of the red locker ?", SamplingParams(max_tokens=12))
    eng.mask(a, 2, 6)
    eng.splice(b, a, 0, 8, SpliceOptions(seam_repair=2))
    eng.rename_session(a, "renamed")
    for sid in (a, b):
        eng.chat(sid, "and the blue one ?", SamplingParams(max_tokens=12, temperature=0.7, seed=1))
    doc = json.loads(eng.export_trace(tmp_path / "t.json").read_text())
    assert trace_problems(doc) == []
    slices = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert {"turn", "ttft", "decode", "prefill"} <= {e["name"] for e in slices}
    names = {e["args"]["name"] for e in doc["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {f"renamed ({a})", f"twin ({b})"} <= names  # the current name, told apart by the id
    # every decode step lies inside its session's turn
    for sid_tid in {e["tid"] for e in slices}:
        turns = [(e["ts"], e["ts"] + e["dur"]) for e in slices if e["tid"] == sid_tid and e["name"] == "turn"]
        for e in slices:
            if e["tid"] == sid_tid and e["name"] in ("ttft", "decode", "prefill"):
                assert any(lo <= e["ts"] and e["ts"] + e["dur"] <= hi for lo, hi in turns), e


def _doc(*slices: tuple[int, int, int, str], names: dict[int, str] | None = None) -> dict:
    events = [
        {"ph": "M", "pid": 1, "tid": t, "name": "thread_name", "args": {"name": n}} for t, n in (names or {}).items()
    ]
    events += [{"ph": "X", "pid": 1, "tid": t, "ts": ts, "dur": dur, "name": n} for t, ts, dur, n in slices]
    return {"traceEvents": events}


def test_the_checker_catches_a_partial_overlap_and_duplicate_names() -> None:
    good = _doc((1, 0, 100, "turn"), (1, 10, 20, "decode"), (1, 30, 70, "decode"), names={1: "a", 2: "b"})
    assert trace_problems(good) == []
    # a decode step that ends after its turn: the mis-nesting the old traces had
    bad = _doc((1, 0, 100, "turn"), (1, 90, 20, "decode"))
    assert any("decode [90, 110] overlaps turn [0, 100]" in p for p in trace_problems(bad))
    assert trace_problems(_doc(names={1: "a", 2: "a"})) == ["two tracks are named 'a'"]
    assert any("timestamp order" in p for p in trace_problems(_doc((1, 50, 10, "x"), (1, 0, 10, "y"))))

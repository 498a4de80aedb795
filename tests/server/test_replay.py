"""`kvscope replay`: the simulated prefix store against the engine's real one, the policies
under a budget, the causes and the what-if on the sample logs, and bad logs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kvscope.app.cli import main
from kvscope.engine import Engine, EngineConfig, SamplingParams
from kvscope.engine.prompt_turn import run_prompt
from kvscope.server.replay import ReplayError, format_report, read_log, replay, replay_file
from kvscope.server.samples import write_samples


@pytest.fixture(scope="module")
def engine(llama_dir: Path) -> Engine:
    eng = Engine()
    eng.load(llama_dir)
    return eng


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {p.stem: p for p in write_samples(tmp_path_factory.mktemp("samples"))}


def test_simulated_store_matches_the_engines_prefix_store(engine: Engine, samples: dict[str, Path]) -> None:
    requests = read_log(samples["workflow"], engine.model)
    sim = replay(requests, engine.model, ("lru",))
    real = []
    for r in requests:
        sid = engine.new_session()
        res = run_prompt(engine, sid, list(r.ids), SamplingParams(max_tokens=1), [], "", lambda: False)
        real.append(res.stats.cached_tokens)
        engine.close_session(sid)
    assert sim.results[0].per_request == real
    assert sum(real) > 0


@pytest.mark.parametrize("policy", ["lru", "hot", "workflow"])
def test_simulated_policies_match_the_engines_store_under_a_budget(
    llama_dir: Path, samples: dict[str, Path], policy: str
) -> None:
    """The replay's store and the engine's live store run the same policy code: the same hits per request."""
    eng = Engine(EngineConfig(prefix_policy=policy))
    lm = eng.load(llama_dir)
    budget = 40 * 16 * lm.bytes_per_token  # 40 blocks: the three agents do not all fit
    eng.store.budget_bytes = budget  # type: ignore[union-attr]
    requests = read_log(samples["workflow"], lm)
    sim = replay(requests, lm, (policy,), budget_bytes=budget)
    real = []
    for r in requests:
        sid = eng.new_session()
        eng.note_request(sid, r.agent, r.step)
        res = run_prompt(eng, sid, list(r.ids), SamplingParams(max_tokens=1), [], "", lambda: False)
        real.append(res.stats.cached_tokens)
        eng.close_session(sid)
    assert sim.results[0].per_request == real
    assert sim.results[0].evicted_blocks > 0


def test_policies_differ_under_a_budget(engine: Engine, samples: dict[str, Path]) -> None:
    budget = 40 * 16 * engine.model.bytes_per_token  # 40 blocks: not enough for all three agents
    rep = replay_file(engine.model, samples["workflow"], budget_bytes=budget, ms_per_token=1.0)
    rate = {r.policy: r.hit_rate for r in rep.results}
    assert rate["workflow"] > rate["lru"] and rate["hot"] >= rate["lru"], rate
    assert rep.causes["evicted"] > 0
    learned = next(r.step_graph for r in rep.results if r.policy == "workflow")  # from the log's agent/step only
    assert learned == {"planner": {"coder": 6}, "coder": {"reviewer": 6}, "reviewer": {"planner": 5}}
    assert "planner -> coder (6x)" in format_report(rep)
    unlimited = replay_file(engine.model, samples["workflow"])
    assert all(r.hit_rate == unlimited.results[0].hit_rate for r in unlimited.results)
    assert unlimited.results[0].hit_rate > rate["workflow"]


def test_clock_in_system_prompt_found_and_moved(engine: Engine, samples: dict[str, Path]) -> None:
    rep = replay_file(engine.model, samples["agent-clock"], ("lru",), ms_per_token=1.0)
    assert rep.causes.most_common(1)[0][0] == "timestamp"
    assert rep.moved == rep.n_requests and rep.whatif is not None
    assert rep.whatif.hit_rate > 0.5 > 0.1 > rep.results[0].hit_rate


def test_cli_replay_prints_the_table(llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", "--sample", "agent-clock", "--model", str(llama_dir), "--budget-mb", "4"]) == 0
    out = capsys.readouterr().out
    assert "hit rate" in out and "timestamp" in out and "what-if" in out
    for policy in ("lru", "hot", "workflow"):
        assert f" {policy} " in out
    before, after = re.search(r"hit rate ([\d.]+)% -> ([\d.]+)%", out).groups()  # type: ignore[union-attr]
    assert float(after) > float(before) + 30  # the what-if's gain: the clock moved to the end


def test_bad_logs_name_the_line(
    engine: Engine, tmp_path: Path, llama_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    cases = {
        "not json": (good + "\n{oops\n", "line 2: not JSON"),
        "not an object": ("[1, 2]\n", "line 1: each line must be a JSON object"),
        "bad message": (json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n", "line 1: Invalid value"),
        "empty": ("\n\n", "has no requests"),
    }
    for name, (text, msg) in cases.items():
        p = tmp_path / f"{name}.jsonl"
        p.write_text(text)
        with pytest.raises(ReplayError, match=msg):
            read_log(p, engine.model)
    assert main(["replay", str(tmp_path / "not json.jsonl"), "--model", str(llama_dir)]) == 2
    assert "line 2: not JSON" in capsys.readouterr().err
    assert main(["replay", "--sample", "workflow", "--policy", "lru,fifo", "--model", str(llama_dir)]) == 2
    assert "unknown policy fifo" in capsys.readouterr().err

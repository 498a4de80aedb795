"""Compaction vs restart with a summary that omits the answer: the mechanics, on the demo model."""

from __future__ import annotations

import numpy as np
import pytest

from kvscope.engine import Engine, SamplingParams
from kvscope.lab.chat_runs import render_chat
from kvscope.lab.leakage import LeakConfig, make_leak_episode, run_leakage


@pytest.fixture(scope="module")
def demo() -> Engine:
    eng = Engine()
    eng.load(None)
    return eng


def test_only_the_full_cache_answers_when_the_summary_omits_the_number(demo: Engine) -> None:
    result = run_leakage(demo.model, LeakConfig(n=10, context=256))
    rows = {r.condition: r for r in result.behaviour()}
    assert rows["full cache"].exact.value >= 0.8 and rows["full cache"].exact.n == 10
    assert rows["restart"].exact.value == 0.0  # the number is nowhere in the restarted chat
    assert rows["full cache"].logprob.value > rows["restart"].logprob.value + 5
    probe = result.probe()
    assert {(p.condition, p.site, p.layer) for p in probe} == {
        (c, s, layer) for c in rows for s in ("kv", "hidden") for layer in range(demo.model.n_layers)
    }
    # Layer 0's values for turn n+1 come from its own tokens alone (V carries no position):
    # identical whatever was masked or restarted before it.
    v0 = {c: result.outcomes[0][c].features["kv"][0] for c in rows}
    half = len(v0["restart"]) // 2
    assert np.allclose(v0["compact (mask)"][half:], v0["restart"][half:], atol=1e-4)
    assert not np.allclose(
        result.outcomes[0]["compact (mask)"].features["kv"][1], result.outcomes[0]["restart"].features["kv"][1]
    )


def test_a_summary_that_contains_the_number_lets_restart_answer(demo: Engine) -> None:
    result = run_leakage(demo.model, LeakConfig(n=5, context=256, summary="contains"))
    rows = {r.condition: r for r in result.behaviour()}
    assert rows["restart"].exact.value >= 0.7 and rows["compact (mask)"].exact.value >= 0.7


def test_raw_compaction_is_the_engines_compaction(demo: Engine) -> None:
    """The lab's compact (summary appended, notes masked) replies as Engine.compact does."""
    ep = make_leak_episode(0, LeakConfig(context=256, summary="contains"), demo.model.tokenizer)
    tok = demo.model.tokenizer
    chat = render_chat(tok, ep.messages)
    sid = demo.new_session("leak")
    for m in ep.messages[:3]:
        demo.append_message(sid, m["role"], m["content"])
    lo, hi = chat.spans[1]
    demo.compact(sid, lo, hi, summary=ep.messages[3]["content"].removeprefix("[summary] "), fidelity=False)
    assert demo.session(sid).tokens == chat.tokens[: chat.spans[3][1]]
    reply = demo.chat(sid, ep.messages[4]["content"], SamplingParams(max_tokens=24)).text.strip()
    demo.close_session(sid)
    result = run_leakage(demo.model, LeakConfig(n=1, context=256, summary="contains"))
    assert result.episodes[0].messages == ep.messages
    assert (reply == ep.answer) == result.outcomes[0]["compact (mask)"].exact

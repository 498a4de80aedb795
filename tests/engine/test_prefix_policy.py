"""The live prefix store's eviction policies: under a byte budget each evicts what it says, and says so in events."""

from __future__ import annotations

import math

import mlx.core as mx
import pytest

from kvscope.engine import Engine, EngineConfig
from kvscope.engine.blocks import chain_hashes
from kvscope.engine.errors import InvalidRequestError
from kvscope.engine.events import BlockRemoved, Event, PrefixEvictionDecided, SessionId
from kvscope.engine.prefix_policy import StepGraph
from kvscope.engine.prefix_store import PrefixStore

BS, LAYERS = 4, 2
PROMPTS = {name: [k * 100 + i for i in range(2 * BS)] for k, name in enumerate(("a", "b", "c"), 1)}  # 2 blocks each


def _store(policy: str) -> tuple[PrefixStore, list[Event]]:
    events: list[Event] = []
    return PrefixStore("root", BS, 1 << 30, events.append, lambda: 0.0, policy), events


def _insert(store: PrefixStore, name: str, agent: str | None = None, step: int | None = None) -> None:
    sid = SessionId(f"s-{name}-{len(store)}")
    if agent is not None:
        store.note_request(sid, agent, step)
    kv = [mx.zeros((1, 2, 2 * BS, 4)) for _ in range(LAYERS)]
    store.insert(PROMPTS[name], kv, kv, sid)
    store.release(sid)


def _hit(store: PrefixStore, name: str, times: int = 1) -> None:
    for _ in range(times):
        blocks = store.match(PROMPTS[name])
        assert len(blocks) == 2
        store.load_rows(blocks, SessionId("reader"))
        store.release(SessionId("reader"))


def _evict_one_chain(store: PrefixStore, events: list[Event]) -> PrefixEvictionDecided:
    """Lower the budget by one prompt's blocks; the one eviction decision that made."""
    events.clear()
    store.evict_to_budget(store.nbytes - 1)  # at least one block must go; a chain's leaf goes first
    store.evict_to_budget(store.nbytes - 1)  # then its parent (or another leaf)
    decided = [e for e in events if isinstance(e, PrefixEvictionDecided)]
    removed = [e for e in events if isinstance(e, BlockRemoved)]
    assert [d.block_hashes for d in decided] == [r.block_hashes for r in removed]  # each decision, then its removal
    return PrefixEvictionDecided(0.0, decided[0].policy, sum((d.block_hashes for d in decided), ()), (), 0, 0)


def _chain(name: str) -> set[str]:
    return set(chain_hashes(PROMPTS[name], BS, "root"))


def test_lru_evicts_the_least_recently_used_prompt() -> None:
    store, events = _store("lru")
    for name in "abc":
        _insert(store, name)
    _hit(store, "a")  # a is now the most recently used; b the least
    decided = _evict_one_chain(store, events)
    assert decided.policy == "lru" and set(decided.block_hashes) == _chain("b")


def test_hot_keeps_the_most_reused_prompt_where_lru_would_drop_it() -> None:
    results = {}
    for policy in ("lru", "hot"):
        store, events = _store(policy)
        for name in "ab":
            _insert(store, name)
        _hit(store, "a", 3)  # a: reused three times, then b once, then c is new (never reused)
        _hit(store, "b", 1)
        _insert(store, "c")
        results[policy] = set(_evict_one_chain(store, events).block_hashes)
    assert results["lru"] == _chain("a")  # the oldest use
    assert results["hot"] == _chain("c")  # the least reused; a, reused most, stays


def test_workflow_evicts_the_agent_that_runs_again_furthest() -> None:
    results, reasons = {}, {}
    for policy in ("lru", "workflow"):
        store, events = _store(policy)
        # planner -> coder -> reviewer -> coder -> reviewer: the graph says coder runs next, then reviewer,
        # and nothing leads back to the planner.
        for step, (name, agent) in enumerate([("a", "planner"), ("b", "coder"), ("c", "reviewer")], 1):
            _insert(store, name, agent, step)
        store.note_request(SessionId("x"), "coder", 4)
        store.note_request(SessionId("y"), "reviewer", 5)
        _hit(store, "a")  # someone without an agent read the planner's prefix: the most recently used now
        decided = _evict_one_chain(store, events)
        results[policy], reasons[policy] = set(decided.block_hashes), decided
        if policy == "workflow":
            second = _evict_one_chain(store, events)
            assert set(second.block_hashes) == _chain("c")  # reviewer (2 steps away) before coder (1 step)
            assert _chain("b") <= {b.block_hash for b in store.blocks()}
    assert results["lru"] == _chain("b")
    assert results["workflow"] == _chain("a")


def test_the_decision_event_names_policy_and_reason() -> None:
    store, events = _store("workflow")
    _insert(store, "a", "planner", 1)
    _insert(store, "b", "coder", 2)
    events.clear()
    before = store.nbytes
    store.evict_to_budget(before - 1)
    (decided,) = [e for e in events if isinstance(e, PrefixEvictionDecided)]
    assert decided.policy == "workflow" and decided.budget_bytes == before - 1
    assert decided.freed_bytes == before - store.nbytes > 0
    assert decided.reasons == ("workflow: planner not expected again",)


def test_blocks_in_use_are_never_evicted_whatever_the_policy() -> None:
    for policy in ("lru", "hot", "workflow"):
        store, _ = _store(policy)
        kv = [mx.zeros((1, 2, 2 * BS, 4)) for _ in range(LAYERS)]
        store.insert(PROMPTS["a"], kv, kv, SessionId("holder"))
        _insert(store, "b")
        store.evict_to_budget(0)
        assert {b.block_hash for b in store.blocks()} == _chain("a")


def test_policy_switch_and_bad_names() -> None:
    store, events = _store("lru")
    for name in "abc":
        _insert(store, name)
    _hit(store, "a", 2)
    store.budget_bytes = store.nbytes - 1
    store.set_policy("hot")  # switching applies the budget at once, by the new policy
    assert store.policy.name == "hot"
    assert not (_chain("a") & {h for e in events if isinstance(e, BlockRemoved) for h in e.block_hashes})
    with pytest.raises(InvalidRequestError, match="unknown prefix-store policy 'fifo'; choose from lru, hot, workflow"):
        store.set_policy("fifo")
    assert store.policy.name == "hot"
    with pytest.raises(InvalidRequestError, match="unknown prefix-store policy"):
        Engine(EngineConfig(prefix_policy="fifo"))


def test_step_graph_learns_fan_out_from_step_numbers() -> None:
    g = StepGraph()
    for agent, step in [("plan", 1), ("search", 2), ("code", 2), ("merge", 3), ("plan", 4)]:
        g.observe(agent, step)
    assert g.edges() == {
        "plan": {"search": 1, "code": 1},
        "search": {"merge": 1},
        "code": {"merge": 1},
        "merge": {"plan": 1},
    }
    assert (g.steps_until("search"), g.steps_until("merge"), g.steps_until("plan")) == (1, 2, 3)
    g.observe("stranger")  # no step: a step of its own; nothing ever followed it
    assert math.isinf(g.steps_until("plan"))

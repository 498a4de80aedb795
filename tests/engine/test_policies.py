"""Compression policies: budgets kept exactly, promises kept, decisions are data."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from kvscope.engine import Engine, InvalidRequestError, SamplingParams, UnsupportedModelError, load_model
from kvscope.engine.compression import (
    AutoCompress,
    Decision,
    apply_decision,
    compress_caches,
    maybe_compress_session,
)
from kvscope.engine.events import DecisionApplied
from kvscope.engine.generation import forward, prefill
from kvscope.engine.kv_cache import ScopeKVCache
from kvscope.engine.policies import POLICIES
from kvscope.engine.policies.attention import window_attention

EVICTING = [name for name, cls in POLICIES.items() if cls.evicts]
PER_LAYER = [name for name in EVICTING if not POLICIES[name].head_wise]  # head-wise: tests/engine/test_headwise.py
SMALL = {
    "snapkv": {"window": 6},
    "pyramidkv": {"window": 6},
    "dynamickv": {"window": 6},
    "h2o": {},
}
SYSTEM = "the code of locker red is 4 2 7 . the colour of the water is blue . " * 3


@pytest.fixture(scope="module")
def lm(llama_dir: Path):  # type: ignore[no-untyped-def]
    return load_model(llama_dir)


def _caches(lm, n: int = 64, seed: int = 0) -> tuple[list[ScopeKVCache], list[int]]:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    ids = [int(t) for t in rng.integers(4, 120, n)]
    caches = [ScopeKVCache() for _ in range(lm.n_layers)]
    prefill(lm.model, caches, ids, 32)
    return caches, ids


def _chat_session(eng: Engine) -> str:
    sid = eng.new_session(system=SYSTEM)
    eng.chat(sid, "what is the code of locker red ?", SamplingParams(max_tokens=3))
    return sid


def _state(eng: Engine, sid: str) -> tuple:  # type: ignore[type-arg]
    s = eng.session(sid)  # type: ignore[arg-type]
    rows = tuple(
        (c.n_rows, c.offset, c.row_token[: c.n_rows].tobytes(), np.array(c.state[0]).tobytes()) for c in s.caches
    )
    return rows, len(s.operations), s.last_decision, tuple(s.origin)


@pytest.mark.parametrize("policy", PER_LAYER)
def test_each_policy_keeps_exactly_its_budget(lm, policy: str) -> None:  # type: ignore[no-untyped-def]
    for kw, per_layer in (({"keep_ratio": 0.5}, 32), ({"budget_tokens": 20}, 20)):
        caches, ids = _caches(lm)
        d = compress_caches(caches, ids, lm.model, policy, **kw, **SMALL.get(policy, {}))
        assert [c.n_rows for c in caches] == list(d.kept_counts)
        assert sum(d.kept_counts) == per_layer * lm.n_layers  # layer-wise policies: the total is exact
        if policy not in ("pyramidkv", "dynamickv"):
            assert d.kept_counts == (per_layer,) * lm.n_layers
        for c, layer in zip(caches, d.layers):
            assert np.array_equal(c.row_token[: c.n_rows], layer.kept)
            assert len(layer.kept) + len(layer.evicted) == 64
            assert c.offset == 64  # positions untouched


def test_layerwise_policies_keep_different_rows_per_layer(lm) -> None:  # type: ignore[no-untyped-def]
    caches, ids = _caches(lm)
    d = compress_caches(caches, ids, lm.model, "pyramidkv", keep_ratio=0.5, window=6)
    assert d.kept_counts[0] > d.kept_counts[-1]


@pytest.mark.parametrize(
    "policy, params, budget, kept_tokens",
    [
        ("streaming_llm", {"sinks": 4}, 10, list(range(4)) + list(range(58, 64))),
        ("snapkv", {"window": 8, "sinks": 2}, 12, [0, 1] + list(range(56, 64))),
        ("h2o", {"sinks": 3, "recent_fraction": 0.5}, 12, [0, 1, 2] + list(range(58, 64))),
        ("random", {"sinks": 4, "recent": 5}, 10, list(range(4)) + list(range(59, 64))),
        ("key_norm", {"sinks": 4, "recent": 2}, 8, [0, 1, 2, 3, 62, 63]),
        ("pyramidkv", {"window": 8}, 9, list(range(56, 64))),
    ],
)
def test_sinks_and_recent_window_are_never_evicted(lm, policy, params, budget, kept_tokens) -> None:  # type: ignore[no-untyped-def]
    caches, ids = _caches(lm)
    d = compress_caches(caches, ids, lm.model, policy, budget_tokens=budget, **params)
    for layer in d.layers:
        assert set(kept_tokens) <= set(layer.kept.tolist())
        assert set(kept_tokens) <= set(layer.protected.tolist())


def test_streaming_llm_keeps_sinks_and_the_most_recent_rows(lm) -> None:  # type: ignore[no-untyped-def]
    caches, ids = _caches(lm)
    d = compress_caches(caches, ids, lm.model, "streaming_llm", budget_tokens=12, sinks=4)
    assert d.layers[0].kept.tolist() == [0, 1, 2, 3] + list(range(56, 64))


@pytest.mark.parametrize("policy", EVICTING)
def test_policies_are_deterministic_for_a_seed(lm, policy: str) -> None:  # type: ignore[no-untyped-def]
    runs = []
    for _ in range(2):
        caches, ids = _caches(lm)
        kw = {"tokenizer": lm.tokenizer, **SMALL.get(policy, {})}  # kvzip writes its own prompt
        runs.append(compress_caches(caches, ids, lm.model, policy, keep_ratio=0.25, **kw))
    for a, b in zip(runs[0].layers, runs[1].layers):
        assert np.array_equal(a.kept, b.kept)
        assert np.array_equal(a.scores, b.scores, equal_nan=True)


def test_random_seed_changes_the_choice(lm) -> None:  # type: ignore[no-untyped-def]
    kept = []
    for seed in (1, 2):
        caches, ids = _caches(lm)
        kept.append(compress_caches(caches, ids, None, "random", keep_ratio=0.5, seed=seed).layers[0].kept)
    assert not np.array_equal(kept[0], kept[1])


@pytest.mark.parametrize("policy", EVICTING)
def test_decision_replays_to_the_same_cache_and_survives_json(lm, policy: str) -> None:  # type: ignore[no-untyped-def]
    caches, ids = _caches(lm)
    fresh = [c.copy() for c in caches]
    kw = {"tokenizer": lm.tokenizer, **SMALL.get(policy, {})}  # kvzip writes its own prompt
    d = compress_caches(caches, ids, lm.model, policy, keep_ratio=0.5, **kw)
    back = Decision.from_json(d.to_json())
    for a, b in zip(d.layers, back.layers):
        for name in ("kept", "evicted", "protected", "scored_tokens", "scores", "head_scores"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=True), name
    assert (back.policy, back.params, back.keep_ratio) == (d.policy, d.params, d.keep_ratio)
    apply_decision(fresh, back)
    for a, b in zip(caches, fresh):
        assert np.array_equal(a.row_token[: a.n_rows], b.row_token[: b.n_rows])
        assert np.array_equal(np.array(a.state[0]), np.array(b.state[0]))
        assert np.array_equal(np.array(a.state[1]), np.array(b.state[1]))


def test_scoring_leaves_the_caches_alone_and_sees_normalised_attention(lm) -> None:  # type: ignore[no-untyped-def]
    caches, ids = _caches(lm)
    before = [np.array(c.state[0]) for c in caches]
    att = window_attention(lm.model, caches, ids, 10)
    n_q_heads = lm.model.layers[0].self_attn.n_heads
    for mass in att.mass:
        assert mass.sum() == pytest.approx(10 * n_q_heads, rel=1e-4)  # each query's softmax sums to 1
        assert mass[:, 54:].min() > 0 and np.all(att.seen_by[:54] == 10)
    for c, b in zip(caches, before):
        assert c.n_rows == 64 and c.offset == 64 and np.array_equal(np.array(c.state[0]), b)


def test_eviction_equals_logical_masking(arch_dir: Path) -> None:
    eng = Engine()
    lm = eng.load(arch_dir)
    sid = _chat_session(eng)
    s = eng.session(sid)
    reference = [c.copy() for c in s.caches]
    d = eng.compress(sid, "snapkv", keep_ratio=0.5, window=6)
    for c, layer in zip(reference, d.layers):
        for t in layer.evicted:
            c.set_visible(int(t), int(t) + 1, False)
    assert [c.offset for c in s.caches] == [c.offset for c in reference]
    assert [c.n_rows for c in s.caches] != [c.n_rows for c in reference]
    nxt = s.tokens[len(s.tokens) - 1 :] + [5, 9, 11]
    a = forward(lm.model, nxt, [c.copy() for c in s.caches])
    b = forward(lm.model, nxt, reference)
    assert np.allclose(np.array(a), np.array(b), atol=1e-4)
    # and the chat goes on, at the right positions
    res = eng.chat(sid, "and the colour of the water ?", SamplingParams(max_tokens=2))
    assert res.stats.cached_tokens > 0
    for c in s.caches:  # new rows continue at the next positions, not at the row count
        assert c.offset == len(s.tokens) > c.n_rows
        assert c.row_position[c.n_rows - 1] == c.offset - 1


def test_decision_is_recorded_in_the_session_and_as_an_event(llama_dir: Path) -> None:
    eng = Engine()
    eng.load(llama_dir)
    sid = _chat_session(eng)
    d = eng.compress(sid, "key_norm", budget_tokens=16, sinks=2)
    s = eng.session(sid)
    assert s.last_decision is d and s.operations[-1]["policy"] == "key_norm"
    ev = [e for e in eng.events if isinstance(e, DecisionApplied)][-1]
    assert ev.policy == "key_norm" and ev.kept_rows == d.kept_counts and ev.details["budget_tokens"] == 16
    scores = eng.snapshot(sid).scores
    assert scores is not None and scores.dtype == np.float32 and scores.shape == (len(s.caches), s.n_tokens)
    assert np.isfinite(scores).all()  # every cached token was scored
    assert np.isnan(d.token_scores(s.n_tokens + 3)[:, -3:]).all()
    state = eng.snapshot(sid).token_state
    assert (state == 3).sum() == sum(d.evicted_counts)  # TokenState.EVICTED
    # replay onto another session holding the same cache
    other = _chat_session(eng)
    eng.replay_decision(other, Decision.from_json(d.to_json()))
    assert [c.row_token.tolist() for c in eng.session(other).caches] == [c.row_token.tolist() for c in s.caches]


@pytest.mark.parametrize(
    "policy, kw, message",
    [
        ("snapkv", {"keep_ratio": 0.0}, "keep_ratio must be in (0, 1]"),
        ("snapkv", {"keep_ratio": -0.5}, "keep_ratio must be in (0, 1]"),
        ("random", {"keep_ratio": 1.5}, "keep_ratio must be in (0, 1]"),
        ("random", {"budget_tokens": 0}, "budget_tokens must be >= 1"),
        ("key_norm", {"budget_tokens": -3}, "budget_tokens must be >= 1"),
        ("h2o", {"budget_tokens": 10**6}, "more than the"),
        ("lru", {"keep_ratio": 0.5}, "unknown compression policy 'lru'"),
        ("snapkv", {"keep_ratio": 0.5, "windw": 3}, "no parameter 'windw'"),
        ("snapkv", {}, "exactly one of keep_ratio"),
        ("snapkv", {"keep_ratio": 0.5, "budget_tokens": 3}, "exactly one of keep_ratio"),
        ("streaming_llm", {"budget_tokens": 3, "sinks": 4}, "smaller than the 4 rows"),
        ("quantize", {"keep_ratio": 0.5}, "keeps every row"),
        ("random", {"keep_ratio": 0.5, "quant_bits": 3}, "4 or 8 bits"),
    ],
)
def test_impossible_requests_raise_and_leave_the_session_unchanged(llama_dir: Path, policy, kw, message) -> None:  # type: ignore[no-untyped-def]
    eng = Engine()
    eng.load(llama_dir)
    sid = _chat_session(eng)
    before = _state(eng, sid)
    with pytest.raises(InvalidRequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        eng.compress(sid, policy, **kw)
    assert _state(eng, sid) == before
    assert not any(isinstance(e, DecisionApplied) for e in eng.events)


def test_quantization_round_trips_rows_and_reports_quantized_bytes() -> None:
    mx.random.seed(0)
    caches = [ScopeKVCache() for _ in range(2)]
    for c in caches:
        c.update_and_fetch(mx.random.normal((1, 2, 40, 64)), mx.random.normal((1, 2, 40, 64)))
    fresh = [c.copy() for c in caches]
    raw = np.array(caches[0].state[0])
    d = compress_caches(caches, list(range(40)), None, "key_norm", keep_ratio=0.5, quant_bits=4)
    assert d.kept_counts == (20, 20) and d.quant_bits == 4 and d.group_size == 64
    # 4-bit values + a float32 scale and bias per 64 values, for K and V
    assert d.quantized_bytes == 2 * 2 * (2 * 20 * 64 // 2 + 2 * 2 * 20 * 4)
    kept = np.array(caches[0].state[0])
    assert not np.array_equal(kept, raw[:, :, d.layers[0].kept])
    assert np.abs(kept - raw[:, :, d.layers[0].kept]).max() < 0.5
    apply_decision(fresh, Decision.from_json(d.to_json()))
    assert np.array_equal(np.array(fresh[0].state[0]), kept)
    d8 = compress_caches([c.copy() for c in fresh], list(range(40)), None, "quantize", bits=8)
    assert d8.kept_counts == (20, 20) and d8.quantized_bytes < d8.bytes_after // 3


def test_quantization_needs_a_head_dim_multiple_of_32(llama_dir: Path) -> None:
    eng = Engine()
    eng.load(llama_dir)  # head_dim 16
    sid = _chat_session(eng)
    before = _state(eng, sid)
    with pytest.raises(UnsupportedModelError, match="multiple of 32"):
        eng.compress(sid, "quantize", bits=4)
    assert _state(eng, sid) == before


def test_auto_compress_fires_past_its_budget(llama_dir: Path) -> None:
    eng = Engine()
    eng.load(llama_dir)
    sid = _chat_session(eng)
    s = eng.session(sid)
    with pytest.raises(InvalidRequestError):
        eng.set_auto_compress(sid, AutoCompress("snapkv", budget_tokens=40, trigger="budget", trigger_tokens=20))
    eng.set_auto_compress(sid, AutoCompress("streaming_llm", budget_tokens=24, trigger="budget", trigger_tokens=32))
    assert maybe_compress_session(s, eng.model, eng.bus, "prefill") is not None
    assert [c.n_visible for c in s.caches] == [24] * len(s.caches)
    assert maybe_compress_session(s, eng.model, eng.bus, "turn_end") is None  # under the trigger now


def test_auto_compress_after_prefill_only_when_asked(llama_dir: Path) -> None:
    eng = Engine()
    eng.load(llama_dir)
    sid = _chat_session(eng)
    s = eng.session(sid)
    assert maybe_compress_session(s, eng.model, eng.bus, "prefill") is None  # no setting
    eng.set_auto_compress(sid, AutoCompress("snapkv", keep_ratio=0.5, params={"window": 4, "quant_bits": None}))
    assert maybe_compress_session(s, eng.model, eng.bus, "turn_end") is None
    n = s.caches[0].n_visible
    d = maybe_compress_session(s, eng.model, eng.bus, "prefill")
    assert d is not None and d.kept_counts == (round(n / 2),) * len(s.caches)
    assert s.operations[-1]["policy"] == "snapkv"


def test_window_attention_equals_the_models_own_attention(lm, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import mlx_lm.models.llama as llama

    caches, ids = _caches(lm, 40)
    caches[0].set_visible(3, 9, False)  # masked rows are not attended to
    att = window_attention(lm.model, caches, ids, 8)
    # Reference: what the model's attention itself receives when the window is fed.
    ref = [c.copy() for c in caches]
    for c in ref:
        c.trim(8)
    seen = []
    orig = llama.scaled_dot_product_attention

    def spy(q, k, v, cache, scale, mask):  # type: ignore[no-untyped-def]
        seen.append((q, k, scale))
        return orig(q, k, v, cache=cache, scale=scale, mask=mask)

    monkeypatch.setattr(llama, "scaled_dot_product_attention", spy)
    lm.model(mx.array(ids[-8:])[None], cache=ref)
    for i, (q, k, scale) in enumerate(seen):
        group = q.shape[1] // k.shape[1]
        logits = (q @ mx.repeat(k, group, axis=1).transpose(0, 1, 3, 2)) * scale
        n = k.shape[2]
        causal = mx.array(np.tril(np.ones((8, n), bool), n - 8))
        probs = np.array(mx.softmax(mx.where(causal, logits, -np.inf), axis=-1))[0]
        mass = probs.reshape(k.shape[1], group, 8, n).sum(axis=(1, 2))
        c = ref[i]
        tokens = c.row_token[: c.n_rows][c.row_visible[: c.n_rows]]
        assert np.allclose(att.mass[i][:, tokens], mass, atol=1e-5)
        assert np.all(att.mass[i][:, 3:9] == 0) or i > 0


def test_auto_compress_runs_inside_the_turn(llama_dir) -> None:  # type: ignore[no-untyped-def]
    from kvscope.engine import Engine, SamplingParams
    from kvscope.engine.compression import AutoCompress
    from kvscope.engine.events import DecisionApplied

    eng = Engine()
    eng.load(llama_dir)
    eng.set_auto_compress(None, AutoCompress(policy="streaming_llm", keep_ratio=0.5, trigger="prefill"))
    sid = eng.new_session()
    res = eng.chat(sid, "the code for locker 7 is 4 8 2 1 . " * 20, SamplingParams(max_tokens=4))
    s = eng.session(sid)
    assert any(isinstance(e, DecisionApplied) and e.session == sid for e in eng.events)
    assert s.caches[0].n_rows < s.n_tokens  # rows were evicted during the turn
    assert s.caches[0].offset == s.n_tokens  # positions kept counting
    assert res.token_ids


def test_keydiff_scores_are_kvpress_keydiff(lm) -> None:  # type: ignore[no-untyped-def]
    """Oracle: kvpress's KeyDiffPress formula written out in numpy (minus cosine to the mean unit key)."""
    from kvscope.engine.policies import Candidates, ScoreInput, make_policy

    caches, ids = _caches(lm)
    got = make_policy("keydiff").score(ScoreInput(caches, [Candidates.of(c) for c in caches], ids))
    for cache, scores in zip(caches, got):
        keys = np.array(cache.state[0][0], np.float64)  # [H, n, D]
        unit = keys / np.linalg.norm(keys, axis=-1, keepdims=True)
        anchor = unit.mean(axis=1, keepdims=True)
        want = -(unit * anchor).sum(-1) / np.linalg.norm(anchor, axis=-1)
        np.testing.assert_allclose(scores, want, atol=1e-5)


def test_tova_scores_the_last_querys_attention(lm) -> None:  # type: ignore[no-untyped-def]
    from kvscope.engine.policies import Candidates, ScoreInput, make_policy
    from kvscope.engine.policies.attention import window_attention

    caches, ids = _caches(lm)
    got = make_policy("tova").score(ScoreInput(caches, [Candidates.of(c) for c in caches], ids, lm.model))
    att = window_attention(lm.model, caches, ids, 1)
    for mass, scores in zip(att.mass, got):
        assert scores.shape == (1, len(ids))
        np.testing.assert_allclose(scores[0], mass.mean(0), atol=1e-6)

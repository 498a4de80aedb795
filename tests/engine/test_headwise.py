"""Head-wise eviction: each KV head keeps its own rows, and attention sees exactly those.

The oracle is independent of kvscope's head-wise storage and of its attention
hook: the *full* cache, run layer by layer with an additive per-head mask
(0 where the decision keeps a token for that head, -inf elsewhere), built
from the decision's data alone.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from kvscope.engine import Engine, InvalidRequestError, SamplingParams, UnsupportedModelError, load_model
from kvscope.engine import head_attention
from kvscope.engine.compression import Decision, apply_decision, compress_caches
from kvscope.engine.generation import forward, prefill
from kvscope.engine.invariants import session_problems
from kvscope.engine.kv_cache import ScopeKVCache

N = 96


@pytest.fixture(scope="module")
def lm(llama_dir: Path):  # type: ignore[no-untyped-def]
    return load_model(llama_dir)


def _caches(lm: Any, n: int = N, seed: int = 0) -> tuple[list[ScopeKVCache], list[int]]:
    rng = np.random.default_rng(seed)
    ids = [int(t) for t in rng.integers(4, 120, n)]
    caches = [ScopeKVCache() for _ in range(lm.n_layers)]
    prefill(lm.model, caches, ids, 32)
    return caches, ids


def _oracle_logits(model: Any, caches: list[ScopeKVCache], keep: list[np.ndarray], probe: list[int]) -> np.ndarray:
    """Logits of `probe` on uniform `caches`, layer i's KV head h seeing only the cached tokens
    `keep[i][h]` allows (tokens past keep's width: allowed), by an additive mask per layer."""
    inner = model.model
    h = inner.embed_tokens(mx.array(probe)[None])
    n_new = len(probe)
    for layer, c, k in zip(inner.layers, caches, keep):
        vis = np.asarray(c.visible_tokens)
        n_heads = k.shape[0]
        wide = np.ones((n_heads, max(int(vis.max()) + 1 if len(vis) else 0, k.shape[1])), bool)
        wide[:, : k.shape[1]] = k
        allowed = np.concatenate([wide[:, vis], np.ones((n_heads, n_new), bool)], axis=1)
        causal = np.ones((n_new, len(vis) + n_new), bool)
        causal[:, len(vis) :] = np.tril(np.ones((n_new, n_new), bool))
        add = np.where(allowed[:, None, :] & causal[None], 0.0, -np.inf).astype(np.float32)
        group = layer.self_attn.n_heads // n_heads
        h = layer(h, mx.array(np.repeat(add, group, axis=0))[None], c)
    h = inner.norm(h)
    out = model.lm_head(h) if hasattr(model, "lm_head") else inner.embed_tokens.as_linear(h)
    return np.array(out[0], np.float32)


@pytest.mark.parametrize("policy, params", [("adakv", {"scorer": "snapkv", "window": 8}), ("per_head", {"scorer": "keydiff"})])
def test_headwise_decision_keeps_exactly_its_rows_per_head(lm, policy: str, params: dict) -> None:  # type: ignore[no-untyped-def]
    caches, ids = _caches(lm)
    d = compress_caches(caches, ids, lm.model, policy, keep_ratio=0.5, **params)
    n_heads = caches[0].n_kv_heads
    for c, layer in zip(caches, d.layers):
        assert c.is_headwise and layer.head_kept is not None and layer.head_budgets is not None
        for h in range(n_heads):
            assert np.array_equal(c.head_tokens()[h], layer.head_kept[h])
        assert [len(t) for t in layer.head_kept] == layer.head_budgets.tolist()
        assert int(layer.head_budgets.sum()) == 48 * n_heads  # the layer's budget, shared across heads
        assert np.array_equal(c.visible_tokens, layer.kept)  # some head keeps each of them
        assert c.offset == N  # positions untouched
        if policy == "per_head":
            assert layer.head_budgets.tolist() == [48] * n_heads
        else:
            assert layer.head_budgets.min() >= int(48 * 0.2)  # the floor
            assert set(range(N - 8, N)) <= set.intersection(*(set(t.tolist()) for t in layer.head_kept))
    assert len({tuple(b) for b in d.head_budgets or []}) > 1 or policy == "per_head"
    assert d.bytes_after < d.bytes_before


def test_logits_equal_a_full_recompute_masked_per_head(lm) -> None:  # type: ignore[no-untyped-def]
    caches, ids = _caches(lm)
    full = [c.copy() for c in caches]
    d = compress_caches(caches, ids, lm.model, "adakv", keep_ratio=0.4, scorer="snapkv", window=8)
    assert any(c._live.has_holes for c in caches)  # heads of unequal budgets: padding is masked
    keep = [layer.head_keep_mask(N) for layer in d.layers]
    probe = [7, 30, 31, 99, 5]
    got = np.array(forward(lm.model, probe, caches)[0], np.float32)
    want = _oracle_logits(lm.model, full, keep, probe)
    np.testing.assert_allclose(got, want, atol=1e-4)
    plain = np.array(forward(lm.model, probe, [c.copy() for c in full])[0], np.float32)
    assert np.abs(got - plain).max() > 1e-2  # the eviction did change what attention sees
    for step in (12, 44):  # decode continues on both, one token at a time
        got = np.array(forward(lm.model, [step], caches)[0], np.float32)
        np.testing.assert_allclose(got, _oracle_logits(lm.model, full, keep, [step]), atol=1e-4)


def test_headwise_decisions_replay_bit_for_bit_from_json(lm) -> None:  # type: ignore[no-untyped-def]
    caches, ids = _caches(lm)
    fresh = [c.copy() for c in caches]
    d = compress_caches(caches, ids, lm.model, "adakv", keep_ratio=0.5, scorer="keydiff", floor=0.1)
    back = Decision.from_json(d.to_json())
    assert back.head_budgets == d.head_budgets and back.params == d.params
    for a, b in zip(d.layers, back.layers):
        assert b.head_kept is not None and a.head_kept is not None
        assert all(np.array_equal(x, y) and y.dtype == np.int64 for x, y in zip(a.head_kept, b.head_kept))
    apply_decision(fresh, back)
    for a, b in zip(caches, fresh):
        assert all(np.array_equal(x, y) for x, y in zip(a.head_tokens(), b.head_tokens()))
        assert np.array_equal(np.array(a.keys), np.array(b.keys)) and np.array_equal(np.array(a.values), np.array(b.values))
        assert np.array_equal(np.array(a.state[0]), np.array(b.state[0]))


def test_bad_head_decisions_are_refused_before_any_change(lm) -> None:  # type: ignore[no-untyped-def]
    caches, ids = _caches(lm)
    d = compress_caches([c.copy() for c in caches], ids, lm.model, "per_head", keep_ratio=0.5, scorer="key_norm")
    before = [np.array(c.keys).tobytes() for c in caches]
    wrong = Decision.from_json(d.to_json())
    assert wrong.layers[-1].head_kept is not None
    wrong.layers[-1].head_kept = wrong.layers[-1].head_kept[:1]  # one head short, in the last layer
    with pytest.raises(InvalidRequestError, match="names 1 KV heads; the cache has 2"):
        apply_decision(caches, wrong)
    bad = d.to_dict()
    bad["layers"][0]["head_budgets"] = [1]
    with pytest.raises(InvalidRequestError, match="one entry per KV head"):
        Decision.from_dict(bad)
    assert [np.array(c.keys).tobytes() for c in caches] == before and not any(c.is_headwise for c in caches)
    with pytest.raises(InvalidRequestError, match="floor must be in"):
        compress_caches(caches, ids, lm.model, "adakv", keep_ratio=0.5, floor=2)
    with pytest.raises(InvalidRequestError, match="scorer must be one of"):
        compress_caches(caches, ids, lm.model, "adakv", keep_ratio=0.5, scorer="adakv")


def test_attention_without_the_per_head_mask_trips_instead_of_attending_padding(lm, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    caches, ids = _caches(lm)
    compress_caches(caches, ids, lm.model, "adakv", keep_ratio=0.4, scorer="snapkv", window=8)
    module = sys.modules[type(lm.model.layers[0].self_attn).__module__]
    wrapped = module.scaled_dot_product_attention
    from mlx_lm.models.base import scaled_dot_product_attention as plain

    monkeypatch.setattr(module, "scaled_dot_product_attention", plain)
    assert not head_attention.covers(lm.model)
    forward(lm.model, [5], caches)  # this step attends the holes: the next one refuses to go on
    with pytest.raises(RuntimeError, match="without its per-head mask"):
        forward(lm.model, [6], caches)
    fresh, ids = _caches(lm)
    monkeypatch.setattr(head_attention, "install", lambda model: False)
    with pytest.raises(UnsupportedModelError, match="per-head masks cannot reach"):
        compress_caches(fresh, ids, lm.model, "adakv", keep_ratio=0.5)
    assert not any(c.is_headwise for c in fresh)
    monkeypatch.setattr(module, "scaled_dot_product_attention", wrapped)


SYSTEM = "the code of locker red is 4 2 7 . the colour of the water is blue . " * 3


def _headwise_session(llama_dir: Path, **cfg: Any) -> tuple[Engine, str]:
    eng = Engine(**cfg) if cfg else Engine()
    eng.load(llama_dir)
    sid = eng.new_session(system=SYSTEM)
    eng.chat(sid, "what is the code of locker red ?", SamplingParams(max_tokens=3))
    eng.compress(sid, "adakv", keep_ratio=0.5, scorer="key_norm")
    return eng, sid


def test_mask_and_unmask_work_per_head_and_edits_that_move_rows_are_refused(llama_dir: Path) -> None:
    eng, sid = _headwise_session(llama_dir)
    s = eng.session(sid)
    assert all(c.is_headwise for c in s.caches) and not session_problems(s)
    before = [(c.head_tokens(), np.array(c.state[0])) for c in s.caches]
    full_keep = [np.stack([np.isin(np.arange(s.n_tokens), t) for t in c.head_tokens()]) for c in s.caches]
    eng.mask(sid, 10, 30, fidelity=False)
    for c, keep in zip(s.caches, full_keep):
        for h, (vis, hid) in enumerate(zip(c.head_tokens(True), c.head_tokens(False))):
            held = np.nonzero(keep[h])[0]
            assert np.array_equal(hid, held[(held >= 10) & (held < 30)])  # each head hides its own rows
            assert np.array_equal(vis, held[(held < 10) | (held >= 30)])
    assert not session_problems(s)
    eng.unmask(sid, 10, 30, fidelity=False)
    for c, (heads, keys) in zip(s.caches, before):
        assert all(np.array_equal(a, b) for a, b in zip(c.head_tokens(), heads))
        assert np.array_equal(np.array(c.state[0]), keys)  # every head's rows, bit for bit
    snapshot = [c.copy() for c in s.caches]
    for call, what in (
        (lambda: eng.delete_span(sid, 5, 9), "deleting tokens"),
        (lambda: eng.replace_span(sid, 5, 9, "red"), "deleting tokens"),
    ):
        with pytest.raises(InvalidRequestError, match=f"{what} is refused on a head-wise compressed layer"):
            call()
    other = eng.new_session(system="the colour of the water is blue .")
    eng.chat(other, "hi", SamplingParams(max_tokens=1))
    with pytest.raises(InvalidRequestError, match="inserting tokens is refused on a head-wise compressed layer"):
        eng.splice(sid, other, 0, 8)  # a uniform segment into a head-wise session
    with pytest.raises(InvalidRequestError, match="is refused on a head-wise compressed layer"):
        eng.splice(other, sid, 0, 8)  # out of a head-wise session
    with pytest.raises(InvalidRequestError, match="is refused on a head-wise compressed layer"):
        eng.save_segment(sid, 0, 16, llama_dir.parent / "seg.safetensors")
    with pytest.raises(InvalidRequestError, match="already compressed head-wise"):
        eng.compress(sid, "snapkv", keep_ratio=0.5, window=4)
    for c, old in zip(s.caches, snapshot):  # nothing changed
        assert all(np.array_equal(a, b) for a, b in zip(c.head_tokens(), old.head_tokens()))
    res = eng.chat(sid, "and the colour of the water ?", SamplingParams(max_tokens=4))  # chat goes on
    assert res.stats.cached_tokens > 0 and not session_problems(s)
    assert all(c.offset == s.n_tokens for c in s.caches)

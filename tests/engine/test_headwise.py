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

from kvscope.engine import (
    Engine,
    InvalidRequestError,
    SamplingParams,
    UnsupportedModelError,
    head_attention,
    load_model,
)
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


@pytest.mark.parametrize(
    "policy, params",
    [
        ("adakv", {"scorer": "snapkv", "window": 8}),
        ("per_head", {"scorer": "keydiff"}),
    ],
)
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


def test_adakv_cap_bounds_the_greediest_head(lm) -> None:  # type: ignore[no-untyped-def]
    most = {}
    for cap in (None, 1.05):
        caches, ids = _caches(lm)
        d = compress_caches(caches, ids, lm.model, "adakv", keep_ratio=0.5, scorer="snapkv", window=8, cap=cap)
        assert [sum(b) for b in d.head_budgets or []] == [48 * caches[0].n_kv_heads] * lm.n_layers
        most[cap] = max(max(b) for b in d.head_budgets or [])
        assert max(c.keys.shape[2] for c in caches) >= most[cap]
    assert most[None] > 51 >= most[1.05]  # ceil(1.05 x 48)


def test_logits_equal_a_full_recompute_masked_per_head(lm) -> None:  # type: ignore[no-untyped-def]
    caches, ids = _caches(lm)
    full = [c.copy() for c in caches]
    d = compress_caches(caches, ids, lm.model, "adakv", keep_ratio=0.4, scorer="snapkv", window=8)
    assert any(c.head_mask(4, 1, c.keys.shape[2]) is not None for c in caches)  # unequal budgets: holes masked
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
        assert np.array_equal(np.array(a.keys), np.array(b.keys)) and np.array_equal(
            np.array(a.values), np.array(b.values)
        )
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
    for c, old in zip(s.caches, snapshot):  # nothing changed
        assert all(np.array_equal(a, b) for a, b in zip(c.head_tokens(), old.head_tokens()))
    eng.erratum(sid, "the code is 5 5 5", fidelity=False)  # appends rows in every head
    eng.compact(sid, 2, 10, summary="a code", fidelity=False)  # a summary turn + a per-head mask
    assert all(c.is_headwise for c in s.caches) and not session_problems(s)
    res = eng.chat(sid, "and the colour of the water ?", SamplingParams(max_tokens=4))  # chat goes on
    assert res.stats.cached_tokens > 0 and not session_problems(s)
    assert all(c.offset == s.n_tokens for c in s.caches)


def test_headwise_sessions_save_and_reopen_per_head_and_bad_head_rows_are_refused(
    llama_dir: Path, tmp_path: Path
) -> None:
    import json
    import zipfile

    from kvscope.engine.errors import SegmentFileError

    eng, sid = _headwise_session(llama_dir)
    eng.mask(sid, 12, 20, fidelity=False)  # masked rows differ per head too
    path = eng.export_session(sid, tmp_path / "hw.kvsession")
    new = eng.import_session(path)
    a, b = eng.session(sid), eng.session(new)
    for ca, cb in zip(a.caches, b.caches):
        assert cb.is_headwise
        for visible in (True, False):
            assert all(np.array_equal(x, y) for x, y in zip(ca.head_tokens(visible), cb.head_tokens(visible)))
        assert ca.nbytes == cb.nbytes  # the reopened cache frees the same memory
    probe = [7, 30, 31]
    want = np.array(forward(eng.model.model, probe, [c.copy() for c in a.caches]))
    assert np.array_equal(np.array(forward(eng.model.model, probe, [c.copy() for c in b.caches])), want)
    assert not session_problems(b)
    with zipfile.ZipFile(path) as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    doc_name = next(n for n in files if n.endswith("session.json"))
    for hurt, message in (
        (lambda lay: lay["head_rows"][0].__setitem__(0, 7), "head_rows must be one list"),
        (lambda lay: [row.__setitem__(0, 0) for row in lay["head_rows"]], "no KV head holds"),
        (lambda lay: lay["head_rows"].append(lay["head_rows"][0]), "head presence is"),
    ):
        doc = json.loads(files[doc_name])
        hurt(doc["layers"][0])
        bad = tmp_path / "bad.kvsession"
        with zipfile.ZipFile(bad, "w") as zf:
            for n, data in files.items():
                zf.writestr(n, json.dumps(doc) if n == doc_name else data)
        with pytest.raises(SegmentFileError, match=message):
            eng.import_session(bad)


def test_headwise_with_quantization_counts_stored_columns() -> None:
    demo = load_model(None)  # head_dim 32: quantizable
    caches, ids = _caches(demo)
    d = compress_caches(caches, ids, demo.model, "adakv", keep_ratio=0.5, quant_bits=8)
    cols = sum(c.n_columns for c in caches)
    assert cols > sum(c.n_rows for c in caches) // 2  # padded columns, more than half the union rows
    head_dim = caches[0].keys.shape[-1]
    per_column = 2 * caches[0].n_kv_heads * head_dim  # K and V values per column
    assert d.bytes_after == cols * per_column * 4  # float32, as stored
    groups = per_column // 64 if head_dim % 64 == 0 else per_column // 32
    assert d.quantized_bytes == cols * (per_column + 2 * groups * 4)  # 8-bit values + a scale and bias per group


def test_adakv_over_a_layerwise_scorer_moves_budget_across_layers_too(lm) -> None:  # type: ignore[no-untyped-def]
    caches, ids = _caches(lm)
    d = compress_caches(caches, ids, lm.model, "adakv", keep_ratio=0.5, scorer="pyramidkv", window=8)
    totals = [sum(b) for b in d.head_budgets or []]
    n_heads = caches[0].n_kv_heads
    assert totals[0] > totals[-1]  # the pyramid: lower layers keep more
    assert sum(totals) == 48 * n_heads * lm.n_layers  # the same rows in all
    assert [layer.budget * n_heads for layer in d.layers] == totals


def test_masking_a_headwise_cache_equals_the_oracle_with_the_span_hidden_in_every_head(lm) -> None:  # type: ignore[no-untyped-def]
    caches, ids = _caches(lm)
    full = [c.copy() for c in caches]
    d = compress_caches(caches, ids, lm.model, "adakv", keep_ratio=0.4, scorer="snapkv", window=8)
    for c in caches:
        assert c.set_visible(10, 30, False) > 0
    keep = [layer.head_keep_mask(N) for layer in d.layers]
    for k in keep:
        k[:, 10:30] = False
    probe = [7, 30, 31]
    got = np.array(forward(lm.model, probe, [c.copy() for c in caches])[0], np.float32)
    np.testing.assert_allclose(got, _oracle_logits(lm.model, [c.copy() for c in full], keep, probe), atol=1e-4)
    for c in caches:
        c.set_visible(10, 30, True)
    back = np.array(forward(lm.model, probe, caches)[0], np.float32)
    want = _oracle_logits(lm.model, full, [layer.head_keep_mask(N) for layer in d.layers], probe)
    np.testing.assert_allclose(back, want, atol=1e-4)


@pytest.mark.parametrize("second", ["adakv", "per_head", "snapkv", "key_norm"])
def test_compressing_a_headwise_cache_again_keeps_rows_each_head_holds(lm, second: str) -> None:  # type: ignore[no-untyped-def]
    caches, ids = _caches(lm)
    full = [c.copy() for c in caches]
    first = compress_caches(caches, ids, lm.model, "adakv", keep_ratio=0.5, scorer="snapkv", window=8)
    held = [layer.head_keep_mask(N) for layer in first.layers]
    params = {"window": 8} if second in ("adakv", "snapkv") else {}
    if second == "adakv":
        params["scorer"] = "snapkv"
    d = compress_caches(caches, ids, lm.model, second, keep_ratio=0.5, **params)
    for c, layer, was in zip(caches, d.layers, held):
        now = np.stack([np.isin(np.arange(N), t) for t in c.head_tokens()])
        assert not (now & ~was).any()  # a head never gets back a row it had dropped
        if layer.head_kept is not None:  # half the rows each head held, on average
            assert abs(now.sum() - 0.5 * was.sum()) <= now.shape[0]
            assert all(np.array_equal(t, k) for t, k in zip(c.head_tokens(), layer.head_kept))
        else:  # a per-layer policy keeps half of the mean rows per head as tokens, in every head holding them
            assert len(c.visible_tokens) == 24 and now.sum(axis=1).max() <= 24
    keep = [np.stack([np.isin(np.arange(N), t) for t in c.head_tokens()]) for c in caches]
    probe = [7, 30, 31]
    got = np.array(forward(lm.model, probe, caches)[0], np.float32)
    np.testing.assert_allclose(got, _oracle_logits(lm.model, full, keep, probe), atol=1e-4)


def test_auto_compress_head_wise_every_turn_and_a_scorer_that_cannot_read_heads_is_refused(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvscope.engine.compression import AutoCompress
    from kvscope.engine.policies.scorers import KeyDiff

    eng = Engine()
    eng.load(llama_dir)
    sid = eng.new_session(system=SYSTEM)
    eng.set_auto_compress(sid, AutoCompress("adakv", keep_ratio=0.75))
    for question in ("what is the code of locker red ?", "and the colour of the water ?"):
        eng.chat(sid, question, SamplingParams(max_tokens=3))
        s = eng.session(sid)
        assert s.last_decision is not None and s.last_decision.is_headwise
        assert all(c.is_headwise for c in s.caches) and not session_problems(s)
    assert sum(op.get("op") == "compress" for op in s.operations) == 2  # once per turn, the second on head-wise rows
    before = [c.head_tokens() for c in s.caches]
    monkeypatch.setattr(KeyDiff, "reads_head_rows", False)
    with pytest.raises(InvalidRequestError, match="already compressed head-wise"):
        eng.compress(sid, "adakv", keep_ratio=0.5)
    assert all(all(np.array_equal(a, b) for a, b in zip(c.head_tokens(), old)) for c, old in zip(s.caches, before))

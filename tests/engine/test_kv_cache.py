"""The per-layer cache: masking is exact, reversible, and keeps positions."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from kvscope.engine.generation import forward
from kvscope.engine.kv_cache import ScopeKVCache
from kvscope.engine.model_loading import load_model

ATOL = 1e-4  # float32, different summation order only


class MaskedRefCache(KVCache):
    """Plain mlx-lm cache whose queries may not see key columns in `hidden`."""

    def __init__(self, hidden: range) -> None:
        super().__init__()
        self.hidden = hidden

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):  # type: ignore[override]
        total = self.offset + n
        q = np.arange(self.offset, total)[:, None]
        k = np.arange(total)[None]
        allowed = (q >= k) & ~np.isin(k, np.array(list(self.hidden)))
        return mx.array(allowed)


def _ids(n: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(4, 100, n)]


def test_masking_equals_recompute_with_span_masked(arch_dir: Path) -> None:
    lm = load_model(arch_dir)
    ids, query = _ids(48), _ids(5, 1)
    span = range(10, 30)
    scope = [ScopeKVCache() for _ in range(lm.n_layers)]
    ref = [MaskedRefCache(range(0)) for _ in range(lm.n_layers)]
    forward(lm.model, ids, scope)
    forward(lm.model, ids, ref)
    for c in scope:
        assert c.set_visible(span.start, span.stop, False) == len(span)
    for c in ref:
        c.hidden = span
    got = forward(lm.model, query, scope)  # a 5-token chunk, then decode steps
    want = forward(lm.model, query, ref)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=ATOL)
    got1 = forward(lm.model, [7], scope)
    want1 = forward(lm.model, [7], ref)
    np.testing.assert_allclose(np.array(got1), np.array(want1), atol=ATOL)
    # Masked logits really differ from unmasked ones (the test can fail).
    plain = [ScopeKVCache() for _ in range(lm.n_layers)]
    forward(lm.model, ids, plain)
    unmasked = forward(lm.model, query, plain)
    assert float(mx.abs(unmasked - got).max()) > 1e-3


def test_unmask_restores_logits_exactly(llama_dir: Path) -> None:
    lm = load_model(llama_dir)
    ids = _ids(40)
    caches = [ScopeKVCache() for _ in range(lm.n_layers)]
    forward(lm.model, ids, caches)
    before = [c.copy() for c in caches]
    want = forward(lm.model, [9], before)
    for c in caches:
        c.set_visible(5, 25, False)
        c.set_visible(5, 25, True)
    got = forward(lm.model, [9], caches)
    assert np.array_equal(np.array(got), np.array(want))


def test_positions_survive_masking_and_eviction(llama_dir: Path) -> None:
    lm = load_model(llama_dir)
    caches = [ScopeKVCache() for _ in range(lm.n_layers)]
    forward(lm.model, _ids(40), caches)
    c = caches[0]
    c.set_visible(0, 10, False)
    c.evict_tokens(np.arange(20))
    assert (c.n_rows, c.n_visible, c.offset) == (20, 20, 40)
    forward(lm.model, [5, 6], caches)
    assert c.offset == 42
    assert list(c.row_position[c.n_rows - 2 : c.n_rows]) == [40, 41]


def test_eviction_equals_masking_the_same_rows(llama_dir: Path) -> None:
    lm = load_model(llama_dir)
    ids = _ids(64)
    a = [ScopeKVCache() for _ in range(lm.n_layers)]
    forward(lm.model, ids, a)
    b = [c.copy() for c in a]
    for layer, (ca, cb) in enumerate(zip(a, b)):
        lo, hi = 8 + layer * 3, 40 + layer  # different rows per layer
        ca.evict_tokens(np.arange(lo, hi))
        cb.set_visible(lo, hi, False)
    got = forward(lm.model, [3, 4, 5], a)
    want = forward(lm.model, [3, 4, 5], b)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=ATOL)
    assert a[0].nbytes < b[0].nbytes


def test_trim_drops_tail_tokens_and_positions(llama_dir: Path) -> None:
    lm = load_model(llama_dir)
    caches = [ScopeKVCache() for _ in range(lm.n_layers)]
    ids = _ids(30)
    forward(lm.model, ids, caches)
    for c in caches:
        assert c.trim(10) == 10
    got = forward(lm.model, ids[20:], caches)
    fresh = [ScopeKVCache() for _ in range(lm.n_layers)]
    want = forward(lm.model, ids, fresh)[:, 20:]
    np.testing.assert_allclose(np.array(got), np.array(want), atol=ATOL)

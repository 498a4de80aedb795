"""mlx-lm's own tests/test_prompt_cache.py, pointed at kvscope's caches.

Each test is the idea of the upstream test of the same name (mlx-lm
0.32.x), with `KVCache` replaced by `ScopeKVCache`, `RotatingKVCache(n)`
by `SlidingScopeKVCache(n)` and mlx-lm's `make_prompt_cache(model)` by
kvscope's `make_session_caches(model)`, on a tiny qwen3 instead of a hub
model. The files go through the installed mlx-lm's own
`save_prompt_cache` / `load_prompt_cache`. Upstream tests of mlx-lm's own
batch and arrays classes (BatchKVCache internals, ArraysCache.advance, ...)
have no kvscope counterpart; the ones that hand kvscope caches to them
(merge, extend) are here.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import (
    ArraysCache,
    BatchKVCache,
    BatchRotatingKVCache,
    CacheList,
    KVCache,
    QuantizedKVCache,
    load_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)

from kvscope.engine.caches.layout import make_session_caches
from kvscope.engine.caches.sliding import SlidingScopeKVCache
from kvscope.engine.errors import UnsupportedModelError
from kvscope.engine.kv_cache import ScopeKVCache
from tiny_models import make_zoo_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """A tiny qwen3 (head dim 32: quantizable in groups of 32, as upstream's model)."""
    from mlx_lm import load

    model, tokenizer = load(str(make_zoo_model(tmp_path_factory.mktemp("pc") / "qwen3", "qwen3")))[:2]
    model.set_dtype(mx.float32)
    return model, tokenizer


def _filled(cls: Any = ScopeKVCache, n: int = 10, shape: tuple[int, ...] = (1, 8, 10, 4), *args: Any) -> Any:
    c = cls(*args)
    x = mx.random.uniform(shape=shape[:2] + (n,) + shape[3:])
    c.update_and_fetch(x, x)
    return c


def test_save_load(tmp_path: Path) -> None:
    cache = [_filled() for _ in range(4)]
    f = str(tmp_path / "prompt_cache.safetensors")
    save_prompt_cache(f, cache)
    loaded = load_prompt_cache(f)
    assert len(loaded) == 4 and all(type(c) is ScopeKVCache for c in loaded)
    for c, lc in zip(cache, loaded):
        assert c.offset == lc.offset
        assert mx.array_equal(c.state[0], lc.state[0]) and mx.array_equal(c.state[1], lc.state[1])
    save_prompt_cache(f, cache, {"a": "b", "c": "d"})
    assert load_prompt_cache(f, return_metadata=True)[1] == {"a": "b", "c": "d"}


def test_save_load_keeps_masks_and_positions(tmp_path: Path) -> None:
    """Beyond upstream: an edited cache (masked rows, a gap in positions) round-trips exactly."""
    c = _filled()
    c.set_visible(2, 5, False)
    c.advance_to(40)
    y = mx.random.uniform(shape=(1, 8, 3, 4))
    c.update_and_fetch(y, y)
    f = str(tmp_path / "c.safetensors")
    save_prompt_cache(f, [c])
    (lc,) = load_prompt_cache(f)
    assert (lc.offset, lc.n_visible, lc.masked_tokens.tolist()) == (43, 10, [2, 3, 4])
    assert lc.token_positions.tolist() == c.token_positions.tolist()
    x = mx.random.uniform(shape=(1, 8, 1, 4))
    k, v = c.update_and_fetch(x, x)
    lk, lv = lc.update_and_fetch(x, x)
    assert mx.array_equal(k, lk) and mx.array_equal(v, lv)


def test_save_load_rotating_cache(tmp_path: Path) -> None:
    cache = [_filled(SlidingScopeKVCache, 10, (1, 8, 10, 4), 8) for _ in range(4)]
    f = str(tmp_path / "prompt_cache.safetensors")
    save_prompt_cache(f, cache)
    loaded = load_prompt_cache(f)
    for c, lc in zip(cache, loaded):
        assert type(lc) is SlidingScopeKVCache and (c.offset, c.window) == (lc.offset, lc.window)
        assert mx.array_equal(c.state[0], lc.state[0]) and mx.array_equal(c.state[1], lc.state[1])
    for _ in range(2):  # single-token updates past the window
        for c in cache:
            x = mx.random.uniform(shape=(1, 8, 1, 4))
            c.update_and_fetch(x, x)
    save_prompt_cache(f, cache)
    for c, lc in zip(cache, load_prompt_cache(f)):
        x = mx.random.uniform(shape=(1, 8, 1, 4))
        k, v = c.update_and_fetch(x, x)
        lk, lv = lc.update_and_fetch(x, x)
        assert c.offset == lc.offset and mx.array_equal(k, lk) and mx.array_equal(v, lv)
        assert k.shape[2] == 8  # the window: what the model attends


def _mixed() -> list[Any]:
    cache: list[Any] = [ArraysCache(size=2), ScopeKVCache(), SlidingScopeKVCache(8), ArraysCache(size=2)]
    for c in cache:
        if isinstance(c, ArraysCache):
            c[0] = mx.random.uniform(shape=(4, 4, 4))
            c[1] = mx.random.uniform(shape=(4, 4, 4))
        else:
            c.update_and_fetch(mx.random.uniform(shape=(4, 4, 7, 4)), mx.random.uniform(shape=(4, 4, 7, 4)))
    return cache


def _same_after_update(cache: list[Any], loaded: list[Any]) -> None:
    for c, lc in zip(cache, loaded):
        if isinstance(c, ArraysCache):
            assert mx.array_equal(c[0], lc[0]) and mx.array_equal(c[1], lc[1])
        else:
            x, y = mx.random.uniform(shape=(4, 4, 1, 4)), mx.random.uniform(shape=(4, 4, 1, 4))
            k, v = c.update_and_fetch(x, y)
            lk, lv = lc.update_and_fetch(x, y)
            assert c.offset == lc.offset and mx.array_equal(k, lk) and mx.array_equal(v, lv)


def test_save_load_mixed_cache(tmp_path: Path) -> None:
    cache = _mixed()
    f = str(tmp_path / "c.safetensors")
    save_prompt_cache(f, cache)
    _same_after_update(cache, load_prompt_cache(f))


def test_save_load_cache_list(tmp_path: Path) -> None:
    cache = [CacheList(*_mixed())]
    f = str(tmp_path / "c.safetensors")
    save_prompt_cache(f, cache)
    _same_after_update(cache[0].caches, load_prompt_cache(f)[0].caches)


def test_cache_with_generate(llama: tuple[Any, Any]) -> None:
    model, tokenizer = llama
    prompt = mx.array(tokenizer.encode("this is a prompt"))
    toks, logits = zip(*generate_step(prompt, model, max_tokens=4))
    cache = make_session_caches(model)
    i = 0
    for tok, lg in generate_step(prompt, model, prompt_cache=cache, max_tokens=2):
        assert tok == toks[i] and mx.allclose(lg, logits[i], atol=1e-4)
        i += 1
    for tok, lg in generate_step(mx.array([toks[i]]), model, prompt_cache=cache, max_tokens=1):
        i += 1
        assert tok == toks[i] and mx.allclose(lg, logits[i], atol=1e-4)


def test_trim_cache() -> None:
    cache = [_filled() for _ in range(2)]
    assert trim_prompt_cache(cache, 7) == 7
    assert trim_prompt_cache(cache, 4) == 3
    mixed = [ArraysCache(size=2), ScopeKVCache()]  # every cache must be trimmable
    mixed[0][0] = mixed[0][1] = mx.zeros((5, 5))
    mixed[1].update_and_fetch(mx.zeros((1, 8, 10, 4)), mx.zeros((1, 8, 10, 4)))
    assert trim_prompt_cache(mixed, 1) == 0
    sliding = [_filled(SlidingScopeKVCache, 5, (1, 8, 5, 4), 6) for _ in range(2)]
    assert trim_prompt_cache(sliding, 4) == 4
    for c in sliding:  # unlike mlx-lm's ring buffer, every row is kept: trimming stays exact
        c.update_and_fetch(mx.zeros((1, 8, 10, 4)), mx.zeros((1, 8, 10, 4)))
    assert trim_prompt_cache(sliding, 4) == 4 and sliding[0].offset == 7


def test_trim_cache_with_generate(llama: tuple[Any, Any]) -> None:
    model, tokenizer = llama
    prompt = mx.array(tokenizer.encode("this is a prompt"))
    cache = make_session_caches(model)
    last = mx.array([next(generate_step(prompt, model, prompt_cache=cache))[0]])
    toks, logits = zip(*(r for _, r in zip(range(2), generate_step(last, model, prompt_cache=cache))))
    trim_prompt_cache(cache, 3)
    toks2, logits2 = zip(*(r for _, r in zip(range(2), generate_step(last, model, prompt_cache=cache))))
    assert toks == toks2 and all(mx.allclose(a, b) for a, b in zip(logits, logits2))


def test_cache_copying() -> None:
    cache = [_filled()]
    y = mx.random.uniform(shape=(1, 8, 1, 4))
    cache[0].update_and_fetch(y, y)
    old = copy.deepcopy(cache)
    trim_prompt_cache(cache, 1)
    assert (old[0].offset, cache[0].offset) == (11, 10)
    z = mx.random.uniform(shape=(1, 8, 1, 4))
    cache[0].update_and_fetch(z, z)
    assert mx.allclose(old[0].keys[..., 10:11, :], y) and mx.allclose(cache[0].keys[..., 10:11, :], z)


def test_save_load_quantized_cache(tmp_path: Path) -> None:
    cache = [_filled(ScopeKVCache, 10, (1, 8, 10, 32)).to_quantized(bits=4, group_size=32) for _ in range(4)]
    assert all(type(c) is QuantizedKVCache and c.offset == 10 for c in cache)
    f = str(tmp_path / "c.safetensors")
    save_prompt_cache(f, cache, {"a": "b"})
    loaded, meta = load_prompt_cache(f, return_metadata=True)
    assert meta == {"a": "b"} and (loaded[0].bits, loaded[0].group_size) == (4, 32)
    for c, lc in zip(cache, loaded):
        assert c.offset == lc.offset
        assert all(mx.array_equal(c.state[j][i], lc.state[j][i]) for i in range(3) for j in range(2))


def test_cache_to_quantized(llama: tuple[Any, Any]) -> None:
    model, tokenizer = llama
    prompt = mx.array(tokenizer.encode("this is a prompt"))
    toks, logits = zip(*(r for _, r in zip(range(4), generate_step(prompt, model))))
    cache = make_session_caches(model)
    i = 0
    for _, (tok, lg) in zip(range(2), generate_step(prompt, model, prompt_cache=cache)):
        assert tok == toks[i] and mx.allclose(lg, logits[i], atol=1e-4)
        i += 1
    cache = [c.to_quantized(bits=8, group_size=32) for c in cache]
    for _, (tok, lg) in zip(range(1), generate_step(mx.array([toks[i]]), model, prompt_cache=cache)):
        i += 1
        assert tok == toks[i] and mx.allclose(lg, logits[i], rtol=4e-2, atol=4e-2)


def test_an_edited_cache_is_refused_by_quantize_and_merge_not_converted_wrongly() -> None:
    c = _filled(ScopeKVCache, 10, (1, 8, 10, 32))
    c.set_visible(2, 4, False)
    with pytest.raises(UnsupportedModelError, match="8 visible rows for 10 positions"):
        c.to_quantized(bits=4, group_size=32)
    with pytest.raises(UnsupportedModelError, match="batching is refused"):
        ScopeKVCache.merge([c, _filled(ScopeKVCache, 10, (1, 8, 10, 32))])
    with pytest.raises(UnsupportedModelError, match="not quantized"):
        _filled(SlidingScopeKVCache, 4, (1, 8, 4, 32), 8).to_quantized()


def test_cache_list() -> None:
    c = CacheList(ScopeKVCache(), ScopeKVCache())
    assert c.is_trimmable()
    k = mx.zeros((1, 2, 8, 8))
    c[0].update_and_fetch(k, k)
    c[1].update_and_fetch(k, k)
    assert c.trim(5) == 5
    c = CacheList(ArraysCache(size=2), ScopeKVCache())
    assert not c.is_trimmable()
    c1, c2 = CacheList(ArraysCache(size=1), ScopeKVCache()), CacheList(ArraysCache(size=1), ScopeKVCache())
    for cl, n in ((c1, 5), (c2, 7)):
        cl[0][0] = mx.random.normal(shape=(1, 2, 4, 4))
        cl[1].update_and_fetch(mx.random.normal(shape=(1, 2, n, 4)), mx.random.normal(shape=(1, 2, n, 4)))
    merged = CacheList.merge((c1, c2))
    for i, cl in enumerate((c1, c2)):
        ex = merged.extract(i)
        assert mx.array_equal(ex[0][0], cl[0][0])
        assert mx.array_equal(ex[1].state[0][..., : cl[1].offset, :], cl[1].state[0])


def test_make_mask_with_cache() -> None:
    c = ScopeKVCache()
    x = mx.zeros((1, 8, 10, 4))
    c.update_and_fetch(x, x)
    h = mx.zeros((1, 3, 4))
    assert mx.array_equal(
        create_attention_mask(h, c, return_array=True),
        create_attention_mask(h, KVCache.from_state((x, x, 10)), return_array=True),
    )
    assert create_attention_mask(h, c) == "causal"
    assert create_attention_mask(mx.zeros((1, 1, 4)), c) is None


def test_window_mask_with_full_kv_cache() -> None:
    c, ref = ScopeKVCache(), KVCache()
    x = mx.zeros((1, 8, 10, 4))
    c.update_and_fetch(x, x)
    ref.update_and_fetch(x, x)
    for n in (1, 3):
        got = c.make_mask(n, window_size=4, return_array=True)
        assert mx.array_equal(got, ref.make_mask(n, window_size=4, return_array=True))


def test_merge_with_empty_caches() -> None:
    out = ScopeKVCache.merge((ScopeKVCache(), ScopeKVCache()))
    assert isinstance(out, BatchKVCache) and out.keys is None
    c2 = _filled(ScopeKVCache, 5, (1, 2, 5, 4))
    out = ScopeKVCache.merge((ScopeKVCache(), c2))
    assert out.keys.shape[0] == 2 and mx.array_equal(out.extract(1).state[0][..., :5, :], c2.state[0])


def test_extend_with_empty_and_nonempty_batch_caches() -> None:
    c1, c2 = _filled(ScopeKVCache, 5, (1, 2, 5, 4)), _filled(ScopeKVCache, 3, (1, 2, 3, 4))
    full = BatchKVCache.merge([c1, c2])
    full.extend(BatchKVCache.merge([ScopeKVCache() for _ in range(3)]))
    assert full.keys.shape[0] == 5
    r1, r2 = _filled(SlidingScopeKVCache, 5, (1, 2, 5, 4), 8), _filled(SlidingScopeKVCache, 10, (1, 2, 10, 4), 8)
    batch = SlidingScopeKVCache.merge([r1, r2])
    assert isinstance(batch, BatchRotatingKVCache) and batch.keys.shape[0] == 2
    ex = batch.extract(1)
    assert ex.offset == 10 and mx.array_equal(ex.state[0][..., -8:, :], r2.state[0][..., -8:, :])

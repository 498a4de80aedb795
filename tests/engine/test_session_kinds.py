"""Saving, reopening and compressing sessions whose caches are not all plain (hybrid, sliding window, MLA).

The oracle for persistence is the never-saved session itself: after save ->
reopen in a new engine, the next-token logits and the continued chat must be
the same. For compression it is a recompute of every token whose caches then
drop exactly the rows the decision evicted.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from zoo_harness import _fingerprint, compressed_logits_error

from kvscope.engine.caches.adopted import AdoptedCache, adopt
from kvscope.engine.caches.compress_scope import apply_scoped
from kvscope.engine.caches.session_kinds import cache_records
from kvscope.engine.caches.sliding import SlidingScopeKVCache
from kvscope.engine.compression import apply_decision
from kvscope.engine.engine import Engine, EngineConfig
from kvscope.engine.errors import SegmentFileError, UnsupportedModelError
from kvscope.engine.generation import SamplingParams, forward
from tiny_models import make_zoo_model

P = SamplingParams(max_tokens=6)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kinds")
    return {a: make_zoo_model(root / a, a) for a in ("qwen3_next", "gemma3_text", "deepseek_v3")}


def _engine(data: Path, folder: Path) -> Engine:
    eng = Engine(EngineConfig(persist=True, data_dir=str(data)))
    eng.load(folder)
    return eng


def _logits(eng: Engine, sid: str) -> mx.array:
    return forward(eng.model.model, [5, 9], [c.copy() for c in eng.session(sid).caches])[0]  # type: ignore[arg-type]


def _reopened(eng: Engine, sid: str, data: Path, folder: Path) -> Engine:
    eng.close_data_folder()  # the folder's lock goes to the next engine, as when the app restarts
    other = _engine(data, folder)
    assert sid in other.sessions(), other.load_errors
    return other


def _rel(a: mx.array, b: mx.array) -> float:
    return float(mx.abs(a - b).max().item()) / (float(mx.abs(b).max().item()) or 1.0)


def test_a_hybrid_session_reopens_with_its_recurrent_state_and_continues_like_the_never_saved_one(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    eng = _engine(tmp_path, zoo["qwen3_next"])
    sid = eng.new_session()
    eng.chat(sid, "the code for locker seven is red blue green", P)
    eng.chat(sid, "and the other one", P)
    other = _reopened(eng, sid, tmp_path, zoo["qwen3_next"])
    s, r = eng.session(sid), other.session(sid)
    states = [c for c in r.caches if isinstance(c, AdoptedCache)]
    assert len(states) == 3 and all(c.last_token_absorbed == s.n_tokens - 1 for c in states)
    assert r.tokens == s.tokens
    assert _rel(_logits(other, sid), _logits(eng, sid)) < 1e-5
    assert other.chat(sid, "what next", P).token_ids == eng.chat(sid, "what next", P).token_ids


def test_a_sliding_window_session_with_a_mask_reopens_sliding_and_continues_like_the_never_saved_one(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    eng = _engine(tmp_path, zoo["gemma3_text"])
    sid = eng.new_session()
    eng.chat(sid, "the code for locker seven is red blue green and the name is", P)
    n = eng.session(sid).n_tokens
    eng.mask(sid, n - 9, n - 5, fidelity=False)  # inside the window of 8: a row-count window would differ
    other = _reopened(eng, sid, tmp_path, zoo["gemma3_text"])
    s, r = eng.session(sid), other.session(sid)
    assert [type(c).__name__ for c in r.caches] == [type(c).__name__ for c in s.caches]
    assert all(c.window == 8 for c in r.caches if isinstance(c, SlidingScopeKVCache))
    assert [c.masked_tokens.tolist() for c in r.caches] == [c.masked_tokens.tolist() for c in s.caches]
    assert _rel(_logits(other, sid), _logits(eng, sid)) < 1e-5
    assert other.chat(sid, "and then", P).token_ids == eng.chat(sid, "and then", P).token_ids


def test_a_session_file_that_disagrees_with_the_models_cache_kinds_is_refused_by_name(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    eng = _engine(tmp_path, zoo["qwen3_next"])
    sid = eng.new_session()
    eng.chat(sid, "the code is red", SamplingParams(max_tokens=2))
    path = eng.export_session(sid, tmp_path / "s.kvsession")
    folder = tmp_path / "unzipped"
    import zipfile

    zipfile.ZipFile(path).extractall(folder)
    doc = json.loads((folder / "session.json").read_text())

    def tampered(change: dict[str, object]) -> Path:
        out = tmp_path / f"t{len(list(tmp_path.glob('t*.kvsession')))}.kvsession"
        with zipfile.ZipFile(out, "w") as zf:
            zf.writestr("session.json", json.dumps({**doc, **change}))
            cache = next(folder.glob("cache-*.safetensors"))
            zf.write(cache, cache.name)
        return out

    kinds = doc["cache_kinds"]
    wrong_shape = [dict(k, state=[[1, 2, 3]] * len(k["state"])) if k["state"] else k for k in kinds]
    wrong_kind = [dict(k, kind="attention", state=None) if k["state"] else k for k in kinds]
    for change, message in (
        ({"cache_kinds": wrong_shape}, "state"),
        ({"cache_kinds": wrong_kind}, "was saved as attention"),
        ({"cache_kinds": kinds[:1]}, "must list the model's 4 caches"),
    ):
        before = list(eng.sessions())
        with pytest.raises(SegmentFileError, match=message):
            eng.import_session(tampered(change))
        assert eng.sessions() == before
    no_kinds = {k: v for k, v in doc.items() if k != "cache_kinds"}
    (folder / "session.json").write_text(json.dumps(no_kinds))
    doc = no_kinds
    with pytest.raises(SegmentFileError, match="without its cache kinds"):
        eng.import_session(tampered({}))


def test_caches_kvscope_does_not_own_are_refused_before_a_file_is_written() -> None:
    from mlx_lm.models.cache import ChunkedKVCache

    with pytest.raises(UnsupportedModelError, match="ChunkedKVCache cache is refused"):
        cache_records([adopt(ChunkedKVCache(8))])


@pytest.mark.parametrize("arch", ["gemma3_text", "deepseek_v3", "qwen3_next"])
def test_compress_on_sliding_mla_and_hybrid_keeps_the_rows_it_says_and_equals_a_recompute_without_them(
    arch: str, zoo: dict[str, Path]
) -> None:
    eng = Engine()
    eng.load(zoo[arch])
    sid = eng.new_session()
    eng.chat(sid, "the code for locker seven is red blue green and the name is", P)
    d = eng.compress(sid, "key_norm", keep_ratio=0.5)
    s = eng.session(sid)
    compressed = d.extra["layers_compressed"]
    assert compressed and sum(len(layer.evicted) for layer in d.layers) > 0
    assert all(len(layer.evicted) == 0 for i, layer in enumerate(d.layers) if i not in compressed)
    err = compressed_logits_error(eng, sid)
    assert err is not None and err < 1e-4
    assert eng.model.support is not None and eng.model.support.verdict("compress").status == "measured"
    record = s.operations[-1]  # the session's record says what was compressed and that it is approximate
    assert record["layers_compressed"] == compressed and record["approximate"]
    # Policies that recompute attention over every cache are refused, the session unchanged.
    before = _fingerprint(eng, sid)
    with pytest.raises(UnsupportedModelError, match="snapkv on .* is refused"):
        eng.compress(sid, "snapkv", keep_ratio=0.5)
    assert _fingerprint(eng, sid) == before
    # A decision that evicts from a cache compression leaves alone is refused before anything changes.
    if len(compressed) < len(s.caches):
        other = next(i for i in range(len(s.caches)) if i not in compressed)
        layer = d.layers[other]
        d.layers[other] = type(layer)(**{**layer.__dict__, "evicted": np.array([0])})
        with pytest.raises(UnsupportedModelError, match="which compression leaves alone"):
            apply_scoped(apply_decision, s.caches, d)
        assert _fingerprint(eng, sid) == before

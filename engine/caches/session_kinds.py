"""Saving and reopening sessions whose caches are not all plain: the kind of each cache, and recurrent states.

A session file stores every cache's rows as `{i}.keys` / `{i}.values`
(row caches of every kind: full attention, MLA, shared-KV sources, sliding
window) plus, per cache, a record in `session.json["cache_kinds"]`:

    {"kind": "attention" | "shared" | "sliding" | "recurrent", "window": int | null,
     "state": null | [null | [dim, ...], ...]}      shapes of a recurrent state's arrays

and a recurrent state's arrays as `{i}.state.{j}` (float32). Reopening
builds the session's caches as the loaded model lays them out
(`layout.make_session_caches`), checks each record against it — same kind,
same window, every state array shaped as the model's own state after one
token (measured once per model) — and moves the checked rows and states in.
So a reopened sliding-window cache is a sliding-window cache again, a
shared-KV source hands its rows to the reading layers, and a recurrent layer
continues from exactly the state it had: the reopened session's logits equal
the never-saved session's (tests/engine/test_session_kinds.py).

Files without `cache_kinds` (written before this) reopen as plain caches,
which is what they were. Caches kvscope does not own (chunked, composite,
mlx-lm's quantized KV) are refused before anything is written.

Knows nothing about file layout beyond these names; `session_file` and
`persistence` call it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np

from kvscope.engine.caches.adopted import AdoptedCache
from kvscope.engine.caches.shared import SharedSourceKVCache
from kvscope.engine.caches.sliding import SlidingScopeKVCache
from kvscope.engine.errors import SegmentFileError, UnsupportedModelError
from kvscope.engine.kv_cache import ScopeKVCache
from kvscope.engine.tensor_ops import to_numpy

MAX_STATE_DIMS = 8
StateSpec = tuple[tuple[int, ...], mx.Dtype] | None  # shape, dtype of one state array (None: unused)


def kind_name(cache: Any) -> str:
    """The saved kind of one session cache; raises `UnsupportedModelError` for caches kvscope cannot save."""
    if isinstance(cache, SlidingScopeKVCache):
        return "sliding"
    if isinstance(cache, SharedSourceKVCache):
        return "shared"
    if isinstance(cache, ScopeKVCache):
        return "attention"
    if isinstance(cache, AdoptedCache) and cache.kind == "recurrent":
        return "recurrent"
    raise UnsupportedModelError(
        f"saving a {type(cache).__name__} cache is refused: kvscope saves its own row caches and recurrent states only"
    )


def _state(cache: Any) -> list[Any]:
    return list(cache.cache)


def cache_records(caches: list[Any]) -> list[dict[str, Any]]:
    """One record per cache for `session.json` (refuses caches it cannot save)."""
    out = []
    for c in caches:
        kind = kind_name(c)
        state = [None if a is None else list(a.shape) for a in _state(c)] if kind == "recurrent" else None
        out.append({"kind": kind, "window": c.window if kind == "sliding" else None, "state": state})
    return out


def state_tensors(caches: list[Any]) -> dict[str, np.ndarray]:
    """The recurrent states' arrays, float32, named `{cache}.state.{array}`."""
    out = {}
    for i, c in enumerate(caches):
        if kind_name(c) == "recurrent":
            for j, a in enumerate(_state(c)):
                if a is not None:
                    out[f"{i}.state.{j}"] = to_numpy(a, mx.float32)
    return out


# ---------------------------------------------------------------- reading
def model_kinds(new_caches: Callable[[], list[Any]]) -> list[tuple[str, int | None]]:
    """(kind, window) of every cache the loaded model's session has."""
    return [(kind_name(c), c.window if isinstance(c, SlidingScopeKVCache) else None) for c in new_caches()]


def check_records(name: str, records: Any, expected: list[tuple[str, int | None]]) -> list[dict[str, Any]]:
    """`session.json["cache_kinds"]` checked against the model's layout (type, kind, window, state shape)."""
    if not isinstance(records, list) or len(records) != len(expected):
        raise SegmentFileError(f"session {name}: cache_kinds must list the model's {len(expected)} caches")
    for i, (rec, (kind, window)) in enumerate(zip(records, expected)):
        if not isinstance(rec, dict) or set(rec) != {"kind", "window", "state"}:
            raise SegmentFileError(f"session {name}: cache_kinds[{i}] must have exactly kind, window, state")
        if rec["kind"] != kind or rec["window"] != window:
            raise SegmentFileError(
                f"session {name}: cache {i} was saved as {str(rec['kind'])[:20]} (window {str(rec['window'])[:12]}), "
                f"the loaded model's is {kind} (window {window})"
            )
        state = rec["state"]
        ok = state is None if kind != "recurrent" else isinstance(state, list) and len(state) <= MAX_STATE_DIMS
        if ok and kind == "recurrent":
            ok = all(
                s is None
                or (
                    isinstance(s, list)
                    and len(s) <= MAX_STATE_DIMS
                    and all(isinstance(d, int) and not isinstance(d, bool) and 0 < d < 1 << 24 for d in s)
                )
                for s in state
            )
        if not ok:
            raise SegmentFileError(f"session {name}: cache {i}'s state record is malformed")
    return records


def state_names(records: list[dict[str, Any]]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> declared shape of every saved state array."""
    return {
        f"{i}.state.{j}": tuple(s)
        for i, rec in enumerate(records)
        if rec["kind"] == "recurrent"
        for j, s in enumerate(rec["state"])
        if s is not None
    }


def state_shapes(model: Any, new_caches: Callable[[], list[Any]]) -> dict[int, list[StateSpec]]:
    """Shape and dtype of every recurrent state array after one token: what a saved state must match."""
    from kvscope.engine.generation import forward

    caches = new_caches()
    if not any(isinstance(c, AdoptedCache) for c in caches):
        return {}
    mx.eval(forward(model, [0], caches))
    return {
        i: [None if a is None else (tuple(a.shape), a.dtype) for a in _state(c)]
        for i, c in enumerate(caches)
        if isinstance(c, AdoptedCache) and c.kind == "recurrent"
    }


def _transplant(src: ScopeKVCache, dst: ScopeKVCache) -> ScopeKVCache:
    """`dst` (the model's kind of row cache) takes `src`'s rows, tokens and positions."""
    dst.__dict__.update(vars(src))  # src is a plain ScopeKVCache: only the row bookkeeping moves
    return dst


def rebuild(
    name: str,
    caches: list[ScopeKVCache],
    records: list[dict[str, Any]],
    arrays: dict[str, np.ndarray],
    new_caches: Callable[[], list[Any]],
    shapes: dict[int, list[StateSpec]],
    n_tokens: int,
) -> list[Any]:
    """The session's caches as the model lays them out, holding the checked rows and states."""
    out = new_caches()
    for i, (rec, src) in enumerate(zip(records, caches)):
        if rec["kind"] != "recurrent":
            out[i] = _transplant(src, out[i])
            continue
        want = shapes.get(i, [])
        saved = [None if sh is None else tuple(sh) for sh in rec["state"]]
        if saved != [None if w is None else w[0] for w in want]:
            have = [None if w is None else list(w[0]) for w in want]
            raise SegmentFileError(f"session {name}: cache {i}'s state is shaped {rec['state']}, the model's is {have}")
        state = [None if w is None else mx.array(arrays[f"{i}.state.{j}"]).astype(w[1]) for j, w in enumerate(want)]
        out[i].restore_state(state, n_tokens)
    return out


def default_records(name: str, expected: list[tuple[str, int | None]]) -> list[dict[str, Any]]:
    """Records for a file written before `cache_kinds` existed: plain caches, which only a plain model has."""
    if any(kind != "attention" for kind, _ in expected):
        raise SegmentFileError(
            f"session {name} was saved without its cache kinds (an older kvscope) and this model's caches are not "
            "all full attention: it cannot be reopened exactly"
        )
    return [{"kind": "attention", "window": None, "state": None} for _ in expected]


def expected_tensors(
    rows: list[int], records: list[dict[str, Any]], dims: tuple[tuple[int, int, int], ...], fallback: tuple[int, int]
) -> dict[str, tuple[int, ...]]:
    """Every tensor the cache file must hold, with its shape: rows per cache (its own dims) and states."""
    out: dict[str, tuple[int, ...]] = {}
    for i, n in enumerate(rows):
        if n:
            heads, k_dim, v_dim = dims[i] if i < len(dims) and dims[i][0] else (fallback[0], fallback[1], fallback[1])
            out[f"{i}.keys"], out[f"{i}.values"] = (1, heads, n, k_dim), (1, heads, n, v_dim)
    out.update(state_names(records))
    return out


def records_of(name: str, doc: dict[str, Any], lim: Any) -> list[dict[str, Any]]:
    """The checked cache records of a session.json for the model `lim` (a `ModelLimits`) describes."""
    expected: list[tuple[str, int | None]]
    if lim.new_caches is None:  # limits without a model (tools): plain caches only
        expected = [("attention", None)] * lim.n_layers
    else:
        expected = model_kinds(lim.new_caches)
    if "cache_kinds" not in doc:
        return default_records(name, expected)
    return check_records(name, doc["cache_kinds"], expected)


def rebuild_for(
    name: str,
    caches: list[ScopeKVCache],
    records: list[dict[str, Any]],
    arrays: dict[str, np.ndarray],
    lim: Any,
    n_tokens: int,
) -> list[Any]:
    """`rebuild` with what `lim` knows; plain records keep the plain caches."""
    if lim.new_caches is None or all(r["kind"] == "attention" for r in records):
        return list(caches)
    shapes = lim.state_specs() if lim.state_specs is not None else {}
    return rebuild(name, caches, records, arrays, lim.new_caches, shapes, n_tokens)

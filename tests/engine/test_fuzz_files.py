"""Fuzzing the segment and session loaders: every bad file is a clear error, nothing changes.

Counts: each `@settings(max_examples=...)` below; docs/reliability.md adds them up.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kvscope.engine import Engine
from kvscope.engine.errors import SegmentFileError
from kvscope.engine.model_limits import limits_of
from kvscope.engine.persistence import SessionStore
from kvscope.engine.session_file import read_session
from kvscope.engine.splicing import SpliceOptions

# KVSCOPE_FUZZ_EXAMPLES=1500 for the long run recorded in docs/reliability.md; the suite runs 150 a test.
N_EXAMPLES = int(os.environ.get("KVSCOPE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=N_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


# Outcome of every case, per test (KVSCOPE_FUZZ_REPORT=file.json writes it: docs/reliability.md's table).
TALLY: collections.Counter[tuple[str, str]] = collections.Counter()


def _count(outcome: str) -> None:
    TALLY[(os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].split("[")[0].split(" ")[0], outcome)] += 1


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    out = os.environ.get("KVSCOPE_FUZZ_REPORT")
    if out:
        rows: dict[str, dict[str, int]] = {}
        for (test, outcome), n in sorted(TALLY.items()):
            rows.setdefault(test, {})[outcome] = n
        Path(out).write_text(json.dumps(rows, indent=1))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_model_dirs: dict[str, Path]):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("fuzz")
    eng = Engine()
    eng.load(tiny_model_dirs["llama"])
    src = eng.new_session()
    eng.append_message(src, "user", "the code for locker 7 is 4 8 2 1")
    seg = eng.save_segment(src, 1, 9, root / "good.safetensors")
    target = eng.new_session()
    eng.append_message(target, "user", "you are a code locker")
    store = SessionStore(root / "home")
    folder = store.save(eng.session(src), eng.model.fingerprint, eng.model.name)
    return eng, target, seg.read_bytes(), folder, root


def _state(eng: Engine, sid: str) -> tuple:
    s = eng.session(sid)  # type: ignore[arg-type]
    return (
        list(s.tokens),
        list(s.positions),
        [np.array(c.state[0]).tobytes() for c in s.caches],
        [c.row_visible[: c.n_rows].tobytes() for c in s.caches],
    )


def _try_splice(setup, data: bytes) -> None:  # type: ignore[no-untyped-def]
    eng, target, _, _, root = setup
    f = root / "case.safetensors"
    f.write_bytes(data)
    before = _state(eng, target)
    try:
        eng.splice_file(target, f, SpliceOptions(fidelity=False))
    except SegmentFileError as exc:
        assert str(exc) and "case.safetensors" in str(exc) or "cannot read" in str(exc)
        assert _state(eng, target) == before
        _count("rejected")
    else:  # a harmless change (e.g. header padding): the splice is real; take it back
        eng.undo(target)
        assert _state(eng, target) == before
        _count("accepted (still valid)")


def _header(good: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", good[:8])
    return json.loads(good[8 : 8 + n]), good[8 + n :]


def _pack(header: dict, data: bytes) -> bytes:
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


@FUZZ
@given(cut=st.integers(0, 10_000))
def test_truncated_segments(setup, cut: int) -> None:  # type: ignore[no-untyped-def]
    good = setup[2]
    _try_splice(setup, good[: cut % len(good)])


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 7)), min_size=1, max_size=8))
def test_bit_flipped_segments(setup, flips: list[tuple[int, int]]) -> None:  # type: ignore[no-untyped-def]
    data = bytearray(setup[2])
    for pos, bit in flips:
        data[pos % len(data)] ^= 1 << bit
    _try_splice(setup, bytes(data))


@FUZZ
@given(key=st.integers(0, 50), field=st.sampled_from(["dtype", "shape", "data_offsets", None]), value=JSONISH)
@example(key=2, field="shape", value=[True])  # JSON true is a Python int: once a bare TypeError
def test_mangled_tensor_headers(setup, key: int, field: str | None, value: object) -> None:  # type: ignore[no-untyped-def]
    header, data = _header(setup[2])
    names = sorted(k for k in header if k != "__metadata__")
    name = names[key % len(names)]
    if field is None:
        header[name] = value
    else:
        header[name][field] = value
    _try_splice(setup, _pack(header, data))


@FUZZ
@given(
    key=st.sampled_from(
        [
            "format",
            "version",
            "model_fingerprint",
            "n_layers",
            "n_kv_heads",
            "head_dim",
            "dtype",
            "rope",
            "positions",
            "token_ids",
            "text",
            "tensors_sha256",
            "visible",
            "extra_field",
        ]
    ),
    value=JSONISH,
    delete=st.booleans(),
)
def test_mangled_manifests(setup, key: str, value: object, delete: bool) -> None:  # type: ignore[no-untyped-def]
    header, data = _header(setup[2])
    man = json.loads(header["__metadata__"]["0.kvscope"])
    if delete:
        man.pop(key, None)
    else:
        man[key] = value
    header["__metadata__"]["0.kvscope"] = json.dumps(man)
    _try_splice(setup, _pack(header, data))


@FUZZ
@given(junk=st.binary(min_size=1, max_size=64), length=st.integers(0, 2**63))
def test_garbage_headers(setup, junk: bytes, length: int) -> None:  # type: ignore[no-untyped-def]
    good = setup[2]
    _try_splice(setup, struct.pack("<Q", length) + junk + good[8:])
    _try_splice(setup, struct.pack("<Q", len(junk)) + junk + good[8:])  # non-UTF-8 / non-JSON header


@FUZZ
@given(
    key=st.sampled_from(
        [
            "tokens",
            "positions",
            "origin",
            "layers",
            "messages",
            "cache_file",
            "turns",
            "name",
            "model_fingerprint",
            "version",
            "transcript_text",
            "edited",
            "extra",
        ]
    ),
    value=JSONISH,
    delete=st.booleans(),
    cut=st.integers(0, 10**6),
    flip=st.integers(0, 10**9),
)
def test_mangled_session_files(
    setup, tmp_path_factory, key: str, value: object, delete: bool, cut: int, flip: int
) -> None:  # type: ignore[no-untyped-def]
    eng, _, _, folder, root = setup
    case = root / "session-case"
    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(folder, case)
    doc = json.loads((case / "session.json").read_text())
    if delete:
        doc.pop(key, None)
    else:
        doc[key] = value
    (case / "session.json").write_text(json.dumps(doc))
    cache = next(case.glob("cache-*.safetensors"))
    raw = bytearray(cache.read_bytes())
    if flip % 3 == 0:
        raw[flip % len(raw)] ^= 0x10
    elif flip % 3 == 1:
        raw = raw[: cut % len(raw)]
    cache.write_bytes(bytes(raw))
    _try_session(eng, case)


def _try_session(eng: Engine, case: Path) -> None:
    try:
        s = read_session(case, limits_of(eng.model))
    except SegmentFileError as exc:
        assert str(exc).startswith("session ") or "cannot read" in str(exc)
        _count("rejected")
    else:  # still a valid session: every id inside the vocabulary, every row pointing at a token
        assert len(s.tokens) == len(s.positions) and all(0 <= t < 300 for t in s.tokens)
        assert all(c.n_tokens == s.n_tokens and (c.row_token < s.n_tokens).all() for c in s.caches)
        _count("accepted (still valid)")


@pytest.mark.parametrize("turn", [{}, {"prompt_tokens": 3, "cached_tokens": 0, "prefilled_tokens": 3, "extra": 1}])
def test_a_corrupt_turn_record_is_named(setup, turn: dict[str, int]) -> None:  # type: ignore[no-untyped-def]
    # Found by test_mangled_session_files: a turn missing fields raised a bare TypeError.
    eng, _, _, folder, root = setup
    case = root / "session-turn-case"
    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(folder, case)
    doc = json.loads((case / "session.json").read_text())
    doc["turns"] = [turn]
    (case / "session.json").write_text(json.dumps(doc))
    with pytest.raises(SegmentFileError, match="turn 0 is corrupt"):
        read_session(case, limits_of(eng.model))


# ------------------------------------------------ structure-aware mutations (issue 15)
# Numbers at the edges of every range kvscope checks: the vocabulary (300 here), float32 RoPE (2^24),
# int32/int64/uint64, and values of the wrong JSON type. Checksums are recomputed, so only the range
# checks stand between these and the model.
EDGES = st.sampled_from(
    [-1, 0, 1, 299, 300, 2**24 - 1, 2**24, 2**31, 2**53, 2**62, 2**63 - 1, 2**63, 2**64, 10**19, True, 1.5, "7", None]
)


def _pick(doc: object, path: list[int]) -> tuple[object, object]:
    """Walk into nested lists/dicts by `path` (indices taken modulo the size); returns (container, key)."""
    parent: object = None
    key: object = None
    for step in path:
        if isinstance(doc, dict) and doc:
            parent, key = doc, sorted(doc)[step % len(doc)]
        elif isinstance(doc, list) and doc:
            parent, key = doc, step % len(doc)
        else:
            break
        doc = parent[key]  # type: ignore[index]
    return parent, key


@FUZZ
@given(
    field=st.sampled_from(["token_ids", "positions", "n_layers", "n_kv_heads", "head_dim", "visible", "version"]),
    path=st.lists(st.integers(0, 100), min_size=1, max_size=2),
    value=EDGES,
)
def test_manifest_numbers_at_the_edges(setup, field: str, path: list[int], value: object) -> None:  # type: ignore[no-untyped-def]
    from crafted import resum

    header, data = _header(setup[2])
    man = json.loads(header["__metadata__"]["0.kvscope"])
    parent, key = _pick(man[field], path) if isinstance(man[field], list) else (man, field)
    if parent is None:
        parent, key = man, field
    parent[key] = value  # type: ignore[index]
    header["__metadata__"]["0.kvscope"] = json.dumps(resum(header, data, man))
    _try_splice(setup, _pack(header, data))


@FUZZ
@given(
    field=st.sampled_from(["tokens", "positions", "origin", "layers", "id", "model_fingerprint", "turns"]),
    path=st.lists(st.integers(0, 100), min_size=1, max_size=3),
    value=EDGES | st.sampled_from(["", ".", "..", "/abs/dir", "../sessions/s1", "s1/..", "a" * 65, "s1\0"]),
)
def test_session_fields_at_the_edges(setup, field: str, path: list[int], value: object) -> None:  # type: ignore[no-untyped-def]
    eng, _, _, folder, root = setup
    case = root / "session-edge"
    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(folder, case)
    doc = json.loads((case / "session.json").read_text())
    parent, key = _pick(doc[field], path) if isinstance(doc[field], (list, dict)) else (doc, field)
    if parent is None:
        parent, key = doc, field
    parent[key] = value  # type: ignore[index]
    (case / "session.json").write_text(json.dumps(doc))
    _try_session(eng, case)


@FUZZ
@given(
    depth=st.integers(33, 20_000),
    digits=st.integers(21, 8_000),
    where=st.sampled_from(["manifest", "header", "session"]),
    kind=st.sampled_from(["depth", "digits", "nan", "duplicate"]),
)
def test_json_bombs_everywhere(setup, depth: int, digits: int, where: str, kind: str) -> None:  # type: ignore[no-untyped-def]
    bomb = {
        "depth": "[" * depth + "]" * depth,
        "digits": "9" * digits,
        "nan": "NaN",
        "duplicate": '{"a": 1, "a": 2}',
    }[kind]
    eng, _, good, folder, root = setup
    if where == "session":
        case = root / "session-bomb"
        shutil.rmtree(case, ignore_errors=True)
        shutil.copytree(folder, case)
        text = (case / "session.json").read_text()
        (case / "session.json").write_text(text.replace('"edited": ', f'"bomb": {bomb}, "edited": ', 1))
        with pytest.raises(SegmentFileError, match="session .*session.json"):
            read_session(case, limits_of(eng.model))
        _count("rejected")
        return
    header, data = _header(good)
    if where == "manifest":
        man = header["__metadata__"]["0.kvscope"]
        header["__metadata__"]["0.kvscope"] = man.replace('"text": ', f'"bomb": {bomb}, "text": ', 1)
        _try_splice(setup, _pack(header, data))
    else:
        body = json.dumps(header)
        text = body.replace('"__metadata__": ', f'"bomb": {bomb}, "__metadata__": ', 1)
        _try_splice(setup, struct.pack("<Q", len(text.encode())) + text.encode() + data)

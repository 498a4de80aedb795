"""Segment files: round trip, mlx-lm interop, and every bad file refused cleanly."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache

from kvscope.engine import Engine
from kvscope.engine.errors import SegmentFileError
from kvscope.engine.segment_file import inspect_segment
from tiny_models import make_tiny_model


@pytest.fixture()
def eng(llama_dir: Path) -> Engine:
    e = Engine()
    e.load(llama_dir)
    return e


def _session_bytes(eng: Engine, sid: str) -> tuple:
    s = eng.session(sid)  # type: ignore[arg-type]
    return (
        list(s.tokens),
        list(s.positions),
        list(s.origin),
        [m["content"] for m in s.messages],
        [np.array(c.state[0]).tobytes() + np.array(c.state[1]).tobytes() for c in s.caches],
        [c.row_visible[: c.n_rows].tobytes() for c in s.caches],
        [c.offset for c in s.caches],
    )


def _saved_segment(eng: Engine, tmp_path: Path) -> tuple[Path, str]:
    a = eng.new_session("source")
    eng.append_message(a, "user", "the code for locker 7 is 4 8 2 1")
    path = eng.save_segment(a, 2, eng.session(a).n_tokens, tmp_path / "seg.safetensors")
    return path, a


def test_round_trip_splice_equals_session_splice(eng: Engine, tmp_path: Path) -> None:
    path, a = _saved_segment(eng, tmp_path)
    man = inspect_segment(path)
    assert man["n_layers"] == eng.model.n_layers and man["model_fingerprint"] == eng.model.fingerprint
    assert man["token_ids"] == eng.session(a).tokens[2:]
    b1, b2 = eng.new_session(), eng.new_session()
    for b in (b1, b2):
        eng.append_message(b, "user", "you are a code locker")
    eng.splice_file(b1, path)
    eng.splice(b2, a, 2, eng.session(a).n_tokens)
    assert _session_bytes(eng, b1)[:2] == _session_bytes(eng, b2)[:2]
    k1, k2 = eng.session(b1).caches[1].state[0], eng.session(b2).caches[1].state[0]
    assert np.array_equal(np.array(k1), np.array(k2))


def test_mlx_lm_opens_a_kvscope_segment(eng: Engine, tmp_path: Path) -> None:
    path, a = _saved_segment(eng, tmp_path)
    caches, meta = load_prompt_cache(str(path), return_metadata=True)
    n = eng.session(a).n_tokens - 2
    assert len(caches) == eng.model.n_layers
    assert caches[0].offset == n and caches[0].keys.shape[2] == n
    assert json.loads(meta["kvscope"])["format"] == "kvscope-segment"


def test_mlx_lm_prompt_cache_imports_as_segment(eng: Engine, tmp_path: Path) -> None:
    lm = eng.model
    prompt = "the code for locker 7 is 4 8 2 1"
    ids = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=False, continue_final_message=True
    )
    cache = make_prompt_cache(lm.model)
    for _ in generate_step(mx.array(ids), lm.model, max_tokens=0, prompt_cache=cache):
        pass
    f = tmp_path / "mlx.safetensors"
    save_prompt_cache(str(f), cache, {"model": "tiny"})
    sid = eng.new_session()
    eng.splice_file(sid, f, prompt=prompt)
    s = eng.session(sid)
    assert s.tokens == list(ids)
    ref = make_prompt_cache(lm.model)
    lm.model(mx.array(ids)[None], cache=ref)
    np.testing.assert_allclose(np.array(s.caches[1].state[1]), np.array(ref[1].state[1][..., : len(ids), :]), atol=1e-5)
    with pytest.raises(SegmentFileError, match="prompt has"):
        eng.splice_file(sid, f, prompt="another prompt")
    with pytest.raises(SegmentFileError, match="mlx-lm prompt cache.*prompt text"):
        eng.splice_file(sid, f)


def _corruptions(good: bytes) -> dict[str, tuple[bytes, str]]:
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8 : 8 + n])

    def with_header(h: dict) -> bytes:
        body = json.dumps(h).encode()
        body += b" " * (-len(body) % 8)
        return struct.pack("<Q", len(body)) + body + good[8 + n :]

    tampered = bytearray(good)
    tampered[8 + n + (len(good) - 8 - n) // 2] ^= 0x55  # inside the K/V data
    bad_length = json.loads(json.dumps(header))
    bad_length["0.2"]["dtype"] = "F32"  # same bytes, read as another number
    man = json.loads(header["__metadata__"]["0.kvscope"])

    def with_manifest(**changes: object) -> bytes:
        h = json.loads(json.dumps(header))
        m = dict(man, **changes)
        for k in [k for k, v in changes.items() if v is None]:
            del m[k]
        h["__metadata__"]["0.kvscope"] = json.dumps(m)
        return with_header(h)

    bad_shape = json.loads(json.dumps(header))
    bad_shape["0.0"]["shape"] = [1, 99, 1, 1]
    return {
        "truncated": (good[: len(good) // 2], "truncated"),
        "tiny": (good[:5], "truncated"),
        "tampered": (bytes(tampered), "checksum mismatch"),
        "huge header": (struct.pack("<Q", 1 << 40) + good[8:], "header length"),
        "not json": (struct.pack("<Q", 8) + b"{{{{{{{{" + good[16:], "not valid JSON"),
        "not utf8": (struct.pack("<Q", 8) + b"{\xff\xfe\xfa\xfb{{{" + good[16:], "not UTF-8"),
        "wrong model": (with_manifest(model_fingerprint="0" * 32, model_name="other"), "made with model 'other'"),
        "missing field": (with_manifest(token_ids=None), "missing 'token_ids'"),
        "wrong type": (with_manifest(positions="zero"), "'positions' has the wrong type"),
        "newer version": (with_manifest(version=99), "version 99 is not supported"),
        "wrong layers": (with_manifest(n_layers=5), "do not match 5 layers"),
        "bad shape": (with_header(bad_shape), "has .* bytes, shape"),
        "bad length": (with_header(bad_length), "caches .* tokens, the manifest has"),
        "no manifest": (with_header({k: v for k, v in header.items() if k != "__metadata__"}), "no kvscope manifest"),
        "positions": (with_manifest(positions=[0] * len(man["positions"])), "increasing"),
    }


def test_bad_files_are_refused_and_change_nothing(eng: Engine, tmp_path: Path) -> None:
    path, _ = _saved_segment(eng, tmp_path)
    good = path.read_bytes()
    target = eng.new_session()
    eng.append_message(target, "user", "you are a code locker")
    before = _session_bytes(eng, target)
    for name, (data, message) in _corruptions(good).items():
        f = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        f.write_bytes(data)
        with pytest.raises(SegmentFileError, match=message):
            eng.splice_file(target, f)
        assert _session_bytes(eng, target) == before, name
    with pytest.raises(SegmentFileError, match="cannot read"):
        eng.splice_file(target, tmp_path / "missing.safetensors")


def test_segment_of_another_model_is_refused(eng: Engine, tmp_path: Path) -> None:
    other = Engine()
    other.load(make_tiny_model(tmp_path / "other", "llama", seed=5))
    sid = other.new_session()
    other.append_message(sid, "user", "the code for locker 7")
    path = other.save_segment(sid, 0, 3, tmp_path / "other.safetensors")
    target = eng.new_session()
    with pytest.raises(SegmentFileError, match="made with model"):
        eng.splice_file(target, path)
    qwen = Engine()
    qwen.load(make_tiny_model(tmp_path / "q", "phi3"))
    with pytest.raises(SegmentFileError, match="n_kv_heads is 2, the loaded model has 4"):
        qwen.splice_file(qwen.new_session(), path)

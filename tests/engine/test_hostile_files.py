"""Issue 15's crafted files, each refused with a clear error and nothing changed.

Findings 1, 3, 7, 8 and 12 (segment side): token ids outside the vocabulary
(a SIGSEGV before), a checksum that covers the manifest, JSON depth bombs
and 5,000-digit integers, FIFOs / devices / sparse files / absurd layer
counts, positions past float32 RoPE, wrong dtype, garbage visibility,
NaN tensors, overlapping or shifted offsets, trailing bytes, NUL bytes.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from crafted import pack, split, with_manifest, with_tensor

from kvscope.engine import Engine
from kvscope.engine.errors import InvalidRequestError, SegmentFileError
from kvscope.engine.segment_file import inspect_segment
from kvscope.engine.surgery import Segment


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("hostile")
    eng = Engine()
    eng.load(llama_dir)
    src = eng.new_session()
    eng.append_message(src, "user", "the code for locker 7 is 4 8 2 1")
    good = eng.save_segment(src, 1, 9, root / "good.safetensors").read_bytes()
    target = eng.new_session()
    eng.append_message(target, "user", "you are a code locker")
    return eng, target, good, root


def _state(eng: Engine, sid: str) -> tuple:
    s = eng.session(sid)  # type: ignore[arg-type]
    return (
        list(s.tokens),
        list(s.positions),
        len(s.undo_stack),
        len(s.operations),
        [np.array(c.state[0]).tobytes() for c in s.caches],
        [c.row_visible[: c.n_rows].tobytes() for c in s.caches],
    )


def _refused(lab, data: bytes, match: str) -> None:  # type: ignore[no-untyped-def]
    eng, target, _, root = lab
    f = root / "case.safetensors"
    f.write_bytes(data)
    before = _state(eng, target)
    with pytest.raises(SegmentFileError, match=match):
        eng.splice_file(target, f)
    assert _state(eng, target) == before


# ---------------------------------------------------------------- finding 1
@pytest.mark.parametrize("bad", [300, 2**31, 2**40, 2**63 - 1, -1])
def test_token_ids_outside_the_vocabulary_are_refused(lab, bad: int) -> None:  # type: ignore[no-untyped-def]
    good = lab[2]
    ids = json.loads(split(good)[0]["__metadata__"]["0.kvscope"])["token_ids"]
    data = with_manifest(good, token_ids=[bad] + ids[1:])  # checksum recomputed: only the range check can catch it
    _refused(lab, data, "vocabulary of 300" if 0 <= bad < 2**31 else "not a token id")


def test_the_checksum_covers_the_manifest(lab) -> None:  # type: ignore[no-untyped-def]
    eng, _, good, root = lab
    ids = json.loads(split(good)[0]["__metadata__"]["0.kvscope"])["token_ids"]
    f = root / "edited.safetensors"
    f.write_bytes(with_manifest(good, keep_sum=True, token_ids=[5] + ids[1:]))
    with pytest.raises(SegmentFileError, match="checksum mismatch: the tensors or manifest"):
        inspect_segment(f)


def test_a_crafted_segment_no_longer_kills_the_cli(lab, llama_dir: Path) -> None:  # type: ignore[no-untyped-def]
    _, _, good, root = lab
    ids = json.loads(split(good)[0]["__metadata__"]["0.kvscope"])["token_ids"]
    f = root / "segv.safetensors"
    f.write_bytes(with_manifest(good, token_ids=[2**31] + ids[1:]))
    out = subprocess.run(
        [sys.executable, "-m", "kvscope.app.cli", "segment", "load", "--model", str(llama_dir), str(f)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2, out.stderr[-2000:]  # was 139 (SIGSEGV)
    assert "kvscope: error:" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("bad", [2**31, 2**63, 2**64 + 5])
def test_api_segments_are_checked_too_and_a_failed_splice_leaves_nothing(lab, bad: int) -> None:  # type: ignore[no-untyped-def]
    # Finding 2: ids >= 2^63 raised std::bad_cast *after* the splice was applied (40 -> 92 tokens, undo +1).
    eng, target, _, _ = lab
    lm = eng.model
    src = eng.session(target)
    n = 4
    k = [c.state[0][..., :n, :] for c in src.caches]
    v = [c.state[1][..., :n, :] for c in src.caches]
    seg = Segment([bad, 5, 6, 7], np.arange(n, dtype=np.int64), k, v, [np.ones(n, bool)] * lm.n_layers)
    before = _state(eng, target)
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        eng.splice_segment(target, seg)
    assert _state(eng, target) == before


# ---------------------------------------------------------------- finding 3
@pytest.mark.parametrize(
    "raw, match",
    [
        ("[" * 100_000 + "]" * 100_000, "nests 100000 levels"),
        ('{"format": "kvscope-segment", "version": ' + "9" * 5000 + "}", "integer of 5000 digits"),
        ('{"positions": [NaN]}', "NaN, not a finite number"),
        ('{"a": 1, "a": 2}', "appears twice"),
    ],
)
def test_hostile_json_in_the_manifest(lab, raw: str, match: str) -> None:  # type: ignore[no-untyped-def]
    _refused(lab, with_manifest(lab[2], raw=raw), match)


def test_hostile_json_in_the_safetensors_header(lab) -> None:  # type: ignore[no-untyped-def]
    body = split(lab[2])[1]
    _refused(lab, pack('{"a":' * 50_000 + "1" + "}" * 50_000, body), "nests")
    _refused(lab, pack('{"x": ' + "1" * 5000 + "}", body), "5000 digits")


# ---------------------------------------------------------------- finding 7
def _with_timeout(fn) -> BaseException | None:  # type: ignore[no-untyped-def]
    """Run `fn` in a thread; a hang fails the test instead of hanging the suite (not a speed bound)."""
    box: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            box.append(None)
        except BaseException as exc:  # noqa: BLE001
            box.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(120)
    assert box, "the reader blocked"
    return box[0]


def test_special_files_are_refused_without_blocking(lab) -> None:  # type: ignore[no-untyped-def]
    eng, target, _, root = lab
    fifo = root / "fifo.safetensors"
    os.mkfifo(fifo)
    exc = _with_timeout(lambda: eng.splice_file(target, fifo))
    assert isinstance(exc, SegmentFileError) and "FIFO" in str(exc)
    zero = root / "zero.safetensors"
    zero.symlink_to("/dev/zero")
    exc = _with_timeout(lambda: eng.splice_file(target, zero))
    assert isinstance(exc, SegmentFileError) and "character device" in str(exc)
    exc = _with_timeout(lambda: eng.splice_file(target, root))
    assert isinstance(exc, SegmentFileError) and "directory" in str(exc)


def test_a_huge_sparse_file_is_judged_by_its_header(lab) -> None:  # type: ignore[no-untyped-def]
    f = lab[3] / "sparse.safetensors"
    with f.open("wb") as fh:
        fh.write(struct.pack("<Q", 1 << 40))
        fh.truncate(2 << 30)  # 2 GB, all holes: reading it whole would take seconds and 2 GB
    eng, target, _, _ = lab
    with pytest.raises(SegmentFileError, match="header length 1099511627776 exceeds"):
        eng.splice_file(target, f)
    f.unlink()


@pytest.mark.parametrize("n_layers", [10**19, 2**31, 0, -1])
def test_absurd_layer_counts_are_refused_before_use(lab, n_layers: int) -> None:  # type: ignore[no-untyped-def]
    _refused(lab, with_manifest(lab[2], n_layers=n_layers), "n_layers is")
    f = lab[3] / "layers.safetensors"
    f.write_bytes(with_manifest(lab[2], n_layers=n_layers))
    with pytest.raises(SegmentFileError, match="n_layers is"):
        inspect_segment(f)  # no model to compare with: still bounded


# ---------------------------------------------------------------- finding 8
@pytest.mark.parametrize("first", [10**9, 2**62, 2**63 - 1, 1 << 24])
def test_positions_past_float32_rope_are_refused(lab, first: int) -> None:  # type: ignore[no-untyped-def]
    man = json.loads(split(lab[2])[0]["__metadata__"]["0.kvscope"])
    n = len(man["positions"])
    _refused(lab, with_manifest(lab[2], positions=list(range(first, first + n))), "positions must be")


def test_dtype_visibility_and_values_are_checked(lab) -> None:  # type: ignore[no-untyped-def]
    good = lab[2]
    _refused(lab, with_manifest(good, dtype="complex1024"), "dtype 'complex1024'")
    _refused(lab, with_manifest(good, visible="garbage"), "'visible'")
    _refused(lab, with_manifest(good, visible=[[1, 0]]), "'visible' must be")
    header, _ = split(good)
    shape = header["0.0"]["shape"]
    for bad in (np.nan, np.inf):
        keys = np.zeros(shape, np.float32)
        keys[0, 0, 1, 2] = bad
        _refused(lab, with_tensor(good, "0.0", keys), "NaN or infinite")


def test_offsets_must_tile_the_data_like_the_official_parser(lab) -> None:  # type: ignore[no-untyped-def]
    from safetensors import SafetensorError
    from safetensors.numpy import load

    header, body = split(lab[2])
    cases = {}
    h = json.loads(json.dumps(header))
    a, b = h["0.1"]["data_offsets"]
    h["0.1"]["data_offsets"] = [a - 4, b - 4]  # shifted onto the previous tensor
    cases["overlaps"] = pack(h, body)
    h = json.loads(json.dumps(header))
    last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    a, b = h[last]["data_offsets"]
    h[last]["data_offsets"] = [a + 8, b + 8]  # 8 unindexed bytes before the last tensor
    cases["gap"] = pack(h, body[:a] + b"\0" * 8 + body[a:])
    cases["trailing bytes"] = pack(header, body + b"\0" * 8)
    for name, data in cases.items():
        with pytest.raises(SafetensorError):
            load(data)  # the official parser refuses it too
        _refused(lab, data, {"overlaps": "overlaps", "gap": "leaves a gap", "trailing bytes": "trailing bytes"}[name])


# ---------------------------------------------------------------- finding 12
def test_nul_bytes_and_special_output_targets(lab) -> None:  # type: ignore[no-untyped-def]
    eng, target, _, root = lab
    with pytest.raises(SegmentFileError, match="null byte"):
        eng.splice_file(target, "seg\0ment.safetensors")
    with pytest.raises(SegmentFileError, match="null byte"):
        eng.import_session("a\0b.kvsession")
    with pytest.raises(InvalidRequestError, match="null byte"):
        eng.export_session(target, "a\0b.kvsession")
    fifo = root / "out.fifo"
    os.mkfifo(fifo)
    with pytest.raises(SegmentFileError, match="not a regular file"):
        eng.save_segment(target, 0, 3, fifo)
    assert fifo.is_fifo()


def test_special_session_files_and_archive_bombs(tmp_path: Path, llama_dir: Path) -> None:
    """Finding 7, session side: a FIFO or a symlink as session.json, an archive that expands past the budget."""
    import zipfile

    from kvscope.engine import EngineConfig, SamplingParams
    from kvscope.engine.errors import MemoryBudgetError

    data = tmp_path / "data"
    eng = Engine(EngineConfig(persist=True, data_dir=str(data)))
    eng.load(llama_dir)
    for _ in range(3):
        eng.chat(eng.new_session(), "the code ?", SamplingParams(max_tokens=2))
    eng.close_data_folder()
    (data / "sessions" / "s1" / "session.json").unlink()
    os.mkfifo(data / "sessions" / "s1" / "session.json")
    (data / "sessions" / "s2" / "session.json").unlink()
    (data / "sessions" / "s2" / "session.json").symlink_to(data / "sessions" / "s3" / "session.json")
    again = Engine(EngineConfig(persist=True, data_dir=str(data), memory_budget_bytes=1 << 20))
    exc = _with_timeout(lambda: again.load(llama_dir))
    assert exc is None and again.sessions() == ["s3"]
    errors = " | ".join(again.load_errors)
    assert "FIFO" in errors and "symbolic link" in errors
    bomb = tmp_path / "bomb.kvsession"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("session.json", "{}")
        zf.writestr("cache-0123456789ab.safetensors", b"\0" * (64 << 20))  # 64 MB of zeros, ~64 KB zipped
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(SegmentFileError, match="would expand to 67108864 bytes"):
        again.import_session(bomb)
    assert again.sessions() == ["s3"]
    with pytest.raises((SegmentFileError, MemoryBudgetError)):
        with zipfile.ZipFile(bomb, "w") as zf:
            zf.writestr("session.json", "[" * 100_000 + "]" * 100_000)
            zf.writestr("cache-0123456789ab.safetensors", b"")
        again.import_session(bomb)
    again.close_data_folder()

"""Every operation is a transaction (issue 15, findings 2, 10, 11): a failure at any step changes nothing.

A full disk is a real `OSError(ENOSPC)` raised by the write path, as a
full disk raises it; the session is compared in memory and on disk.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

import kvscope.engine.persistence as persistence
from kvscope.engine import Engine, EngineConfig, SamplingParams
from kvscope.engine.errors import InvalidRequestError, KVScopeError, MemoryBudgetError


def _full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    real = persistence.os.fsync

    def fsync(fd: int) -> None:
        real(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(persistence.os, "fsync", fsync)


def _state(eng: Engine, sid: str) -> tuple:
    s = eng.session(sid)  # type: ignore[arg-type]
    return (
        s.name,
        list(s.tokens),
        [dict(m) for m in s.messages],
        len(s.undo_stack),
        len(s.operations),
        [np.array(c.state[0]).tobytes() for c in s.caches],
        [c.row_visible[: c.n_rows].tobytes() for c in s.caches],
    )


def _disk(data: Path) -> dict[str, bytes]:
    return {str(p.relative_to(data)): p.read_bytes() for p in sorted(data.rglob("*")) if p.is_file()}


@pytest.fixture()
def saved(tmp_path: Path, llama_dir: Path):  # type: ignore[no-untyped-def]
    eng = Engine(EngineConfig(persist=True, data_dir=str(tmp_path)))
    eng.load(llama_dir)
    sid = eng.new_session("work")
    eng.chat(sid, "the code for locker 7 is 4 8 2 1", SamplingParams(max_tokens=3))
    yield eng, sid, tmp_path
    eng.close_data_folder()


def test_on_a_full_disk_nothing_half_applies(saved, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    eng, sid, data = saved
    before, disk, sessions = _state(eng, sid), _disk(data), eng.sessions()
    _full_disk(monkeypatch)
    attempts = {
        "mask": lambda: eng.mask(sid, 1, 4, fidelity=False),
        "erratum": lambda: eng.erratum(sid, "[update] the code is 1 2 3 4", fidelity=False),
        "rename": lambda: eng.rename_session(sid, "renamed"),
        "new": lambda: eng.new_session("another"),
        "duplicate": lambda: eng.duplicate_session(sid),
        "append": lambda: eng.append_message(sid, "user", "a document"),
        "compress": lambda: eng.compress(sid, "streaming_llm", keep_ratio=0.5),
    }
    for what, attempt in attempts.items():
        with pytest.raises(InvalidRequestError, match="could not save .*No space left"):
            attempt()
        assert _state(eng, sid) == before, what
        assert eng.sessions() == sessions, what
        assert _disk(data) == disk, what  # no temp file left behind either
    monkeypatch.undo()
    eng.mask(sid, 1, 4, fidelity=False)  # and the engine still works


def test_a_failed_measure_or_save_undoes_the_splice(saved, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import kvscope.engine.editing as editing

    eng, sid, data = saved
    src = eng.new_session("source")
    eng.append_message(src, "user", "the colour is blue")
    before, disk = _state(eng, sid), _disk(data)

    def broken_measure(*a: object, **k: object) -> None:
        raise RuntimeError("std::bad_cast")  # what the model run raised for ids >= 2^63

    monkeypatch.setattr(editing, "measure", broken_measure)
    with pytest.raises(RuntimeError, match="bad_cast"):
        eng.splice(sid, src, 0, 3)
    assert _state(eng, sid) == before  # was: 40 -> 92 tokens and one more undo entry
    monkeypatch.undo()
    _full_disk(monkeypatch)
    with pytest.raises(InvalidRequestError, match="could not save"):
        eng.splice(sid, src, 0, 3)
    assert _state(eng, sid) == before and _disk(data) == disk


def test_leftover_temp_files_are_removed_at_start_up(saved, llama_dir: Path) -> None:  # type: ignore[no-untyped-def]
    eng, sid, data = saved
    assert eng.data_folder is not None
    folder = eng.data_folder / sid
    eng.close_data_folder()
    junk = [folder / ".cache-0123456789ab.safetensors.tmp", folder / ".session.json.tmp"]
    for j in junk:
        j.write_bytes(b"x" * 4096)  # what a SIGKILL inside a save leaves
    again = Engine(EngineConfig(persist=True, data_dir=str(data)))
    again.load(llama_dir)
    assert not any(j.exists() for j in junk)
    assert again.sessions() == [sid] and again.load_errors == []


def test_cleanup_failures_do_not_hide_the_reason(saved, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    eng, sid, _ = saved

    def refuse(*a: object, **k: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "replace", refuse)
    monkeypatch.setattr(Path, "unlink", refuse)  # a read-only place: the clean-up fails too
    with pytest.raises(KVScopeError, match="cannot write segment .*Read-only file system"):
        eng.save_segment(sid, 0, 3, tmp_path / "seg.safetensors")
    with pytest.raises(KVScopeError, match="cannot write .*Read-only file system"):
        eng.export_session(sid, tmp_path / "s.kvsession")


# ---------------------------------------------------------------- finding 11
@pytest.mark.parametrize("text", ["0123456789" * 30, "記憶体の予算" * 50, "🙂🚀" * 100])
def test_the_turn_budget_counts_real_tokens(llama_dir: Path, text: str) -> None:
    eng = Engine()
    lm = eng.load(llama_dir)
    sid = eng.new_session()
    n_real, old_estimate = len(lm.tokenizer.encode(text)), len(text) // 2
    assert n_real > 1.5 * old_estimate  # digits, CJK, emoji: more tokens than characters / 2
    eng.memory_budget_bytes = ((old_estimate + n_real) // 2 + 32 + 16) * lm.bytes_per_token  # between the two
    with pytest.raises(MemoryBudgetError, match="this turn needs"):
        eng.chat(sid, text, SamplingParams(max_tokens=16))
    assert eng.session(sid).n_tokens == 0 and eng.cache_bytes() == 0


def test_everything_that_adds_rows_checks_the_budget(tmp_path: Path, llama_dir: Path) -> None:
    big = Engine(EngineConfig(persist=True, data_dir=str(tmp_path / "a")))
    lm = big.load(llama_dir)
    sid = big.new_session()
    big.append_message(sid, "user", "the code for locker 7 is 4 8 2 1 . " * 20)
    path = big.export_session(sid, tmp_path / "big.kvsession")
    big.close_data_folder()
    need = big.session(sid).nbytes
    small = Engine(EngineConfig(persist=True, data_dir=str(tmp_path / "a"), memory_budget_bytes=need // 3))
    small.load(llama_dir)
    assert small.sessions() == [] and any("budget" in e for e in small.load_errors)  # restore refused, kept on disk
    assert (tmp_path / "a" / "sessions" / sid / "session.json").exists()
    with pytest.raises(MemoryBudgetError, match="importing big.kvsession"):
        small.import_session(path)
    s2 = small.new_session()
    small.append_message(s2, "user", "the code")
    for attempt in (
        lambda: small.duplicate_session(s2) and small.duplicate_session(s2) and small.duplicate_session(s2),
        lambda: small.erratum(s2, "[update] " + "the code is 4 8 2 1 . " * 40, fidelity=False),
    ):
        with pytest.raises(MemoryBudgetError):
            for _ in range(200):
                attempt()
    assert small.cache_bytes() <= small.memory_budget_bytes
    assert lm.bytes_per_token > 0


def test_invalid_budgets_are_refused(llama_dir: Path) -> None:
    for bad in (0, -5):
        with pytest.raises(InvalidRequestError, match="positive"):
            Engine(EngineConfig(memory_budget_bytes=bad))
    eng = Engine(EngineConfig(memory_budget_bytes=100_000))
    eng.load(llama_dir)
    with pytest.raises(MemoryBudgetError) as err:
        eng.append_message(eng.new_session(), "user", "code " * 5000)
    assert " 0 MB" not in str(err.value) and "KB" in str(err.value)


def test_cancel_stops_a_long_append_and_changes_nothing(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kvscope.engine.generation as generation
    from kvscope.engine.errors import CancelledError

    eng = Engine()
    eng.load(llama_dir)
    sid = eng.new_session()
    eng.append_message(sid, "user", "the code for locker 7 is 4 8 2 1")
    before = _state(eng, sid)
    real, chunks = generation.forward, []

    def forward(*a: object, **k: object) -> object:
        chunks.append(1)
        eng.cancel(sid)  # the person presses stop while the first chunk runs
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(generation, "forward", forward)
    with pytest.raises(CancelledError, match="cancelled after 512 of"):
        eng.append_message(sid, "user", "the code for locker 7 is 4 8 2 1 . " * 300)  # a few chunks of 512
    assert len(chunks) == 1 and _state(eng, sid) == before
    monkeypatch.undo()
    assert eng.append_message(sid, "user", "and the colour ?") > 0

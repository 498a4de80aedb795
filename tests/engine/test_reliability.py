"""Nothing lost: sessions survive SIGKILL (mid-generation, mid-save); memory budget refuses cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kvscope.engine import Engine, EngineConfig, SamplingParams
from kvscope.engine.budget import MemoryBudget
from kvscope.engine.errors import MemoryBudgetError

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import kvscope.engine
    from kvscope.engine import Engine, EngineConfig, SamplingParams
    import kvscope.engine.persistence as P
    data, model, kill_on_replace = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if kill_on_replace:
        real, calls = os.replace, [0]
        def replace(a, b):
            calls[0] += 1
            if calls[0] == kill_on_replace:
                os.kill(os.getpid(), signal.SIGKILL)  # after the temp file, before the rename
            real(a, b)
        P.os.replace = replace
    eng = Engine(EngineConfig(persist=True, data_dir=data))
    eng.load(model)
    sid = eng.sessions()[0] if eng.sessions() else eng.new_session("work", system="you are a code locker")
    print("ready", flush=True)
    for i in range(1000):
        eng.chat(sid, f"turn {i}: the code for locker {i} is 4 8 2 1", SamplingParams(max_tokens=40))
        print("turn", i, flush=True)
    """
)


def _spawn(data: Path, model: Path, kill_on_replace: int = 0) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data), str(model), str(kill_on_replace)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _reopen(data: Path, model: Path) -> Engine:
    eng = Engine(EngineConfig(persist=True, data_dir=str(data)))
    eng.load(model)
    return eng


def _consistent(eng: Engine) -> int:
    assert eng.load_errors == []
    (sid,) = eng.sessions()
    s = eng.session(sid)
    assert all(c.n_tokens == s.n_tokens and c.n_rows == s.n_tokens for c in s.caches)
    assert len(s.messages) % 2 == 1  # system + complete user/assistant pairs
    res = eng.chat(sid, "and now ?", SamplingParams(max_tokens=2))  # still usable
    assert res.token_ids
    return len(s.messages)


def test_sigkill_mid_generation_loses_at_most_the_answer(tmp_path: Path, llama_dir: Path) -> None:
    data = tmp_path / "data"
    seen_turns = 0
    for delay in (0.6, 1.3, 0.9):
        child = _spawn(data, llama_dir)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready", child.stderr.read() if child.stderr else ""
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        eng = _reopen(data, llama_dir)
        n_messages = _consistent(eng)
        assert n_messages >= seen_turns  # nothing completed earlier was lost
        seen_turns = n_messages + 2  # _consistent added a turn, saved too
        eng.close_data_folder()  # hand the data folder to the next child; keep what is on disk as it sees it


def test_sigkill_mid_save_keeps_the_previous_state(tmp_path: Path, llama_dir: Path) -> None:
    data = tmp_path / "data"
    first = _reopen(data, llama_dir)
    first.chat(first.new_session("work", system="you are a code locker"), "hello", SamplingParams(max_tokens=2))
    first.close_data_folder()  # one writer per data folder: let the children write
    for nth in (1, 2, 3, 5, 8):
        child = _spawn(data, llama_dir, kill_on_replace=nth)
        child.wait(timeout=120)
        assert child.returncode == -signal.SIGKILL
        _consistent(_reopen(data, llama_dir))
    leftovers = [p.name for p in data.rglob(".*.tmp")]
    assert leftovers == []  # the reopening engine cleaned what the killed saves left


def test_memory_budget_evicts_prefix_blocks_then_refuses(llama_dir: Path) -> None:
    eng = Engine(EngineConfig(memory_budget_bytes=300_000))
    lm = eng.load(llama_dir)
    sid = eng.new_session(system="you are a code locker . " * 6)
    eng.chat(sid, "what is the code ?", SamplingParams(max_tokens=4))
    assert eng.store is not None and eng.store.nbytes > 0
    eng.close_session(sid)  # its blocks are now unreferenced
    big = eng.new_session()
    per_token = lm.bytes_per_token
    room = (eng.memory_budget_bytes - eng.cache_bytes()) // per_token
    store = eng.store
    budget = MemoryBudget(eng.memory_budget_bytes, lambda: eng.cache_bytes() - store.nbytes, lambda: store)
    budget.reserve_tokens(room + store.nbytes // per_token, per_token, "test")  # needs all the store's blocks gone
    assert eng.store.nbytes == 0
    before = eng.session(big).n_tokens
    with pytest.raises(MemoryBudgetError, match="needs .* MB .* budget"):
        eng.append_message(big, "user", "code " * 40_000)
    assert eng.session(big).n_tokens == before
    assert "memory_budget_bytes" in eng.info()


def test_saved_sessions_of_another_model_stay_on_disk(tmp_path: Path, tiny_model_dirs: dict[str, Path]) -> None:
    data = tmp_path / "data"
    a = Engine(EngineConfig(persist=True, data_dir=str(data)))
    a.load(tiny_model_dirs["llama"])
    a.chat(a.new_session(), "the code ?", SamplingParams(max_tokens=2))
    a.close_data_folder()
    b = _reopen(data, tiny_model_dirs["qwen2"])
    assert b.sessions() == [] and b.load_errors == []
    b.chat(b.new_session(), "another model's chat", SamplingParams(max_tokens=2))  # must not overwrite it
    b.close_data_folder()
    assert len(_reopen(data, tiny_model_dirs["llama"]).sessions()) == 1
    assert os.listdir(data / "sessions")


def test_session_files_round_trip_and_bad_ones_are_refused(tmp_path: Path, llama_dir: Path) -> None:
    import zipfile

    from kvscope.engine.errors import SegmentFileError

    eng = Engine()
    eng.load(llama_dir)
    sid = eng.new_session("work")
    eng.chat(sid, "the code for locker 7 ?", SamplingParams(max_tokens=3))
    eng.mask(sid, 2, 5)
    path = eng.export_session(sid, tmp_path / "work.kvsession")
    new = eng.import_session(path)
    a, b = eng.session(sid), eng.session(new)
    assert a.tokens == b.tokens and a.messages == b.messages
    assert [c.n_visible for c in a.caches] == [c.n_visible for c in b.caches]
    before = eng.sessions()
    junk = tmp_path / "junk.kvsession"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(SegmentFileError, match="not a readable session file"):
        eng.import_session(junk)
    evil = tmp_path / "evil.kvsession"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("session.json", "{}")
        zf.writestr("../../escape.txt", "x")
    with pytest.raises(SegmentFileError, match="not a kvscope session file"):
        eng.import_session(evil)
    assert eng.sessions() == before and not (tmp_path.parent / "escape.txt").exists()


# Issue 15, finding 9: two processes on one data folder. Each child loads, says whether it was told the
# folder is in use, then runs turns in steps the test releases through stdin (so the interleaving is fixed).
NEIGHBOUR = textwrap.dedent(
    """
    import sys
    import kvscope.engine
    from kvscope.engine import Engine, EngineConfig, SamplingParams
    data, model, tag = sys.argv[1], sys.argv[2], sys.argv[3]
    eng = Engine(EngineConfig(persist=True, data_dir=data))
    eng.load(model)
    print("read-only", any("in use by another kvscope process" in e for e in eng.load_errors), flush=True)
    sid = eng.sessions()[0] if eng.sessions() else eng.new_session("work")
    for line in sys.stdin:
        for i in range(int(line)):
            eng.chat(sid, f"{tag} turn {i}", SamplingParams(max_tokens=4))
        print("done", flush=True)
    """
)


def _neighbour(data: Path, model: Path, tag: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", NEIGHBOUR, str(data), str(model), tag],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _step(p: subprocess.Popen[str], n: int) -> None:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(f"{n}\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "done", p.stderr.read() if p.stderr else ""


def _read_only(p: subprocess.Popen[str]) -> bool:
    assert p.stdout is not None
    line = p.stdout.readline().split()
    assert line[:1] == ["read-only"], p.stderr.read() if p.stderr else ""
    return line[1] == "True"


def _finish(*procs: subprocess.Popen[str]) -> None:
    for p in procs:
        assert p.stdin is not None
        p.stdin.close()
        assert p.wait(timeout=300) == 0, p.stderr.read() if p.stderr else ""


def _saved_user_turns(data: Path, model: Path) -> list[str]:
    eng = _reopen(data, model)
    eng.close_data_folder()
    return [m["content"] for sid in eng.sessions() for m in eng.session(sid).messages if m["role"] == "user"]


def test_a_second_process_never_overwrites_saved_turns(tmp_path: Path, llama_dir: Path) -> None:
    data = tmp_path / "data"
    a = _neighbour(data, llama_dir, "A")
    assert not _read_only(a)
    _step(a, 6)
    b = _neighbour(data, llama_dir, "B")  # opens A's session while A still works on it
    assert _read_only(b)
    _step(a, 6)
    _finish(a)
    _step(b, 1)  # B is the last to finish a turn: before, its save replaced A's last 6 turns
    _finish(b)
    assert _saved_user_turns(data, llama_dir) == [f"A turn {i}" for i in range(6)] * 2


def test_two_windows_started_together_do_not_mix_their_chats(tmp_path: Path, llama_dir: Path) -> None:
    data = tmp_path / "data"
    a, b = _neighbour(data, llama_dir, "A"), _neighbour(data, llama_dir, "B")
    flags = {"A": _read_only(a), "B": _read_only(b)}
    assert sorted(flags.values()) == [False, True]  # exactly one writes; the other was told
    _step(a, 3)
    _step(b, 3)
    _finish(a, b)
    writer = next(tag for tag, ro in flags.items() if not ro)
    assert _saved_user_turns(data, llama_dir) == [f"{writer} turn {i}" for i in range(3)]
    assert os.listdir(data / "sessions") == ["s1"]


def test_dropping_an_engine_lets_go_of_its_data_folder_at_once(tmp_path: Path, llama_dir: Path) -> None:
    """A script that drops its Engine hands the folder to the next one without waiting for the GC."""
    import gc

    data = tmp_path / "data"
    gc.disable()  # no cycle collection: the engine must be freed by its last reference going away
    try:
        first = _reopen(data, llama_dir)
        first.new_session("kept")
        del first
        second = _reopen(data, llama_dir)
    finally:
        gc.enable()
    assert second.load_errors == [] and len(second.sessions()) == 1
    second.close_data_folder()

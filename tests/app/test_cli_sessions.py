"""`kvscope sessions` and hostile data folders (issue 15, findings 3-6, 11): clear messages, nothing lost.

In-process `main(argv)`, as a person types it; the data folder is real.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvscope.app.cli import main
from kvscope.engine import Engine, EngineConfig, SamplingParams


@pytest.fixture()
def data(tmp_path: Path, llama_dir: Path) -> Path:
    """A data folder with two saved sessions, s1 and s2, and a file of the person's next to them."""
    home = tmp_path / "home"
    eng = Engine(EngineConfig(persist=True, data_dir=str(home)))
    eng.load(llama_dir)
    for name in ("first", "second"):
        eng.chat(eng.new_session(name), "the code ?", SamplingParams(max_tokens=2))
    eng.close_data_folder()
    (home / "notes.txt").write_text("mine, not kvscope's")
    (tmp_path / "sibling.txt").write_text("also mine")
    return home


def _everything(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name != "kvscope.lock")


@pytest.mark.parametrize("bad", ["", ".", "..", "../..", "/", "s1/..", "../home/sessions/s1", "s1/session.json"])
def test_delete_refuses_anything_but_a_session_id(data: Path, bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    before = _everything(data.parent)
    assert main(["sessions", "--data-dir", str(data), "--delete", bad]) == 2
    err = capsys.readouterr()
    assert "is not a session id" in err.err and "deleted" not in err.out
    assert _everything(data.parent) == before


def test_delete_says_so_for_an_unknown_id_and_deletes_a_known_one(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (data / "sessions" / "s9").symlink_to(outside)  # a session folder that is a link out of the store
    assert main(["sessions", "--data-dir", str(data), "--delete", "s7", "--delete", "s9"]) == 2
    out = capsys.readouterr()
    assert "no saved session 's7'" in out.err and "not a session folder" in out.err and "deleted" not in out.out
    assert outside.exists()
    assert main(["sessions", "--data-dir", str(data), "--delete", "s1"]) == 0
    out = capsys.readouterr().out
    assert "deleted s1" in out and "'second'" in out and "'first'" not in out
    assert (data / "notes.txt").exists() and (tmp_path / "sibling.txt").exists()


def test_delete_waits_for_the_window_to_let_go(data: Path, llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    window = Engine(EngineConfig(persist=True, data_dir=str(data)))
    window.load(llama_dir)  # holds the data folder, as the window does
    assert main(["sessions", "--data-dir", str(data), "--delete", "s1"]) == 2
    assert "in use by another kvscope process" in capsys.readouterr().err
    assert (data / "sessions" / "s1").exists()
    window.close_data_folder()


@pytest.mark.parametrize(
    "field, value",
    [
        ("id", 5),
        ("id", None),
        ("id", ["s1"]),
        ("model_fingerprint", 42),
        ("model_fingerprint", None),
        ("id", "/abs/dir"),
        ("id", "../sessions/s2"),
        ("tokens", "[" * 5000),
    ],
)
def test_a_broken_session_json_is_listed_and_the_others_open(
    data: Path, llama_dir: Path, field: str, value: object, capsys: pytest.CaptureFixture[str]
) -> None:
    f = data / "sessions" / "s1" / "session.json"
    doc = json.loads(f.read_text())
    doc[field] = value
    text = json.dumps(doc)
    if isinstance(value, str) and value.startswith("["):
        text = text.replace(json.dumps(value), value + "]" * 5000)  # a real depth bomb, not a string
    f.write_text(text)
    assert main(["sessions", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert "s1  unreadable:" in out and "'second'" in out
    eng = Engine(EngineConfig(persist=True, data_dir=str(data)))
    eng.load(llama_dir)  # the window opens: the model loads, the good session is there
    assert eng.sessions() == ["s2"] and len(eng.load_errors) == 1 and "s1" in eng.load_errors[0]
    eng.chat("s2", "and now ?", SamplingParams(max_tokens=2))  # type: ignore[arg-type]
    assert f.read_text() == text  # the broken one is left as it was, never re-saved elsewhere
    assert not Path("/abs/dir").exists()
    eng.close_data_folder()


@pytest.mark.parametrize("budget", ["0", "-1", "nan", "inf", "lots"])
def test_invalid_memory_budgets_are_refused_at_the_command_line(
    budget: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvscope.app.gui import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--memory-budget", budget])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "memory budget must be a positive" in err or "expected a number of MB" in err
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--memory-budget", budget])  # the server's flag too
    assert exc.value.code == 2

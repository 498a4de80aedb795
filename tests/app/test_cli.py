"""The `kvscope` command end to end (in-process `main(argv)`, one real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvscope.app.cli import main


def test_chat_prints_answer_and_stats(llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.json"
    code = main(
        [
            "chat",
            "--model",
            str(llama_dir),
            "-p",
            "the code ?",
            "-p",
            "and the colour ?",
            "--system",
            "you are a code locker",
            "--max-tokens",
            "5",
            "--trace",
            str(trace),
        ]
    )
    err = capsys.readouterr().err
    assert code == 0
    assert err.count("ttft") == 2 and "cached 0 + prefilled" in err
    second = err.split("ttft")[2]
    assert "cached 0 " not in second  # the second turn reused the first
    doc = json.loads(trace.read_text())
    names = {e["name"] for e in doc["traceEvents"]}
    assert {"prefill", "ttft", "decode", "turn", "thread_name"} <= names
    assert all({"ph", "ts", "pid", "tid"} <= set(e) for e in doc["traceEvents"] if e["ph"] != "M")
    assert all("dur" in e for e in doc["traceEvents"] if e["ph"] == "X")


def test_info_json(llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", str(llama_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dtype"] == "float32" and info["layers"] == 2 and info["blas"]
    assert info["memory_budget_bytes"] > 0


def test_export_trace_with_shared_prefix(llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "trace.json"
    assert (
        main(
            [
                "export-trace",
                str(out),
                "--model",
                str(llama_dir),
                "-p",
                "the code ?",
                "--sessions",
                "2",
                "--system",
                "you are a code locker . " * 4,
                "--max-tokens",
                "3",
            ]
        )
        == 0
    )
    events = json.loads(out.read_text())["traceEvents"]
    assert any(e["name"] == "BlockStored" for e in events)
    tracks = {e["tid"] for e in events if e["ph"] == "X"}
    assert len(tracks) == 2


def test_bad_input_is_a_clear_message(llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chat", "--model", str(tmp_path / "nope"), "-p", "hi"]) == 2
    assert "no model folder" in capsys.readouterr().err
    assert main(["chat", "--model", str(llama_dir), "-p", "  "]) == 2
    assert "empty prompt" in capsys.readouterr().err
    assert (
        main(
            [
                "export-trace",
                str(tmp_path / "no" / "dir" / "t.json"),
                "--model",
                str(llama_dir),
                "-p",
                "x",
                "--max-tokens",
                "1",
            ]
        )
        == 2
    )
    assert "cannot write trace" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["chat", "--max-tokens", "many"])
    assert exc.value.code == 2
    assert main(["edit", "--model", str(llama_dir), "--text", "the code", "--mask", "0:999"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_edit_and_segment_commands(llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seg = tmp_path / "seg.safetensors"
    assert (
        main(
            [
                "edit",
                "--model",
                str(llama_dir),
                "--system",
                "you are a code locker",
                "--text",
                "the code for locker 7 is 4 8 2 1",
                "--mask",
                "2:5",
                "--erratum",
                "[update] code -> 1 2 3 4",
                "--delete",
                "0:1",
                "--save-segment",
                f"3:9={seg}",
                "--ask",
                "code ?",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    for op in ("[mask] mask: cosine", "[erratum]", "[delete]", "[segment] wrote", "[answer]"):
        assert op in err
    assert main(["segment", "inspect", str(seg)]) == 0
    assert "6 tokens, checksum OK" in capsys.readouterr().out
    assert main(["segment", "load", str(seg), "--model", str(llama_dir), "--text", "hello", "--seam-repair", "2"]) == 0
    assert "[splice] splice: cosine" in capsys.readouterr().err
    seg.write_bytes(seg.read_bytes()[:100])
    assert main(["segment", "inspect", str(seg)]) == 2
    assert "truncated" in capsys.readouterr().err


def test_console_script_runs(llama_dir: Path) -> None:
    exe = Path(sys.executable).parent / "kvscope"
    out = subprocess.run(
        [str(exe), "chat", "--model", str(llama_dir), "-p", "the code ?", "--max-tokens", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "decode" in out.stderr and "tok/s" in out.stderr


def test_sessions_lists_and_deletes_saved_sessions(
    llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvscope.engine import Engine, EngineConfig, SamplingParams

    eng = Engine(EngineConfig(persist=True, data_dir=str(tmp_path)))
    eng.load(llama_dir)
    sid = eng.new_session("kept work")
    eng.chat(sid, "the code ?", SamplingParams(max_tokens=2))
    assert main(["sessions", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "'kept work'" in out and "tokens" in out
    eng.close_data_folder()  # one writer per data folder: the engine lets go before the CLI deletes
    assert main(["sessions", "--data-dir", str(tmp_path), "--delete", sid]) == 0
    assert "no saved sessions" in capsys.readouterr().out

"""The window saves sessions as it goes, and the next start reopens them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from test_ui_smoke import _kvscope

from kvscope.engine import Engine, EngineConfig


def test_window_sessions_survive_a_restart(llama_dir: Path, tmp_path: Path) -> None:
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", KVSCOPE_HOME=str(tmp_path))
    cmd = _kvscope() + ["gui", "--model", str(llama_dir), "--quit-after-ms", "3000", "--prompt", "the red code"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    eng = Engine(EngineConfig(persist=True, data_dir=str(tmp_path)))
    eng.load(llama_dir)
    (sid,) = eng.sessions()
    assert [m["content"] for m in eng.session(sid).messages if m["role"] == "user"] == ["the red code"]
    assert eng.session(sid).n_tokens > 0
    # A second start reopens it rather than adding an empty "chat 1".
    second = subprocess.run(cmd[:-2], env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr[-2000:]
    eng = Engine(EngineConfig(persist=True, data_dir=str(tmp_path)))
    eng.load(llama_dir)
    assert eng.sessions() == [sid]

"""Start the real application in a subprocess and let it quit by itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys


def _kvscope() -> list[str]:
    exe = shutil.which("kvscope") or os.path.join(os.path.dirname(sys.executable), "kvscope")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "kvscope.app.cli"]


def test_kvscope_gui_starts_loads_chats_and_quits(llama_dir):
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    cmd = _kvscope() + ["gui", "--model", str(llama_dir), "--quit-after-ms", "2500", "--prompt", "the red code"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"window closed (model {llama_dir.name})" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_quit_after_env_var(llama_dir):
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", KVSCOPE_QUIT_AFTER_MS="1500")
    proc = subprocess.run(
        _kvscope() + ["gui", "--model", str(llama_dir)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]

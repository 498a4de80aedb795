"""Real mouse and keyboard on a real X server (issue 18).

Starts Xvfb, runs the window in a subprocess on it (`real_input_driver.py`,
Qt's xcb platform) and drives it with xdotool: a multi-line message typed
with Shift+Enter, a span selected with the mouse and dragged into another
session (a real QDrag), a span selected with the keyboard and masked with
M, M typed into the message box staying a letter, and the span unmasked
from its right-click context menu.

Skipped, with the reason, only where Xvfb or xdotool is missing (`run.sh`
installs both on Debian/Ubuntu) or no X server can start.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvscope.engine.blocks import TokenState
from kvscope.ui.actions import EDIT_ACTIONS, context_text

DRIVER = Path(__file__).with_name("real_input_driver.py")


@pytest.fixture(scope="module")
def x_display() -> Iterator[str]:
    missing = [t for t in ("Xvfb", "xdotool") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (run.sh installs xvfb and xdotool on Debian/Ubuntu)")
    read, write = os.pipe()
    proc = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write), "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
        pass_fds=(write,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write)
    with os.fdopen(read) as f:
        number = f.readline().strip()
    if not number:
        proc.kill()
        pytest.skip("Xvfb could not start an X server here")
    try:
        yield f":{number}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_real_drag_typing_and_keyboard_mask(x_display: str, llama_dir: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("QT_QPA_PLATFORM", "WAYLAND_DISPLAY")}
    env.update(DISPLAY=x_display, QT_QPA_PLATFORM="xcb", PYTHONPATH=str(DRIVER.parent))
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(DRIVER), "--model", str(llama_dir), "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.exists(), proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert proc.returncode == 0, (r, proc.stderr[-3000:])
    assert r["platform"] == "xcb"
    assert r["typed_before_enter"] == "the locker code\nis 4815"
    assert r["sent_message"] == "the locker code\nis 4815"
    assert r["mouse_selection"] == [2, 8]
    assert r["drags_started"] == 1
    before, after = r["b_tokens_before_after"]
    assert after == before + 6, r
    assert r["b_new_states"] == [int(TokenState.SPLICED)]
    assert "splice" in r["report_title"]
    assert r["keyboard_selection"] == [2, 6] and r["active_after_keys"]
    assert r["masked_tokens"] == [2, 3, 4, 5]
    assert r["prompt_after_m"] == "m" and r["masked_after_typing"] == [2, 3, 4, 5]
    assert r["context_menu"] == [context_text(a) for a in EDIT_ACTIONS]  # the one action table
    assert r["masked_after_menu"] == [], r  # "Unmask" chosen from it with the mouse

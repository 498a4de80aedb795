"""Every command module is wired into `kvscope`, and a missing one fails loudly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvscope.app import cli
from kvscope.app.cli import main

APP = Path(cli.__file__).resolve().parent


def test_every_command_module_is_a_command() -> None:
    files = {p.stem for p in APP.glob("cmd_*.py")}
    wired = {m.__name__.rsplit(".", 1)[-1] for m in cli.COMMAND_MODULES}
    assert files == wired  # a cmd_*.py that is not in COMMAND_MODULES would never run
    assert "cmd_segment" in wired


def test_a_missing_command_module_stops_kvscope_with_its_name() -> None:
    # The module gone from the install (as a None in sys.modules makes it): kvscope must not start without it.
    code = (
        "import sys; sys.modules['kvscope.app.cmd_segment'] = None; from kvscope.app.cli import main; main(['--help'])"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "ModuleNotFoundError" in res.stderr and "kvscope.app.cmd_segment" in res.stderr
    assert "usage: kvscope" not in res.stdout


def test_segment_save_then_inspect(llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seg = tmp_path / "seg.safetensors"
    text = "the code for locker 7 is 4 8 2 1"
    assert main(["segment", "save", "--model", str(llama_dir), "--text", text, "--span", "2:7", "-o", str(seg)]) == 0
    assert f"wrote {seg}: tokens [2, 7)" in capsys.readouterr().out
    assert main(["segment", "inspect", str(seg)]) == 0
    assert "5 tokens, checksum OK" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:  # argparse: a usage error, the span format named
        main(["segment", "save", "--model", str(llama_dir), "--text", text, "--span", "2-7", "-o", str(seg)])
    assert exc.value.code == 2 and "span must be LO:HI" in capsys.readouterr().err

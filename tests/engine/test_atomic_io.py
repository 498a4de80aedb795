"""atomic_write: the one file writer keeps the old file whole when a write fails."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import pytest

from kvscope.engine.atomic_io import atomic_write, temp_path


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "notes.json"
    atomic_write(target, b"old")

    def half_then_fail(fh: BinaryIO) -> None:
        fh.write(b"new but incomplete")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.json"]


def test_a_write_replaces_the_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "notes.json"
    atomic_write(target, b"a much longer first version")
    atomic_write(target, lambda fh: fh.write(b"v2"))
    assert target.read_bytes() == b"v2"
    assert not temp_path(target).exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_special_file_as_target_is_refused_before_writing(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        atomic_write(fifo, b"x")  # opening a FIFO for writing would block forever
    assert not temp_path(fifo).exists()

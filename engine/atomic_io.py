"""The one way kvscope writes a file: all of it or none of it.

    atomic_write(path, data)          # bytes
    atomic_write(path, fill)          # fill(fh) writes into a binary handle

Promises:
- the content goes to a hidden sibling `.NAME.tmp`, is flushed and fsynced,
  then renamed over `path` (`os.replace`, atomic on POSIX and Windows); the
  folder is fsynced after the rename where the platform allows it;
- a crash or an error at any point leaves `path` as it was (old file, or
  none) and no temporary file behind; the original exception propagates
  (callers turn `OSError` into their own error for a person);
- `path` is never followed if it exists and is not a regular file (a FIFO or
  a device as the target is refused with `IsADirectoryError`-like
  `OSError`, before anything is written).

Used by session folders, segment files, session archives and traces.
Knows nothing about what it writes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TMP_PREFIX = "."
TMP_SUFFIX = ".tmp"


def temp_path(path: Path) -> Path:
    """The temporary sibling `atomic_write` uses for `path` (stale ones are safe to delete)."""
    return path.with_name(f"{TMP_PREFIX}{path.name}{TMP_SUFFIX}")


def atomic_write(path: str | os.PathLike[str], content: bytes | Callable[[BinaryIO], None]) -> Path:
    """Write `content` (bytes, or a function that writes into a binary handle) to `path` atomically."""
    target = Path(path)
    _refuse_special(target)
    tmp = temp_path(target)
    try:
        with tmp.open("wb") as fh:
            if isinstance(content, bytes | bytearray | memoryview):
                fh.write(content)
            else:
                content(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError, ValueError):  # a failing cleanup must not hide the real reason
            tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(target.parent)
    return target


def _refuse_special(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise OSError(errno.EINVAL, "it exists and is not a regular file", str(path))


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable; some platforms (Windows) cannot open a folder: that is fine."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

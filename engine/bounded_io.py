"""The one bounded reader every kvscope file goes through.

Promises:
- `open_regular` opens only regular files: a FIFO, a device, a socket or a
  directory is refused without blocking (opened `O_NONBLOCK`, checked with
  `fstat`), and with `follow_symlinks=False` a symbolic link is refused too;
- `read_exact` never reads more than the size `fstat` reported, and says so
  when the file shrinks under it;
- `loads_json` parses JSON only after bounding its size and nesting depth,
  refuses integers longer than 20 digits, non-finite numbers (`NaN`,
  `Infinity`, `1e999`) and duplicate object keys, so a hostile file gives a
  `SegmentFileError` naming it instead of a `RecursionError` or `ValueError`;
- every OS-level problem (missing file, permission, a NUL byte in the path)
  becomes a `SegmentFileError` with the reason.

Knows nothing about safetensors, segments or sessions.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from kvscope.engine.errors import SegmentFileError

MAX_JSON_BYTES = 100_000_000  # safetensors' own header limit; a 250K-token x 64-layer manifest fits
MAX_JSON_DEPTH = 32  # kvscope's own files nest 4 deep
MAX_INT_DIGITS = 20  # int64 and uint64 have at most 20 digits
_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def describe(path: str | os.PathLike[str]) -> str:
    """A file's name for messages (the last part of the path)."""
    return Path(os.fsdecode(path)).name or str(path)


@contextmanager
def open_regular(path: str | os.PathLike[str], *, follow_symlinks: bool = True) -> Iterator[tuple[IO[bytes], int]]:
    """Open a regular file for reading; yields (binary file, size in bytes).

    Raises:
        SegmentFileError: the path is missing, unreadable, not a regular file,
            or (with `follow_symlinks=False`) a symbolic link.
    """
    name = describe(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except ValueError as exc:  # an embedded NUL byte
        raise SegmentFileError(f"cannot read {path!r}: {exc}") from exc
    except OSError as exc:
        if not follow_symlinks and os.path.islink(path):
            raise SegmentFileError(f"{name} is a symbolic link: kvscope reads only regular files here") from exc
        raise SegmentFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((k for test, k in _KINDS if test(st.st_mode)), "not a regular file")
            if stat.S_ISDIR(st.st_mode):
                kind = "a directory"
            raise SegmentFileError(f"cannot read {path}: it is {kind}, not a regular file")
        os.set_blocking(fd, True)
        fh = os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise
    with fh:
        yield fh, st.st_size


def read_exact(fh: IO[bytes], n: int, name: str) -> bytes:
    """Read exactly `n` bytes from the current position (never more)."""
    parts, left = [], n
    while left > 0:
        try:
            chunk = fh.read(min(left, 1 << 24))
        except OSError as exc:
            raise SegmentFileError(f"cannot read {name}: {exc.strerror or exc}") from exc
        if not chunk:
            raise SegmentFileError(f"{name} is truncated or changed while being read ({n - left} of {n} bytes)")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def read_regular(path: str | os.PathLike[str], max_bytes: int, *, follow_symlinks: bool = True) -> bytes:
    """The whole content of a regular file no larger than `max_bytes`."""
    name = describe(path)
    with open_regular(path, follow_symlinks=follow_symlinks) as (fh, size):
        if size > max_bytes:
            raise SegmentFileError(f"{name} is {size} bytes, over the {max_bytes}-byte limit for this kind of file")
        return read_exact(fh, size, name)


def json_depth(data: bytes) -> int:
    """Deepest nesting of arrays/objects in JSON text, in linear time (brackets inside strings ignored).

    Escaped backslashes, then escaped quotes, are dropped first (JSON pairs
    escapes left to right), so every remaining quote delimits a string and a
    bracket is inside a string when an odd number of quotes precede it.
    """
    a = np.frombuffer(data.replace(b"\\\\", b"").replace(b'\\"', b""), np.uint8)
    opens = (a == ord("[")) | (a == ord("{"))
    at = np.flatnonzero(opens | (a == ord("]")) | (a == ord("}")))
    if not at.size:
        return 0
    outside = np.searchsorted(np.flatnonzero(a == ord('"')), at) % 2 == 0
    steps = np.where(opens[at], 1, -1)[outside]
    return int(np.cumsum(steps).max()) if steps.size else 0


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"it holds an integer of {len(text)} digits")
    return int(text)


def _float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"it holds a number out of range ({text[:30]})")
    return x


def _constant(text: str) -> Any:
    raise ValueError(f"it holds {text}, not a finite number")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"the key {dup[:40]!r} appears twice")
    return out


def loads_json(data: bytes | str, what: str, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON with size, depth and number limits; `what` names it in errors."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if len(raw) > max_bytes:
        raise SegmentFileError(f"{what} is {len(raw)} bytes, over the {max_bytes}-byte limit")
    depth = json_depth(raw)
    if depth > max_depth:
        raise SegmentFileError(f"{what} nests {depth} levels deep (the limit is {max_depth}): not a kvscope file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SegmentFileError(f"{what} is not UTF-8 ({exc.reason})") from exc
    try:
        return json.loads(
            text,
            parse_int=_int,
            parse_float=_float,
            parse_constant=_constant,
            object_pairs_hook=_no_duplicates,
        )
    except json.JSONDecodeError as exc:
        raise SegmentFileError(f"{what} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    except (ValueError, RecursionError) as exc:
        raise SegmentFileError(f"{what} is refused: {exc}") from exc


def check_fields(doc: dict[str, Any], fields: dict[str, type], where: str) -> None:
    """Every key of `fields` is in `doc` with that JSON type (an int is never a bool), or `SegmentFileError`.

    `where` names the document for the message ("session s1: session.json").
    """
    for key, typ in fields.items():
        if key not in doc:
            raise SegmentFileError(f"{where} is missing {key!r}")
        value = doc[key]
        if not isinstance(value, typ) or (typ in (int, float) and isinstance(value, bool)):
            raise SegmentFileError(f"{where}: field {key!r} has the wrong type ({type(value).__name__})")

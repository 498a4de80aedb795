"""`.kvsession` archives: one session folder (session.json + cache file) as a zip.

Promises:
- reading bounds the archive before extracting anything: exactly two
  members, `session.json` and one `cache-<sha12>.safetensors`, plain names
  only; their declared sizes are checked against the JSON limit and the
  memory budget, and extraction stops at the declared size (a zip bomb
  expands to nothing);
- the extracted folder is read with `session_file.read_session`, so an
  archive is checked exactly like a saved session;
- writing goes through `atomic_io.atomic_write`; a failure removes the
  temporary file and says why (a failing clean-up never hides the reason).

Knows nothing about the engine; the caller assigns a fresh id.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from kvscope.engine.atomic_io import atomic_write
from kvscope.engine.bounded_io import MAX_JSON_BYTES, describe, open_regular
from kvscope.engine.errors import InvalidRequestError, SegmentFileError
from kvscope.engine.model_limits import ModelLimits
from kvscope.engine.persistence import write_session_folder
from kvscope.engine.session import Session
from kvscope.engine.session_file import CACHE_FILE, read_session

_SLACK = 1 << 20  # a cache file's safetensors header on top of its tensor bytes
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, OSError, ValueError)


def write_archive(s: Session, fingerprint: str, model_name: str, path: str | os.PathLike[str]) -> Path:
    """Write `s` as a `.kvsession` zip at `path` (atomically)."""
    out = Path(path)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "session"
            write_session_folder(folder, s, fingerprint, model_name)

            def fill(fh: BinaryIO) -> None:
                with zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED) as zf:
                    for f in sorted(folder.iterdir()):
                        zf.write(f, f.name)

            atomic_write(out, fill)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise InvalidRequestError(f"cannot write {path!r}: {getattr(exc, 'strerror', None) or exc}") from exc
    return out


def _extract(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path) -> None:
    """Copy one member, never more than its declared size."""
    left = info.file_size
    with zf.open(info) as src, dest.open("wb") as dst:
        while True:
            chunk = src.read(min(1 << 20, left + 1))
            if not chunk:
                return
            left -= len(chunk)
            if left < 0:
                raise SegmentFileError(f"{info.filename} expands beyond its declared size: not a kvscope archive")
            dst.write(chunk)


def _members(zf: zipfile.ZipFile, name: str, max_cache: int) -> list[zipfile.ZipInfo]:
    infos = zf.infolist()
    names = sorted(i.filename for i in infos)
    caches = [n for n in names if CACHE_FILE.fullmatch(n)]
    if len(infos) != 2 or "session.json" not in names or len(caches) != 1:
        raise SegmentFileError(f"{name} is not a kvscope session file (members {[n[:40] for n in names[:4]]})")
    for i in infos:
        limit = MAX_JSON_BYTES if i.filename == "session.json" else max_cache
        if i.file_size > limit:
            raise SegmentFileError(f"{name}: {i.filename} would expand to {i.file_size} bytes, over {limit}")
    return infos


def read_archive(
    path: str | os.PathLike[str], limits: ModelLimits, max_cache_bytes: int, reserve: Callable[[int], None]
) -> Session:
    """Open a `.kvsession` file; `reserve(bytes)` is asked before the cache is extracted."""
    name = describe(path)
    with open_regular(path) as (fh, size), tempfile.TemporaryDirectory() as tmp:
        if size > MAX_JSON_BYTES + _SLACK + max_cache_bytes:
            raise SegmentFileError(f"{name} is {size} bytes, more than the memory budget could open")
        try:
            zf = zipfile.ZipFile(fh)  # type: ignore[arg-type]
        except _ZIP_ERRORS as exc:
            raise SegmentFileError(f"{name} is not a readable session file: {exc}") from exc
        with zf:
            infos = _members(zf, name, _SLACK + max(max_cache_bytes, 0))
            reserve(sum(i.file_size for i in infos if i.filename != "session.json"))
            try:
                for i in infos:
                    _extract(zf, i, Path(tmp) / i.filename)
            except _ZIP_ERRORS as exc:
                raise SegmentFileError(f"{name} is not a readable session file: {exc}") from exc
        return read_session(Path(tmp), limits, label=name)

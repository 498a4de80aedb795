"""Recordings of raw KV event messages: what `kvscope attach --record` writes.

One JSON object per line: {"topic": str, "seq": int, "payload": base64 of the
msgpack payload}, in arrival order. The bytes are kept as they came, so a
recording of a real server is a fixture for the decoder (tests/fixtures/).
"""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

from kvscope.engine.kv_events import WireFormatError, decode_seq

MAX_RECORDING_BYTES = 256 << 20


class Recorder:
    """Appends each message to a file; safe to call from the receive thread."""

    def __init__(self, path: str | Path, append: bool = False) -> None:
        self.path = Path(path)
        self._f = self.path.open("a" if append else "w", encoding="utf-8")
        self._lock = threading.Lock()

    def __call__(self, frames: list[bytes]) -> None:
        if len(frames) != 3:
            return
        try:
            seq = decode_seq(frames[1])
        except WireFormatError:
            return
        line = {
            "topic": frames[0].decode("utf-8", "replace"),
            "seq": seq,
            "payload": base64.b64encode(frames[2]).decode(),
        }
        with self._lock:
            self._f.write(json.dumps(line) + "\n")
            self._f.flush()

    def close(self) -> None:
        with self._lock:
            self._f.close()


def read_recording(path: str | Path) -> list[list[bytes]]:
    """The messages of a recording as `[topic, seq, payload]` frames; ValueError on a bad line."""
    p = Path(path)
    if p.stat().st_size > MAX_RECORDING_BYTES:
        raise ValueError(f"{p}: over {MAX_RECORDING_BYTES} bytes")
    out: list[list[bytes]] = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            out.append(
                [
                    d["topic"].encode(),
                    int(d["seq"]).to_bytes(8, "big", signed=True),
                    base64.b64decode(d["payload"], validate=True),
                ]
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{p}:{n}: not a recorded message ({exc})") from None
    return out

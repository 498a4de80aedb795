"""The drag format: what a dragged span carries, and what a session view accepts.

One module owns the wire format of a drag inside the window, so the token
strip (which starts drags), the block map and the strip (which take drops)
and `SpanActions` (which splices what was dropped) cannot drift apart:

- a dragged segment is `application/x-kvscope-segment`, UTF-8 JSON
  `{"session": str, "lo": int, "hi": int}` with `0 <= lo < hi` (a token span
  `[lo, hi)` of that session); the span's text rides along as plain text for
  other applications;
- a `.safetensors` file (a URL from a file manager) is a segment file;
- a segment dropped onto the session it came from is refused unless Ctrl is
  held (`SELF_SPLICE_MODIFIER`): re-selecting a span with the mouse must never
  splice a session into itself by accident;
- a malformed segment payload is refused with the reason, never half-read.

Knows nothing about the engine or the views.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from PySide6.QtCore import QMimeData, Qt
from PySide6.QtGui import QDragEnterEvent, QDragMoveEvent, QDropEvent

MIME_SEGMENT = "application/x-kvscope-segment"
SEGMENT_FILE_SUFFIX = ".safetensors"
SELF_SPLICE_MODIFIER = Qt.KeyboardModifier.ControlModifier
SELF_DROP_REFUSED = "a span dropped onto its own session is ignored: hold Ctrl while dropping to splice it into itself"
NOTHING_TO_DROP = "only session spans and .safetensors segment files can be dropped here"
MAX_PAYLOAD_BYTES = 4096  # a session id and two ints: anything larger is not ours


class DragFormatError(ValueError):
    """A dragged segment payload that does not follow the format (the message says why)."""


@dataclass(frozen=True, slots=True)
class DraggedSegment:
    """Tokens `[lo, hi)` of session `session`, as dragged from its token strip."""

    session: str
    lo: int
    hi: int


def encode_segment(seg: DraggedSegment, text: str = "") -> QMimeData:
    """The mime data a drag of `seg` carries (`text`: the span's text, for other apps)."""
    mime = QMimeData()
    mime.setData(MIME_SEGMENT, json.dumps({"session": seg.session, "lo": seg.lo, "hi": seg.hi}).encode())
    mime.setText(text)
    return mime


def parse_segment(payload: bytes) -> DraggedSegment:
    """Read one segment payload; raises `DragFormatError` naming what is wrong."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise DragFormatError(f"segment payload of {len(payload)} bytes (at most {MAX_PAYLOAD_BYTES})")
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DragFormatError(f"segment payload is not UTF-8 JSON ({exc})") from None
    if not isinstance(data, dict) or set(data) != {"session", "lo", "hi"}:
        raise DragFormatError('segment payload must be an object with exactly "session", "lo" and "hi"')
    session, lo, hi = data["session"], data["lo"], data["hi"]
    if not isinstance(session, str) or not session:
        raise DragFormatError(f"segment session must be a non-empty string, got {session!r}")
    for name, value in (("lo", lo), ("hi", hi)):
        if type(value) is not int:  # bool is an int subclass: not a token index
            raise DragFormatError(f"segment {name} must be a whole number, got {value!r}")
    if not 0 <= lo < hi:
        raise DragFormatError(f"segment span [{lo}, {hi}) is empty or negative")
    return DraggedSegment(session, lo, hi)


def decode_segment(mime: QMimeData) -> DraggedSegment | None:
    """The segment a drag carries (None: it carries none); raises `DragFormatError` if malformed."""
    if not mime.hasFormat(MIME_SEGMENT):
        return None
    return parse_segment(bytes(mime.data(MIME_SEGMENT).data()))


def segment_files(mime: QMimeData) -> list[str]:
    """Local `.safetensors` files a drag carries (from a file manager)."""
    if not mime.hasUrls():
        return []
    return [u.toLocalFile() for u in mime.urls() if u.toLocalFile().endswith(SEGMENT_FILE_SUFFIX)]


def has_payload(mime: QMimeData) -> bool:
    """Something a view may take: worth accepting on enter (Ctrl may still be pressed on the way)."""
    return mime.hasFormat(MIME_SEGMENT) or bool(segment_files(mime))


def refusal(mime: QMimeData, own_session: str, modifiers: Qt.KeyboardModifier) -> str | None:
    """Why a drop onto a view of `own_session` is refused, or None if it is accepted."""
    if not has_payload(mime):
        return NOTHING_TO_DROP
    try:
        seg = decode_segment(mime)
    except DragFormatError as exc:
        return f"the dragged segment is malformed: {exc}"
    if seg is not None and seg.session == own_session and not modifiers & SELF_SPLICE_MODIFIER:
        return SELF_DROP_REFUSED
    return None


def accept_enter(ev: QDragEnterEvent) -> None:
    """Take a drag entering a view if it carries something droppable (refusals come on move and drop)."""
    if has_payload(ev.mimeData()):
        ev.acceptProposedAction()
    else:
        ev.ignore()


def accept_move(ev: QDragMoveEvent, own_session: str) -> bool:
    """Accept or ignore a drag moving over a view of `own_session`; True if it would be taken."""
    if refusal(ev.mimeData(), own_session, ev.modifiers()) is not None:
        ev.ignore()
        return False
    ev.acceptProposedAction()
    return True


def accept_drop(ev: QDropEvent, own_session: str) -> str | None:
    """Accept or refuse a drop onto a view of `own_session`; the refusal reason, or None if taken."""
    why = refusal(ev.mimeData(), own_session, ev.modifiers())
    if why is None:
        ev.acceptProposedAction()
    else:
        ev.ignore()
    return why

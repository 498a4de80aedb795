"""What the window accepts as a drop, shared by the token strip and the block map.

A drop is a segment of a session (`application/x-kvscope-segment` JSON
`{session, lo, hi}`, made by dragging a selection) or `.safetensors`
segment files. A segment dropped onto the session it came from is refused
unless Ctrl is held (`SELF_SPLICE_MODIFIER`): re-selecting a span with the
mouse must never splice a session into itself by accident.
"""

from __future__ import annotations

import json

from PySide6.QtCore import QMimeData, Qt

MIME_SEGMENT = "application/x-kvscope-segment"
SELF_SPLICE_MODIFIER = Qt.KeyboardModifier.ControlModifier
SELF_DROP_REFUSED = "a span dropped onto its own session is ignored: hold Ctrl while dropping to splice it into itself"


def segment_source(mime: QMimeData) -> str | None:
    """The session a dragged segment comes from (None: not a segment)."""
    if not mime.hasFormat(MIME_SEGMENT):
        return None
    try:
        return str(json.loads(bytes(mime.data(MIME_SEGMENT)).decode())["session"])
    except (ValueError, KeyError, TypeError):
        return None


def has_payload(mime: QMimeData) -> bool:
    if mime.hasFormat(MIME_SEGMENT):
        return True
    return mime.hasUrls() and any(u.toLocalFile().endswith(".safetensors") for u in mime.urls())


def refusal(mime: QMimeData, own_session: str, modifiers: Qt.KeyboardModifier) -> str | None:
    """Why this drop is refused here, or None if it is accepted."""
    if not has_payload(mime):
        return "only session spans and .safetensors segment files can be dropped here"
    if segment_source(mime) == own_session and not modifiers & SELF_SPLICE_MODIFIER:
        return SELF_DROP_REFUSED
    return None

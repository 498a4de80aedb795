"""The Qt binding must not over-release None (PySide6 6.12.0 does, and aborts Python < 3.12)."""

from __future__ import annotations

import sys

from PySide6.QtCore import QPointF
from PySide6.QtGui import QColor, QImage, QPainter, QPen


def test_painter_calls_keep_none_alive(qapp) -> None:  # type: ignore[no-untyped-def]
    img = QImage(64, 64, QImage.Format.Format_ARGB32)
    p = QPainter(img)
    pen = QPen(QColor(255, 0, 0))
    before = sys.getrefcount(None)
    for _ in range(200):
        p.setPen(pen)
        p.drawLine(QPointF(0, 0), QPointF(10, 10))
    after = sys.getrefcount(None)
    p.end()
    assert after - before > -50, f"None lost {before - after} references in 400 QPainter calls"

"""MessageEdit: the multi-line message box of a session.

Promises:
- Enter (or the keypad's Enter) sends: emits `submitted(text)` with the
  text as typed (the caller decides what an empty or busy send means);
- Shift+Enter inserts a newline, as in chat apps;
- grows with its text from one to `MAX_LINES` lines, then scrolls, so a
  long message never pushes the session's map and strip away.
"""

from __future__ import annotations

from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QKeyEvent
from PySide6.QtWidgets import QPlainTextEdit, QSizePolicy, QWidget

MAX_LINES = 6


class MessageEdit(QPlainTextEdit):
    submitted = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setPlaceholderText("Message… (Enter sends, Shift+Enter new line)")
        self.setTabChangesFocus(True)  # Tab moves on to the buttons and the strip
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.document().contentsChanged.connect(self._fit_height)
        self._fit_height()

    def text(self) -> str:
        return self.toPlainText()

    def setText(self, text: str) -> None:  # noqa: N802 - QLineEdit's name, kept for callers
        self.setPlainText(text)

    def keyPressEvent(self, ev: QKeyEvent) -> None:  # noqa: N802
        if ev.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter):
            if ev.modifiers() & Qt.KeyboardModifier.ShiftModifier:
                self.insertPlainText("\n")
            else:
                self.submitted.emit(self.toPlainText())
            ev.accept()
            return
        super().keyPressEvent(ev)

    def _lines_shown(self) -> int:
        return max(1, min(MAX_LINES, self.document().blockCount()))

    def _fit_height(self) -> None:
        line = self.fontMetrics().lineSpacing()
        margins = self.contentsMargins().top() + self.contentsMargins().bottom()
        self.setFixedHeight(int(self._lines_shown() * line + 2 * self.document().documentMargin() + margins + 2))

    def sizeHint(self) -> QSize:  # noqa: N802
        return QSize(200, self.height())

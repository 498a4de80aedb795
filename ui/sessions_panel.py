"""SessionsPanel: the list of open sessions and the buttons that manage them.

Emits what the person asked for (`new_requested`, `duplicate_requested`,
`rename_requested`, `close_requested`, `current_changed`); the main window
turns them into engine calls. The list mirrors the engine's sessions: it is
updated from `SessionCreated` / `SessionClosed` events and snapshots.
The "system prompt" box below the list is the system prompt of the next
new session (sessions that share it share its cached blocks).
"""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QGridLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)


class SessionsPanel(QWidget):
    new_requested = Signal()
    duplicate_requested = Signal(str)
    rename_requested = Signal(str, str)  # sid, new name
    close_requested = Signal(str)
    current_changed = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.list = QListWidget()
        self.list.currentItemChanged.connect(self._on_current)
        self.list.itemChanged.connect(self._on_item_edited)
        buttons = QGridLayout()
        self.new_btn = QPushButton("New")
        self.dup_btn = QPushButton("Duplicate")
        self.rename_btn = QPushButton("Rename")
        self.close_btn = QPushButton("Close")
        for i, b in enumerate((self.new_btn, self.dup_btn, self.rename_btn, self.close_btn)):
            buttons.addWidget(b, i // 2, i % 2)
        self.new_btn.clicked.connect(self.new_requested)
        self.dup_btn.clicked.connect(lambda: self._with_current(self.duplicate_requested.emit))
        self.close_btn.clicked.connect(lambda: self._with_current(self.close_requested.emit))
        self.rename_btn.clicked.connect(self._start_rename)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        self.system = QPlainTextEdit()
        self.system.setPlaceholderText("System prompt for new sessions (optional)")
        self.system.setMaximumHeight(90)
        self.system.setTabChangesFocus(True)
        lay.addWidget(self.list, 1)
        lay.addLayout(buttons)
        lay.addWidget(QLabel("System prompt of new sessions:"))
        lay.addWidget(self.system)
        self._names: dict[str, str] = {}

    def system_prompt(self) -> str | None:
        return self.system.toPlainText().strip() or None

    def current(self) -> str | None:
        item = self.list.currentItem()
        return item.data(Qt.ItemDataRole.UserRole) if item else None

    def sessions(self) -> list[str]:
        return [self.list.item(i).data(Qt.ItemDataRole.UserRole) for i in range(self.list.count())]

    def _item(self, sid: str) -> QListWidgetItem | None:
        for i in range(self.list.count()):
            if self.list.item(i).data(Qt.ItemDataRole.UserRole) == sid:
                return self.list.item(i)
        return None

    def add(self, sid: str, name: str) -> None:
        if self._item(sid) is not None:
            return self.set_name(sid, name)
        item = QListWidgetItem(name)
        item.setData(Qt.ItemDataRole.UserRole, sid)
        item.setFlags(item.flags() | Qt.ItemFlag.ItemIsEditable)
        item.setToolTip(sid)
        self._names[sid] = name
        self.list.blockSignals(True)
        self.list.addItem(item)
        self.list.blockSignals(False)
        self.list.setCurrentItem(item)

    def remove(self, sid: str) -> None:
        item = self._item(sid)
        if item is not None:
            self.list.takeItem(self.list.row(item))
        self._names.pop(sid, None)

    def set_name(self, sid: str, name: str) -> None:
        item = self._item(sid)
        if item is not None and item.text() != name:
            self.list.blockSignals(True)
            item.setText(name)
            self.list.blockSignals(False)
        self._names[sid] = name

    def select(self, sid: str) -> None:
        item = self._item(sid)
        if item is not None and item is not self.list.currentItem():
            self.list.setCurrentItem(item)

    def _with_current(self, fn: Callable[[str], object]) -> None:
        sid = self.current()
        if sid is not None:
            fn(sid)

    def _start_rename(self) -> None:
        item = self.list.currentItem()
        if item is not None:
            self.list.editItem(item)

    def _on_item_edited(self, item: QListWidgetItem) -> None:
        sid = item.data(Qt.ItemDataRole.UserRole)
        name = item.text().strip()
        if name and name != self._names.get(sid):
            self._names[sid] = name
            self.rename_requested.emit(sid, name)

    def _on_current(self, item: QListWidgetItem | None, _prev: object) -> None:
        if item is not None:
            self.current_changed.emit(item.data(Qt.ItemDataRole.UserRole))

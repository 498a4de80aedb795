"""SessionArea: where the session views live — tabs, or two side by side.

Promises:
- any number of sessions fit in a window 1024 px wide: each session is a
  tab (movable, so the person can reorder them; scroll buttons when the
  tabs do not fit), never one more column;
- `compare(a, b)` shows two sessions side by side (a left, b right) for
  drag and drop between them; `end_compare()` folds the right side back;
  the right pane exists only while it holds a tab;
- `tab_chosen(sid)` is emitted only when the person clicks a tab; showing a
  view programmatically (`show_view`) emits nothing.

Knows nothing about the engine; a view is any widget, added with its
session id and name.
"""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QSplitter, QTabWidget, QWidget


class SessionArea(QSplitter):
    tab_chosen = Signal(str)  # session id of the tab the person clicked

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(Qt.Orientation.Horizontal, parent)
        self.setChildrenCollapsible(False)
        self.panes = [self._new_pane(), self._new_pane()]
        self._sids: dict[QWidget, str] = {}  # view -> its session id
        self.panes[1].hide()

    def _new_pane(self) -> QTabWidget:
        tabs = QTabWidget()
        tabs.setMovable(True)
        tabs.setDocumentMode(True)
        tabs.setUsesScrollButtons(True)
        tabs.setElideMode(Qt.TextElideMode.ElideRight)
        tabs.tabBar().setChangeCurrentOnDrag(True)  # hovering a drag over a tab shows that session
        tabs.tabBar().tabBarClicked.connect(lambda i, t=tabs: self._on_tab_clicked(t, i))
        self.addWidget(tabs)
        return tabs

    # ------------------------------------------------------------ views
    def add(self, view: QWidget, sid: str, name: str) -> None:
        self._sids[view] = sid
        self._put(self.panes[0], view, name)

    def _put(self, pane: QTabWidget, view: QWidget, name: str) -> None:
        pane.addTab(view, name)
        pane.setTabToolTip(pane.indexOf(view), self._sids[view])

    def remove(self, view: QWidget) -> None:
        self._sids.pop(view, None)
        pane = self.pane_of(view)
        if pane is not None:
            pane.removeTab(pane.indexOf(view))
        self._fold_if_empty()

    def pane_of(self, view: QWidget) -> QTabWidget | None:
        return next((p for p in self.panes if p.indexOf(view) >= 0), None)

    def show_view(self, view: QWidget) -> None:
        pane = self.pane_of(view)
        if pane is not None and pane.currentWidget() is not view:
            pane.setCurrentWidget(view)

    def set_name(self, view: QWidget, name: str) -> None:
        pane = self.pane_of(view)
        if pane is not None:
            pane.setTabText(pane.indexOf(view), name)

    def views(self) -> list[QWidget]:
        return [w for p in self.panes for w in _tabs(p)]

    def visible_views(self) -> list[QWidget]:
        return [w for p in self.panes if p.isVisible() and (w := p.currentWidget()) is not None]

    # ------------------------------------------------------------ compare
    @property
    def comparing(self) -> bool:
        return self.panes[1].count() > 0

    def compare(self, left: QWidget, right: QWidget) -> None:
        """Show `left` and `right` side by side."""
        self._move(left, 0)
        self._move(right, 1)
        self.panes[1].show()
        self.setSizes([1, 1])
        self.show_view(left)
        self.show_view(right)

    def end_compare(self) -> None:
        for view in _tabs(self.panes[1]):
            self._move(view, 0)
        self._fold_if_empty()

    def _move(self, view: QWidget, to: int) -> None:
        src = self.pane_of(view)
        dst = self.panes[to]
        if src is dst or src is None:
            return
        name = src.tabText(src.indexOf(view))
        src.removeTab(src.indexOf(view))
        self._put(dst, view, name)

    def _fold_if_empty(self) -> None:
        if self.panes[1].count() == 0:
            self.panes[1].hide()

    def _on_tab_clicked(self, tabs: QTabWidget, index: int) -> None:
        view = tabs.widget(index)
        sid = self._sids.get(view) if view is not None else None
        if sid is not None:
            self.tab_chosen.emit(sid)


def _tabs(pane: QTabWidget) -> list[QWidget]:
    """The widgets of a pane's tabs, in tab order."""
    return [w for i in range(pane.count()) if (w := pane.widget(i)) is not None]

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

Knows nothing about the engine; views are `SessionView`s (anything with
`sid` and `name`).
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
    def add(self, view: QWidget) -> None:
        pane = self.panes[0]
        pane.addTab(view, view.name)  # type: ignore[attr-defined]
        pane.setTabToolTip(pane.indexOf(view), view.sid)  # type: ignore[attr-defined]

    def remove(self, view: QWidget) -> None:
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
        return [p.widget(i) for p in self.panes for i in range(p.count())]

    def visible_views(self) -> list[QWidget]:
        return [p.currentWidget() for p in self.panes if p.isVisible() and p.currentWidget() is not None]

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
        for view in [self.panes[1].widget(i) for i in range(self.panes[1].count())]:
            self._move(view, 0)
        self._fold_if_empty()

    def _move(self, view: QWidget, to: int) -> None:
        src = self.pane_of(view)
        dst = self.panes[to]
        if src is dst or src is None:
            return
        src.removeTab(src.indexOf(view))
        dst.addTab(view, view.name)  # type: ignore[attr-defined]
        dst.setTabToolTip(dst.indexOf(view), view.sid)  # type: ignore[attr-defined]

    def _fold_if_empty(self) -> None:
        if self.panes[1].count() == 0:
            self.panes[1].hide()

    def _on_tab_clicked(self, tabs: QTabWidget, index: int) -> None:
        view = tabs.widget(index)
        if view is not None:
            self.tab_chosen.emit(view.sid)  # type: ignore[attr-defined]

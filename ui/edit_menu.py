"""EditMenu: the Edit menu and its shortcuts, routed to the active session.

Promises:
- every action acts on the active session view — the one the person last
  acted in (selected a span, clicked, typed, chose its tab) — and its text
  says which session and which span (“Mask [3, 9) of alice”), so what a
  key will do is visible before it is pressed;
- span actions are disabled while that view has no selection, and every
  edit is disabled while that session generates (the engine refuses edits
  to a generating session); a disabled action's shortcut does nothing;
- single-key shortcuts (M, C, E, P, Delete) and Ctrl+Z never fire into a
  text field: an editable text field takes its own keys first (Qt's
  shortcut override), so M types “m” and Ctrl+Z undoes typing there;
  anywhere else in the window Ctrl+Z undoes the last edit of the session.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QMenu, QWidget

from kvscope.ui.span_actions import SHORTCUTS

if TYPE_CHECKING:
    from kvscope.ui.session_view import SessionView

LABELS = {
    "mask": "Mask",
    "unmask": "Unmask",
    "compact": "Compact with a summary…",
    "erratum": "Append an erratum…",
    "delete": "Delete",
    "compress": "Compress with a policy…",
    "save": "Save as a segment file…",
    "undo": "Undo the last edit",
}
SPAN_OPS = ("mask", "unmask", "compact", "delete", "save")


class EditMenu:
    def __init__(
        self, parent: QWidget, menu: QMenu, active_view: Callable[[], SessionView | None], say: Callable[[str], None]
    ) -> None:
        self._active_view = active_view
        self._say = say
        self.actions: dict[str, QAction] = {}
        for key, label in LABELS.items():
            act = QAction(label, parent)
            act.setShortcut(QKeySequence(SHORTCUTS[key]))
            act.triggered.connect(lambda _=False, k=key: self.run(k))
            menu.addAction(act)
            self.actions[key] = act
            if key == "save":
                menu.addSeparator()
        menu.aboutToShow.connect(self.refresh)
        self.refresh()

    def refresh(self) -> None:
        """Texts and enabled states for the active view and its selection."""
        view = self._active_view()
        lo, hi = view.selection() if view is not None else (0, 0)
        busy = view is not None and view.generating
        for key, act in self.actions.items():
            label = LABELS[key]
            if view is None:
                act.setText(label)
                act.setEnabled(False)
                continue
            if key in SPAN_OPS:
                where = f" [{lo}, {hi})" if hi > lo else " (select a span first)"
                act.setText(f"{label}{where} of {view.name}")
                act.setEnabled(hi > lo and not busy)
            else:
                act.setText(f"{label} — {view.name}")
                act.setEnabled(not busy)

    def run(self, key: str) -> None:
        """Run the action `key` on the active view and say where it went."""
        view = self._active_view()
        if view is None:
            return
        lo, hi = view.selection()
        if key in SPAN_OPS and hi <= lo:
            self._say(f"{LABELS[key]}: select a span of {view.name} first")
            return
        where = f" [{lo}, {hi})" if key in SPAN_OPS else ""
        self._say(f"{key}{where} on {view.name}")
        view.actions_.trigger(key)

"""EditMenu: the Edit menu and its shortcuts, routed to the active session.

Promises:
- its actions, labels, shortcuts and enabled rule are `actions.EDIT_ACTIONS`
  (the same table the context menu reads);
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

Knows the view only as an `ActionTarget` (no import of the view or window).
"""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QMenu, QWidget

from kvscope.ui.actions import ACTIONS, EDIT_ACTIONS, ActionTarget, enabled, fill_menu, menu_text


class EditMenu:
    def __init__(
        self,
        parent: QWidget,
        menu: QMenu,
        active_view: Callable[[], ActionTarget | None],
        say: Callable[[str], None],
    ) -> None:
        self._active_view = active_view
        self._say = say
        self.actions: dict[str, QAction] = {}
        for action in EDIT_ACTIONS:
            act = QAction(action.label, parent)
            act.setShortcut(QKeySequence(action.shortcut))
            act.triggered.connect(lambda _=False, k=action.key: self.run(k))
            self.actions[action.key] = act
        fill_menu(menu, self.actions)
        menu.aboutToShow.connect(self.refresh)
        self.refresh()

    def refresh(self) -> None:
        """Texts and enabled states for the active view and its selection."""
        view = self._active_view()
        span = view.selection() if view is not None else (0, 0)
        for key, act in self.actions.items():
            action = ACTIONS[key]
            act.setText(menu_text(action, view))
            act.setEnabled(view is not None and enabled(action, span, view.generating))

    def run(self, key: str) -> None:
        """Run the action `key` on the active view and say where it went."""
        view = self._active_view()
        if view is None:
            return
        action = ACTIONS[key]
        lo, hi = view.selection()
        if action.needs_span and hi <= lo:
            self._say(f"{action.label}: select a span of {view.name} first")
            return
        where = f" [{lo}, {hi})" if action.needs_span else ""
        self._say(f"{key}{where} on {view.name}")
        view.run_action(key)

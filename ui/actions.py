"""The edit actions: one table that every surface reads.

The window's Edit menu and a session view's context menu show the same
actions with the same labels, shortcuts and enabled rules, because both
are built from `EDIT_ACTIONS` here; neither keeps a list of its own.

Promises:
- `label` is the first thing every surface shows for an action; a surface
  only adds where the action goes (the Edit menu: " [3, 9) of alice") or its
  shortcut (the context menu: "<label>\\t<shortcut>");
- one enabled rule (`enabled`): an action on a span needs a non-empty
  selection, and nothing runs while the session generates (the engine
  refuses edits to a generating session);
- menus list the actions in table order, with a separator between groups.

Knows nothing about the engine; says what an action is, not what it does
(`SpanActions` maps each key to its operation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QMenu, QWidget


@dataclass(frozen=True, slots=True)
class EditAction:
    key: str  # what SpanActions and tests call it
    label: str
    shortcut: str  # QKeySequence text
    needs_span: bool  # acts on the selected span (else on the whole session)
    group: int  # menus put a separator between groups


EDIT_ACTIONS: tuple[EditAction, ...] = (
    EditAction("mask", "Mask", "M", needs_span=True, group=0),
    EditAction("unmask", "Unmask", "Shift+M", needs_span=True, group=0),
    EditAction("compact", "Compact with a summary…", "C", needs_span=True, group=0),
    EditAction("delete", "Delete", "Delete", needs_span=True, group=0),
    EditAction("save", "Save as a segment file…", "Ctrl+Shift+S", needs_span=True, group=0),
    EditAction("erratum", "Append an erratum…", "E", needs_span=False, group=1),
    EditAction("compress", "Compress with a policy…", "P", needs_span=False, group=1),
    EditAction("undo", "Undo the last edit", "Ctrl+Z", needs_span=False, group=2),
)
ACTIONS = {a.key: a for a in EDIT_ACTIONS}


class ActionTarget(Protocol):
    """What a surface needs from the session view its actions go to (SessionView provides it)."""

    @property
    def name(self) -> str: ...

    @property
    def generating(self) -> bool: ...

    def selection(self) -> tuple[int, int]: ...

    def run_action(self, key: str) -> None: ...


def enabled(action: EditAction, span: tuple[int, int], generating: bool) -> bool:
    """The one rule every surface applies: a span action needs a span; nothing while generating."""
    lo, hi = span
    return not generating and (hi > lo or not action.needs_span)


def shortcut_text(action: EditAction) -> str:
    """The shortcut as this platform writes it (⌘ on macOS)."""
    return QKeySequence(action.shortcut).toString(QKeySequence.SequenceFormat.NativeText)


def menu_text(action: EditAction, target: ActionTarget | None) -> str:
    """The Edit menu's text: the label, then where the action goes ("Mask [3, 9) of alice")."""
    if target is None:
        return action.label
    if not action.needs_span:
        return f"{action.label} — {target.name}"
    lo, hi = target.selection()
    where = f" [{lo}, {hi})" if hi > lo else " (select a span first)"
    return f"{action.label}{where} of {target.name}"


def fill_menu(menu: QMenu, actions: dict[str, QAction]) -> None:
    """Add one surface's actions (by key) to `menu` in table order, a separator between groups."""
    group = EDIT_ACTIONS[0].group
    for action in EDIT_ACTIONS:
        if action.group != group:
            menu.addSeparator()
            group = action.group
        menu.addAction(actions[action.key])


def menu_action(
    parent: QWidget,
    menu: QMenu,
    text: str,
    slot: Callable[[], object],
    key: QKeySequence.StandardKey | str | None = None,
) -> QAction:
    """A plain menu entry (not an edit action): `slot()` when chosen, with an optional shortcut."""
    act = QAction(text, parent)
    if key is not None:
        act.setShortcut(QKeySequence(key))
    act.triggered.connect(lambda _=False: slot())
    menu.addAction(act)
    return act


def context_text(action: EditAction) -> str:
    """The context menu's text: the label and, after a tab, the shortcut."""
    return f"{action.label}\t{shortcut_text(action)}"

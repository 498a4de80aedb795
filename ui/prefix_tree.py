"""PrefixTreePanel: everything cached, as one radix tree of blocks.

Promises:
- built from the newest snapshot of each open session: a session's path is
  its chain of full-block hashes from block 0 up to its first partial or
  edited block (hash None). A chain hash covers its parent, so two
  sessions reach the same node exactly when they share that whole prefix;
  where they differ, the tree branches;
- a run of blocks that all the same sessions pass through is one node
  (radix compression), shown with its block span, its text and the
  sessions through it; "heat" is how many sessions share it (the greener,
  the more);
- clicking a node shows its tokens and the sessions that use it;
- rebuilds only when a snapshot changed and the panel is on screen.

Knows nothing about the engine: it reads `SessionSnapshot`s.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor
from PySide6.QtWidgets import QLabel, QPlainTextEdit, QSplitter, QTreeWidget, QTreeWidgetItem, QVBoxLayout, QWidget

from kvscope.engine.snapshot import SessionSnapshot


@dataclass
class PrefixNode:
    first_block: int
    n_blocks: int = 0
    text: str = ""
    sessions: tuple[str, ...] = ()
    children: list[PrefixNode] = field(default_factory=list)


def build_tree(snaps: list[SessionSnapshot]) -> PrefixNode:
    """The radix tree of the sessions' shared full-block prefixes (root: an empty node)."""
    root: dict = {}  # hash -> (block index, text, sessions, children dict)
    for snap in snaps:
        level = root
        for b, h in enumerate(snap.block_hashes):
            if h is None:
                break
            lo, hi = snap.block_span(b)
            if h not in level:
                level[h] = (b, "".join(snap.token_text[lo:hi]), [], {})
            level[h][2].append(snap.name)
            level = level[h][3]
    tree = PrefixNode(0)
    tree.children = [_compress(b, text, names, kids) for b, text, names, kids in root.values()]
    return tree


def _compress(block: int, text: str, names: list[str], kids: dict) -> PrefixNode:
    node = PrefixNode(block, 1, text, tuple(names))
    while len(kids) == 1:
        ((b, t, n, k),) = kids.values()
        if tuple(n) != node.sessions:
            break
        node.n_blocks += 1
        node.text += t
        kids = k
    node.children = [_compress(b, t, n, k) for b, t, n, k in kids.values()]
    return node


class PrefixTreePanel(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.snapshots: dict[str, SessionSnapshot] = {}
        self._dirty = False
        self.tree = QTreeWidget()
        self.tree.setHeaderLabels(["blocks", "shared by", "text"])
        self.tree.setColumnWidth(0, 90)
        self.tree.setColumnWidth(1, 200)
        self.tree.itemClicked.connect(self._on_clicked)
        self.detail = QPlainTextEdit(readOnly=True)
        self.detail.setPlaceholderText("Click a node to see its tokens and the sessions that use it.")
        self.summary = QLabel("")
        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(self.tree)
        split.addWidget(self.detail)
        split.setSizes([700, 300])
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addWidget(self.summary)
        lay.addWidget(split, 1)

    def on_snapshot(self, snap: SessionSnapshot) -> None:
        self.snapshots[snap.session] = snap
        self._dirty = True

    def forget(self, sid: str) -> None:
        if self.snapshots.pop(sid, None) is not None:
            self._dirty = True

    def refresh(self, force: bool = False) -> bool:
        if not (self._dirty and (force or self.isVisible())):
            return False
        self._dirty = False
        root = build_tree(list(self.snapshots.values()))
        self.tree.clear()
        n_sessions = max(len(self.snapshots), 1)
        for child in root.children:
            self.tree.addTopLevelItem(self._item(child, n_sessions))
        self.tree.expandAll()
        n_nodes = sum(1 for _ in _walk(root)) - 1
        self.summary.setText(
            f"{len(self.snapshots)} sessions · {n_nodes} nodes of full blocks · "
            "a branch is where sessions stop sharing a prefix"
        )
        return True

    def _item(self, node: PrefixNode, n_sessions: int) -> QTreeWidgetItem:
        last = node.first_block + node.n_blocks - 1
        span = f"{node.first_block}" if node.n_blocks == 1 else f"{node.first_block}–{last}"
        text = node.text.replace("\n", "⏎")
        item = QTreeWidgetItem([span, f"{len(node.sessions)}: {', '.join(node.sessions)}", text[:120]])
        heat = len(node.sessions) / n_sessions
        item.setBackground(1, QColor(60, 179, 113, int(40 + 180 * heat)))
        item.setData(0, Qt.ItemDataRole.UserRole, node)
        item.setToolTip(2, text[:1000])
        for child in node.children:
            item.addChild(self._item(child, n_sessions))
        return item

    def _on_clicked(self, item: QTreeWidgetItem, _column: int) -> None:
        node: PrefixNode = item.data(0, Qt.ItemDataRole.UserRole)
        self.detail.setPlainText(
            f"blocks {node.first_block}–{node.first_block + node.n_blocks - 1} "
            f"({node.n_blocks} blocks), used by {len(node.sessions)} session(s): {', '.join(node.sessions)}\n\n"
            f"{node.text}"
        )


def _walk(node: PrefixNode) -> Iterator[PrefixNode]:
    yield node
    for c in node.children:
        yield from _walk(c)

"""ChildIndex: the children of every block, stored so the garbage collector barely sees them.

    (group, parent) -> "h7"            one child: the hash itself (a str: not tracked)
    (group, parent) -> {"h7", "h9"}    a branch: a set (tracked), only where blocks branch

Promises: `add` and `discard` return the parent's number of children after
the change; `of` lists them; a parent with no children has no entry. Most
blocks of a prefix tree have one child, so this holds one tracked object per
branch point instead of one per block: CPython's full collections walk every
tracked object with the GIL held (every thread stops, the window's too).
"""

from __future__ import annotations

from collections.abc import Iterator

BlockKey = tuple[int, str]  # (KV cache group, block hash); the parent of a root is (group, "")


class ChildIndex:
    def __init__(self) -> None:
        self._kids: dict[BlockKey, str | set[str]] = {}

    def add(self, parent: BlockKey, h: str) -> int:
        v = self._kids.get(parent)
        if v is None:
            self._kids[parent] = h
            return 1
        if isinstance(v, str):
            if v == h:
                return 1
            self._kids[parent] = {v, h}
            return 2
        v.add(h)
        return len(v)

    def discard(self, parent: BlockKey, h: str) -> int:
        v = self._kids.get(parent)
        if v is None:
            return 0
        if isinstance(v, str):
            if v != h:
                return 1
            del self._kids[parent]
            return 0
        v.discard(h)
        if len(v) == 1:
            self._kids[parent] = next(iter(v))
            return 1
        return len(v)

    def count(self, parent: BlockKey) -> int:
        v = self._kids.get(parent)
        return 0 if v is None else 1 if isinstance(v, str) else len(v)

    def of(self, parent: BlockKey) -> Iterator[str]:
        v = self._kids.get(parent)
        if v is None:
            return iter(())
        return iter((v,)) if isinstance(v, str) else iter(v)

    def clear(self) -> None:
        self._kids.clear()

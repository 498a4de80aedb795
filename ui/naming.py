"""Session names a person can tell apart: “chat N” for new sessions, and
“name (2)” when an imported or copied session repeats a name in use."""

from __future__ import annotations

import re
from collections.abc import Collection


def next_chat_name(taken: Collection[str]) -> str:
    """“chat N” with the smallest N not taken."""
    n = 1
    while f"chat {n}" in taken:
        n += 1
    return f"chat {n}"


def unique_name(name: str, taken: Collection[str]) -> str:
    """`name`, or “name (k)” with the smallest k ≥ 2 not taken."""
    if name not in taken:
        return name
    base = re.sub(r" \(\d+\)$", "", name)
    k = 2
    while f"{base} ({k})" in taken:
        k += 1
    return f"{base} ({k})"

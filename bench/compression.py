"""Compression benchmark: the same code as `kvscope bench compression`.

Usage: python bench/compression.py [--model M] [-n 6] [--mode both] ...
(writes docs/compression.md and docs/compression.png by default).
"""

from __future__ import annotations

import sys

from kvscope.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "compression", *sys.argv[1:]]))

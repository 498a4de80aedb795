"""Short garbage-collector pauses in a long-running process (the window, an attach process).

CPython's full collection walks every object it tracks while holding the
GIL, so every thread stops: the Qt event loop, or the thread receiving a
stream. A process that has imported Qt, pyqtgraph, numpy and zmq (or mlx,
which `kvscope.engine` brings) tracks ~120,000 objects at start-up:
one full pass of those took 0.3-0.5 s on the shared 2-core machine
(`bench/attach.py` prints the longest pause). Nearly all of them live as
long as the process (modules, classes, functions, the window's widgets).

`freeze_startup_heap()`, called once the process is set up, collects what is
garbage already and moves everything else into the permanent generation
(`gc.freeze`): later passes walk only what the program made since. What is
frozen is still freed by reference counting; only a reference cycle among
start-up objects that becomes garbage later would stay (a few objects, once).

Knows nothing about Qt; the window's launchers and the attach process call it.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect, then freeze every object alive now; the number frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()

"""kvscope attach: follow a serving engine's prefix cache through vLLM's KV events.

`Subscriber` reads one ZMQ stream in order (gaps filled from the replay
socket), `RemoteCache` rebuilds the engine's blocks from the events,
`AttachClient` runs the two on a thread, `AttachProcess` in a process of its
own (what the window uses), `chain_grid` lays a cache out for drawing,
`fleet` compares several engines.
Imports no Qt: the window's view (`kvscope.ui.attach_view`) reads from here.
"""

from kvscope.attach.client import AttachClient
from kvscope.attach.remote_cache import RemoteBlock, RemoteCache
from kvscope.attach.subscriber import StreamStats, Subscriber

__all__ = ["AttachClient", "RemoteBlock", "RemoteCache", "StreamStats", "Subscriber"]

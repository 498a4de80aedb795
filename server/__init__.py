"""kvscope serve: an OpenAI-compatible HTTP server on kvscope's engine.

Point any OpenAI client at it; every request becomes an inspectable engine
session named after its client, requests share cache through the engine's
prefix store (no session ids), and each one says where its prefix broke.

Layers: `protocol` (request bodies) and `shapes` (response JSON) know
nothing of the engine; `runner` bridges the event loop to the one engine
thread (`EngineWorker`); `app` is the Starlette surface; `launch` runs it
under uvicorn. Imports the engine, never the window.
"""

from kvscope.server.launch import ServeOptions, Server

__all__ = ["ServeOptions", "Server"]

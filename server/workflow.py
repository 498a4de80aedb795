"""Which agent sent a request, and at which step of its workflow, from what the request carries.

The workflow-aware prefix-store policy (`kvscope.engine.prefix_policy`)
needs both. The first source found wins:

    agent   header X-KVScope-Agent; body metadata.agent; body `user`;
            header X-KVScope-Client or X-Client; the User-Agent's first word;
            the client's address
    step    header X-KVScope-Step; body metadata.step (OpenAI's metadata
            values are strings, so "3" and 3 both count); none if absent

Requests with the same step number run in the same step (a fan-out); a
request without one starts a step of its own. A replay log's own `agent`
and `step` fields come first (`--record` writes them). A step that is not
an integer >= 0, or a `metadata` that is not an object, is a 400 naming it.
Knows nothing about HTTP frameworks or the engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvscope.server.errors import bad_param

MAX_AGENT_CHARS = 40


def agent_and_step(headers: Mapping[str, str], body: dict[str, Any], address: str) -> tuple[str, int | None]:
    """The agent name and workflow step of an HTTP request (`headers` with lower-case names)."""
    meta = _metadata(body)
    agent = _first(headers.get("x-kvscope-agent"), meta.get("agent"), body.get("user"))
    agent = agent or _first(headers.get("x-kvscope-client"), headers.get("x-client"))
    agent = agent or _first(headers.get("user-agent", "").split(" ")[0]) or address or "client"
    step = _step(headers["x-kvscope-step"], "X-KVScope-Step") if "x-kvscope-step" in headers else None
    if step is None and meta.get("step") is not None:
        step = _step(meta["step"], "metadata.step")
    return agent, step


def logged_agent_and_step(body: dict[str, Any]) -> tuple[str, int | None]:
    """The agent and step of a replay log line: its own fields, else what a server would read from it."""
    meta = _metadata(body)
    agent = _first(body.get("agent"), meta.get("agent"), body.get("user")) or ""
    raw = body.get("step") if body.get("step") is not None else meta.get("step")
    return agent, (None if raw is None else _step(raw, "step"))


def _metadata(body: dict[str, Any]) -> dict[str, Any]:
    meta = body.get("metadata")
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise bad_param("metadata", "'metadata' must be an object of string values.")
    return meta


def _first(*values: Any) -> str | None:
    for v in values:
        if isinstance(v, str) and v.strip():
            return v.strip()[:MAX_AGENT_CHARS]
    return None


def _step(raw: Any, where: str) -> int:
    if isinstance(raw, str) and raw.strip().isdecimal():
        raw = int(raw.strip())
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise bad_param(where, f"{where} must be a workflow step number (an integer >= 0), got {raw!r}.")
    return raw

"""Parse and check OpenAI request bodies into small frozen requests.

Every rule a client can break raises `APIError(400, ..., param=...)` naming
the field, as OpenAI does; fields kvscope does not act on (penalties,
`response_format`, `user` beyond naming the client, ...) are accepted and
ignored, as vLLM and mlx-lm's server do, except those that would silently
change the answer's meaning (`n > 1`, `logprobs`, `echo`, `suffix`), which
are refused. Knows nothing about the engine or HTTP.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kvscope.server.errors import APIError, bad_param

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOPS = 4


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    seed: int | None
    max_tokens: int | None  # None: up to the context limit
    stop: tuple[str, ...]


@dataclass(frozen=True)
class ParsedRequest:
    """What either endpoint asks for: a chat (`messages`) or raw text / ids (`prompt`)."""

    endpoint: str  # "chat" | "completions"
    model: str
    sampling: Sampling
    stream: bool
    include_usage: bool
    user: str | None
    messages: tuple[dict[str, str], ...] = ()
    tools: tuple[dict[str, Any], ...] | None = None
    prompt_text: str | None = None
    prompt_ids: tuple[int, ...] | None = None


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except RecursionError as exc:
        raise APIError(400, "The JSON body of your request is nested too deeply.") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(
            400,
            f"We could not parse the JSON body of your request ({exc}). The body must be a JSON object.",
        ) from exc
    if not isinstance(body, dict):
        raise APIError(400, f"The request body must be a JSON object, not {type(body).__name__}.")
    return body


def parse_chat(body: dict[str, Any]) -> ParsedRequest:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad_param("messages", "'messages' must be a non-empty array of message objects.")
    messages = tuple(_message(m, i) for i, m in enumerate(raw))
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise bad_param("tools", "'tools' must be an array of tool objects.")
    return ParsedRequest(
        "chat",
        _model(body),
        _sampling(body, "max_completion_tokens"),
        *_stream(body),
        _user(body),
        messages=messages,
        tools=tuple(tools) if tools else None,
    )


def parse_completion(body: dict[str, Any]) -> ParsedRequest:
    for name in ("echo", "suffix"):
        if body.get(name):
            raise bad_param(name, f"'{name}' is not supported by kvscope serve.")
    if body.get("best_of", 1) != 1:
        raise bad_param("best_of", "Only best_of=1 is supported.")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    text: str | None = None
    ids: tuple[int, ...] | None = None
    if isinstance(prompt, str) and prompt:
        text = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = tuple(prompt)
    else:
        raise bad_param("prompt", "'prompt' must be a non-empty string or token id array (one prompt per request).")
    return ParsedRequest(
        "completions",
        _model(body),
        _sampling(body, None),
        *_stream(body),
        _user(body),
        prompt_text=text,
        prompt_ids=ids,
    )


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_param("model", "You must provide a model parameter.")
    return model


def _user(body: dict[str, Any]) -> str | None:
    user = body.get("user")
    return user if isinstance(user, str) and user.strip() else None


def _message(m: Any, i: int) -> dict[str, str]:
    if not isinstance(m, dict):
        raise bad_param(f"messages[{i}]", f"messages[{i}] must be an object with 'role' and 'content'.")
    role = m.get("role")
    if role not in ROLES:
        raise bad_param(
            f"messages[{i}].role",
            f"Invalid value for messages[{i}].role: {role!r}; expected one of {', '.join(ROLES)}.",
        )
    content = m.get("content")
    if content is None and role == "assistant":
        content = ""  # an assistant turn that only called tools
    if isinstance(content, list):
        content = _text_parts(content, i)
    if not isinstance(content, str):
        raise bad_param(f"messages[{i}].content", f"messages[{i}].content must be a string or an array of text parts.")
    out = {"role": "system" if role == "developer" else role, "content": content}
    for key in ("name", "tool_call_id"):
        if isinstance(m.get(key), str):
            out[key] = m[key]
    return out


def _text_parts(parts: list[Any], i: int) -> str:
    texts = []
    for j, p in enumerate(parts):
        if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
            kind = p.get("type") if isinstance(p, dict) else type(p).__name__
            raise bad_param(f"messages[{i}].content[{j}]", f"Only text content parts are supported (got {kind!r}).")
        texts.append(p["text"])
    return "".join(texts)


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad_param(name, f"'{name}' must be a number, got {json.dumps(v)}.")
    if v > hi or v < lo or (lo_open and v == lo):
        lo_s = f"> {lo}" if lo_open else f">= {lo}"
        raise bad_param(name, f"'{name}' must be {lo_s} and <= {hi}, got {v}.")
    return float(v)


def _int(body: dict[str, Any], name: str, lo: int | None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad_param(name, f"'{name}' must be an integer, got {json.dumps(v)}.")
    if lo is not None and v < lo:
        raise bad_param(name, f"'{name}' must be >= {lo}, got {v}.")
    return v


def _sampling(body: dict[str, Any], alias: str | None) -> Sampling:
    if body.get("n", 1) != 1:
        raise bad_param("n", "Only n=1 is supported.")
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs"):
        raise bad_param("logprobs", "logprobs are not supported by kvscope serve.")
    max_tokens = _int(body, "max_tokens", 1)
    if alias is not None and body.get(alias) is not None:
        max_tokens = _int(body, alias, 1)  # the newer name wins, as in OpenAI's API
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOPS:
        stops = tuple(s for s in stop if s)
    else:
        raise bad_param("stop", f"'stop' must be a string or an array of at most {MAX_STOPS} strings.")
    return Sampling(
        _number(body, "temperature", 1.0, 0.0, 2.0),
        _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        _int(body, "seed", None),
        max_tokens,
        stops,
    )


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_param("stream", "'stream' must be a boolean.")
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not stream:
        raise bad_param("stream_options", "The 'stream_options' parameter is only allowed when 'stream' is enabled.")
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise bad_param("stream_options", "'stream_options' must be an object like {\"include_usage\": true}.")
    return stream, bool(opts.get("include_usage", False))

"""OpenAI's response, chunk and usage JSON, built from an engine outcome.

Shapes follow OpenAI's API as vLLM and mlx-lm's server emit them:
`chat.completion` / `chat.completion.chunk` / `text_completion` objects,
`usage.prompt_tokens_details.cached_tokens` = the prefix hit, a first
chat chunk carrying the role, a last chunk carrying `finish_reason`, and
with `stream_options.include_usage` every chunk has `"usage": null` and one
extra chunk with empty `choices` carries the usage. kvscope's own numbers
ride in a `kvscope` extension field (clients ignore unknown fields).

`StopFilter` keeps a streamed answer from ever showing a stop string: text
that might be the start of one is held back until it is not.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec

from kvscope.server.records import RequestRecord

FINISH = {"stop": "stop", "stop_string": "stop", "length": "length", "cancelled": "stop"}


def new_id(endpoint: str) -> str:
    return ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(rec: RequestRecord) -> dict[str, Any]:
    return {
        "prompt_tokens": rec.prompt_tokens,
        "completion_tokens": rec.completion_tokens,
        "total_tokens": rec.prompt_tokens + rec.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": rec.cached_tokens},
    }


def kvscope_field(rec: RequestRecord) -> dict[str, Any]:
    return {
        "request_id": rec.id,
        "session": rec.session,
        "name": rec.name,
        "prefilled_tokens": rec.prefilled_tokens,
        "ttft_ms": round(rec.ttft_ms, 3),
        "decode_tps": round(rec.decode_tps, 2),
        "prefix_break": rec.prefix_break,
    }


def completion(cid: str, model: str, rec: RequestRecord, text: str, finish: str) -> dict[str, Any]:
    base = {"id": cid, "created": int(rec.created), "model": model, "system_fingerprint": None}
    if rec.endpoint == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": FINISH.get(finish, "stop"),
        }
        base["object"] = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": FINISH.get(finish, "stop")}
        base["object"] = "text_completion"
    return {**base, "choices": [choice], "usage": usage(rec), "kvscope": kvscope_field(rec)}


class ChunkMaker:
    """The server-sent events of one streamed answer."""

    def __init__(self, cid: str, model: str, endpoint: str, include_usage: bool) -> None:
        self.cid, self.model, self.endpoint, self.include_usage = cid, model, endpoint, include_usage
        self.created = int(time.time())

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        obj = "chat.completion.chunk" if self.endpoint == "chat" else "text_completion"
        d: dict[str, Any] = {
            "id": self.cid,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.include_usage:
            d["usage"] = None
        d.update(extra)
        return _sse(d)

    def _choice(self, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if self.endpoint == "chat":
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    def first(self) -> bytes | None:
        return self._event([self._choice("", None, role=True)]) if self.endpoint == "chat" else None

    def piece(self, text: str) -> bytes:
        return self._event([self._choice(text, None)])

    def last(self, finish: str, rec: RequestRecord) -> bytes:
        fin = FINISH.get(finish, "stop")
        out = self._event([self._choice(None if self.endpoint == "chat" else "", fin)], kvscope=kvscope_field(rec))
        if self.include_usage:
            out += self._event([], usage=usage(rec))
        return out

    @staticmethod
    def error(body: dict[str, Any]) -> bytes:
        return _sse(body)

    @staticmethod
    def done() -> bytes:
        return b"data: [DONE]\n\n"


def _sse(obj: dict[str, Any]) -> bytes:
    """One server-sent event; msgspec encodes (UTF-8, no ASCII escapes) several times faster than json."""
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


class StopFilter:
    """Streams text but never a stop string (nor the text after it)."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.buffer = ""  # all text seen
        self.sent = 0  # characters of `buffer` released
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.buffer += piece
        hits = [self.buffer.find(s, max(0, self.sent - len(s))) for s in self.stops]
        hits = [h for h in hits if h >= 0]
        if hits:
            self.stopped = True
            return self._release(min(hits))
        hold = max((self._partial(s) for s in self.stops), default=0)
        return self._release(len(self.buffer) - hold)

    def finish(self, final_text: str) -> str:
        """The rest of the answer the engine settled on (it may hold text still held back)."""
        sent = self.buffer[: self.sent]
        if final_text.startswith(sent):
            self.sent = len(final_text)
            return final_text[len(sent) :]
        return ""

    def _partial(self, stop: str) -> int:
        for n in range(min(len(stop) - 1, len(self.buffer)), 0, -1):
            if self.buffer.endswith(stop[:n]):
                return n
        return 0

    def _release(self, upto: int) -> str:
        upto = max(upto, self.sent)
        out = self.buffer[self.sent : upto]
        self.sent = upto
        return out

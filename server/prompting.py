"""A parsed request -> the prompt's token ids, its template text, and the context check.

Chats go through the model's chat template exactly as mlx-lm's server does
(`apply_chat_template(messages, tools=..., add_generation_prompt=True)`);
completions encode the raw text (or take the ids as given). A template
that refuses the messages, ids outside the vocabulary, and a prompt that
leaves no room under the context limit are `APIError`s naming the problem.

Runs on the engine thread (the tokenizer belongs to the loaded model) but
makes no mx call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvscope.engine import chat
from kvscope.engine.model_loading import LoadedModel
from kvscope.server.errors import APIError
from kvscope.server.protocol import ParsedRequest


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    text: str  # template text the ids encode (the session's transcript)
    messages: list[dict[str, str]]  # what the session shows
    max_tokens: int  # resolved against the context limit


def context_limit(lm: LoadedModel) -> int:
    """The model's context length: config first, then the tokenizer's limit."""
    for key in ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length"):
        v = lm.config.get(key)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(getattr(lm.tokenizer, "_tokenizer", lm.tokenizer), "model_max_length", None)
    return int(v) if isinstance(v, int) and 0 < v < 10**8 else 4096


def build_prompt(lm: LoadedModel, req: ParsedRequest) -> Prompt:
    tok = lm.tokenizer
    if req.endpoint == "chat":
        messages = [dict(m) for m in req.messages]
        try:
            if req.tools:
                text = chat.render(tok, messages, tools=list(req.tools))
                ids = chat.encode(tok, text)  # the template text carries its own special tokens
            else:
                text = chat.render(tok, messages)
                ids = chat.first_turn_ids(tok, messages)
        except Exception as exc:  # noqa: BLE001 - a template's own refusal (jinja raise_exception) is the client's to fix
            raise APIError(400, f"The chat template rejected these messages: {exc}", param="messages") from exc
        shown = [{"role": m["role"], "content": m["content"]} for m in messages]
    elif req.prompt_ids is not None:
        ids = list(req.prompt_ids)
        vocab = _vocab_size(lm)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(
                400, f"Token id {bad[0]} is out of range for this model (vocabulary size {vocab}).", param="prompt"
            )
        text = tok.decode(ids)
        shown = [{"role": "user", "content": text}]
    else:
        text = req.prompt_text or ""
        ids = chat.encode(tok, text, special=True)
        shown = [{"role": "user", "content": text}]
    if not ids:
        raise APIError(
            400, "The prompt is empty after tokenization.", param="messages" if req.endpoint == "chat" else "prompt"
        )
    return Prompt(ids, text, shown, _max_tokens(lm, req, len(ids)))


def _max_tokens(lm: LoadedModel, req: ParsedRequest, n_prompt: int) -> int:
    limit = context_limit(lm)
    field = "messages" if req.endpoint == "chat" else "prompt"
    asked = req.sampling.max_tokens
    if n_prompt >= limit or (asked is not None and n_prompt + asked > limit):
        what = (
            f"you requested {n_prompt + asked} tokens ({n_prompt} in the {field}, {asked} in the completion)"
            if asked
            else f"your {field} resulted in {n_prompt} tokens"
        )
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, {what}. "
            f"Please reduce the length of the {field}{' or completion' if asked else ''}.",
            param=field,
            code="context_length_exceeded",
        )
    return asked if asked is not None else limit - n_prompt


def _vocab_size(lm: LoadedModel) -> int:
    v: Any = lm.config.get("vocab_size")
    if isinstance(v, int) and v > 0:
        return v
    return int(len(lm.tokenizer.get_vocab()))

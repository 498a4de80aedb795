"""Chat templates -> token ids, turn by turn, without re-tokenizing the past.

Promises:
- the first turn is tokenized exactly as mlx-lm does (`apply_chat_template`
  with the generation prompt), so kvscope and `mlx_lm.generate` see the same
  ids;
- a later turn only yields the *new* tokens: the template text of the whole
  chat minus the text the cache already holds, tokenized on its own;
- tokenizers without a chat template get a plain `role: content` format.

Knows nothing about caches or models.
"""

from __future__ import annotations

from typing import Any

Messages = list[dict[str, str]]


def _has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(
    tokenizer: Any, messages: Messages, add_generation_prompt: bool = True, tools: list[Any] | None = None
) -> str:
    """The chat as template text (with `tools`, the template's tool section too)."""
    if _has_template(tokenizer):
        extra = {"tools": tools} if tools else {}
        text = tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=add_generation_prompt, tokenize=False, **extra
        )
        return str(text)
    parts = [f"{m['role']}: {m['content']}\n" for m in messages]
    if add_generation_prompt:
        parts.append("assistant: ")
    return "".join(parts)


def _ids(result: Any) -> list[int]:
    if isinstance(result, dict) or hasattr(result, "input_ids"):
        result = result["input_ids"]
    if result and isinstance(result[0], list):
        result = result[0]
    return [int(t) for t in result]


def first_turn_ids(tokenizer: Any, messages: Messages) -> list[int]:
    """Token ids of the whole chat with the generation prompt (as mlx-lm does)."""
    if _has_template(tokenizer):
        return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return encode(tokenizer, render(tokenizer, messages), special=True)


def continued_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Ids of one user message left open (`continue_final_message`), as mlx-lm's `cache_prompt` writes them."""
    if getattr(tokenizer, "has_chat_template", False) or _has_template(tokenizer):
        return _ids(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=False, continue_final_message=True
            )
        )
    return encode(tokenizer, prompt, special=True)


def encode(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    """Tokenize `text`; `special=False` adds no BOS (for text appended mid-chat)."""
    return [int(t) for t in tokenizer.encode(text, add_special_tokens=special)]


def delta_text(
    tokenizer: Any, transcript_text: str, messages: Messages, add_generation_prompt: bool = True
) -> str | None:
    """Template text to append after `transcript_text`, or None if the template re-renders the past differently."""
    full = render(tokenizer, messages, add_generation_prompt)
    if not full.startswith(transcript_text):
        return None
    return full[len(transcript_text) :]


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n

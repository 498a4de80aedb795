"""A turn from ready-made prompt token ids: what an OpenAI-style request is.

`Engine.chat` adds one user message to a chat it keeps; a server request
instead brings the whole prompt (its own messages, tools and template, or
raw completion text) and wants an answer on a fresh session. This module
runs that turn with the same code as `turns.run_turn` (`turns.turn_on_tokens`):

- the longest chain of stored full blocks that prefixes the prompt is copied
  in (`cached_tokens`), only the rest is prefilled (`prefilled_tokens`);
- the answer is decoded with the same events (`TurnStarted`, `PrefillChunk`,
  `TokenSampled`, `GenerationFinished`) and the session's plain blocks are
  offered back to the prefix store, so the next request can hit them;
- a cancelled or failed prefill leaves the session empty, as it was.

`longest_cached_prefix` answers, without changing anything, how many tokens
of a prompt the prefix store holds and which sessions share those blocks.

Must run on the engine thread. Knows nothing about HTTP or the window.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from kvscope.engine import turns
from kvscope.engine.errors import InvalidRequestError
from kvscope.engine.events import SessionId
from kvscope.engine.generation import SamplingParams
from kvscope.engine.session import Session

if TYPE_CHECKING:
    from kvscope.engine.engine import Engine
    from kvscope.engine.parts import EngineParts

# The memory budget is checked for the prompt plus at most this many answer
# tokens: a request without max_tokens may run to the context limit, and
# reserving all of it up front would refuse long-context models outright.
BUDGET_ANSWER_TOKENS = 2048


def longest_cached_prefix(eng: Engine, prompt_ids: list[int]) -> tuple[int, tuple[SessionId, ...]]:
    """(tokens of `prompt_ids` the prefix store would serve, sessions using the last such block)."""
    store = eng.store
    if store is None or len(prompt_ids) < 2:
        return 0, ()
    blocks = store.match(prompt_ids[:-1])  # the last token is always fed, as in a turn
    if not blocks:
        return 0, ()
    return sum(len(b.token_ids) for b in blocks), store.sessions_of(blocks[-1].block_hash)


def run_prompt(
    eng: Engine,
    sid: SessionId,
    prompt_ids: list[int],
    params: SamplingParams,
    messages: list[dict[str, str]],
    transcript_text: str,
    cancelled: Callable[[], bool],
) -> turns.TurnResult:
    """Generate the answer to `prompt_ids` on the empty session `sid` (`Engine.run_prompt`).

    Args:
        messages: what the session shows as its chat (the answer is appended).
        transcript_text: the template text `prompt_ids` encode (later turns of
            the session continue from it).
        cancelled: polled between prefill chunks and decode steps.

    Raises:
        InvalidRequestError: the session is not empty or the prompt is.
        CancelledError: cancelled during prefill (the session stays empty).
        MemoryBudgetError: the prompt and answer do not fit the memory budget.
    """
    prompt = turns.PromptTokens(list(prompt_ids), 0, [dict(m) for m in messages], transcript_text)
    return eng.run_prompt(sid, prompt, params, cancelled)


def run_on_empty(
    s: Session, ctx: turns.TurnContext, prompt: turns.PromptTokens, params: SamplingParams, parts: EngineParts
) -> turns.TurnResult:
    """The body of `Engine.run_prompt`: checks, the memory budget, then the shared turn code."""
    if s.n_tokens:
        raise InvalidRequestError(f"session {s.name} is not empty: a prompt turn needs a fresh session")
    if not prompt.new_tokens:
        raise InvalidRequestError("empty prompt")
    params.validate()
    parts.reserve_tokens(len(prompt.new_tokens) + min(params.max_tokens, BUDGET_ANSWER_TOKENS), "this request")
    s.generating = True
    try:
        return turns.turn_on_tokens(s, ctx, prompt, params)
    finally:
        s.generating = False

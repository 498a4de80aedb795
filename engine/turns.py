"""One chat turn on a session: pick the new tokens, reuse what is cached,
prefill the rest, decode, and report it all as events.

Promises:
- a new session whose prompt starts with stored full blocks copies their rows
  in (`cached_tokens`) and prefills only the rest (`prefilled_tokens`);
- a later turn of the same chat prefills only the tokens the template adds;
- a cancelled or failed prefill leaves the session exactly as before the turn;
- a cancelled decode keeps the answer so far (its tokens are in the cache).

Knows nothing about threads or the window.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from kvscope.engine import chat
from kvscope.engine.blocks import TokenState
from kvscope.engine.caches.state_prefix import reuse_state_prefix, share_state_prefix
from kvscope.engine.compression import maybe_compress_session
from kvscope.engine.errors import InvalidRequestError
from kvscope.engine.events import (
    EventBus,
    GenerationFinished,
    PrefillChunk,
    TokenSampled,
    TurnStarted,
)
from kvscope.engine.generation import SamplingParams, decode, prefill
from kvscope.engine.model_loading import LoadedModel
from kvscope.engine.prefix_store import PrefixStore
from kvscope.engine.session import Session, TurnStats


@dataclass(frozen=True)
class TurnContext:
    """Where a turn runs: the model, the prefix store, the event bus, prefill chunking, the cancel poll."""

    lm: LoadedModel
    store: PrefixStore
    bus: EventBus
    chunk_size: int
    cancelled: Callable[[], bool]


@dataclass(frozen=True)
class PromptTokens:
    """What a turn feeds: keep the session's first `keep` tokens, add `new_tokens`;
    the session then shows `messages` over `transcript_text` (+ the answer)."""

    new_tokens: list[int]
    keep: int
    messages: chat.Messages
    transcript_text: str


@dataclass(frozen=True)
class TurnResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: TurnStats


def plan_prompt(session: Session, lm: LoadedModel, messages: chat.Messages) -> tuple[list[int], int]:
    """(tokens to add, tokens of the session to keep) for a turn on `messages`."""
    tok = lm.tokenizer
    if session.n_tokens == 0:
        return chat.first_turn_ids(tok, messages), 0
    delta = chat.delta_text(tok, session.transcript_text, messages)
    if delta is not None:
        return chat.encode(tok, delta), session.n_tokens
    # The template re-rendered the past differently. An unedited cache keeps
    # the longest common token prefix; an edited one keeps everything and
    # appends the text that differs.
    if not session.edited:
        full = chat.first_turn_ids(tok, messages)
        keep = min(chat.common_prefix_len(full, session.tokens), session.plain_prefix_len())
        return full[keep:], keep
    text = chat.render(tok, messages)
    common = len(_common_text_prefix(text, session.transcript_text))
    return chat.encode(tok, text[common:]), session.n_tokens


def _common_text_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


def _reuse_prefix(session: Session, store: PrefixStore, prompt: list[int]) -> int:
    """Copy stored full blocks that prefix `prompt` into an empty session."""
    blocks = store.match(prompt[:-1])  # the last token must be fed to get logits
    if not blocks:
        return 0
    keys, values = store.load_rows(blocks, session.id)
    n = sum(len(b.token_ids) for b in blocks)
    session.append_tokens(prompt[:n], TokenState.SHARED)  # before the caches move their offset
    for c, k, v in zip(session.caches, keys, values):
        c.update_and_fetch(k, v)
    return n


def share_prefix(session: Session, store: PrefixStore, lm: LoadedModel) -> None:
    """Offer the session's plain full blocks to the prefix store."""
    if lm.layout is not None and not lm.layout.rows_only:
        share_state_prefix(session, lm)  # recurrent states are checkpointed, not stored as blocks
        return
    n = session.plain_prefix_len()
    n -= n % store.block_size
    if n == 0:
        return
    keys = [c.keys for c in session.caches]
    values = [c.values for c in session.caches]
    store.insert(session.tokens[:n], keys, values, session.id)  # type: ignore[arg-type]


def run_turn(session: Session, ctx: TurnContext, user_text: str, params: SamplingParams) -> TurnResult:
    """Add a user message, generate the answer, keep the cache."""
    if not user_text.strip():
        raise InvalidRequestError("empty prompt: type a message first")
    params.validate()
    messages = session.messages + [{"role": "user", "content": user_text}]
    new_tokens, keep = plan_prompt(session, ctx.lm, messages)
    transcript = chat.render(ctx.lm.tokenizer, messages)
    return turn_on_tokens(session, ctx, PromptTokens(new_tokens, keep, messages, transcript), params)


def turn_on_tokens(session: Session, ctx: TurnContext, prompt: PromptTokens, params: SamplingParams) -> TurnResult:
    """Keep the session's first `prompt.keep` tokens, add `prompt.new_tokens` (prefix-store hits first), generate.

    The shared body of a chat turn (`run_turn`) and of a turn from ready-made
    prompt ids (`prompt_turn.run_prompt`, what a server request is).
    """
    lm, store, bus = ctx.lm, ctx.store, ctx.bus
    new_tokens, keep = prompt.new_tokens, prompt.keep
    before = (session.n_tokens, session.transcript_text, len(session.messages))
    t_start = time.perf_counter()
    session.trim_to(keep)
    blocks = keep == 0 and (lm.layout is None or lm.layout.rows_only)  # attention rows only: the block store
    cached = keep
    if keep == 0:
        cached = _reuse_prefix(session, store, new_tokens) if blocks else reuse_state_prefix(session, lm, new_tokens)
    to_prefill = new_tokens[cached - keep :]
    if not to_prefill:  # everything was cached: feed the last token again
        session.trim_to(session.n_tokens - 1)
        cached -= 1
        to_prefill = new_tokens[-1:]
    stats = TurnStats(len(new_tokens) + keep, cached, len(to_prefill))
    bus.emit(TurnStarted(bus.now_ms(), session.id, stats.prompt_tokens, cached, len(to_prefill)))

    def on_chunk(start: int, n: int, t0: float, t1: float) -> None:
        bus.emit(PrefillChunk(bus.now_ms(), session.id, start, n, len(to_prefill) - 1, (t1 - t0) * 1000, bus.ms_at(t0)))

    session.append_tokens(to_prefill[:-1])
    try:
        prefill(lm.model, session.caches, to_prefill[:-1], ctx.chunk_size, ctx.cancelled, on_chunk)
        maybe_compress_session(session, lm, bus, "prefill")
    except BaseException:
        _roll_back(session, store, *before)
        raise
    session.append_tokens(to_prefill[-1:])
    session.messages = prompt.messages
    session.transcript_text = prompt.transcript_text
    return _generate(session, ctx, to_prefill[-1], params, stats, t_start)


def _roll_back(session: Session, store: PrefixStore, n_tokens: int, transcript: str, n_messages: int) -> None:
    session.trim_to(n_tokens)
    session.transcript_text = transcript
    del session.messages[n_messages:]
    if n_tokens == 0:
        store.release(session.id)


class _Answer:
    """The answer being decoded: its tokens, why it stopped, its text."""

    def __init__(self, session: Session, lm: LoadedModel, params: SamplingParams, cancelled: Callable[[], bool]):
        self.session, self.tok, self.params, self.cancelled = session, lm.tokenizer, params, cancelled
        # An empty eos set is allowed (benchmarks that need a fixed token count).
        self.eos = set(self.tok.eos_token_ids) if hasattr(self.tok, "eos_token_ids") else {self.tok.eos_token_id}
        self.ids: list[int] = []
        self.reason = "length"

    def keep_going(self, token: int) -> bool:
        """Called only while the budget allows feeding `token`; True = feed it."""
        stop = self.params.stop
        if token in self.eos:
            self.reason = "stop"
        elif stop and any(s in self.tok.decode((self.ids + [token])[-64:]) for s in stop if s):
            self.reason = "stop_string"
        elif self.cancelled():
            self.reason = "cancelled"
        else:
            self.session.append_tokens([token])  # decode feeds it next: keep the bookkeeping in step
            return True
        return False

    def text(self) -> str:
        if self.reason == "length" and self.ids and self.ids[-1] in self.eos:
            self.reason = "stop"  # the budget ran out on the end-of-turn token itself
        text = self.tok.decode([t for t in self.ids if t not in self.eos])
        hits = [text.index(s) for s in self.params.stop if s and s in text]
        return text[: min(hits)] if hits else text


def _generate(
    session: Session, ctx: TurnContext, last_token: int, params: SamplingParams, stats: TurnStats, t_start: float
) -> TurnResult:
    lm, store, bus = ctx.lm, ctx.store, ctx.bus
    ans = _Answer(session, lm, params, ctx.cancelled)
    detok = lm.tokenizer.detokenizer  # streaming: keeps the spaces SentencePiece drops per token
    detok.reset()
    t_first = t_last = time.perf_counter()
    for i, step in enumerate(decode(lm.model, session.caches, last_token, params, ans.keep_going)):
        ans.ids.append(step.token_id)
        t_last = step.ended  # slices end where the next one begins: traces nest by construction
        if i == 0:
            t_first = t_last
            stats.ttft_ms = (t_first - t_start) * 1000
        stats.token_ms.append(step.step_ms if i else stats.ttft_ms)
        piece = ""
        if step.token_id not in ans.eos:
            detok.add_token(step.token_id)
            piece = detok.last_segment
        began = bus.ms_at(step.started if i else t_start)  # the first token's slice spans the prefill
        bus.emit(TokenSampled(bus.now_ms(), session.id, step.token_id, piece, i, stats.token_ms[-1], began))
    text = ans.text()
    n = len(ans.ids)
    session.transcript_text += lm.tokenizer.decode(ans.ids[:-1]) if n > 1 else ""  # the last one is not fed
    session.messages = session.messages + [{"role": "assistant", "content": text}]
    stats.n_generated, stats.finish_reason = n, ans.reason
    stats.decode_tps = (n - 1) / (t_last - t_first) if n > 1 and t_last > t_first else 0.0
    stats.cache_bytes = session.nbytes
    session.turns.append(stats)
    share_prefix(session, store, lm)
    maybe_compress_session(session, lm, bus, "turn_end")
    end_ms = bus.now_ms()
    dur_ms = end_ms - bus.ms_at(t_start)
    bus.emit(
        GenerationFinished(
            end_ms,
            session.id,
            text,
            n,
            ans.reason,
            stats.ttft_ms,
            stats.decode_tps,
            stats.cached_tokens,
            stats.prefilled_tokens,
            dur_ms,
            bus.ms_at(t_start),
        )
    )
    return TurnResult(text, ans.ids, ans.reason, stats)

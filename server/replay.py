"""`kvscope replay`: a log of OpenAI request bodies through the tokenizer and a prefix store.

Each line of the log is one request body (`messages` or `prompt`, as
`--record` writes them or a user's own), with optional `agent`, `step` and
`ts` fields. Every request is tokenized exactly as `kvscope serve` would
(chat template, tools) and matched against a simulated prefix store: the
same chain hashes and full blocks as the engine's `PrefixStore`, under a
byte budget, without computing any K/V, evicting with the engine's own
policy code (`kvscope.engine.prefix_policy`: lru, hot, workflow; the
workflow policy learns the step graph from the log's `agent`/`step` as it
goes, exactly as the live store learns it from request metadata). It
reports, per eviction policy:

hit rate (cached / prompt tokens), cached vs prefilled tokens, the TTFT
the hits save at a measured prefill speed, the misses grouped by cause (the
`explain` causes), and a what-if: the same log with the dynamic content it
finds (times, dates, random ids) moved to the end of the last message.

Knows nothing about mx: the caller passes a `LoadedModel` (for its
tokenizer and fingerprint) and the prefill speed.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kvscope.engine.blocks import chain_hashes
from kvscope.engine.model_loading import LoadedModel
from kvscope.engine.prefix_policy import POLICIES, EvictionPolicy, eviction_order
from kvscope.server.errors import APIError
from kvscope.server.explain import EarlierPrompt, explain
from kvscope.server.prompting import build_prompt
from kvscope.server.protocol import ParsedRequest, parse_chat, parse_completion
from kvscope.server.workflow import logged_agent_and_step

MAX_LOG_BYTES = 256 << 20
_DYNAMIC = re.compile(
    r"\d{4}-\d{2}-\d{2}(?:[T ]\d{1,2}:\d{2}(?::\d{2})?(?:\.\d+)?Z?)?"  # ISO date (and time)
    r"|\b\d{1,2}:\d{2}(?::\d{2})?\b"  # a clock
    r"|\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"  # uuid
    r"|\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{10,}\b"  # a hex id
)


class ReplayError(ValueError):
    """The log cannot be replayed; the message names the line and the problem."""


@dataclass(frozen=True)
class LoggedRequest:
    line: int
    agent: str
    step: int | None
    parsed: ParsedRequest
    ids: tuple[int, ...]


@dataclass
class PolicyResult:
    policy: str
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    evicted_blocks: int = 0
    per_request: list[int] = field(default_factory=list)  # cached tokens of each request
    step_graph: dict[str, dict[str, int]] = field(default_factory=dict)  # who followed whom (workflow policy)

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass
class ReplayReport:
    n_requests: int
    budget_bytes: int | None
    ms_per_token: float
    results: list[PolicyResult]
    causes: Counter[str]  # misses by cause (first policy's run)
    lost_by_cause: Counter[str]  # tokens recomputed by cause
    whatif: PolicyResult | None  # the dynamic content moved to the end (first policy)
    moved: int  # requests the what-if rewrote


# ------------------------------------------------------------ reading
def read_log(path: str | Path, lm: LoadedModel) -> list[LoggedRequest]:
    """Parse and tokenize every line; the first bad one raises `ReplayError` naming it."""
    p = Path(path)
    if not p.is_file():
        raise ReplayError(f"{p} is not a file")
    if p.stat().st_size > MAX_LOG_BYTES:
        raise ReplayError(f"{p} is larger than {MAX_LOG_BYTES >> 20} MB")
    out: list[LoggedRequest] = []
    with p.open(encoding="utf-8", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as exc:
            raise ReplayError(f"{p} is not UTF-8 text: {exc}") from exc
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            out.append(_request(json.loads(raw), n, lm))
        except json.JSONDecodeError as exc:
            raise ReplayError(f"{p.name} line {n}: not JSON ({exc.msg} at column {exc.colno})") from exc
        except APIError as exc:
            raise ReplayError(f"{p.name} line {n}: {exc.message}") from exc
    if not out:
        raise ReplayError(f"{p} has no requests")
    return out


def _request(body: Any, line: int, lm: LoadedModel) -> LoggedRequest:
    if not isinstance(body, dict):
        raise APIError(400, "each line must be a JSON object (an OpenAI request body)")
    body = dict(body, model=body.get("model") or lm.name)
    parsed = parse_chat(body) if "messages" in body else parse_completion(body)
    agent, step = logged_agent_and_step(body)
    return LoggedRequest(line, agent, step, parsed, tuple(build_prompt(lm, parsed).ids))


# ------------------------------------------------------------ the store
@dataclass
class _Block:
    block_hash: str
    parent: str | None
    last_used: int  # request index
    hits: int = 0
    agents: set[str] = field(default_factory=set)


class SimulatedStore:
    """Chain-hashed full blocks under a block budget, evicted by the engine's own policy code."""

    def __init__(self, root: str, block_size: int, budget_blocks: int | None, policy: str):
        try:
            self.policy = EvictionPolicy(policy, clock_unit="requests")
        except ValueError as exc:
            raise ReplayError(str(exc)) from None
        self.root, self.block_size, self.budget = root, block_size, budget_blocks
        self.blocks: dict[str, _Block] = {}
        self.children: Counter[str] = Counter()
        self.evicted = 0

    def serve(self, t: int, ids: Sequence[int], agent: str, step: int | None = None) -> int:
        """Cached tokens for request `t`, then store its blocks and evict to budget."""
        self.policy.graph.observe(agent, step)
        hit = 0
        for h in chain_hashes(list(ids[:-1]), self.block_size, self.root):
            b = self.blocks.get(h)
            if b is None:
                break
            b.hits += 1
            hit += 1
        parent: str | None = None
        for h in chain_hashes(list(ids), self.block_size, self.root):
            b = self.blocks.get(h)
            if b is None:
                b = self.blocks[h] = _Block(h, parent, t)
                if parent is not None:
                    self.children[parent] += 1
            b.agents.add(agent)
            b.last_used = t
            parent = h
        self._evict(t)
        return hit * self.block_size

    def _evict(self, t: int) -> None:
        """As the engine's store does for a request session closed right after its turn: at insert the
        request's own blocks are in use (others go first), at release they may go too."""
        not_this_request: Callable[[_Block], bool] = lambda b: b.last_used != t  # noqa: E731
        for evictable in (not_this_request, lambda b: True):
            if self.budget is None or len(self.blocks) <= self.budget:
                return
            for b in eviction_order(self.policy, self.blocks, self.children.__getitem__, evictable, _hash):
                del self.blocks[b.block_hash]
                if b.parent is not None:
                    self.children[b.parent] -= 1
                self.evicted += 1
                if len(self.blocks) <= self.budget:
                    return


def _hash(b: _Block) -> str:
    return b.block_hash


# ------------------------------------------------------------ replay
def replay(
    requests: Sequence[LoggedRequest],
    lm: LoadedModel,
    policies: Sequence[str] = POLICIES,
    budget_bytes: int | None = None,
    block_size: int = 16,
    ms_per_token: float = 0.0,
) -> ReplayReport:
    budget_blocks = None if budget_bytes is None else max(1, budget_bytes // (block_size * lm.bytes_per_token))
    results = []
    for policy in policies:
        store = SimulatedStore(lm.fingerprint, block_size, budget_blocks, policy)
        results.append(_run(store, requests, policy))
    causes, lost = _causes(requests, results[0].per_request, lm, block_size, ms_per_token)
    rewritten, moved = _move_dynamic_to_end(requests, lm)
    whatif = None
    if moved:
        store = SimulatedStore(lm.fingerprint, block_size, budget_blocks, policies[0])
        whatif = _run(store, rewritten, policies[0])
    return ReplayReport(len(requests), budget_bytes, ms_per_token, results, causes, lost, whatif, moved)


def replay_file(
    lm: LoadedModel,
    path: str | Path,
    policies: Sequence[str] = POLICIES,
    budget_bytes: int | None = None,
    block_size: int = 16,
    ms_per_token: float = 0.0,
) -> ReplayReport:
    return replay(read_log(path, lm), lm, policies, budget_bytes, block_size, ms_per_token)


def _run(store: SimulatedStore, requests: Sequence[LoggedRequest], policy: str) -> PolicyResult:
    res = PolicyResult(policy)
    for t, r in enumerate(requests):
        hit = store.serve(t, r.ids, r.agent, r.step)
        res.requests += 1
        res.prompt_tokens += len(r.ids)
        res.cached_tokens += hit
        res.per_request.append(hit)
    res.evicted_blocks = store.evicted
    res.step_graph = store.policy.graph.edges()
    return res


def _causes(
    requests: Sequence[LoggedRequest], cached: list[int], lm: LoadedModel, block_size: int, ms_per_token: float
) -> tuple[Counter[str], Counter[str]]:
    causes: Counter[str] = Counter()
    lost: Counter[str] = Counter()
    earlier: list[EarlierPrompt] = []
    tok = lm.tokenizer
    for r, hit in zip(requests, cached):
        msgs = list(r.parsed.messages)
        why = explain(r.ids, msgs, r.parsed.tools, hit, block_size, earlier[-256:], tok.decode, ms_per_token)
        if why.cause != "none":
            causes[why.cause] += 1
            lost[why.cause] += why.lost_tokens
        earlier.append(EarlierPrompt(len(earlier) + 1, r.ids, tuple(msgs), r.parsed.tools, ""))
    return causes, lost


def _move_dynamic_to_end(requests: Sequence[LoggedRequest], lm: LoadedModel) -> tuple[list[LoggedRequest], int]:
    """The what-if log: times, dates and random ids cut from every message and appended to the last one."""
    out, moved = [], 0
    for r in requests:
        p = r.parsed
        if p.endpoint != "chat":
            out.append(r)
            continue
        found: list[str] = []
        msgs = []
        for m in p.messages:
            hits = _DYNAMIC.findall(m["content"])
            found += hits
            msgs.append(dict(m, content=_DYNAMIC.sub("", m["content"])) if hits else dict(m))
        if not found:
            out.append(r)
            continue
        msgs[-1]["content"] += "\n(" + ", ".join(found) + ")"
        parsed = replace(p, messages=tuple(msgs))
        out.append(replace(r, parsed=parsed, ids=tuple(build_prompt(lm, parsed).ids)))
        moved += 1
    return out, moved


def format_report(rep: ReplayReport) -> str:
    budget = "unlimited" if rep.budget_bytes is None else f"{rep.budget_bytes / (1 << 20):.2f} MB"
    lines = [
        f"{rep.n_requests} requests; prefix-store budget {budget}; prefill {rep.ms_per_token:.3f} ms/token",
        f"{'policy':>9} {'hit rate':>9} {'cached':>9} {'prefilled':>10} {'TTFT saved':>11} {'evicted':>8}",
    ]
    for r in rep.results:
        saved = r.cached_tokens * rep.ms_per_token / 1000
        lines.append(
            f"{r.policy:>9} {r.hit_rate:9.1%} {r.cached_tokens:9d} {r.prefilled_tokens:10d} {saved:10.2f}s {r.evicted_blocks:8d}"
        )
    graph = next((r.step_graph for r in rep.results if r.policy == "workflow"), None)
    if graph:
        edges = sorted((n, a, b) for a, nxt in graph.items() for b, n in nxt.items())[::-1][:8]
        lines.append("workflow step graph learned: " + ", ".join(f"{a} -> {b} ({n}x)" for n, a, b in edges))
    if rep.causes:
        lines.append("misses by cause (requests, tokens recomputed):")
        for cause, n in rep.causes.most_common():
            lines.append(f"  {cause:<18} {n:5d} {rep.lost_by_cause[cause]:8d}")
    if rep.whatif is not None:
        base = rep.results[0]
        lines.append(
            f"what-if, dynamic content (times, dates, ids) moved to the end of {rep.moved} requests: "
            f"hit rate {base.hit_rate:.1%} -> {rep.whatif.hit_rate:.1%} ({base.policy}); "
            f"{rep.whatif.cached_tokens - base.cached_tokens:+d} cached tokens, "
            f"{(rep.whatif.cached_tokens - base.cached_tokens) * rep.ms_per_token / 1000:+.2f} s of TTFT"
        )
    else:
        lines.append("what-if: no times, dates or random ids found to move")
    return "\n".join(lines)

"""A hypothesis state machine that drives real engine operations and checks every invariant.

Random sequences of chat turns (random sampling, stop strings, cancels),
mask/unmask, delete with and without shift, replace, erratum, compact,
splices between sessions and from segment files, compression with every
policy, undo, and save/reopen run on one `Engine`. After every step:
- `check_sessions` holds for every session and the prefix store;
- an operation that raised a kvscope error left its session exactly as it was;
- a session only ever touched by exact operations (turns, undo back to exact,
  save/reopen) gives the same next-token logits as a fresh recompute of its
  visible tokens at their recorded positions (float32, `EXACT_ATOL`);
- an operation's fidelity report equals a fresh measurement of the state it
  left (so it measured the state the user got, inside its transaction).

Used by tests/engine/test_stateful.py (short budget) and bench/stateful.py
(long runs).
"""

from __future__ import annotations

import hashlib
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvscope.engine import Engine, EngineConfig, SamplingParams
from kvscope.engine.errors import KVScopeError
from kvscope.engine.events import TokenSampled
from kvscope.engine.fidelity import measure
from kvscope.engine.invariants import check_sessions, logits_vs_recompute
from kvscope.engine.policies import POLICIES
from kvscope.engine.splicing import SpliceOptions

EXACT_ATOL = 2e-4  # float32 logits of a 2-layer model: chunking changes sums at ~1e-6
WORDS = "the code locker red blue green water name is what of a you first time day".split()
text = st.lists(st.sampled_from(WORDS), min_size=1, max_size=8).map(" ".join)


def fingerprint(eng: Engine, sid: str) -> str:
    """A digest of everything an operation could change in a session."""
    s = eng.session(sid)
    h = hashlib.sha256()
    h.update(repr((s.tokens, s.origin, s.positions, s.messages, s.transcript_text, len(s.undo_stack))).encode())
    for c in s.caches:
        h.update(c.row_token.tobytes() + c.masked_tokens.tobytes() + c.token_positions.tobytes())
        h.update(c.head_presence().tobytes())  # which KV head holds which row (head-wise compression)
        if c.n_rows:
            k, v = c.state[:2]
            h.update(np.array(k).tobytes() + np.array(v).tobytes())
    return h.hexdigest()


class EngineMachine(RuleBasedStateMachine):
    model_dir: Path | None = None  # set by the subclass per architecture
    counts: Counter[str] = Counter()  # steps run per rule and outcome, over every case of a run

    sessions = Bundle("sessions")

    def __init__(self) -> None:
        super().__init__()
        self.eng = Engine(EngineConfig(block_size=8, persist=False))
        self.eng.load(self.model_dir)
        self.exact: dict[str, bool] = {}
        self.undo_exact: dict[str, list[bool]] = {}
        self.tmp = Path(tempfile.mkdtemp(prefix="kvscope-machine-"))
        self.n_files = 0

    # ------------------------------------------------------------ helpers
    def _open(self, sid: str) -> bool:
        return sid in self.eng.sessions()

    def _span(self, data: st.DataObject, sid: str) -> tuple[int, int]:
        n = self.eng.session(sid).n_tokens
        lo = data.draw(st.integers(0, max(n - 1, 0)), "lo")
        hi = data.draw(st.integers(lo + 1, max(n, lo + 1)), "hi")
        return lo, hi

    def _edit(self, sid: str, fn, exact_after: bool = False, undoable: bool = True) -> object:
        """Run an edit; on a kvscope error the session must be unchanged."""
        before = fingerprint(self.eng, sid)
        was = self.exact[sid]
        try:
            result = fn()
        except KVScopeError:
            assert fingerprint(self.eng, sid) == before, "a failed operation changed the session"
            self.counts["refused"] += 1
            return None
        self.counts["applied"] += 1
        if undoable:
            self.undo_exact[sid] = (self.undo_exact[sid] + [was])[-8:]
        self.exact[sid] = was and exact_after
        report = result
        if hasattr(report, "cosine") and not np.isnan(report.cosine):
            again = measure(self.eng.model, self.eng.session(sid), "check", 0.0)
            assert abs(again.cosine - report.cosine) < 1e-5, (again.cosine, report.cosine)
            assert abs(again.kl - report.kl) < 1e-4 + 1e-3 * abs(report.kl), (again.kl, report.kl)
        return result

    # ------------------------------------------------------------ rules
    @initialize(
        target=sessions, system=st.sampled_from([None, "you are a code locker .", "name the water"]), first=text
    )
    def first_session(self, system: str | None, first: str) -> str:
        return self.new_session(system, first)

    @rule(target=sessions, system=st.sampled_from([None, "you are a code locker ."]), first=text)
    def new_session(self, system: str | None, first: str) -> str:
        self.counts["new_session"] += 1
        sid = self.eng.new_session(system=system)
        self.exact[sid], self.undo_exact[sid] = True, []
        self.eng.chat(sid, first, SamplingParams(max_tokens=3))  # something to edit
        return sid

    def _chat(self, sid: str, prompt: str, params: SamplingParams, cancel_after: int | None = None) -> None:
        self.counts["chat"] += 1
        if not self._open(sid):
            return
        unsubscribe = None
        if cancel_after is not None:

            def on_event(ev: object) -> None:
                if isinstance(ev, TokenSampled) and ev.session == sid and ev.index >= cancel_after:
                    self.eng.cancel(sid)

            unsubscribe = self.eng.subscribe(on_event)
        try:
            self.eng.chat(sid, prompt, params)
        except KVScopeError:
            pass  # a turn that fails rolls back (checked by the invariants)
        finally:
            if unsubscribe is not None:
                unsubscribe()
        self.undo_exact[sid] = []  # a turn clears the undo history

    @rule(sid=sessions, prompt=text, max_tokens=st.integers(1, 8))
    def chat_greedy(self, sid, prompt, max_tokens) -> None:
        self._chat(sid, prompt, SamplingParams(max_tokens=max_tokens))

    @rule(
        sid=sessions,
        prompt=text,
        max_tokens=st.integers(1, 8),
        top_p=st.sampled_from([1.0, 0.9]),
        seed=st.integers(0, 3),
        stop=st.sampled_from([(), ("the",), ("e",)]),
    )
    def chat_sampled(self, sid, prompt, max_tokens, top_p, seed, stop) -> None:
        self._chat(
            sid, prompt, SamplingParams(temperature=0.9, top_p=top_p, seed=seed, max_tokens=max_tokens, stop=stop)
        )

    @rule(sid=sessions, prompt=text, cancel_after=st.integers(0, 3))
    def chat_cancelled(self, sid, prompt, cancel_after) -> None:
        self._chat(sid, prompt, SamplingParams(max_tokens=8), cancel_after)

    @rule(sid=sessions, data=st.data(), hide=st.booleans())
    def mask(self, sid, data, hide) -> None:
        self.counts["mask"] += 1
        if self._open(sid) and self.eng.session(sid).n_tokens:
            lo, hi = self._span(data, sid)
            fn = self.eng.mask if hide else self.eng.unmask
            self._edit(sid, lambda: fn(sid, lo, hi))

    @rule(sid=sessions, data=st.data(), shift=st.booleans())
    def delete(self, sid, data, shift) -> None:
        self.counts["delete"] += 1
        if self._open(sid) and self.eng.session(sid).n_tokens:
            lo, hi = self._span(data, sid)
            self._edit(sid, lambda: self.eng.delete_span(sid, lo, hi, shift))

    @rule(sid=sessions, data=st.data(), new=text)
    def replace(self, sid, data, new) -> None:
        self.counts["replace"] += 1
        if self._open(sid) and self.eng.session(sid).n_tokens:
            lo, hi = self._span(data, sid)
            self._edit(sid, lambda: self.eng.replace_span(sid, lo, hi, new))

    @rule(sid=sessions, note=text)
    def erratum(self, sid, note) -> None:
        self.counts["erratum"] += 1
        if self._open(sid):
            self._edit(sid, lambda: self.eng.erratum(sid, f"[update] {note}"))

    @rule(sid=sessions, data=st.data(), summary=text)
    def compact(self, sid, data, summary) -> None:
        self.counts["compact"] += 1
        if self._open(sid) and self.eng.session(sid).n_tokens:
            lo, hi = self._span(data, sid)
            self._edit(sid, lambda: self.eng.compact(sid, lo, hi, summary))

    @rule(dst=sessions, src=sessions, data=st.data(), seam=st.sampled_from([0, 0, 2]), via_file=st.booleans())
    def splice(self, dst, src, data, seam, via_file) -> None:
        self.counts["splice"] += 1
        if not (self._open(dst) and self._open(src)) or not self.eng.session(src).n_tokens:
            return
        lo, hi = self._span(data, src)
        n_dst = self.eng.session(dst).n_tokens
        at = data.draw(st.one_of(st.none(), st.integers(0, n_dst)), "at")
        if via_file:
            path = self.tmp / f"seg{self.n_files}.kvseg"
            self.n_files += 1
            try:
                self.eng.save_segment(src, lo, hi, path)
            except KVScopeError:
                return
            self._edit(dst, lambda: self.eng.splice_file(dst, path, SpliceOptions(at=at, seam_repair=seam)))
        else:
            self._edit(dst, lambda: self.eng.splice(dst, src, lo, hi, SpliceOptions(at=at, seam_repair=seam)))

    @rule(sid=sessions, policy=st.sampled_from(sorted(POLICIES)), keep=st.sampled_from([0.5, 0.75, 0.9]))
    def compress(self, sid, policy, keep) -> None:
        self.counts["compress"] += 1
        if self._open(sid) and self.eng.session(sid).n_tokens:
            self._edit(sid, lambda: self.eng.compress(sid, policy, keep_ratio=keep))

    @precondition(lambda self: any(self.undo_exact.get(s) for s in self.eng.sessions()))
    @rule(data=st.data())
    def undo(self, data) -> None:
        self.counts["undo"] += 1
        sid = data.draw(st.sampled_from([s for s in self.eng.sessions() if self.undo_exact.get(s)]), "sid")
        self.eng.undo(sid)
        self.exact[sid] = self.undo_exact[sid].pop()

    @rule(target=sessions, sid=sessions)
    def save_and_reopen(self, sid) -> str:
        self.counts["save_and_reopen"] += 1
        if not self._open(sid):
            return sid
        path = self.tmp / f"s{self.n_files}.kvsession"
        self.n_files += 1
        self.eng.export_session(sid, path)
        new = self.eng.import_session(path)
        a, b = self.eng.session(sid), self.eng.session(new)
        assert (a.tokens, a.positions, a.messages) == (b.tokens, b.positions, b.messages)
        if a.n_tokens:
            probe = a.tokens[-1:]
            got_a, _ = logits_vs_recompute(self.eng.model, a, probe)
            got_b, _ = logits_vs_recompute(self.eng.model, b, probe)
            np.testing.assert_array_equal(got_a, got_b)  # a reopened session is bit-exact
        self.exact[new], self.undo_exact[new] = self.exact[sid], []
        return new

    @precondition(lambda self: len(self.eng.sessions()) > 1)
    @rule(sid=sessions)
    def close(self, sid) -> None:
        self.counts["close"] += 1
        if self._open(sid):
            self.eng.close_session(sid)

    # ------------------------------------------------------------ checks
    @invariant()
    def invariants_hold(self) -> None:
        self.counts["steps checked"] += 1
        check_sessions([self.eng.session(s) for s in self.eng.sessions()], self.eng.store)

    @invariant()
    def exact_sessions_equal_a_recompute(self) -> None:
        for sid in self.eng.sessions():
            s = self.eng.session(sid)
            if self.exact.get(sid) and s.n_tokens:
                got, want = logits_vs_recompute(self.eng.model, s, s.tokens[-1:])
                np.testing.assert_allclose(got, want, atol=EXACT_ATOL)

    def teardown(self) -> None:
        for f in self.tmp.iterdir():
            f.unlink()
        self.tmp.rmdir()


def machine_for(model_dir: Path) -> type[EngineMachine]:
    return type(f"EngineMachine_{model_dir.name}", (EngineMachine,), {"model_dir": model_dir})

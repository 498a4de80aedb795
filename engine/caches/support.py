"""Which cache operations are exact, approximate-and-measured, or refused — for one model.

Every operation consults this one table before it changes anything:
`SupportTable.require(op)` raises `UnsupportedModelError` naming the model,
the layer kind and why. `kvscope info` prints the table.

    op            full attention  MLA (k_pe)  sliding window  chunked/quant/other  recurrent+attention  recurrent only
    chat          exact           exact       exact           exact                exact                exact
    prefix reuse  exact           exact       exact           refused              exact (checkpoints)  exact (checkpoints)
    mask/compact  exact           exact       exact**         refused              measured             refused
    erratum       exact           exact       exact           exact                exact                exact
    delete/replace/splice/segment files
                  exact*          exact*      exact*          refused              refused              refused
    compress      policy          policy***   policy***       refused              policy***            refused
    persistence   exact           exact       exact           refused              exact (state saved)  exact (state saved)

    *  when every layer's rows rotate by one fixed rotation per position
       (probed from the model: `rope_probe`), or do not rotate at all.
    ** all sliding layers together (they share one window mask).
    *** measured, on the full-attention caches only, row-scoring policies
        (caches.compress_scope); sliding and recurrent caches are left alone.

Knows nothing about sessions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvscope.engine.caches.layout import KIND_LABELS, CacheLayout
from kvscope.engine.caches.rope_probe import LayerRotation
from kvscope.engine.errors import UnsupportedModelError

EXACT, MEASURED, REFUSED = "exact", "measured", "refused"

OPERATIONS = (
    "chat",
    "prefix reuse",
    "mask",
    "unmask",
    "compact",
    "erratum",
    "delete",
    "replace",
    "splice",
    "segment files",
    "compress",
    "persistence",
)
# Names callers use for the same operation.
ALIASES = {"delete span": "delete", "replace span": "replace", "save segment": "segment files", "undo": "chat"}
_ROW_KINDS = ("attention", "sliding")  # kvscope caches with per-row bookkeeping


@dataclass(frozen=True)
class Verdict:
    op: str
    status: str  # exact | measured | refused
    reason: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"op": self.op, "status": self.status, "reason": self.reason}


@dataclass(frozen=True)
class SupportTable:
    model: str
    verdicts: tuple[Verdict, ...]
    mla: bool = False  # caches hold an MLA latent / k_pe (row-scoring compression only)

    def verdict(self, op: str) -> Verdict:
        name = ALIASES.get(op, op)
        for v in self.verdicts:
            if v.op == name:
                return v
        raise KeyError(f"unknown operation {op!r}; known: {', '.join(OPERATIONS)}")

    def allows(self, op: str) -> bool:
        return self.verdict(op).status != REFUSED

    def require(self, op: str) -> Verdict:
        """The verdict for `op`; raises `UnsupportedModelError` if it is refused."""
        v = self.verdict(op)
        if v.status == REFUSED:
            raise UnsupportedModelError(f"{v.op} is refused on {self.model}: {v.reason}")
        return v

    def as_rows(self) -> list[dict[str, str]]:
        return [v.as_dict() for v in self.verdicts]

    def format(self) -> str:
        width = max(len(v.op) for v in self.verdicts)
        return "\n".join(f"  {v.op:<{width}}  {v.status:<8}  {v.reason}".rstrip() for v in self.verdicts)


def _kinds_phrase(layout: CacheLayout, kinds: tuple[str, ...]) -> str:
    parts = [f"{layout.kinds[k]} of {layout.n_caches} caches are {KIND_LABELS[k]}" for k in kinds if layout.kinds[k]]
    return "; ".join(parts)


def _rotation_problem(layout: CacheLayout, rotations: list[LayerRotation]) -> str | None:
    for r in rotations:
        if not r.exact and layout.entries[r.index].kind in _ROW_KINDS:
            return f"cache {r.index} ({KIND_LABELS[layout.entries[r.index].kind]}): {r.reason}"
    return None


def build_table(model: str, layout: CacheLayout, rotations: list[LayerRotation]) -> SupportTable:
    """The verdict of every operation for a model with this layout and these rotations."""
    non_row = tuple(k for k in layout.kinds if k not in _ROW_KINDS)
    windowed = tuple(k for k in non_row if k != "recurrent")
    has_rows = any(layout.kinds[k] for k in _ROW_KINDS)
    recurrent = layout.kinds["recurrent"]
    mla = any(r.rotates and (r.tensor == "values" or r.lo > 0) for r in rotations)
    rot_problem = _rotation_problem(layout, rotations)

    def v(op: str, status: str, reason: str = "") -> Verdict:
        return Verdict(op, status, reason)

    if not non_row:
        move = v("", EXACT) if rot_problem is None else v("", REFUSED, rot_problem)
        mask = v("", EXACT)
    else:
        why = _kinds_phrase(layout, non_row)
        move = v("", REFUSED, f"{why}: kvscope moves rows only in full-attention caches")
        if windowed or not has_rows:
            mask = v("", REFUSED, f"{why}: there are no attention rows kvscope can hide in them")
        else:
            mask = v(
                "",
                MEASURED,
                f"approximate: {recurrent} of {layout.n_caches} caches keep a recurrent state that has "
                "already absorbed the masked tokens (only attention rows are hidden; fidelity is measured)",
            )
    compress = _compress_verdict(layout, windowed, mla)
    persistence = (
        v("", REFUSED, f"{_kinds_phrase(layout, windowed)}: kvscope saves only its own row caches and recurrent states")
        if windowed
        else v("", EXACT, "recurrent states are saved with the rows" if recurrent else "")
    )
    if not non_row:
        reuse = v("", EXACT)
    elif windowed:
        reuse = v("", REFUSED, f"off: {_kinds_phrase(layout, windowed)}")
    else:
        reuse = v("", EXACT, "through recurrent-state checkpoints taken at the end of each prefill (last 8 prompts)")
    rows = [
        ("chat", v("", EXACT)),
        ("prefix reuse", reuse),
        ("mask", mask),
        ("unmask", mask),
        ("compact", mask),
        ("erratum", v("", EXACT)),
        ("delete", move),
        ("replace", move),
        ("splice", move),
        ("segment files", move),
        ("compress", compress),
        ("persistence", persistence),
    ]
    return SupportTable(model, tuple(Verdict(op, x.status, x.reason) for op, x in rows), mla)


def _compress_verdict(layout: CacheLayout, windowed: tuple[str, ...], mla: bool) -> Verdict:
    """Policies evict from full-attention caches only (see caches.compress_scope)."""
    full, sliding, recurrent = layout.kinds["attention"], layout.kinds["sliding"], layout.kinds["recurrent"]
    if windowed:
        return Verdict("", REFUSED, f"{_kinds_phrase(layout, windowed)}: rows not kvscope's to evict")
    if not full:
        return Verdict(
            "", REFUSED, f"{_kinds_phrase(layout, tuple(layout.kinds))}: no full-attention cache to evict from"
        )
    notes = []
    if sliding:
        notes.append(
            f"the {sliding} sliding-window caches keep every row (one window mask for all; they read at most "
            "the window)"
        )
    if recurrent:
        notes.append(f"the {recurrent} recurrent states keep what they absorbed (no rows)")
    if mla:
        notes.append(
            "MLA caches hold a shared latent: row-scoring policies only (key_norm, keydiff, streaming_llm, "
            "random, quantize)"
        )
    if not notes:
        return Verdict("", EXACT)
    if sliding or recurrent:
        notes.insert(0, f"a policy evicts from the {full} full-attention caches only")
        notes.append("attention-recomputing policies are refused; fidelity is measured")
    return Verdict("", MEASURED, "; ".join(notes))


def table_as_dict(table: SupportTable) -> dict[str, Any]:
    return {v.op: {"status": v.status, "reason": v.reason} for v in table.verdicts}

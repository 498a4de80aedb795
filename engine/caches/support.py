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
    compress      policy          refused     refused         refused              refused              refused
    persistence   exact           exact       refused         refused              refused              refused

    *  when every layer's rows rotate by one fixed rotation per position
       (probed from the model: `rope_probe`), or do not rotate at all.
    ** all sliding layers together (they share one window mask).

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
    plain_only = v("", EXACT) if not non_row else v("", REFUSED, f"{_kinds_phrase(layout, non_row)}")
    sliding = layout.kinds["sliding"]
    full_only = plain_only
    if sliding and not non_row:
        full_only = v("", REFUSED, f"{_kinds_phrase(layout, ('sliding',))}, which kvscope does not save or score yet")
    compress = full_only
    if not non_row and mla:
        compress = v("", REFUSED, "MLA caches store a shared latent and k_pe, not per-head keys to score")
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
        ("persistence", full_only),
    ]
    return SupportTable(model, tuple(Verdict(op, x.status, x.reason) for op, x in rows))


def table_as_dict(table: SupportTable) -> dict[str, Any]:
    return {v.op: {"status": v.status, "reason": v.reason} for v in table.verdicts}

"""ReportPanel: the result of the last operation, docked beside the work.

Promises:
- the same layout for every operation (mask, splice, compress, save,
  undo, ...): a title naming the operation and the session, one verdict
  line with a colour, then the numbers behind it (shown on demand);
- the verdict follows fixed, stated thresholds on the fidelity measured
  against a full recompute (`VERDICTS`); an operation that reports no
  fidelity says so in grey rather than inventing a verdict;
- field names are written for a person (`FIELD_NAMES`), and the fidelity
  rows carry the same good / bad colour as the verdict;
- it never takes focus and never opens a window over the session;
- for an edit whose fidelity is measured after it (long sessions, see
  `fidelity_jobs.py`) it says "measuring…" with a Skip button, then shows
  the verdict when the measurement arrives; the size past which that
  happens is the person's (`inline_max`).
"""

from __future__ import annotations

import math
from typing import Any

from PySide6.QtCore import Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from kvscope.ui.dialogs import format_value

# (name, colour, test on (kl, top1)), first match wins. KL in nats, mean over probe positions.
EXACT_KL, FAITHFUL_KL, FAITHFUL_TOP1 = 1e-4, 0.05, 0.9
VERDICTS = (
    ("exact", "#3cb371", lambda kl, top1: kl <= EXACT_KL and top1 >= 1.0),
    ("faithful", "#e6a23c", lambda kl, top1: kl <= FAITHFUL_KL and top1 >= FAITHFUL_TOP1),
    ("degraded", "#e05252", lambda kl, top1: True),
)
THRESHOLDS = (
    f"exact: KL ≤ {EXACT_KL:g} and every top-1 token the same · "
    f"faithful: KL ≤ {FAITHFUL_KL:g} and top-1 ≥ {FAITHFUL_TOP1:.0%} · degraded: otherwise "
    "(next-token logits vs a full recompute of the visible tokens)"
)
FIELD_NAMES = {
    "operation": "operation",
    "cosine": "logit cosine vs recompute",
    "kl": "KL divergence vs recompute (nats)",
    "top1_agree": "same top-1 token",
    "n_probe": "positions probed",
    "elapsed_ms": "operation time (ms)",
    "recompute_ms": "full recompute time (ms)",
    "rows_changed": "cache rows changed",
    "delta": "positions moved by",
    "seam_repair": "tokens recomputed after the seam",
    "path": "file",
    "undone": "undone",
    "policy": "policy",
    "keep_ratio": "share of rows kept",
    "budget_tokens": "token budget",
    "bytes_before": "bytes before",
    "bytes_after": "bytes after",
    "n_tokens": "tokens",
}
FIRST = ("cosine", "kl", "top1_agree", "elapsed_ms", "recompute_ms")


def verdict(report: dict[str, Any]) -> tuple[str, str] | None:
    """(verdict, colour) from a report's KL and top-1, or None if it measured no fidelity."""
    kl, top1 = report.get("kl"), report.get("top1_agree")
    if not isinstance(kl, (int, float)) or not isinstance(top1, (int, float)) or math.isnan(kl) or math.isnan(top1):
        return None
    name, colour = next((name, colour) for name, colour, ok in VERDICTS if ok(kl, top1))
    if isinstance(report.get("extra"), dict) and report["extra"].get("approximate"):
        return f"approximate (measured {name})", colour  # e.g. a mask a recurrent state already absorbed
    return name, colour


def human_name(key: str) -> str:
    return FIELD_NAMES.get(key, key.replace("_", " "))


def flat_fields(report: dict[str, Any]) -> list[tuple[str, Any]]:
    """Fidelity first, then the rest; nested dicts (`extra`, `params`) flattened one level."""
    items: list[tuple[str, Any]] = []
    keys = [k for k in FIRST if k in report] + [k for k in report if k not in FIRST]
    for k in keys:
        v = report[k]
        if isinstance(v, dict):
            items.extend((sub, sv) for sub, sv in v.items())
        elif k != "operation":
            items.append((k, v))
    return items


class ReportPanel(QWidget):
    skip_requested = Signal(str)  # session id whose queued measurement to drop

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.pending_sid: str | None = None
        self.skip_btn = QToolButton()
        self.skip_btn.setText("skip measuring")
        self.skip_btn.setToolTip("Drop this edit's fidelity measurement (a full recompute of the session)")
        self.skip_btn.clicked.connect(lambda: self.pending_sid and self.skip_requested.emit(self.pending_sid))
        self.skip_btn.hide()
        self.inline_max = QSpinBox(minimum=0, maximum=10_000_000, singleStep=256, suffix=" tokens")
        self.inline_max.setToolTip(
            "Sessions up to this size measure fidelity inside the edit; longer ones apply the edit at once "
            "and measure after it, when the engine is idle"
        )
        self.title = QLabel("No operation yet: select a span and mask, splice, compress…")
        self.title.setWordWrap(True)
        self.verdict_label = QLabel("")
        self.verdict_label.setWordWrap(True)
        self.details_btn = QToolButton()
        self.details_btn.setText("numbers")
        self.details_btn.setCheckable(True)
        self.details_btn.setChecked(True)
        self.details_btn.setToolTip(THRESHOLDS)
        self.table = QTableWidget(0, 2)
        self.table.setHorizontalHeaderLabels(["measure", "value"])
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.verticalHeader().hide()
        self.details_btn.toggled.connect(self.table.setVisible)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addWidget(self.title)
        lay.addWidget(self.verdict_label)
        row = QHBoxLayout()
        row.addWidget(self.details_btn)
        row.addWidget(self.skip_btn)
        row.addStretch(1)
        row.addWidget(QLabel("measure fidelity inside the edit up to"))
        row.addWidget(self.inline_max)
        lay.addLayout(row)
        lay.addWidget(self.table, 1)
        self.last: tuple[str, str, dict[str, Any]] | None = None
        self.last_verdict: str | None = None

    def show_report(
        self, op: str, session_name: str, report: dict[str, Any], measuring_sid: str | None = None, note: str = ""
    ) -> None:
        """Show a report; `measuring_sid`: its fidelity is being measured after the edit."""
        self.last = (op, session_name, report)
        self.pending_sid = measuring_sid
        self.skip_btn.setVisible(measuring_sid is not None)
        self.title.setText(f"<b>{op}</b> on <b>{session_name}</b>{note}")
        v = verdict(report)
        self.last_verdict = v[0] if v else None
        if measuring_sid is not None:
            self.verdict_label.setText(
                "<span style='color:#6aa0e0'>● measuring fidelity after the edit…</span> "
                "<span style='color:#999'>(a full recompute; it waits until the engine is idle)</span>"
            )
        elif v is None:
            self.verdict_label.setText(
                f"<span style='color:#999'>{op} done · no fidelity measured for this operation</span>"
            )
        else:
            name, colour = v
            kl, top1 = report["kl"], report["top1_agree"]
            self.verdict_label.setText(
                f"<span style='color:{colour}; font-weight:bold'>● {name}</span> "
                f"<span style='color:#bbb'>KL {kl:.2g} nats · same top-1 token {top1:.0%}</span>"
            )
        self.verdict_label.setToolTip(THRESHOLDS)
        rows = flat_fields(report)
        self.table.setRowCount(len(rows))
        for r, (k, val) in enumerate(rows):
            key_item = QTableWidgetItem(human_name(k))
            key_item.setToolTip(k)
            shown = f"{val:.1%}" if k == "top1_agree" and isinstance(val, float) else format_value(val)
            value = QTableWidgetItem(shown)
            if v is not None and k in ("cosine", "kl", "top1_agree"):
                value.setForeground(QColor(v[1]))
            self.table.setItem(r, 0, key_item)
            self.table.setItem(r, 1, value)
        self.table.resizeColumnToContents(0)

"""DecisionPanel: the last compression decision of the active session, and
the controls to make a new one.

Promises:
- shows, per layer x token, the keep mask (kept / evicted / masked, in the
  state colours) and the policy scores of the last decision
  (`snapshot.scores`, which may be None: then says so);
- summarises the last `DecisionApplied` event: policy, budget, kept and
  evicted rows per layer;
- "Apply" calls `compress` through the active session's `SpanActions`;
- below, `HeadPanel` shows per-KV-head keep masks of a chosen layer and the
  per-head / per-layer budgets (head-wise policies such as `adakv`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from kvscope.engine.blocks import N_STATES, TokenState
from kvscope.engine.events import DecisionApplied, Event
from kvscope.engine.snapshot import SessionSnapshot
from kvscope.ui.block_map import IndexAxis
from kvscope.ui.dialogs import format_value, policy_names
from kvscope.ui.head_panel import HeadPanel
from kvscope.ui.palette import state_lut

ApplyFn = Callable[[str, float | None, int | None], object]


class DecisionPanel(QWidget):
    def __init__(self, apply: ApplyFn, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._apply = apply
        self.session: str | None = None
        self.decisions: dict[str, DecisionApplied] = {}
        self.reports: dict[str, dict] = {}
        self.evicted: dict[str, list[int]] = {}  # per layer, from the newest snapshot
        self.names: dict[str, str] = {}
        self.policy = QComboBox()
        self.policy.addItems(list(policy_names()))
        self.ratio = QDoubleSpinBox(
            minimum=0.01, maximum=1.0, singleStep=0.05, value=0.5, prefix="keep ", suffix=" of the rows"
        )
        self.ratio.setToolTip("Share of each layer's cache rows the policy keeps (0.50 = half); the rest are evicted")
        self.use_budget = QCheckBox("budget")
        self.budget = QSpinBox(minimum=1, maximum=1_000_000, value=256, suffix=" tok")
        self.budget.setEnabled(False)
        self.use_budget.toggled.connect(self.budget.setEnabled)
        self.use_budget.toggled.connect(lambda on: self.ratio.setEnabled(not on))
        self.apply_btn = QPushButton("Apply to session")
        self.apply_btn.clicked.connect(self._on_apply)
        controls = QHBoxLayout()
        for w in (QLabel("policy"), self.policy, self.ratio, self.use_budget, self.budget, self.apply_btn):
            controls.addWidget(w)
        controls.addStretch(1)
        self.summary = QLabel("No decision yet.")
        self.summary.setWordWrap(True)
        self.mask_plot, self.mask_img = _image_plot("rows kept (layer × token)")
        self.mask_img.setLookupTable(state_lut())
        self.mask_img.setLevels((0, N_STATES))
        self.score_plot, self.score_img = _image_plot("policy score (layer × token)")
        self.score_img.setColorMap(pg.colormap.get("viridis"))
        split = QSplitter()
        split.addWidget(self.mask_plot)
        split.addWidget(self.score_plot)
        self.heads = HeadPanel()
        rows = QSplitter(Qt.Orientation.Vertical)
        rows.addWidget(split)
        rows.addWidget(self.heads)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addLayout(controls)
        lay.addWidget(self.summary)
        lay.addWidget(rows, 1)

    def _on_apply(self) -> None:
        ratio = None if self.use_budget.isChecked() else self.ratio.value()
        budget = self.budget.value() if self.use_budget.isChecked() else None
        self._apply(self.policy.currentText(), ratio, budget)

    # ------------------------------------------------------------ inputs
    def on_event(self, ev: Event) -> None:
        if isinstance(ev, DecisionApplied):
            self.decisions[ev.session] = ev
            if ev.session == self.session:
                self._show_summary()

    def on_report(self, sid: str, op: str, report: dict) -> None:
        """The returned Decision of a compress call: budget and bytes saved."""
        if op != "compress":
            return
        self.reports[sid] = report
        if sid == self.session:
            self._show_summary()

    def set_session(self, sid: str | None) -> None:
        self.session = sid
        self._show_summary()

    def on_snapshot(self, snap: SessionSnapshot) -> None:
        self.names[snap.session] = snap.name
        self.evicted[snap.session] = [int(n) for n in (snap.token_state == TokenState.EVICTED).sum(axis=1)]
        if snap.session != self.session:
            return
        self._show_summary()
        self.heads.on_snapshot(snap)
        self.mask_img.setImage(snap.token_state.T, autoLevels=False, levels=(0, N_STATES))
        # The plots' ranges were pinned while empty, which turns auto-range off:
        # show the whole layer x token grid of this snapshot.
        n_layers, n_tokens = snap.token_state.shape
        whole = {"xRange": (0, max(n_tokens, 1)), "yRange": (0, max(n_layers, 1)), "padding": 0}
        self.mask_plot.getViewBox().setRange(**whole)
        self.score_plot.getViewBox().setRange(**whole)
        if snap.scores is None:
            self.score_img.clear()
            self.score_plot.setTitle("policy score: none (no decision with scores yet)")
        else:
            scores = np.nan_to_num(np.asarray(snap.scores, np.float32), nan=0.0, posinf=0.0, neginf=0.0)
            self.score_img.setImage(scores.T, autoLevels=True)
            self.score_plot.setTitle(f"policy score (layer × token) · min {scores.min():.3g} · max {scores.max():.3g}")

    def _show_summary(self) -> None:
        ev = self.decisions.get(self.session or "")
        rep = self.reports.get(self.session or "", {})
        asked = ", ".join(
            f"{k} {format_value(rep[k])}"
            for k in ("keep_ratio", "budget_tokens", "bytes_before", "bytes_after")
            if rep.get(k) is not None
        )
        if ev is None:
            evicted: Sequence[int] = self.evicted.get(self.session or "", [])
            if any(evicted):  # e.g. a session reopened after a restart: its evictions are in the cache
                self.summary.setText(
                    f"Evicted rows per layer {evicted} ({sum(evicted)} in all), from a decision made before "
                    "this window opened; the keep mask below is the cache as it is now."
                )
            else:
                self.summary.setText(f"No decision yet for {self.session or 'this session'}.")
            return
        kept, evicted = ev.kept_rows, ev.evicted_rows
        extra = ", ".join(f"{k} {format_value(v)}" for k, v in ev.details.items() if k not in ("kept", "evicted"))
        self.summary.setText(
            f"<b>{ev.policy}</b> on {self.names.get(ev.session, ev.session)} · tokens [{ev.token_lo}, {ev.token_hi}) · "
            f"kept {sum(kept)} / evicted {sum(evicted)} rows · per layer kept {list(kept)}"
            + (f"<br>{asked}" if asked else "")
            + (f"<br><span style='color:#999'>{extra[:400]}</span>" if extra else "")
        )


def _image_plot(title: str) -> tuple[pg.PlotWidget, pg.ImageItem]:
    plot = pg.PlotWidget(title=title, axisItems={"left": IndexAxis("left", 14)})  # layer i labelled at its row's centre
    plot.setBackground((24, 24, 28))
    img = pg.ImageItem(axisOrder="col-major")
    plot.addItem(img)
    plot.getViewBox().invertY(True)
    plot.setLabel("bottom", "token")
    plot.setLabel("left", "layer")
    plot.setMinimumHeight(120)
    plot.getViewBox().setRange(xRange=(0, 64), yRange=(0, 4), padding=0)  # empty until a snapshot
    return plot, img

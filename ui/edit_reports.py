"""EditReports: where the result of an edit goes.

Promises:
- an edit's report (from a view's `SpanActions`) is shown in the report
  panel, which comes to the front, and handed to the decisions panel; while
  its fidelity is still to be measured the panel says "measuring…";
- an edit applied without its fidelity is queued for `FidelityJobs`; any
  newer operation of that session drops the queued measurement (the cache
  it would measure is gone); the measured report replaces the shown one
  and becomes the session's last report;
- Skip drops the measurement and says so on the shown report.

Knows the views only through `view_of(sid)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvscope.ui.decision_panel import DecisionPanel
from kvscope.ui.fidelity_jobs import FidelityJobs
from kvscope.ui.report_panel import ReportPanel
from kvscope.ui.session_view import SessionView


class EditReports:
    def __init__(
        self,
        report: ReportPanel,
        decisions: DecisionPanel,
        fidelity: FidelityJobs,
        view_of: Callable[[str], SessionView | None],
        bring_forward: Callable[[], None],
    ) -> None:
        self._report, self._decisions, self._fidelity = report, decisions, fidelity
        self._view_of = view_of
        self._bring_forward = bring_forward
        report.inline_max.setValue(fidelity.inline_max_tokens)
        report.inline_max.valueChanged.connect(fidelity.set_inline_max_tokens)
        report.skip_requested.connect(self._skip_measuring)
        fidelity.measured.connect(self._on_measured)

    def attach(self, view: SessionView) -> None:
        """Route the reports of one view's edits."""
        acts, fidelity = view.actions_, self._fidelity
        acts.report_ready.connect(lambda op, rep: self._on_report(view, op, rep))
        # A newer operation changes what a queued measurement would measure: drop it.
        acts.submitted.connect(lambda _op: fidelity.skip(view.sid))
        acts.set_inline_fidelity(lambda: fidelity.inline(view.snapshot.n_tokens if view.snapshot else 0))
        acts.measure_later.connect(lambda op, rep: fidelity.queue(view.sid, op, rep))

    def _on_report(self, view: SessionView, op: str, report: dict[str, Any]) -> None:
        measuring = view.sid if view.sid in self._fidelity.pending else None
        self._report.show_report(op, view.name, report, measuring)
        self._decisions.on_report(view.sid, op, report)
        self._bring_forward()

    def _on_measured(self, sid: str, op: str, report: dict[str, Any]) -> None:
        view = self._view_of(sid)
        if view is not None:
            view.actions_.record_report(report)
            self._report.show_report(op, view.name, report, note=" · fidelity measured after the edit")

    def _skip_measuring(self, sid: str) -> None:
        self._fidelity.skip(sid)
        if self._view_of(sid) is not None and self._report.last is not None:
            op, name, report = self._report.last
            self._report.show_report(op, name, report, note=" · fidelity not measured (skipped)")

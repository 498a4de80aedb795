"""Small dialogs: compaction, compression, open model, new session; report values.

Dialogs only collect values or show them; they never call the engine.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

FALLBACK_POLICIES = ("streaming_llm", "h2o", "snapkv", "key_norm", "pyramidkv", "random")


def policy_names() -> tuple[str, ...]:
    """The engine's compression policies (a fallback list until it has them)."""
    try:
        from kvscope.engine.compression import POLICIES
    except ImportError:
        return FALLBACK_POLICIES
    return tuple(POLICIES)


def report_dict(result: Any) -> dict[str, Any]:
    """A plain dict of what an operation returned (report, decision, path...)."""
    if result is None:
        return {}
    if hasattr(result, "as_dict"):
        return dict(result.as_dict())
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    if isinstance(result, dict):
        return dict(result)
    return {"result": result}


def format_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, np.ndarray):
        if v.size <= 8:
            return np.array2string(v, precision=4, separator=", ")
        return f"array{list(v.shape)} {v.dtype} (mean {float(np.mean(v)):.4g})" if v.size else "[]"
    if isinstance(v, (list, tuple)) and len(v) > 8:
        return f"[{', '.join(format_value(x) for x in v[:8])}, … ({len(v)} items)]"
    if isinstance(v, (list, tuple)):
        return f"[{', '.join(format_value(x) for x in v)}]"
    return str(v)


class CompactDialog(QDialog):
    """Summary text for a compaction; empty + 'generate' lets the model write it."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Compact span with a summary")
        self.text = QPlainTextEdit(placeholderText="Summary of the selected span…")
        self.generate = QCheckBox("Let the model write the summary")
        self.generate.toggled.connect(lambda on: self.text.setEnabled(not on))
        lay = QVBoxLayout(self)
        lay.addWidget(self.text)
        lay.addWidget(self.generate)
        lay.addWidget(_buttons(self))

    def summary(self) -> str | None:
        text = self.text.toPlainText().strip()
        return None if self.generate.isChecked() or not text else text


class CompressDialog(QDialog):
    """Policy and budget: a keep ratio or an absolute token budget."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Compress with a policy")
        self.policy_box = QComboBox()
        self.policy_box.addItems(list(policy_names()))
        self.ratio = QDoubleSpinBox(minimum=0.01, maximum=1.0, singleStep=0.05, value=0.5)
        self.use_budget = QCheckBox("absolute budget (tokens)")
        self.budget = QSpinBox(minimum=1, maximum=1_000_000, value=256)
        self.budget.setEnabled(False)
        self.use_budget.toggled.connect(self.budget.setEnabled)
        self.use_budget.toggled.connect(lambda on: self.ratio.setEnabled(not on))
        form = QFormLayout(self)
        form.addRow("policy", self.policy_box)
        form.addRow("share of rows kept", self.ratio)
        form.addRow(self.use_budget, self.budget)
        form.addRow(_buttons(self))

    def policy(self) -> str:
        return self.policy_box.currentText()

    def keep_ratio(self) -> float | None:
        return None if self.use_budget.isChecked() else self.ratio.value()

    def budget_tokens(self) -> int | None:
        return self.budget.value() if self.use_budget.isChecked() else None


class OpenModelDialog(QDialog):
    """A model folder (picker) or a Hugging Face hub id."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Open model")
        self.path = QLineEdit(placeholderText="/path/to/model folder  or  mlx-community/…")
        browse = QPushButton("Folder…")
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.path, 1)
        row.addWidget(browse)
        lay = QVBoxLayout(self)
        lay.addWidget(QLabel("Model folder or hub id (empty = the bundled demo model):"))
        lay.addLayout(row)
        lay.addWidget(_buttons(self))
        self.resize(520, 120)

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Model folder")
        if folder:
            self.path.setText(folder)

    def model(self) -> str | None:
        return self.path.text().strip() or None


def _buttons(dlg: QDialog) -> QDialogButtonBox:
    box = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
    box.accepted.connect(dlg.accept)
    box.rejected.connect(dlg.reject)
    return box

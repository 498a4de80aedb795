"""Layer-wise budgets: the same total rows, spread unevenly over layers.

Both score rows as SnapKV does (observation-window attention, pooled) and
keep `sum(per-layer budget)` rows in total, exactly; each layer keeps at
least its protected rows (the window) and at most its visible rows.

- `pyramidkv`: a fixed pyramid (Cai et al. 2024; PrefixKV-style layer-wise
  budgets): layer 0 gets about `2 - 1/beta` times the mean, the last layer
  `1/beta` times, linear in between.
- `dynamickv`: task-adaptive (DynamicKV, Zhou et al. 2024): a layer's share
  is the number of rows it needs to cover `mass` of its attention on this
  input, so layers whose attention is spread out keep more rows.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from kvscope.engine.errors import InvalidRequestError
from kvscope.engine.policies.base import fit_budgets
from kvscope.engine.policies.scorers import SnapKV


class PyramidKV(SnapKV):
    name = "pyramidkv"
    summary = "SnapKV scores, pyramid budgets (more rows in lower layers)"
    defaults: ClassVar[dict[str, Any]] = {**SnapKV.defaults, "beta": 20.0}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if not float(self.params["beta"]) >= 1.0:
            raise InvalidRequestError(f"pyramidkv: beta must be >= 1, got {self.params['beta']!r}")

    def allocate(self, budgets: list[int], scores: list[np.ndarray], floors: list[int], caps: list[int]) -> list[int]:
        n = len(budgets)
        lo = 1.0 / float(self.params["beta"])
        weights = np.linspace(2.0 - lo, lo, n) if n > 1 else np.ones(1)
        return fit_budgets(weights, sum(budgets), floors, caps)


class DynamicKV(SnapKV):
    name = "dynamickv"
    summary = "SnapKV scores, budgets adapted per layer to the input's attention"
    defaults: ClassVar[dict[str, Any]] = {**SnapKV.defaults, "mass": 0.9}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        m = self.params["mass"]
        if not isinstance(m, (int, float)) or not 0.0 < float(m) <= 1.0:
            raise InvalidRequestError(f"dynamickv: mass must be in (0, 1], got {m!r}")

    def allocate(self, budgets: list[int], scores: list[np.ndarray], floors: list[int], caps: list[int]) -> list[int]:
        need = []
        for s in scores:
            layer = np.sort(np.nan_to_num(s.mean(axis=0), nan=0.0))[::-1]
            total = float(layer.sum())
            if total <= 0:
                need.append(float(len(layer)))
                continue
            cover = np.cumsum(layer) / total
            need.append(float(np.searchsorted(cover, float(self.params["mass"])) + 1))
        return fit_budgets(np.asarray(need), sum(budgets), floors, caps)

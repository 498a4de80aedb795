"""Recall and decision tasks that score a KV cache by what the model still knows.

Promises: held-out episodes (`make_episodes`), a runner protocol that any
cache strategy can implement (`Runner`, `RunResult`), grading (`score`,
`format_table`), the default full-cache mlx-lm runner (`MlxRunner`, import
it from `kvscope.engine.tasks.mlx_runner`), and the bundled demo model's
location (re-exported from `kvscope.engine.model_loading`).
"""

from __future__ import annotations

from kvscope.engine.model_loading import demo_model_path
from kvscope.engine.tasks.episodes import (
    KINDS,
    Episode,
    erratum,
    make_episodes,
    prompt_tokens,
    render_prompt,
    with_erratum,
)
from kvscope.engine.tasks.scoring import (
    Cell,
    EpisodeScore,
    Runner,
    RunResult,
    Scores,
    answer_tokens,
    format_table,
    score,
)

__all__ = [
    "KINDS",
    "Cell",
    "Episode",
    "EpisodeScore",
    "RunResult",
    "Runner",
    "Scores",
    "answer_tokens",
    "demo_model_path",
    "erratum",
    "format_table",
    "make_episodes",
    "prompt_tokens",
    "render_prompt",
    "score",
    "with_erratum",
]

"""kvscope's lab: benchmarks, experiments and their reports, above the engine.

The lab drives the engine through its API (and, for benchmarks that work on
raw caches, its documented building blocks) and turns what it measures into
tables, intervals and plots. The engine never imports the lab (an
import-linter contract in pyproject.toml).

Modules:
    experiments: head-to-head cache strategies on held-out episodes.
    compression_bench: recall under every compression policy and keep ratio.
    compression_report: the compression benchmark as markdown and a PNG.
"""

"""The compression benchmark runs end to end and its report says what it measured."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvscope.engine import load_model
from kvscope.lab.compression_bench import BenchConfig, run_benchmark, summarize
from kvscope.lab.compression_report import format_table, write_report


@pytest.fixture(scope="module")
def demo():  # type: ignore[no-untyped-def]
    return load_model(None)


def test_full_cache_keeps_the_fact_and_random_loses_part_of_it(demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = BenchConfig(
        policies=("random", "streaming_llm", "snapkv", "dynamickv"),
        ratios=(0.25,),
        contexts=(256,),
        depths=(0.5,),
        n_per_cell=2,
        quant_bits=(),
    )
    result = run_benchmark(demo, config)
    rows = {r.label: r for r in summarize(result)}
    assert set(rows) == {"full cache", "random", "streaming_llm", "snapkv", "dynamickv"}
    assert rows["full cache"].fact_kept == 1.0 and rows["full cache"].accuracy_ratio == 1.0
    # A quarter of the rows at random keeps about a quarter of the fact; StreamingLLM keeps
    # only sinks and the recent tail, so a fact in the middle of the notes is gone.
    assert 0.0 < rows["random"].fact_kept < 0.6
    assert rows["streaming_llm"].fact_kept == 0.0
    assert rows["random"].cache_bytes < rows["full cache"].cache_bytes / 2
    table = format_table(list(rows.values()), config)
    assert table.count("\n") == 6  # header, separator, five rows
    md, png = tmp_path / "report.md", tmp_path / "report.png"
    drawn = write_report({"context": list(rows.values())}, config, demo.name, result.seconds, md, png, "kvscope bench")
    text = md.read_text()
    assert "## context mode" in text and "2 episodes per context" in text
    assert "- keep 25.0%: **" in text  # the paired test of the two most accurate policies
    assert "layer-wise vs uniform at equal bytes: **dynamickv**" in text
    assert "McNemar" in text and "[95% CI]" in text
    assert png.exists() == drawn


def test_the_plot_draws_a_policy_at_100_percent(tmp_path: Path) -> None:
    """Wilson's upper bound at 60/60 is 1 - 2e-16: the error bar must not go negative."""
    pytest.importorskip("matplotlib")
    import dataclasses

    from kvscope.lab.compression_bench import Row
    from kvscope.lab.compression_report import plot
    from kvscope.lab.stats import wilson

    assert wilson(60, 60).hi < 1.0
    row = Row("keydiff", 0.5, {2048: 1.0}, 1.0, 1.0, -0.1, 1.0, 0.0, 1.0, 30.0, 0.8, wilson(60, 60), (True,) * 60)
    full = dataclasses.replace(row, label="full cache", keep_ratio=None)
    assert plot({"context": [full, row]}, tmp_path / "p.png") and (tmp_path / "p.png").exists()

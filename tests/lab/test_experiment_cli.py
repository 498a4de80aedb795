"""`kvscope experiment`: bad arguments get a clear error before any model loads; a small run prints its table."""

from __future__ import annotations

import pytest

from kvscope.app.cli import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["leakage", "--n", "3"], "at least 10 episodes"),
        (["kv-patching", "--depth", "1.5"], "depth must be in [0, 1]"),
        (["mask-vs-restart", "--context", "abc"], "expected an integer"),
        (["mask-vs-restart", "--summary", "maybe"], "invalid choice"),
        (["erratum", "--context", "64"], "at least 192 tokens"),
    ],
)
def test_bad_arguments_exit_2_with_the_reason(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["experiment", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_kv_patching_prints_a_table_with_n_and_intervals(llama_dir, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    assert main(["experiment", "kv-patching", "--model", str(llama_dir), "--n", "10", "--context", "256"]) == 0
    out = capsys.readouterr().out
    assert "| both, all layers | 10 | 100% [100–100] |" in out
    assert "McNemar" in out and "share of LD recovered [bootstrap 95%]" in out


def test_erratum_prints_engine_accuracies_and_causal_shares_on_the_same_edits(  # type: ignore[no-untyped-def]
    llama_dir, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["experiment", "erratum", "--model", str(llama_dir), "--n", "10", "--context", "256"]) == 0
    out = capsys.readouterr().out
    assert "| full recompute | 10 |" in out and "| overwrite span | 10 |" in out
    assert "| field, all layers | 10 |" in out and "Paired: erratum vs overwrite span, McNemar" in out

"""Serve options: a stream's pieces reach the event loop at most once per stream interval (the first at once),
none lost; bad --stream-interval, --prefix-policy and --prefix-budget values are refused by the CLI."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from kvscope.app.cli import build_parser
from kvscope.server.records import RequestLog
from kvscope.server.runner import DONE, STARTED, Job


def _pushes(interval_s: float, items: list[Any]) -> tuple[int, list[Any]]:
    """Push `items` one at a time from another thread, letting the loop take each wake-up;
    returns (wake-ups the loop got, what reached the job's queue in order)."""

    async def run() -> tuple[int, list[Any]]:
        loop = asyncio.get_running_loop()
        wakes = 0
        real = loop.call_soon_threadsafe

        def counting(cb: Any, *args: Any) -> Any:
            nonlocal wakes
            wakes += 1
            return real(cb, *args)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        job = Job(RequestLog().new("c", "chat", True), loop, interval_s)
        for item in items:
            t = threading.Thread(target=job.push, args=(item,))
            t.start()
            t.join()
            for _ in range(3):  # let a wake-up, if one came, run
                await asyncio.sleep(0)
        got = []
        while not job.pieces.empty():
            got.append(job.pieces.get_nowait())
        return wakes, got

    return asyncio.run(run())


ITEMS = [STARTED, "a", "b", "c", "d", DONE]


def test_a_long_interval_holds_text_back_until_done() -> None:
    wakes, got = _pushes(3600.0, ITEMS)
    assert got == ITEMS  # nothing lost, nothing reordered
    assert wakes == 3  # STARTED, the first text at once, then "b".."d" ride with DONE


def test_interval_zero_wakes_the_loop_for_every_piece() -> None:
    wakes, got = _pushes(0.0, ITEMS)
    assert got == ITEMS
    assert wakes == len(ITEMS)


@pytest.mark.parametrize("bad", ["-1", "abc", "nan", "5000"])
def test_cli_refuses_a_bad_stream_interval(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:  # parse only: a value let through must not start a server
        build_parser().parse_args(["serve", "--stream-interval", bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--stream-interval" in err and ("0-1000 ms" in err or "milliseconds" in err)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prefix-policy", "fifo"], "invalid choice: 'fifo'"),
        (["--prefix-budget", "-3"], "the prefix budget must be a positive number of MB"),
    ],
)
def test_cli_refuses_a_bad_prefix_policy_or_budget(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve", *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err

"""The bridge: futures become signals, events arrive batched, snapshots coalesce."""

from __future__ import annotations

import threading

from kvscope.engine.events import GenerationFinished, TokenSampled
from kvscope.engine.generation import SamplingParams
from kvscope.ui.stall import StallMeter


def test_call_result_and_error_come_back_as_signals(qtbot, bridge):
    with qtbot.waitSignal(bridge.call_done, timeout=10_000) as done:
        bridge.call(lambda e: e.new_session("a"))
    assert done.args[1] in bridge.worker.call(lambda e: e.sessions())
    with qtbot.waitSignal(bridge.call_failed, timeout=10_000) as failed:
        bridge.call(lambda e: e.chat("nope", "hello"))
    assert failed.args[1] == "InvalidRequestError"
    assert "nope" in failed.args[2]


def test_events_arrive_in_order_on_the_qt_thread(qtbot, bridge):
    got = []
    bridge.events.connect(got.extend)
    sid = bridge.worker.call(lambda e: e.new_session())
    bridge.call(lambda e: e.chat(sid, "the red code", SamplingParams(max_tokens=30)))
    qtbot.waitUntil(lambda: any(isinstance(e, GenerationFinished) for e in got), timeout=10_000)
    idx = [e.index for e in got if isinstance(e, TokenSampled)]
    assert idx == list(range(len(idx))) and len(idx) >= 1


def test_snapshots_are_coalesced_one_in_flight(qtbot, bridge):
    sid = bridge.worker.call(lambda e: e.new_session())
    snaps = []
    bridge.snapshot_ready.connect(snaps.append)
    gate = threading.Event()
    bridge.call(lambda e: gate.wait(10))  # the engine is busy (as in a long turn)
    for _ in range(30):
        bridge.want_snapshot(sid)
        qtbot.wait(10)
        assert bridge.in_flight() <= 2  # the blocker + at most one snapshot job
    gate.set()
    qtbot.waitUntil(lambda: len(snaps) >= 1, timeout=10_000)
    qtbot.wait(150)
    assert len(snaps) <= 2  # one for the queued job, one for requests made meanwhile
    assert snaps[-1].session == sid


def test_event_loop_never_stalls_during_generation(qtbot, window):

    view = window.active_view()
    meter = StallMeter(5)
    meter.start()
    view.max_tokens.setValue(400)
    view.send("the red code is blue")
    qtbot.waitUntil(lambda: not view.generating, timeout=30_000)
    qtbot.wait(200)
    worst = meter.stop()
    assert len(meter.gaps_ms) > 10
    assert worst <= 50.0, f"event loop stalled for {worst:.1f} ms"

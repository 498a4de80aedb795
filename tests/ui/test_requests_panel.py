"""The Requests panel: the Serve toggle serves the window's engine; requests from the
official `openai` client appear as rows and as sessions; selecting one opens it; Pin keeps it."""

from __future__ import annotations

import threading

import openai
from conftest import WAIT_MS, settle
from PySide6.QtCore import Qt


def _ask(base_url: str, model: str, prompt: str, out: list) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="k", max_retries=0)
    out.append(client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0, user="bot"))


def test_serve_toggle_lists_requests_and_opens_their_sessions(qtbot, window):
    panel = window.requests
    panel.port.setValue(0)
    qtbot.mouseClick(panel.serve, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: panel.server is not None, timeout=WAIT_MS)
    assert "serving" in panel.url.text() and panel.server.base_url in panel.url.text()
    model = panel.server.model.id
    answers: list = []
    for prompt in ("the code for the locker is", "the code for the locker is not"):
        t = threading.Thread(target=_ask, args=(panel.server.base_url, model, prompt, answers))
        t.start()
        qtbot.waitUntil(lambda t=t: not t.is_alive(), timeout=WAIT_MS)
    assert len(answers) == 2, "the requests failed"
    qtbot.waitUntil(lambda: panel.table.rowCount() == 2 and panel.table.item(1, 7).text() == "done", timeout=WAIT_MS)
    assert panel.table.item(0, 1).text() == "bot #1" and panel.table.item(1, 1).text() == "bot #2"
    assert panel.table.item(1, 2).text() == str(answers[1].usage.prompt_tokens)
    assert panel.table.item(1, 3).text() == str(answers[1].usage.prompt_tokens_details.cached_tokens)
    assert panel.table.item(0, 8).text()  # where the prefix broke (the first request: nothing cached)
    settle(qtbot, window)
    sid = answers[1].model_extra["kvscope"]["session"]
    assert sid not in window.views  # a request's session opens when selected, not by itself
    panel.table.selectRow(1)
    assert window.active == sid and sid in window.views
    settle(qtbot, window)
    assert window.views[sid].snapshot is not None and window.views[sid].snapshot.n_tokens > 0  # its blocks
    assert "prefix" in panel.detail.text() or "request" in panel.detail.text()
    assert panel.pin.isEnabled()
    panel.pin.setChecked(True)
    assert panel.server.log.get(answers[1].model_extra["kvscope"]["request_id"]).pinned
    qtbot.waitUntil(lambda: "📌" in panel.table.item(1, 7).text(), timeout=WAIT_MS)
    qtbot.mouseClick(panel.serve, Qt.MouseButton.LeftButton)  # stop
    assert panel.server is None and panel.url.text() == "not serving" and panel.host.isEnabled()


def test_serve_toggle_reports_a_port_in_use(qtbot, window):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        window.requests.port.setValue(s.getsockname()[1])
        window.requests.serve.setChecked(True)
        qtbot.waitUntil(lambda: "could not serve" in window.requests.url.text(), timeout=WAIT_MS)
    assert not window.requests.serve.isChecked() and window.requests.server is None


def test_prefix_policy_selector_drives_the_engine_and_shows_its_evictions(qtbot, window):
    from conftest import engine_call

    from kvscope.engine import SamplingParams

    panel = window.requests
    qtbot.waitUntil(lambda: panel.policy.currentText() == "lru", timeout=WAIT_MS)  # the engine's own policy
    panel.policy.setCurrentText("hot")
    qtbot.waitUntil(lambda: engine_call(window, lambda eng: eng.store.policy.name) == "hot", timeout=WAIT_MS)

    def fill_and_evict(eng):  # a chat leaves blocks in the store; closing it frees them; a zero budget evicts them
        sid = eng.new_session()
        eng.chat(sid, "the code for the locker is " * 8, SamplingParams(max_tokens=2))
        eng.close_session(sid)
        return eng.store.evict_to_budget(0)

    assert engine_call(window, fill_and_evict) > 0
    qtbot.waitUntil(lambda: "hot: reused 0 times" in panel.eviction.text(), timeout=WAIT_MS)
    assert panel.eviction.text().startswith("evicted ") and "hot:" in panel.eviction.toolTip()


def test_the_table_cell_names_the_cause_where_it_is_and_what_was_evicted() -> None:
    from kvscope.ui.requests_panel import _break_summary

    why = {"diverged_at": 31, "cause": "timestamp", "where": "the system prompt", "evicted_tokens": 32}
    assert _break_summary(why) == "token 31: timestamp in the system prompt (+32 evicted)"
    assert (
        _break_summary({**why, "cause": "system_prompt", "evicted_tokens": 0})
        == "token 31: edited in the system prompt"
    )
    assert _break_summary({**why, "cause": "evicted"}) == "token 31: evicted in the system prompt"
    assert _break_summary({"diverged_at": None, "message": "no break: the prompt extends an earlier one"}).startswith(
        "no break"
    )

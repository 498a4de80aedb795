"""Scraping /metrics: the parser on a real vLLM 0.32.0 exposition, the poller against a loopback HTTP server."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kvscope.attach.metrics import MetricsPoller, parse_metrics

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "vllm-0.32.0-metrics.txt"


def test_parses_the_real_exposition() -> None:
    m = parse_metrics(FIXTURE.read_text())
    assert set(m) == {"queries", "hits", "usage"}
    assert m["queries"] >= m["hits"] > 0 and 0 <= m["usage"] <= 1


def test_sums_label_sets_skips_comments_and_junk() -> None:
    text = (
        "# HELP vllm:prefix_cache_hits_total hits\n"
        'vllm:prefix_cache_hits_total{engine="0"} 10\n'
        'vllm:prefix_cache_hits_total{engine="1"} 5\n'
        "vllm:prefix_cache_hits_created 1.7e9\n"
        "vllm:prefix_cache_queries_total not-a-number\n"
        "vllm:kv_cache_usage_perc 0.25\n"
        "other_metric 3\n"
    )
    assert parse_metrics(text) == {"hits": 15.0, "usage": 0.25}


class _Metrics(BaseHTTPRequestHandler):
    counter = [0]

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        n = self.counter[0] = self.counter[0] + 1
        body = f"vllm:prefix_cache_queries_total {n * 100}\nvllm:prefix_cache_hits_total {n * 25}\nvllm:kv_cache_usage_perc 0.5\n"
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/metrics"
    srv.shutdown()
    srv.server_close()


def test_poller_reports_the_hit_rate_between_scrapes(server: str) -> None:
    poller = MetricsPoller(server, interval_s=0.05)
    try:
        for _ in range(400):  # bounded in count
            if len(poller.samples()) >= 3:
                break
            threading.Event().wait(0.02)
        assert poller.hit_rate() == pytest.approx(0.25)
        assert "hit rate 25%" in poller.summary() and "KV usage 50.0%" in poller.summary()
    finally:
        poller.close()


def test_poller_shows_an_unreachable_server_and_refuses_other_schemes(server: str) -> None:
    dead = server.rsplit(":", 1)[0] + ":1/metrics"
    poller = MetricsPoller(dead, interval_s=0.05)
    try:
        for _ in range(400):
            if poller.error:
                break
            threading.Event().wait(0.02)
        assert poller.error and poller.summary().startswith("metrics: ") and poller.hit_rate() is None
    finally:
        poller.close()
    with pytest.raises(ValueError, match="http"):
        MetricsPoller("file:///etc/passwd")

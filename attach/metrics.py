"""A vLLM server's /metrics: what the KV events do not carry (hit rate, usage).

    vllm:prefix_cache_queries_total   tokens looked up in the prefix cache (counter)
    vllm:prefix_cache_hits_total      of those, tokens found (counter)
    vllm:kv_cache_usage_perc          fraction of KV blocks in use (gauge, 0..1)

Promises: `parse_metrics` reads the Prometheus text format and sums each
wanted metric over its label sets (several engines behind one server);
`MetricsPoller` scrapes on its own thread (bounded timeout per request),
keeps the recent samples and the last error as text — a server that does not
answer is shown, never raised. Only http(s) URLs are fetched.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass

WANTED = {
    "vllm:prefix_cache_queries": "queries",
    "vllm:prefix_cache_hits": "hits",
    "vllm:kv_cache_usage_perc": "usage",
}
MAX_METRICS_BYTES = 8 << 20


def parse_metrics(text: str) -> dict[str, float]:
    """{"queries", "hits", "usage"} found in a Prometheus exposition (missing ones left out)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, rest = line.partition(" ")
        name = name_labels.split("{", 1)[0]
        key = WANTED.get(name[: -len("_total")] if name.endswith("_total") else name)
        if key is None:
            continue
        try:
            value = float(rest.split()[0])
        except (ValueError, IndexError):
            continue
        out[key] = out.get(key, 0.0) + value
    return out


def scrape(url: str, timeout_s: float = 2.0) -> dict[str, float]:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"metrics URL must be http(s): {url!r}")
    with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 - scheme checked above
        body = r.read(MAX_METRICS_BYTES + 1)
    if len(body) > MAX_METRICS_BYTES:
        raise ValueError(f"{url}: over {MAX_METRICS_BYTES} bytes")
    return parse_metrics(body.decode("utf-8", "replace"))


@dataclass(frozen=True, slots=True)
class Sample:
    t: float  # time.monotonic()
    queries: float
    hits: float
    usage: float | None


class MetricsPoller:
    def __init__(self, url: str, interval_s: float = 1.0, keep: int = 600) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"metrics URL must be http(s): {url!r}")
        self.url = url
        self.interval_s = interval_s
        self.error: str | None = None
        self._samples: deque[Sample] = deque(maxlen=keep)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kvscope-metrics {url}", daemon=True)
        self._thread.start()

    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._samples)

    def hit_rate(self, window_s: float = 10.0) -> float | None:
        """Tokens hit / tokens queried over the last `window_s` (None: no queries in it)."""
        s = self.samples()
        if len(s) < 2:
            return None
        last = s[-1]
        first = next((x for x in s if last.t - x.t <= window_s), s[0])
        dq = last.queries - first.queries
        return (last.hits - first.hits) / dq if dq > 0 else None

    def summary(self) -> str:
        s = self.samples()
        if self.error and not s:
            return f"metrics: {self.error}"
        if not s:
            return "metrics: waiting"
        rate = self.hit_rate()
        last = s[-1]
        parts = [f"prefix hits {last.hits:.0f}/{last.queries:.0f} tokens"]
        if rate is not None:
            parts.append(f"hit rate {rate:.0%} (10 s)")
        if last.usage is not None:
            parts.append(f"KV usage {last.usage:.1%}")
        if self.error:
            parts.append(f"last error: {self.error}")
        return "metrics: " + ", ".join(parts)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                m = scrape(self.url, timeout_s=min(5.0, max(self.interval_s, 1.0)))
                with self._lock:
                    self._samples.append(
                        Sample(time.monotonic(), m.get("queries", 0.0), m.get("hits", 0.0), m.get("usage"))
                    )
                self.error = None
            except (OSError, ValueError, urllib.error.URLError) as exc:
                self.error = f"{type(exc).__name__}: {exc}"
            self._stop.wait(self.interval_s)

    def close(self, timeout_s: float = 6.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

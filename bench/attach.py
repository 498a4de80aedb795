"""How fast `kvscope attach` follows a busy engine, with and without the window.

    python bench/attach.py [--events 50000] [--per-batch 32] [--where]

Three measurements in one run, printed side by side:
1. decode + apply only (msgpack payloads -> RemoteCache), no sockets;
2. end to end over loopback ZMQ: kvscope's publisher, in a process of its own
   as a server is, -> AttachClient thread;
3. the same with an AttachView redrawing (offscreen Qt), twice: the stream
   decoded by an `AttachProcess` (what the window uses) and by an
   `AttachClient` thread inside the window's process (how it was before),
   while a 5 ms QTimer records the longest gap of the Qt event loop (the stall a person feels),
   next to the longest CPU time the Qt thread itself spent in one pass and
   the longest garbage-collector pause (both stop the loop, for different
   reasons: the first is the view's own work, the second every thread's).
The gaps are also given less the time the Qt thread spent waiting for a
CPU (Linux schedstat: other processes on a shared machine), and for the
same window idle, side by side. `--where` also samples the Qt thread's stack whenever the loop is 30 ms
late and prints where it was: the tool that found the stalls this bench had.
Target (issue 19): >= 10,000 events/s with no event-loop stall over 50 ms.

The stream is what a loaded vLLM server with a full cache sends: requests
on 8 system prompts of 4 blocks (re-reported as reused for every 4th
request, as `kv_cache_report_mode: full` does), each with 2-10 blocks of
its own (one BlockStored of 16 tokens per block, the hardest case for
events/s), and, once `--capacity` blocks are held, the oldest request's
blocks removed tail first (vLLM frees a request's blocks in reverse order
and evicts the least recently freed first).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from kvscope.attach import AttachClient, RemoteCache  # noqa: E402
from kvscope.attach.fleet import content_keys  # noqa: E402
from kvscope.engine.kv_events import WireBlockRemoved, WireBlockStored, WireEvent, decode_payload, encode_batch  # noqa: E402
from kvscope.engine.kv_publisher import ZmqPublisher  # noqa: E402

BS = 16
N_SYSTEM = 8
SYSTEM_BLOCKS = 4


def make_events(n: int, capacity: int = 4096, seed: int = 0) -> list[WireEvent]:
    rng = random.Random(seed)
    out: list[WireEvent] = []
    ids = iter(range(1, 1 << 40))

    def store(h: int, parent: int | None) -> None:
        out.append(
            WireBlockStored(
                (f"{h:016x}",),
                None if parent is None else f"{parent:016x}",
                tuple(range(h * BS, (h + 1) * BS)),
                BS,
                medium="GPU",
            )
        )

    systems = [[next(ids) for _ in range(SYSTEM_BLOCKS)] for _ in range(N_SYSTEM)]
    held: deque[list[int]] = deque()  # requests' own blocks, oldest first
    n_held, req, stored = 0, 0, set()
    while len(out) < n:
        k = req % N_SYSTEM
        if k not in stored or req % 4 == 0:  # new, or re-reported as a hit
            n_held += SYSTEM_BLOCKS * (k not in stored)
            stored.add(k)
            for i, h in enumerate(systems[k]):
                store(h, systems[k][i - 1] if i else None)
        parent, own = systems[k][-1], []
        for _ in range(rng.randint(2, 10)):
            h = next(ids)
            store(h, parent)
            parent = h
            own.append(h)
        held.append(own)
        n_held += len(own)
        while n_held > capacity:
            for h in reversed(held.popleft()):
                out.append(WireBlockRemoved((f"{h:016x}",), "GPU"))
                n_held -= 1
        req += 1
    return out[:n]


def batches(events: list[WireEvent], per: int) -> list[list[WireEvent]]:
    return [events[i : i + per] for i in range(0, len(events), per)]


def bench_decode(payloads: list[bytes]) -> float:
    from kvscope.attach.gc_pauses import freeze_startup_heap

    freeze_startup_heap()  # as the attach process does
    n = 0
    cache = RemoteCache()
    t0 = time.perf_counter()
    for p in payloads:
        ts, _rank, evs = decode_payload(p)
        cache.apply_batch(evs, ts)
        n += len(evs)
    return n / (time.perf_counter() - t0)


def publish_all(pub: ZmqPublisher, events: list[WireEvent], per: int) -> None:
    for b in batches(events, per):
        pub.publish(b)


def publisher_child(n: int, capacity: int, per: int) -> None:
    """The engine's side, in its own process: endpoints out, then publish on "go", close on "close"."""
    events = make_events(n, capacity)
    pub = ZmqPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", max_batch_events=per)
    print(pub.endpoint, pub.replay_endpoint, flush=True)
    for line in sys.stdin:
        if line.strip() == "go":
            publish_all(pub, events, per)
        elif line.strip() == "close":
            break
    pub.close()


class Engine:
    """A publisher process (`publisher_child`), driven over its stdin."""

    def __init__(self, n: int, capacity: int, per: int) -> None:
        args = [sys.executable, __file__, "--publish", str(n), str(capacity), str(per)]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.endpoint, self.replay_endpoint = self.proc.stdout.readline().split()

    def send(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        self.send("close")
        self.proc.wait(timeout=60)


def wait_applied(client: AttachClient, n: int) -> None:
    for _ in range(1_000_000):
        if client.progress.events >= n:  # lock-free
            return
        time.sleep(0.002)


def bench_zmq(n: int, capacity: int, per: int) -> float:
    engine = Engine(n, capacity, per)
    client = AttachClient(engine.endpoint, engine.replay_endpoint)
    wait_applied(client, 0)
    time.sleep(0.3)  # the subscription settles: measure the stream, not the join
    t0 = time.perf_counter()
    engine.send("go")
    wait_applied(client, n)
    rate = n / (time.perf_counter() - t0)
    client.close()
    engine.close()
    return rate


class StallSampler:
    """Where the Qt thread is while its loop is late: stacks sampled every 2 ms, counted."""

    def __init__(self, late_s: float = 0.03) -> None:
        self.beat_at = time.monotonic()
        self.late_s = late_s
        self.where: Counter[str] = Counter()
        self._main = threading.get_ident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            if time.monotonic() - self.beat_at > self.late_s:
                frame = sys._current_frames().get(self._main)
                if frame is not None:
                    stack = traceback.extract_stack(frame)[-5:]
                    self.where[" <- ".join(f"{os.path.basename(s.filename)}:{s.name}" for s in reversed(stack))] += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) used so far by this process or by process `pid` (Linux /proc)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def run_queue_ms() -> float:
    """How long the calling thread has waited for a CPU (Linux schedstat); 0 where unknown."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e6
    except (OSError, IndexError, ValueError):
        return 0.0


class LoopWatch:
    """A 5 ms QTimer on the Qt thread: the gaps between its beats, and how much of each was the
    thread waiting for a CPU (another process had it: the machine, not the program)."""

    def __init__(self, sampler: StallSampler | None) -> None:
        from PySide6.QtCore import QTimer

        self.sampler = sampler
        self.gaps: list[tuple[float, float, float]] = []  # ms: wall, wall less the wait for a CPU, own CPU
        self.reset()
        self.timer = QTimer()
        self.timer.setInterval(5)
        self.timer.timeout.connect(self._beat)
        self.timer.start()

    def reset(self) -> None:
        self.gaps.clear()
        self._last = self._now()

    @staticmethod
    def _now() -> tuple[float, float, float]:
        return time.perf_counter() * 1000, run_queue_ms(), time.thread_time() * 1000

    def _beat(self) -> None:
        now = self._now()
        wall = now[0] - self._last[0]
        self.gaps.append((wall, wall - (now[1] - self._last[1]), now[2] - self._last[2]))
        self._last = now
        if self.sampler is not None:
            self.sampler.beat_at = time.monotonic()

    def longest(self, i: int = 0) -> float:
        return max((g[i] for g in self.gaps), default=0.0)

    def p99(self) -> float:
        walls = sorted(g[0] for g in self.gaps)
        return walls[int(0.99 * (len(walls) - 1))] if walls else 0.0


def run_loop(until: Callable[[], bool], timeout_s: float) -> None:
    """The Qt event loop as an application runs it (asleep between events) until `until()`."""
    from PySide6.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    deadline = time.monotonic() + timeout_s
    check = QTimer()
    check.setInterval(5)
    check.timeout.connect(lambda: loop.quit() if until() or time.monotonic() > deadline else None)
    check.start()
    loop.exec()
    check.stop()


def spin(seconds: float) -> None:
    t_end = time.monotonic() + seconds
    run_loop(lambda: time.monotonic() >= t_end, seconds + 1)


def bench_window(n: int, capacity: int, per: int, where: bool, in_process: bool) -> dict[str, float]:
    from PySide6.QtWidgets import QApplication

    from kvscope.attach.gc_pauses import freeze_startup_heap
    from kvscope.attach.process_client import AttachProcess
    from kvscope.ui.attach_view import AttachView

    _app = QApplication.instance() or QApplication([])  # kept alive for the run
    engine = Engine(n, capacity, per)
    kind = AttachClient if in_process else AttachProcess
    client = kind(engine.endpoint, engine.replay_endpoint)
    view = AttachView(client)
    view.resize(1200, 800)
    view.show()
    if not os.environ.get("KVSCOPE_BENCH_NO_FREEZE"):
        freeze_startup_heap()  # as the launchers do once the window is built
    sampler = StallSampler() if where else None
    watch = LoopWatch(sampler)
    client.read(content_keys)  # answered: the attach process is up
    spin(0.3)
    watch.reset()
    spin(2.0)  # the same window with nothing arriving: what the machine alone does to the loop
    idle = (watch.longest(0), watch.longest(1))
    watch.reset()
    gc_pauses: list[tuple[float, int]] = []  # (ms, generation)
    gc_start = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_start[0] = time.perf_counter()
        else:
            gc_pauses.append(((time.perf_counter() - gc_start[0]) * 1000, info["generation"]))

    gc.callbacks.append(on_gc)
    child = getattr(client, "pid", None)
    cpu0 = cpu_s() + (cpu_s(child) if child else 0.0)
    t0 = time.perf_counter()
    engine.send("go")
    run_loop(lambda: client.progress.events >= n, 600)
    rate = n / (time.perf_counter() - t0)
    used = cpu_s() + (cpu_s(child) if child else 0.0) - cpu0
    gc.callbacks.remove(on_gc)
    busy = (watch.longest(0), watch.longest(1))
    over_50 = sum(g[0] > 50 for g in watch.gaps)  # before the final frames: the stream's gaps only
    spin(0.6)  # the last grid is built and drawn too
    watch.timer.stop()
    if sampler is not None:
        sampler.stop()
        print("where the Qt thread was while its loop was over 30 ms late (2 ms samples):")
        for stack, k in sampler.where.most_common(12):
            print(f"  {k:5d}  {stack}")
    out = {
        "rate": rate,
        "per_cpu_s": n / used if used > 0 else 0.0,
        "cpu_s": used,
        "gap_ms": busy[0],
        "gap_own_ms": busy[1],
        "idle_gap_ms": idle[0],
        "idle_gap_own_ms": idle[1],
        "over_50": over_50,
        "p99_ms": watch.p99(),
        "cpu_ms": watch.longest(2),
        "gc_ms": max((ms for ms, _ in gc_pauses), default=0.0),
        "gc_full": sum(g == 2 for _, g in gc_pauses),
        "gc_tracked": len(gc.get_objects()),
        "grids": view.grids_drawn,
    }
    view.close_client()
    engine.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--per-batch", type=int, default=32, help="events per ZMQ message (a vLLM engine step)")
    ap.add_argument("--capacity", type=int, default=4096, help="blocks the simulated server holds before evicting")
    ap.add_argument("--where", action="store_true", help="print where the Qt thread was during stalls")
    ap.add_argument("--publish", nargs=3, type=int, help=argparse.SUPPRESS)  # the publisher process
    args = ap.parse_args()
    if args.publish:
        publisher_child(*args.publish)
        return
    payloads = [encode_batch(b, 0.0) for b in batches(make_events(args.events, args.capacity), args.per_batch)]
    dec = bench_decode(payloads)  # the events themselves are gone: bytes only, which the collector does not walk
    del payloads
    zmq_rate = bench_zmq(args.events, args.capacity, args.per_batch)
    proc = bench_window(args.events, args.capacity, args.per_batch, args.where, in_process=False)
    thread = bench_window(args.events, args.capacity, args.per_batch, args.where, in_process=True)
    print(f"events: {args.events} in batches of {args.per_batch}, a server holding {args.capacity} blocks")
    print(f"decode + apply (no sockets):      {dec:10,.0f} events/s")
    print(f"loopback ZMQ -> attach thread:    {zmq_rate:10,.0f} events/s  ({zmq_rate / dec:.2f}x of decode)")
    print("with the window redrawing (offscreen Qt):")
    print(f"{'':32} {'attach process':>16} {'thread in window':>18}")
    rows = [
        ("events/s", "rate", "{:,.0f}"),
        ("CPU s used (window + attach)", "cpu_s", "{:.1f}"),
        ("events per CPU second", "per_cpu_s", "{:,.0f}"),
        ("longest loop gap, ms", "gap_ms", "{:.0f}"),
        ("  less waits for a CPU, ms", "gap_own_ms", "{:.0f}"),
        ("gaps over 50 ms", "over_50", "{:.0f}"),
        ("idle window: longest gap, ms", "idle_gap_ms", "{:.0f}"),
        ("  less waits for a CPU, ms", "idle_gap_own_ms", "{:.0f}"),
        ("99th percentile gap, ms", "p99_ms", "{:.0f}"),
        ("Qt thread's CPU in one gap, ms", "cpu_ms", "{:.0f}"),
        ("longest GC pause here, ms", "gc_ms", "{:.0f}"),
        ("GC full passes", "gc_full", "{:.0f}"),
        ("objects GC walks (end)", "gc_tracked", "{:,.0f}"),
        ("grids drawn", "grids", "{:.0f}"),
    ]
    for label, key, fmt in rows:
        print(f"  {label:30} {fmt.format(proc[key]):>16} {fmt.format(thread[key]):>18}")
    print(f"  events/s with the window, attach process: {proc['rate'] / zmq_rate:.2f}x of headless")
    print(f"machine load average (1 min) after the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    ok = proc["rate"] >= 10_000 and proc["gap_ms"] <= 50
    own = proc["rate"] >= 10_000 and proc["gap_own_ms"] <= 50
    print("target met" if ok else "target met less the waits for a CPU" if own else "target NOT met")


if __name__ == "__main__":
    main()

"""Subscriber: one engine's KV event stream, in order, with gaps filled.

    live SUB  ..., 7, 8, [gap] 12, 13 ...      replay DEALER -> ROUTER
                         \\_ request [b"", 9] -> 9, 10, 11, 12, ..., END(-1)
    replies: [b"", topic, seq, payload] (vLLM 0.32) or [b"", seq, payload] (older)

Promises:
- `poll` returns batches in sequence order, each at most once: a gap in
  `seq` is filled from the replay socket when there is one (bounded wait);
  live batches that a replay already delivered are dropped as duplicates;
- the first thing it does (and again after a publisher restart) is ask the
  replay socket for everything from seq 0, so a subscriber started late, or
  killed and restarted, rebuilds the cache the engine holds; when the live
  stream is quiet for `idle_replay_s` it asks again from the next seq, so a
  batch the PUB socket dropped (before the subscription reached it) is not
  missing until the next one arrives;
- a publisher restart (a live seq at or below the last live one, or below
  the next expected one without being a batch the replay delivered: a new
  vLLM process counts from 0 again) is reported as `restarted` on the batch
  that starts the new epoch: the consumer clears what it holds. A restarted
  publisher whose seq has already passed the last one seen looks like a
  gap, so every replay after the first asks from the last batch handed out
  (the anchor): the same seq with another timestamp is a new epoch, and the
  replay starts again from 0;
- what cannot be recovered is counted (`lost` batches), as are messages that
  are not KV event batches (`bad_messages`); nothing raises on bad input.

Endpoints: the SUB socket connects, or binds with `bind=True` (vLLM's
publisher connects to a non-wildcard endpoint, so its subscriber binds).
Not thread-safe: one thread polls.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from kvscope.engine.kv_events import WireBatch, WireFormatError, decode_message, decode_payload, decode_seq, encode_seq

END_SEQ = -1


@dataclass(slots=True)
class StreamStats:
    received: int = 0  # live messages
    applied: int = 0  # batches handed out (live + replayed)
    replayed: int = 0
    duplicates: int = 0
    gaps: int = 0
    lost: int = 0  # batches neither received nor replayable
    restarts: int = 0
    bad_messages: int = 0
    replay_failures: int = 0
    last_seq: int = -1
    last_error: str = ""

    def as_dict(self) -> dict[str, int | str]:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(frozen=True, slots=True)
class Received:
    batch: WireBatch
    restarted: bool = False  # a new publisher epoch begins here: drop what was held
    replayed: bool = False


@dataclass(slots=True)
class _Seq:
    next: int = 0  # next seq to hand out
    last_live: int = -1  # last seq seen on the live stream (per epoch)
    started: bool = False  # the initial replay was tried
    pending_restart: bool = field(default=False)
    last_ts: float | None = None  # timestamp of the batch handed out last (seq next - 1)


def attach_socket(sock: zmq.Socket[bytes], endpoint: str, bind: bool) -> None:
    """Bind or connect `sock` to `endpoint`; ValueError naming the endpoint when it cannot."""
    try:
        if bind:
            sock.bind(endpoint)
        else:
            sock.connect(endpoint)
    except zmq.ZMQError as exc:
        raise ValueError(f"cannot {'bind' if bind else 'connect'} {endpoint!r}: {exc}") from None


class Subscriber:
    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        topic: str = "",
        bind: bool = False,
        replay_timeout_s: float = 5.0,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        record: Callable[[list[bytes]], None] | None = None,
        idle_replay_s: float = 2.0,
    ) -> None:
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic
        self.replay_timeout_s = replay_timeout_s
        self.stats = StreamStats()
        self._record = record  # sees every live message as received
        self.idle_replay_s = idle_replay_s
        self._last_heard = time.monotonic()
        self._ctx = context or zmq.Context.instance()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._sub.setsockopt(zmq.RCVHWM, 100_000)
        try:
            attach_socket(self._sub, endpoint, bind)
        except ValueError:
            self._sub.close(linger=0)
            raise
        self._dealer: zmq.Socket[bytes] | None = None
        self._seq = _Seq()
        self._replayed: dict[int, float] = {}  # seq -> ts of batches the replay delivered ahead of the live stream

    def close(self) -> None:
        self._sub.close(linger=0)
        if self._dealer is not None:
            self._dealer.close(linger=0)

    # ------------------------------------------------------------ receiving
    def poll(self, timeout_ms: int = 100, max_messages: int = 1000) -> list[Received]:
        """Batches that arrived (waiting up to `timeout_ms` for the first), in order."""
        out: list[Received] = []
        if not self._seq.started:
            self._seq.started = True
            out.extend(self._replay_from(0))
            self._last_heard = time.monotonic()
        if not self._sub.poll(timeout_ms):
            if self.replay_endpoint and time.monotonic() - self._last_heard > self.idle_replay_s:
                # Quiet: ask whether batches went out that never reached us (a PUB drops
                # what it sends before our subscription reaches it, and after a restart).
                self._last_heard = time.monotonic()
                out.extend(self._replay_from(self._seq.next))
            return out
        self._last_heard = time.monotonic()
        for _ in range(max_messages):
            try:
                frames = self._sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            out.extend(self._on_live(frames))
        return out

    def _on_live(self, frames: list[bytes]) -> list[Received]:
        st, sq = self.stats, self._seq
        st.received += 1
        if self._record is not None:
            self._record(frames)
        try:
            batch = decode_message(frames)
        except WireFormatError as exc:
            st.bad_messages += 1
            st.last_error = str(exc)
            return []
        s = batch.seq
        out: list[Received] = []
        if s <= sq.last_live or (s < sq.next and self._replayed.get(s) != batch.ts):
            self._new_epoch()
        sq.last_live = s
        if s < sq.next:  # the replay delivered this very batch (same seq, same ts)
            st.duplicates += 1
            return out
        self._replayed.clear()
        if s > sq.next:
            st.gaps += 1
            out.extend(self._replay_from(sq.next))
            if s < sq.next:  # the replay reached past this one
                st.duplicates += 1
                return out
            if s > sq.next:
                st.lost += s - sq.next
        out.append(self._hand_out(batch, replayed=False))
        return out

    def _new_epoch(self) -> None:
        """A new publisher epoch: its seq counts from 0 again. Everything held is stale."""
        self.stats.restarts += 1
        sq = self._seq
        sq.next, sq.pending_restart, sq.last_ts = 0, True, None
        self._replayed.clear()

    def _hand_out(self, batch: WireBatch, replayed: bool) -> Received:
        sq = self._seq
        restarted, sq.pending_restart = sq.pending_restart, False
        sq.next, sq.last_ts = batch.seq + 1, batch.ts
        self.stats.applied += 1
        self.stats.last_seq = batch.seq
        self.stats.replayed += replayed
        if replayed:
            self._replayed[batch.seq] = batch.ts
        return Received(batch, restarted, replayed)

    # ------------------------------------------------------------ replay
    def _replay_from(self, start: int) -> list[Received]:
        """Buffered batches from `start` on; [] (and counted) when there is no answer.

        Asks from the anchor (`start - 1`, the batch handed out last) when there is one: if the
        publisher's batch at that seq has another timestamp, it restarted, and the replay is
        asked again from 0."""
        if not self.replay_endpoint:
            return []
        sq = self._seq
        anchor = start - 1 if start == sq.next and start > 0 and sq.last_ts is not None else None
        out, new_epoch = self._replay_reply(start if anchor is None else anchor, anchor)
        if not new_epoch:
            return out
        self._new_epoch()
        return self._replay_from(0)

    def _replay_reply(self, ask: int, anchor: int | None) -> tuple[list[Received], bool]:
        """The batches of one replay request from `ask`, and whether the anchor showed a new epoch
        (then nothing is handed out: the whole reply is read and dropped)."""
        dealer = self._replay_socket()
        dealer.send_multipart((b"", encode_seq(ask)))
        deadline = time.monotonic() + self.replay_timeout_s
        out: list[Received] = []
        new_epoch = False
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or not dealer.poll(left_ms):
                self.stats.replay_failures += 1
                self.stats.last_error = f"no replay answer from {self.replay_endpoint} in {self.replay_timeout_s:g} s"
                self._drop_replay_socket()  # late answers must not mix with the next request's
                return out, new_epoch
            parsed = self._parse_reply(dealer.recv_multipart())
            if parsed is None:
                continue
            topic, seq, payload = parsed
            if seq == END_SEQ:
                return out, new_epoch
            if new_epoch:
                continue
            if anchor is not None:
                first, anchor = seq, None
                if first == ask:  # the batch handed out last, as the publisher holds it now
                    try:
                        new_epoch = decode_payload(payload)[0] != self._seq.last_ts
                    except WireFormatError:
                        new_epoch = True
                    continue
            if seq < self._seq.next:
                continue
            if seq > self._seq.next:  # the engine's buffer no longer holds these
                self.stats.lost += seq - self._seq.next
            try:
                ts, rank, events = decode_payload(payload)
            except WireFormatError as exc:
                self.stats.bad_messages += 1
                self.stats.last_error = str(exc)
                self._seq.next = seq + 1
                continue
            name = topic.decode("utf-8", "replace") or self.topic
            out.append(self._hand_out(WireBatch(seq, name, ts, rank, events), replayed=True))

    def _parse_reply(self, frames: list[bytes]) -> tuple[bytes, int, bytes] | None:
        """(topic, seq, payload) of one replay message; None (counted) when it is not one."""
        # vLLM >= 0.1x: [b"", topic, seq, payload]; earlier: [b"", seq, payload]
        if len(frames) not in (3, 4) or frames[0]:
            self.stats.bad_messages += 1
            return None
        topic, seq_bytes, payload = (b"", *frames[1:]) if len(frames) == 3 else frames[1:]
        try:
            return topic, decode_seq(seq_bytes), payload
        except WireFormatError:
            self.stats.bad_messages += 1
            return None

    def _replay_socket(self) -> zmq.Socket[bytes]:
        if self._dealer is None:
            self._dealer = self._ctx.socket(zmq.DEALER)
            self._dealer.setsockopt(zmq.LINGER, 0)
            assert self.replay_endpoint is not None
            self._dealer.connect(self.replay_endpoint)
        return self._dealer

    def _drop_replay_socket(self) -> None:
        if self._dealer is not None:
            self._dealer.close(linger=0)
            self._dealer = None

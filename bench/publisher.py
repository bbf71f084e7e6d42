"""The publisher: Peatio's side of the gateway, paced, in a process of its own.

Run by the orchestrator as ``python -m bench.publisher`` and driven over :mod:`bench.rpc`. It
speaks plain AMQP (py-amqp) like Peatio: raw JSON bodies, no properties, to a non-durable topic
exchange. Every body is about ``body_size`` bytes and starts with the send time
(``"ts"``: CLOCK_MONOTONIC in µs, read just before the publish call), so a client can measure
publish → client latency. Messages are paced on a fixed schedule (message n is due at
``start + n / rate``); whatever is due when the process wakes up is sent at once, and the report
says how far behind schedule it ever fell, so a publisher-bound step is visible as such.
The exchange scenario's command (``exchange``) plays many routing keys at once, each on a schedule
of its own, with Peatio-shaped bodies (bench/events.py) and its order books kept in sequence.
"""

from __future__ import annotations

import functools
import heapq
import json
import time
from collections.abc import Callable
from typing import Any

import amqp

from bench import rpc
from bench.events import ExchangeBodies
from bench.exchange import INC, SNAP

__all__ = ["BODIES", "Publisher", "book_body", "main", "trade_body"]

_BODY_HEAD = (
    b'{"ts":%d,"seq":%d,"tid":%d,"market":"%s","price":"9876.54","amount":"0.1250",'
    b'"taker_type":"buy","created_at":%d,"pad":"'
)
_BODY_TAIL = b'"}'
# Never sleep less than this: the loop wakes up, publishes what is due, sleeps again.
_MIN_SLEEP = 0.0002
# The sequence of a book's first snapshot in the exchange scenario.
_FIRST_SEQUENCE = 1000


def trade_body(sent_us: int, seq: int, market: bytes, size: int) -> bytes:
    """A trade-like JSON body of ``size`` bytes (or just over, when ``size`` is tiny)."""
    head = _BODY_HEAD % (sent_us, seq, seq, market, sent_us // 1_000_000)
    pad = size - len(head) - len(_BODY_TAIL)
    return head + b"x" * max(0, pad) + _BODY_TAIL


@functools.lru_cache(maxsize=8)
def _book_levels(size: int) -> bytes:
    """The "asks" and "bids" of a book body of about ``size`` bytes, with its closing brace.

    Prices step by a few cents and amounts vary in every digit, as a real book's do, so that
    deflate gets the redundancy of the JSON shape and not that of a repeated string.
    """
    asks: list[str] = []
    bids: list[str] = []
    # About 40 bytes of head ("ts", "sequence") and 20 of framing; at most one pair per byte.
    left = size - 60
    for i in range(max(size, 2)):
        if left <= 0 and asks and bids:
            break
        side, sign, step = (asks, 1, 0.37) if i % 2 == 0 else (bids, -1, 0.41)
        price = 9876.54 + sign * step * (len(side) + 1)
        amount = (i * 7919 + 977) % 250_000 / 10_000
        pair = f'["{price:.2f}","{amount:.4f}"]'
        side.append(pair)
        left -= len(pair) + 1
    return f'"asks":[{",".join(asks)}],"bids":[{",".join(bids)}]}}'.encode()


def book_body(sent_us: int, seq: int, market: bytes, size: int) -> bytes:
    """An order-book-snapshot-like JSON body of about ``size`` bytes: Peatio's ``ob-snap``
    shape (``asks`` and ``bids`` as ``["price","amount"]`` string pairs, a ``sequence``), with
    ``"ts"`` first like every body of the publisher. ``market`` is not part of a snapshot.

    >>> body = book_body(1_234_567, 8, b"btcusd", 4096)
    >>> 3900 < len(body) < 4300, body.startswith(b'{"ts":1234567,"sequence":8,')
    (True, True)
    >>> book = json.loads(body)
    >>> len(book["asks"]) > 80, book["bids"][0], book["asks"][1]
    (True, ['9876.13', '0.8896'], ['9877.28', '1.6815'])
    """
    return b'{"ts":%d,"sequence":%d,' % (sent_us, seq) + _book_levels(size)


BODIES: dict[str, Callable[[int, int, bytes, int], bytes]] = {
    "trade": trade_body,
    "book": book_body,
}


def _now_us() -> int:
    return time.monotonic_ns() // 1000


def _timing(start_us: int, behind_s: float, cpu0: float) -> dict[str, Any]:
    """A paced run's figures, from its start until now: when, how far behind, the CPU it took."""
    end_us = _now_us()
    return {
        "start_us": start_us,
        "end_us": end_us,
        "duration_s": (end_us - start_us) / 1e6,
        "behind_max_ms": behind_s * 1000.0,
        "cpu_s": time.process_time() - cpu0,
    }


class Publisher:
    def __init__(self) -> None:
        self.connection: amqp.Connection | None = None
        self.channel: Any = None
        # The exchange scenario's books: market -> the sequence of its last message, kept from
        # one call to the next so that a step follows on from its warm-up.
        self._books: dict[str, int] = {}
        self._bodies: tuple[tuple[str, ...], ExchangeBodies] | None = None

    def connect(
        self, *, host: str, port: int, user: str, password: str, vhost: str, exchange: str
    ) -> dict[str, Any]:
        self.connection = amqp.Connection(
            host=f"{host}:{port}",
            userid=user,
            password=password,
            virtual_host=vhost,
            connect_timeout=5,
        )
        self.connection.connect()
        self.channel = self.connection.channel()
        # As Peatio declares it (PROTOCOL §5): topic, non-durable, not auto-delete.
        self.channel.exchange_declare(exchange, "topic", durable=False, auto_delete=False)
        return {}

    def _pace(self, rate: float, duration: float, send: Any) -> dict[str, Any]:
        """Call ``send(n)`` for n = 0, 1, ... on schedule; returns the pacing figures."""
        total = max(1, int(rate * duration))
        cpu0 = time.process_time()
        start = time.monotonic()
        start_us = _now_us()
        n = 0
        behind = 0.0
        while n < total:
            now = time.monotonic()
            due = min(total, int((now - start) * rate) + 1)
            if n < due:
                behind = max(behind, now - (start + n / rate))
            while n < due:
                send(n)
                n += 1
            if n < total:
                wait = start + n / rate - time.monotonic()
                time.sleep(max(wait, _MIN_SLEEP))
            if time.monotonic() > start + duration * 3 + 5:
                break  # hopelessly behind: stop rather than run on (reported as a short count)
        return {"published": n, "target": total, **_timing(start_us, behind, cpu0)}

    def publish(
        self,
        *,
        exchange: str,
        keys: list[str],
        rate: float,
        duration: float,
        body_size: int = 200,
        body_kind: str = "trade",
        market: str = "btcusd",
    ) -> dict[str, Any]:
        """Publish ``rate`` msg/s for ``duration`` s, routing keys taken in turn; ``body_kind``
        is a key of :data:`BODIES`."""
        channel = self.channel
        message = amqp.Message
        count = len(keys)
        tag = market.encode()
        build = BODIES[body_kind]

        def send(n: int) -> None:
            body = build(_now_us(), n, tag, body_size)
            channel.basic_publish(message(body), exchange=exchange, routing_key=keys[n % count])

        return self._pace(rate, duration, send)

    def orderbook(
        self,
        *,
        exchange: str,
        market: str,
        rate: float,
        duration: float,
        snapshot_every: int,
        first_seq: int = 1000,
        skip_at: int | None = None,
    ) -> dict[str, Any]:
        """A snapshot, then increments with consecutive sequence numbers, a new snapshot every
        ``snapshot_every`` increments (its sequence is the last increment's, as Peatio does).

        ``skip_at``: increment number *n* (0-based) leaves one sequence number out, as if the
        one before it had been lost upstream; the reply names it as ``skipped``."""
        channel = self.channel
        snap_key, inc_key = f"public.{market}.ob-snap", f"public.{market}.ob-inc"
        state: dict[str, Any] = {"seq": first_seq, "snapshots": 0, "skipped": None}

        def snapshot() -> None:
            asks = ",".join(f'["{9900 + i}.5","{i + 1}.25"]' for i in range(10))
            bids = ",".join(f'["{9800 - i}.5","{i + 1}.75"]' for i in range(10))
            body = json.dumps(
                {
                    "asks": json.loads(f"[{asks}]"),
                    "bids": json.loads(f"[{bids}]"),
                    "sequence": state["seq"],
                    "ts": _now_us(),
                },
                separators=(",", ":"),
            )
            channel.basic_publish(
                amqp.Message(body.encode()), exchange=exchange, routing_key=snap_key
            )
            state["snapshots"] += 1

        def send(n: int) -> None:
            if n % snapshot_every == 0:
                snapshot()
            state["seq"] += 1
            if n == skip_at:
                state["skipped"] = state["seq"]
                state["seq"] += 1
            side = "asks" if n % 2 else "bids"
            level = [f"{9800 + n % 200}.5", f"{n % 7}.125"]
            body = json.dumps(
                {side: [level], "sequence": state["seq"], "ts": _now_us()}, separators=(",", ":")
            )
            channel.basic_publish(
                amqp.Message(body.encode()), exchange=exchange, routing_key=inc_key
            )

        result = self._pace(rate, duration, send)
        return {**result, "first_seq": first_seq, "last_seq": state["seq"], **state}

    def exchange(
        self,
        *,
        exchange: str,
        feeds: list[list[Any]],
        markets: list[str],
        duration: float,
        open_books: bool = False,
    ) -> dict[str, Any]:
        """Every feed on its own schedule for ``duration`` s (the exchange scenario).

        A feed is ``[routing key, kind, rate, subject, phase]`` (``bench.exchange.Feed``): its
        message n is due at ``start + phase + n / rate``, while that is before ``duration``, so
        each key's count is ``Feed.count(duration)`` unless the publisher fell hopelessly behind
        (``stopped_early``). Increments carry their book's next ``sequence``, snapshots the last
        one. ``open_books``: first, one snapshot of every book that has a snapshot feed, so that
        a server without them accepts the increments that follow (they are not counted in
        ``by_key``). ``markets``: the markets a ``global.tickers`` body lists.
        """
        channel = self.channel
        message = amqp.Message
        if self._bodies is None or self._bodies[0] != tuple(markets):
            self._bodies = (tuple(markets), ExchangeBodies(markets))
        build = self._bodies[1].build
        books = self._books
        counts = [0] * len(feeds)
        heap = [(float(feed[4]), i) for i, feed in enumerate(feeds) if feed[4] < duration]
        heapq.heapify(heap)
        cpu0 = time.process_time()
        start = time.monotonic()
        start_us = _now_us()
        opened = 0
        if open_books:
            for key, kind, _rate, subject, _phase in feeds:
                if kind == SNAP:
                    sequence = books.setdefault(subject, _FIRST_SEQUENCE)
                    body = build(kind, _now_us(), 0, subject, sequence)
                    channel.basic_publish(message(body), exchange=exchange, routing_key=key)
                    opened += 1
        give_up = start + duration * 3 + 5
        behind = 0.0
        stopped_early = False
        while heap:
            due, i = heap[0]
            now = time.monotonic() - start
            if due > now:
                time.sleep(max(due - now, _MIN_SLEEP))
                continue
            behind = max(behind, now - due)
            key, kind, rate, subject, phase = feeds[i]
            n = counts[i]
            sequence = 0
            if kind == INC:
                sequence = books[subject] = books.get(subject, _FIRST_SEQUENCE) + 1
            elif kind == SNAP:
                sequence = books.setdefault(subject, _FIRST_SEQUENCE)
            body = build(kind, _now_us(), n, subject, sequence)
            channel.basic_publish(message(body), exchange=exchange, routing_key=key)
            counts[i] = n + 1
            following = phase + (n + 1) / rate
            if following < duration:
                heapq.heapreplace(heap, (following, i))
            else:
                heapq.heappop(heap)
            if time.monotonic() > give_up:
                stopped_early = True  # reported as short counts, never run on
                break
        return {
            "published": sum(counts),
            "by_key": {feed[0]: count for feed, count in zip(feeds, counts, strict=True) if count},
            "opening_snapshots": opened,
            "stopped_early": stopped_early,
            **_timing(start_us, behind, cpu0),
        }

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def main() -> None:
    publisher = Publisher()
    try:
        rpc.serve(
            {
                "connect": publisher.connect,
                "publish": publisher.publish,
                "orderbook": publisher.orderbook,
                "exchange": publisher.exchange,
            }
        )
    finally:
        publisher.close()


if __name__ == "__main__":
    main()

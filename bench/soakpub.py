"""The soak publisher: steady, sequence-numbered messages, in a process of its own.

Run by :mod:`bench.soak` as ``python -m bench.soakpub`` and driven over :mod:`bench.rpc`; it is
the benchmark's :class:`bench.publisher.Publisher` (same connection, same pacing) with one more
command, ``stream``: publish ``rate`` msg/s for ``duration`` s, routing keys taken in turn, so
message *n* goes to ``keys[n % len(keys)]`` with sequence number ``n // len(keys)`` (each key has
its own sequence 0, 1, 2 ...). Every body is JSON that starts with that sequence number and the
send time, and names its target::

    {"seq":17,"ts":123456789,"to":"ID000000002A","pad":"xxxx..."}

``ts`` is CLOCK_MONOTONIC in µs, read just before the publish call (the load generators read the
same clock). The reply lists every message's ``ts`` in publishing order, which is what the soak
program needs to decide which client should have received which message.
"""

from __future__ import annotations

import time
from array import array
from typing import Any

import amqp

from bench import rpc
from bench.publisher import Publisher

__all__ = ["SoakPublisher", "body_head", "main"]

# The smallest body: a data frame must be longer than any control frame (125 bytes) so that the
# clients can tell them apart by size alone.
MIN_BODY = 130


def body_head(seq: int, sent_us: int, target: str) -> bytes:
    return b'{"seq":%d,"ts":%d,"to":"%s","pad":"' % (seq, sent_us, target.encode())


def _target(key: str) -> str:
    """What a message is for: the uid of ``private.<uid>.<event>``, else the stream."""
    parts = key.split(".")
    if parts[0] == "private" and len(parts) == 3:
        return parts[1]
    return ".".join(parts[1:])


class SoakPublisher(Publisher):
    def stream(
        self,
        *,
        exchange: str,
        keys: list[str],
        rate: float,
        duration: float,
        body_size: int = 160,
    ) -> dict[str, Any]:
        channel = self.channel
        message = amqp.Message
        count = len(keys)
        targets = [_target(key) for key in keys]
        size = max(body_size, MIN_BODY)
        sent: array[int] = array("q")

        def send(n: int) -> None:
            index = n % count
            sent_us = time.monotonic_ns() // 1000
            head = body_head(n // count, sent_us, targets[index])
            body = head + b"x" * max(0, size - len(head) - 2) + b'"}'
            sent.append(sent_us)
            channel.basic_publish(message(body), exchange=exchange, routing_key=keys[index])

        result = self._pace(rate, duration, send)
        # Only what was really handed to the broker: a failed publish raised above.
        return {**result, "keys": keys, "sent_us": sent.tolist()[: result["published"]]}


def main() -> None:
    publisher = SoakPublisher()
    try:
        rpc.serve({"connect": publisher.connect, "stream": publisher.stream})
    finally:
        publisher.close()


if __name__ == "__main__":
    main()

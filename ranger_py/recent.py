"""The messages a worker fanned out most recently, to recognise the broker's redeliveries. Pure.

Messages are acknowledged in batches after their fan-out (ranger_py.consumer). When the broker
connection dies, the broker puts back every message it had pushed and not seen acknowledged, marked
*redelivered*, and some of those were fanned out already. The broker never has more than
``prefetch`` unacknowledged messages out, so a redelivered message that was fanned out is among the
last ``prefetch`` fanned out: a window of that many digests recognises every one of them.

A message is recognised by its routing key and body. A redelivered message whose twin (same
routing key, same body) was fanned out shortly before it is taken for a duplicate and dropped:
Peatio's events carry ids, times or sequences, so twins are not expected. Recognising does not use
a digest up, so a message redelivered after a second cut is still recognised.

Digests are Python's hash of (routing key, body): fast, and stable within the process, which is
what the window lives in.
"""

from __future__ import annotations

from collections import deque

__all__ = ["RecentMessages"]


class RecentMessages:
    """The digests of the last ``size`` messages seen (each counted, so that it ages out right)."""

    __slots__ = ("_counts", "_order", "_size")

    def __init__(self, size: int) -> None:
        self._size = size
        self._order: deque[int] = deque()
        self._counts: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._order)

    @staticmethod
    def digest(routing_key: str, body: bytes) -> int:
        return hash((routing_key, body))

    def add(self, digest: int) -> None:
        """Remember one more message; the oldest is forgotten past ``size``."""
        counts = self._counts
        counts[digest] = counts.get(digest, 0) + 1
        order = self._order
        order.append(digest)
        if len(order) > self._size:
            self._forget(order.popleft())

    def __contains__(self, digest: object) -> bool:
        return digest in self._counts

    def _forget(self, digest: int) -> None:
        count = self._counts[digest]
        if count == 1:
            del self._counts[digest]
        else:
            self._counts[digest] = count - 1

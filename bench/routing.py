"""What a worker's queue should receive: its bindings, matched against what was published.

RabbitMQ's topic rules (AMQP 0-9-1): a routing key and a binding are dot-separated words; in a
binding ``*`` stands for exactly one word and ``#`` for zero or more. A message reaches a queue
once however many of its bindings match. Pure (no numpy, no I/O): the exchange scenario reads
the bindings with ``rabbitmqctl list_bindings`` and hands them here.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping

__all__ = ["Bindings", "matches", "queue_worker"]

# Keys of up to this many words are matched against the "*" bindings by lookup (2^words
# candidates); longer ones, rare, by trying each such binding.
_LOOKUP_WORDS = 8


def _match(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[skip:]) for skip in range(len(words) + 1))
    return bool(words) and head in ("*", words[0]) and _match(rest, words[1:])


def matches(binding: str, key: str) -> bool:
    """Whether a message published with ``key`` reaches a queue bound with ``binding``.

    >>> matches("*.mkt001usd.trades", "public.mkt001usd.trades"), matches("#", "a.b")
    (True, True)
    >>> matches("private.ID1.*", "private.ID1"), matches("public.#.ob-inc", "public.ob-inc")
    (False, True)
    """
    return _match(binding.split("."), key.split("."))


class Bindings:
    """One queue's bindings, for many lookups: exact keys in a set, ``*`` bindings by every
    way of putting stars in a key, ``#`` bindings one by one (there are few)."""

    def __init__(self, bindings: Iterable[str]) -> None:
        self.keys = frozenset(bindings)
        self._exact = {b for b in self.keys if "*" not in b.split(".") and "#" not in b}
        self._stars = {b for b in self.keys if b not in self._exact and "#" not in b.split(".")}
        self._star_sizes = {b.count(".") + 1 for b in self._stars}
        self._hashes = [b for b in self.keys if "#" in b.split(".")]

    def __contains__(self, key: str) -> bool:
        """Whether a message published with ``key`` reaches this queue."""
        if key in self._exact:
            return True
        words = key.split(".")
        if len(words) in self._star_sizes:
            if len(words) <= _LOOKUP_WORDS:
                for stars in itertools.product((False, True), repeat=len(words)):
                    starred = (
                        "*" if star else word for star, word in zip(stars, words, strict=True)
                    )
                    if any(stars) and ".".join(starred) in self._stars:
                        return True
            elif any(matches(b, key) for b in self._stars):
                return True
        return any(matches(b, key) for b in self._hashes)

    def share(self, per_key: Mapping[str, int]) -> int:
        """How many of the messages counted in ``per_key`` (routing key -> count) reach it."""
        return sum(count for key, count in per_key.items() if key in self)


def queue_worker(queue: str) -> int | None:
    """The worker pid in a ranger-py queue name (``ranger-py.<host>.<pid>.<random>``), if it
    is one; another gateway names its queues its own way.

    >>> queue_worker("ranger-py.box.example.4242.0a1b2c3d"), queue_worker("rango.q1")
    (4242, None)
    """
    parts = queue.split(".")
    if len(parts) < 4 or parts[0] != "ranger-py" or not parts[-2].isdigit():
        return None
    return int(parts[-2])

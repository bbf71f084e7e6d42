"""Which routing keys a worker's queue is bound to: only what its own clients subscribe to.

With ``RANGER_BROKER_ROUTING=subscribed`` RabbitMQ does the routing: a worker's queue is bound to
the keys its clients' streams are published under (PROTOCOL §5, read backwards), so a worker
receives what its clients want rather than the exchange's whole traffic. Pure bookkeeping: no
sockets, no greenlets; the consumer sends what :meth:`Bindings.pending` returns on its channel
and reports each reply with :meth:`Bindings.confirmed`, and the clock is passed in.

* :func:`binding_keys` maps one subscription to its keys: ``*.<m>.<e>`` for a public stream
  (one binding for ``public.`` and ``global.`` and whatever else the router then drops), the
  stream itself for a prefixed one, ``private.<uid>.*`` for every private stream of a user.
* The keys of the order-book cache (``book_keys``: Peatio's ``ob`` books, or those named by
  ``RANGER_BROKER_BOOKS``) stay bound whoever subscribes, so a new subscriber still gets its
  snapshot at once (PROTOCOL §6); another ``-snap``/``-inc`` pair is bound, and so cached, only
  while a local client holds it; ``RANGER_BROKER_ROUTING=all`` binds
  ``#`` alone, as Ranger and Rango do, and nothing here changes.
* A key is counted per subscription holding it (``hold``/``release``); when the last one goes
  it stays bound ``unbind_delay`` seconds longer, so clients that come and go do not storm the
  broker with bind/unbind pairs.
* A subscribe request whose keys are not bound yet waits (:meth:`Bindings.wait`) until the
  broker has confirmed them: whatever is published after its reply reaches the client. While
  the worker is not connected to the broker nothing waits: the keys are declared with the
  queue when it comes back.
* After a lost connection, :meth:`Bindings.declared` is exactly the wanted set, which the
  consumer binds while declaring the queue again; keys that a surviving queue may still hold
  from before and that nobody wants any more are unbound once it consumes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Final

from ranger_py.protocol import StreamKind

__all__ = ["ALL_KEYS", "STATIC_KEYS", "Bindings", "binding_keys", "book_keys", "book_topic"]

ALL_KEYS: Final = ("#",)
"""``RANGER_BROKER_ROUTING=all``: every message, as Ranger and Rango bind."""


def book_keys(events: Iterable[str]) -> tuple[str, ...]:
    """The keys of the order books named ``<event>-snap``/``<event>-inc`` (RANGER_BROKER_BOOKS),
    bound whatever the clients hold, so that their cache (PROTOCOL §6) is always warm."""
    return tuple(
        f"{scope}.*.{event}{suffix}"
        for event in events
        for scope in ("public", "global")
        for suffix in ("-snap", "-inc")
    )


STATIC_KEYS: Final = book_keys(("ob",))
"""Peatio's order books (``ob-snap``, ``ob-inc``): RANGER_BROKER_BOOKS's default."""

_SNAP: Final = "-snap"
_INC: Final = "-inc"
# AMQP short strings: a longer key can be neither bound nor published.
_MAX_KEY_BYTES: Final = 255


def binding_keys(kind: StreamKind, name: str, uid: str) -> tuple[str, ...]:
    """The routing-key patterns whose messages reach a subscriber of ``name`` (PROTOCOL §5).

    The router still decides who gets each message, so a pattern may be wider than the stream
    (``*.<m>.<e>``), never narrower. A ``-inc`` stream also needs its ``-snap`` key: snapshots
    reach the increments' subscribers.
    """
    if kind is StreamKind.PRIVATE:
        keys: tuple[str, ...] = (f"private.{uid}.*",)
    elif kind is StreamKind.PREFIXED:
        keys = (name,)
        if name.endswith(_INC):
            keys = (name, name[: -len(_INC)] + _SNAP)
    elif name.count(".") != 1:
        return ()  # no routing key of PROTOCOL §5 reaches a public name of 3+ dots
    else:
        market, _, event = name.partition(".")
        keys = (f"*.{name}",)
        if market in ("public", "global"):
            keys += (name,)  # the two-word "public.<e>" and "global.<e>" keys (Rango)
        if event.endswith(_INC):
            keys += tuple(key[: -len(_INC)] + _SNAP for key in keys)
    return tuple(key for key in keys if len(key.encode()) <= _MAX_KEY_BYTES)


def book_topic(key: str) -> str | None:
    """The order-book cache entry (a ``<m>.<x>-inc`` topic) a key feeds, if it feeds one."""
    scope, _, topic = key.partition(".")
    if scope not in ("*", "public", "global") or topic.count(".") != 1:
        return None
    if topic.endswith(_SNAP):
        return topic[: -len(_SNAP)] + _INC
    return topic if topic.endswith(_INC) else None


class _Waiter:
    __slots__ = ("callback", "keys", "left")

    def __init__(self, keys: list[str], callback: Callable[[], None]) -> None:
        self.keys = keys
        self.left = len(keys)
        self.callback = callback


class Bindings:
    """The wanted and the confirmed bindings of one worker's queue.

    Args:
        static: keys bound whatever the clients hold (``STATIC_KEYS``, or ``ALL_KEYS``); a key
            they cover is never bound on its own.
        unbind_delay: seconds a key stays bound after its last subscription went.
        on_unbound: called with each key as its unbinding is sent (the router then drops an
            order book that would no longer be kept up to date).
        clock: the monotonic clock of :meth:`release` and :meth:`expire`.
    """

    def __init__(
        self,
        static: Iterable[str],
        unbind_delay: float,
        on_unbound: Callable[[str], None] = lambda key: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.static: Final = tuple(static)
        self._unbind_delay = unbind_delay
        self._clock = clock
        self._on_unbound = on_unbound
        self._refs: dict[str, int] = {}  # key -> subscriptions and waiting requests holding it
        self._idle: dict[str, float] = {}  # wanted keys no one holds -> since when (in order)
        self._todo: dict[str, bool] = {}  # key -> bind (True) or unbind, not sent yet
        self._sent: deque[tuple[int, bool, str]] = deque()  # (op number, bind?, key) awaiting reply
        self._last_op: dict[str, int] = {}  # key -> number of its last op awaiting a reply
        self._ops = 0
        self._bound: set[str] = set()  # confirmed by the broker on this connection
        self._stale: set[str] = set()  # may be bound in a queue that outlived its connection
        self._waiters: dict[str, list[_Waiter]] = {}
        # The static patterns by their first word (a scope, or "#" for everything), so that
        # covered() costs a dict lookup for most keys: it is asked on every subscribe.
        self._covers_all = "#" in self.static
        self._static_by_scope: dict[str, list[list[str]]] = {}
        for pattern in self.static:
            scope, *words = pattern.split(".")
            self._static_by_scope.setdefault(scope, []).append(words)
        self.connected = False

    # -- what subscriptions need ---------------------------------------------------------------

    def covered(self, key: str) -> bool:
        """Whether ``key`` needs no binding of its own.

        A public stream's ``*.<m>.<e>`` stands for its ``public.`` and ``global.`` keys (the
        router drops the other scopes' messages for it): covered when both are.
        """
        if self._covers_all:
            return True
        scope, _, rest = key.partition(".")
        words = rest.split(".")
        if scope == "*":
            return self._covered_in("public", words) and self._covered_in("global", words)
        return self._covered_in(scope, words)

    @property
    def dynamic(self) -> bool:
        """Whether any key is ever bound or unbound while consuming (not ``#`` alone)."""
        return not self._covers_all

    def _covered_in(self, scope: str, words: list[str]) -> bool:
        return any(
            len(pattern) == len(words)
            and all(p in ("*", w) for p, w in zip(pattern, words, strict=True))
            for pattern in self._static_by_scope.get(scope, ())
        )

    def hold(self, key: str) -> None:
        """One more subscription (or waiting request) needs ``key``."""
        refs = self._refs.get(key, 0)
        if refs:
            self._refs[key] = refs + 1
            return
        if self.covered(key):
            return
        self._refs[key] = 1
        if self._idle.pop(key, None) is None:  # not bound (or its unbinding is on its way)
            self._todo[key] = True

    def release(self, key: str) -> None:
        """One subscription less needs ``key``; unbound ``unbind_delay`` after the last."""
        refs = self._refs.get(key)
        if refs is None:
            return  # covered
        if refs > 1:
            self._refs[key] = refs - 1
            return
        del self._refs[key]
        self._idle[key] = self._clock()

    def missing(self, keys: Iterable[str]) -> list[str]:
        """Those of ``keys`` a subscribe request must wait for: wanted, but not confirmed."""
        if not self.connected:
            return []
        last_op, todo, bound = self._last_op, self._todo, self._bound
        return [
            key
            for key in dict.fromkeys(keys)
            if (key not in bound or key in last_op or key in todo) and not self.covered(key)
        ]

    def wait(self, keys: list[str], callback: Callable[[], None]) -> None:
        """Call ``callback`` once every key of ``keys`` (from :meth:`missing`) is confirmed, or
        at once when the broker connection is lost; the keys stay held until then."""
        waiter = _Waiter(keys, callback)
        for key in keys:
            self.hold(key)
            self._waiters.setdefault(key, []).append(waiter)

    # -- what the consumer does ----------------------------------------------------------------

    def expire(self) -> None:
        """Schedule the unbinding of keys no one has held for ``unbind_delay``."""
        idle, now = self._idle, self._clock()
        while idle:
            key, since = next(iter(idle.items()))
            if now - since < self._unbind_delay:
                break
            del idle[key]
            self._todo[key] = False

    def pending(self) -> list[tuple[bool, str]]:
        """The binds (True) and unbinds to send now, in order; each awaits :meth:`confirmed`."""
        if not self.connected or not self._todo:
            return []
        ops = [(bind, key) for key, bind in self._todo.items()]
        self._todo.clear()
        for bind, key in ops:
            self._ops += 1
            self._sent.append((self._ops, bind, key))
            self._last_op[key] = self._ops
            if not bind:
                self._bound.discard(key)  # no longer to be relied on, whatever the reply
                self._on_unbound(key)
        return ops

    def confirmed(self) -> None:
        """The broker answered the oldest bind or unbind sent (replies come in order)."""
        if not self._sent:
            return  # not one of ours (the consumer listens only while it consumes)
        number, bind, key = self._sent.popleft()
        if self._last_op.get(key) != number:
            return  # a later op on the same key is on its way: it decides
        del self._last_op[key]
        if not bind:
            return
        self._bound.add(key)
        for waiter in self._waiters.pop(key, ()):
            waiter.left -= 1
            if not waiter.left:
                self._fire(waiter)

    def declared(self) -> list[str]:
        """Every key the queue must be bound to, for its (re)declaration on a new connection."""
        keys = [*self.static, *sorted(self._wanted())]
        self._stale.update(keys)  # bound by a declaration that may not finish
        return keys

    def consuming(self, declared: Iterable[str]) -> None:
        """The queue is declared with ``declared`` bound: what was unbound meanwhile goes."""
        self.connected = True
        static = set(self.static)
        bound = set(declared) - static
        # Bound before, or while the queue was declared, and no longer wanted.
        wanted = self._wanted()
        extra = (self._stale | bound) - wanted - static
        self._bound = bound
        self._todo = dict.fromkeys(sorted(extra), False)
        self._todo.update(dict.fromkeys(sorted(wanted - bound), True))
        self._stale.clear()

    def _wanted(self) -> set[str]:
        """Keys held, or no longer held but not unbound yet."""
        return {*self._refs, *self._idle}

    def lost(self) -> None:
        """The connection is gone: nothing is confirmed, and nobody waits for it to come back."""
        self.connected = False
        self._stale |= self._bound | {key for _, _, key in self._sent}
        self._bound.clear()
        self._sent.clear()
        self._last_op.clear()
        self._todo.clear()
        waiters = {id(w): w for queue in self._waiters.values() for w in queue}
        self._waiters.clear()
        for waiter in waiters.values():
            self._fire(waiter)

    def _fire(self, waiter: _Waiter) -> None:
        # The callback subscribes, holding the keys for good, before the wait lets go of them.
        waiter.callback()
        for key in waiter.keys:
            self.release(key)

    # -- what operators see --------------------------------------------------------------------

    def __len__(self) -> int:
        """Bindings the queue has now, by the broker's replies (``ranger_broker_bindings``)."""
        return len(self.static) + len(self._bound) if self.connected else 0

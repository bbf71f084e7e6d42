"""Who is subscribed to what, where each broker message goes, and the order-book cache.

Owns PROTOCOL §4 subscription rules (stream lists, anonymous and RBAC checks, the stream
limit), §5 routing keys and outbound frames, and §6 order books. Pure: no sockets, no
greenlets, no clock. The connection layer calls :meth:`Router.subscribe` and friends and sends
what they return; the consumer calls :meth:`Router.route` once per broker message and writes
the one payload it gets to every recipient.

Tables, every one pruned as soon as an entry empties:

* ``_clients``: client -> {stream name: kind}, insertion-ordered; only clients that hold at
  least one stream are in it, so a connection that never subscribes costs nothing here.
* ``_topics``: public or prefixed stream name -> clients. One table serves both because the
  names cannot collide: a prefixed name has exactly two dots, the public topics a routing key
  can produce exactly one.
* ``_private``: (uid, event) -> clients, so one lookup finds every connection of that user.
* ``_books``: public ``<m>.<x>-inc`` topic -> [snapshot frame, increment frames...].
* ``_sequences``: the same topic -> the ``sequence`` of its book's last message, for the books
  whose snapshot carries one (Peatio's); the others are cached without any check.
* ``_broken``: topics whose book went out of sequence: not in ``_books`` (nothing to replay)
  until the next snapshot, but their increments still reach the current subscribers.

:meth:`Router.route` outcomes, for the metrics (PROTOCOL §7):

* :class:`Delivery` with recipients: received and delivered.
* :class:`Delivery` with no recipients: received, nobody to deliver to. A public ``-snap``
  is mostly reported this way too: it is cached, and broadcast live only to subscribers who
  hold no book, or one it does not follow on from (§6).
* :class:`Resync`: a :class:`Delivery` that also found its order book out of sequence,
  ``reason`` one of :data:`RESYNC_REASONS`.
* :class:`Dropped`, ``reason`` one of :data:`DROP_REASONS`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from ranger_py.bindings import Bindings, binding_keys, book_topic
from ranger_py.errors import InvalidStreamName, TooManyStreams
from ranger_py.protocol import (
    StreamKind,
    cannot_subscribe_reply,
    stream_kind,
    subscribed_reply,
    unsubscribed_reply,
    valid_stream_name,
)

if TYPE_CHECKING:
    # Only the type: importing auth at run time would pull jwt into every importer of router.
    from ranger_py.auth import Auth

__all__ = [
    "DROP_REASONS",
    "RESYNC_REASONS",
    "Delivery",
    "Dropped",
    "Resync",
    "Router",
    "Subscriber",
]

_log = logging.getLogger(__name__)

_PUBLIC: Final = StreamKind.PUBLIC
_PRIVATE: Final = StreamKind.PRIVATE
_PREFIXED: Final = StreamKind.PREFIXED

_PUBLIC_SCOPES: Final = frozenset({"public", "global"})
_SNAP: Final = "-snap"
_INC: Final = "-inc"

# Encoded frame prefixes are cached per topic; publishers choose routing keys, so the cache is
# bounded and simply starts over when full.
_PREFIX_CACHE_SIZE: Final = 4096


class Subscriber(Protocol):
    """A connection as the router sees it: hashable, with a fixed identity.

    ``auth`` must not change while the connection holds subscriptions: private memberships
    are filed under its ``uid``.
    """

    @property
    def auth(self) -> Auth: ...


@dataclass(frozen=True, slots=True)
class Delivery:
    """One broker message to send: the same ``payload`` bytes to each of ``recipients``.

    ``recipients`` may be the router's own live set, to spare a copy per message. Iterate it
    at once, without switching greenlets and without calling :meth:`Router.subscribe`,
    :meth:`Router.unsubscribe` or :meth:`Router.remove` meanwhile (defer the removal of a
    client that fails mid-loop, or iterate a copy in that case).
    """

    payload: bytes
    recipients: Collection[Subscriber]


@dataclass(frozen=True, slots=True)
class Resync(Delivery):
    """A :class:`Delivery` whose message found its order book out of sequence (PROTOCOL §6).

    ``reason`` is one of :data:`RESYNC_REASONS`. An increment is delivered to the current
    subscribers and the book is not replayed again until its next snapshot, which then goes
    to them live; a snapshot replaces the book and goes to them live at once.
    """

    reason: str


RESYNC_REASONS: Final = ("gap", "step_back", "no_sequence", "restart")
"""Every :attr:`Resync.reason`; one count per book gone out of sequence, not per message.

* ``gap``: an increment's ``sequence`` is past the last one + 1, or a snapshot's past the last
  one: the messages in between were lost.
* ``step_back``: an increment's ``sequence`` is below the last one (reordered, or its publisher
  restarted).
* ``no_sequence``: an increment without an integer ``sequence`` in a book whose snapshot has
  one: no client can tell whether it follows on.
* ``restart``: a snapshot's ``sequence`` is below the book's last one: its publisher started
  counting again.
"""

DROP_REASONS: Final = ("bad_routing_key", "bad_json", "no_snapshot", "book_overflow", "duplicate")
"""Every :attr:`Dropped.reason`: the worker's metrics show each one from the start, at 0.

* ``bad_routing_key``: not one of the §5 shapes.
* ``bad_json``: the body is not UTF-8 JSON (NaN and Infinity refused too).
* ``no_snapshot``: a public ``-inc`` with no snapshot cached (§6).
* ``book_overflow``: a public ``-inc`` past the increment bound; the cache entry is gone
  until the next snapshot (§6).
* ``duplicate``: a public ``-inc`` with the same ``sequence`` as its book's last message (§6).
"""


@dataclass(frozen=True, slots=True)
class Dropped:
    """A broker message that reaches nobody; ``reason`` is one of :data:`DROP_REASONS`."""

    reason: str


_BAD_ROUTING_KEY: Final = Dropped("bad_routing_key")
_BAD_JSON: Final = Dropped("bad_json")
_NO_SNAPSHOT: Final = Dropped("no_snapshot")
_BOOK_OVERFLOW: Final = Dropped("book_overflow")
_DUPLICATE: Final = Dropped("duplicate")
_NOBODY: Final[frozenset[Subscriber]] = frozenset()


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


# json.loads(bytes) would guess UTF-16/32 and accept NaN: bodies are decoded as UTF-8 and
# checked by this decoder, built once. raw_decode skips json.loads' two whitespace regex
# matches; the caller strips JSON whitespace (not bytes.strip(): \v and \f are not JSON).
_raw_decode: Final = json.JSONDecoder(parse_constant=_refuse_constant).raw_decode
_JSON_SPACE: Final = b" \t\n\r"


def _sequence(value: object) -> int | None:
    """The integer ``sequence`` of a decoded body, if it has one; a bool or a float is not one."""
    if type(value) is dict:
        sequence = value.get("sequence")
        if type(sequence) is int:
            return sequence
    return None


class Router:
    """Subscriptions of every connection of one worker, and routing of broker messages.

    Args:
        rbac: prefix -> roles allowed on prefixed streams ``<prefix>.*.*`` (exact match).
        max_streams: most streams one connection may hold (PROTOCOL §4, "Too many streams").
        max_increments: most increments cached after one snapshot (PROTOCOL §6).
        on_change: called with (kind, stream, +1 or -1) whenever a client joins or leaves a
            stream, for the subscription gauges; the stream is named as the client named it.
        bindings: the worker queue's bindings (``RANGER_BROKER_ROUTING=subscribed``), held for
            every subscription; None when the queue takes everything.
    """

    def __init__(
        self,
        rbac: Mapping[str, frozenset[str]],
        max_streams: int = 100,
        max_increments: int = 10000,
        on_change: Callable[[StreamKind, str, int], None] | None = None,
        bindings: Bindings | None = None,
    ) -> None:
        self._on_change = on_change
        self._bindings = bindings
        self._rbac = rbac
        self._max_streams = max_streams
        self._max_increments = max_increments
        self._clients: dict[Subscriber, dict[str, StreamKind]] = {}
        self._topics: dict[str, set[Subscriber]] = {}
        self._private: dict[tuple[str, str], set[Subscriber]] = {}
        self._books: dict[str, list[bytes]] = {}
        self._sequences: dict[str, int] = {}
        self._broken: set[str] = set()
        self._prefixes: dict[str, bytes] = {}

    # -- subscriptions --------------------------------------------------------------------

    def subscribe(self, client: Subscriber, streams: Iterable[str]) -> list[bytes]:
        """Add ``streams`` for ``client``; return the frames to send it, in order.

        Per stream, in request order: the order-book replay (snapshot, then increments) of a
        newly subscribed public ``*-inc`` stream, or the refusal of an RBAC-denied prefixed
        stream. Last, the subscribed reply listing every current stream. Already held names
        are no-ops (no replay, as Ranger; Rango replays again). Private streams of an
        anonymous client are skipped silently (§4).

        Raises:
            InvalidStreamName: a name fails ``valid_stream_name``; nothing changed.
            TooManyStreams: the result would exceed ``max_streams``; nothing changed.
        """
        held = self._clients.get(client)
        auth = client.auth
        frames: list[bytes] = []
        added: dict[str, StreamKind] = {}
        for name in dict.fromkeys(streams):
            if not name or (held is not None and name in held):
                continue
            if not valid_stream_name(name):
                raise InvalidStreamName()
            kind = stream_kind(name)
            if kind is _PRIVATE:
                if not auth.uid:
                    continue
            elif kind is _PREFIXED:
                prefix = name[: name.index(".")]
                if auth.role not in self._rbac.get(prefix, ()):
                    frames.append(cannot_subscribe_reply(name))
                    continue
            elif name.endswith(_INC):
                # A prefixed "<p>.<m>.<x>-inc" does not replay the public book (Rango does).
                book = self._books.get(name)
                if book is not None:
                    frames.extend(book)
            added[name] = kind
        if (len(held) if held is not None else 0) + len(added) > self._max_streams:
            raise TooManyStreams()
        if added:
            if held is None:
                held = self._clients[client] = {}
            held.update(added)
            for name, kind in added.items():
                if kind is _PRIVATE:
                    members = self._private.get((auth.uid, name))
                    if members is None:
                        members = self._private[auth.uid, name] = set()
                else:
                    members = self._topics.get(name)
                    if members is None:
                        members = self._topics[name] = set()
                members.add(client)
                if self._on_change is not None:
                    self._on_change(kind, name, 1)
                if self._bindings is not None:
                    for binding in binding_keys(kind, name, auth.uid):
                        self._bindings.hold(binding)
        frames.append(subscribed_reply(_listing(held) if held is not None else []))
        return frames

    def unsubscribe(self, client: Subscriber, streams: Iterable[str]) -> bytes:
        """Drop ``streams`` for ``client``; return the unsubscribed reply.

        Each name removes exactly that stream (a prefixed name too: Rango strips the prefix
        here and crashes); unknown names change nothing.
        """
        held = self._clients.get(client)
        if held is None:
            return unsubscribed_reply(())
        uid = client.auth.uid
        for name in streams:
            kind = held.pop(name, None)
            if kind is not None:
                self._leave(client, uid, name, kind)
        if not held:
            del self._clients[client]
        return unsubscribed_reply(_listing(held))

    def remove(self, client: Subscriber) -> None:
        """Forget ``client`` entirely (on disconnect); idempotent."""
        held = self._clients.pop(client, None)
        if held is None:
            return
        uid = client.auth.uid
        for name, kind in held.items():
            self._leave(client, uid, name, kind)

    def unbound_keys(self, client: Subscriber, streams: Iterable[str]) -> list[str]:
        """The bindings a subscribe request for ``streams`` must wait for before it is answered
        (none: answer now), so that what is published after the reply reaches ``client``.

        Only streams the request would add count: held ones, invalid names, private streams
        of an anonymous client and prefixed streams its role may not read bind nothing.
        """
        bindings = self._bindings
        if bindings is None or not bindings.connected:
            return []
        held = self._clients.get(client, {})
        auth = client.auth
        keys: list[str] = []
        for name in streams:
            if not name or name in held or not valid_stream_name(name):
                continue
            kind = stream_kind(name)
            if kind is _PRIVATE and not auth.uid:
                continue
            if kind is _PREFIXED and auth.role not in self._rbac.get(name[: name.index(".")], ()):
                continue
            keys.extend(binding_keys(kind, name, auth.uid))
        return bindings.missing(keys)

    def when_bound(self, keys: list[str], callback: Callable[[], None]) -> None:
        """Call ``callback`` once ``keys`` (from :meth:`unbound_keys`) are bound."""
        assert self._bindings is not None  # unbound_keys found keys to wait for
        self._bindings.wait(keys, callback)

    def unbound(self, key: str) -> None:
        """The queue no longer receives ``key``: an order book it fed would go stale."""
        topic = book_topic(key)
        if topic is not None and topic not in self._topics:
            self._books.pop(topic, None)
            self._sequences.pop(topic, None)
            self._broken.discard(topic)

    def streams(self, client: Subscriber) -> list[str]:
        """The streams ``client`` holds, in reply order."""
        held = self._clients.get(client)
        return _listing(held) if held is not None else []

    def _leave(self, client: Subscriber, uid: str, name: str, kind: StreamKind) -> None:
        if self._on_change is not None:
            self._on_change(kind, name, -1)
        if self._bindings is not None:
            for binding in binding_keys(kind, name, uid):
                self._bindings.release(binding)
        if kind is _PRIVATE:
            key = (uid, name)
            members = self._private.get(key)
            if members is not None:
                members.discard(client)
                if not members:
                    del self._private[key]
        else:
            members = self._topics.get(name)
            if members is not None:
                members.discard(client)
                if not members:
                    del self._topics[name]

    # -- routing ----------------------------------------------------------------------------

    def route(self, routing_key: str, body: bytes) -> Delivery | Dropped:
        """Route one broker message (PROTOCOL §5, §6).

        The payload is ``{"<topic>":<body>}`` with ``body`` forwarded byte for byte (only
        surrounding whitespace stripped): no key reordering, no float rounding.
        """
        words = routing_key.split(".")
        if len(words) == 3:
            scope, middle, event = words
            if not scope or not middle or not event:
                return self._bad_key(routing_key)
        elif len(words) == 2:
            # Rango: the 2-word "public.<e>" is the topic "public.<e>"; other scopes undeliverable.
            scope, event = words
            middle = scope
            if scope not in _PUBLIC_SCOPES or not event:
                return self._bad_key(routing_key)
        else:
            return self._bad_key(routing_key)

        body = body.strip(_JSON_SPACE)
        try:
            text = body.decode()
            # The decoded value is kept: an order book's sequence is read from it, not parsed again.
            value, end = _raw_decode(text)
            whole = end == len(text)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            whole = False
        if not whole:
            _log.debug("dropped %s: body is not JSON", routing_key)
            return _BAD_JSON

        if scope in _PUBLIC_SCOPES:
            topic = f"{middle}.{event}"
            if event.endswith(_SNAP):
                return self._snapshot(topic, body, value)
            if event.endswith(_INC):
                return self._increment(topic, body, value)
            return Delivery(self._frame(topic, body), self._topics.get(topic, _NOBODY))

        if event.endswith(_SNAP):
            # Private and prefixed books are not cached: a snapshot goes out as "-inc" (Rango).
            event = event[: -len(_SNAP)] + _INC
        if scope == "private":
            recipients = self._private.get((middle, event), _NOBODY)
            return Delivery(self._frame(event, body), recipients)
        # Prefixed: only subscribers of the full name, but the frame key drops the prefix.
        recipients = self._topics.get(f"{scope}.{middle}.{event}", _NOBODY)
        return Delivery(self._frame(f"{middle}.{event}", body), recipients)

    def _snapshot(self, snap_topic: str, body: bytes, value: object) -> Delivery:
        frame = self._frame(snap_topic, body)
        inc_topic = snap_topic[: -len(_SNAP)] + _INC
        # A new snapshot replaces the book and resets its increments, and is not broadcast
        # (Rango, Ranger) - except when no book was cached: the current subscribers (who came
        # before the first snapshot, or saw the book overflow or go out of sequence) have none,
        # and the increments that follow would be useless to them. Ruby Ranger sends them this
        # one; so do we.
        live = inc_topic not in self._books
        self._books[inc_topic] = [frame]
        self._broken.discard(inc_topic)
        sequence = _sequence(value)
        last = self._sequences.pop(inc_topic, None)
        if sequence is not None:
            self._sequences[inc_topic] = sequence
            # Peatio's snapshot carries the sequence of the last change it includes: any other
            # than the book's last means the subscribers' copies are not this book.
            if last is not None and sequence != last:
                reason = "gap" if sequence > last else "restart"
                _log.warning(
                    "order book %s out of sequence (%s): snapshot %d after %d; sent live",
                    inc_topic,
                    reason,
                    sequence,
                    last,
                )
                return Resync(frame, self._topics.get(inc_topic, _NOBODY), reason)
        return Delivery(frame, self._topics.get(inc_topic, _NOBODY) if live else _NOBODY)

    def _increment(self, topic: str, body: bytes, value: object) -> Delivery | Dropped:
        book = self._books.get(topic)
        if book is None:
            if topic in self._broken:
                # Out of sequence: the current subscribers get every increment as before (they
                # see the gap themselves), a late one nothing, until the next snapshot.
                return Delivery(self._frame(topic, body), self._topics.get(topic, _NOBODY))
            _log.debug("dropped %s: no snapshot cached yet", topic)
            return _NO_SNAPSHOT
        if len(book) > self._max_increments:
            # book[0] is the snapshot, so the bound is already reached.
            del self._books[topic]
            self._sequences.pop(topic, None)
            _log.warning(
                "order book %s: more than %d increments since the snapshot;"
                " dropped until the next snapshot",
                topic,
                self._max_increments,
            )
            return _BOOK_OVERFLOW
        last = self._sequences.get(topic)
        if last is not None:
            # _sequence(value) inlined: this runs for every increment of every Peatio book.
            sequence = value.get("sequence") if type(value) is dict else None
            if type(sequence) is not int or sequence != last + 1:
                return self._out_of_step(topic, body, _sequence(value), last)
            self._sequences[topic] = sequence
        frame = self._frame(topic, body)
        book.append(frame)
        return Delivery(frame, self._topics.get(topic, _NOBODY))

    def _out_of_step(
        self, topic: str, body: bytes, sequence: int | None, last: int
    ) -> Resync | Dropped:
        """An increment of a cached book whose ``sequence`` is not ``last`` + 1."""
        if sequence == last:
            # Already applied by every holder of the book: forwarding it would apply it twice.
            _log.debug("dropped %s: sequence %d again", topic, last)
            return _DUPLICATE
        if sequence is None:
            reason = "no_sequence"
        elif sequence > last:
            reason = "gap"
        else:
            reason = "step_back"
        del self._books[topic]
        del self._sequences[topic]
        self._broken.add(topic)
        _log.warning(
            "order book %s out of sequence (%s): increment %s after %d;"
            " not replayed until the next snapshot",
            topic,
            reason,
            "without one" if sequence is None else sequence,
            last,
        )
        return Resync(self._frame(topic, body), self._topics.get(topic, _NOBODY), reason)

    def _frame(self, topic: str, body: bytes) -> bytes:
        prefix = self._prefixes.get(topic)
        if prefix is None:
            # Routing keys may hold '"' or '\\': the topic is JSON-encoded, never pasted raw.
            prefix = b"{" + json.dumps(topic).encode() + b":"
            if len(self._prefixes) >= _PREFIX_CACHE_SIZE:
                self._prefixes.clear()
            self._prefixes[topic] = prefix
        return b"".join((prefix, body, b"}"))

    @staticmethod
    def _bad_key(routing_key: str) -> Dropped:
        _log.debug("dropped %r: bad routing key", routing_key)
        return _BAD_ROUTING_KEY


def _listing(held: Mapping[str, StreamKind]) -> list[str]:
    # Public and prefixed names first, then private ones, each in first-subscribed order (§4).
    shared = [name for name, kind in held.items() if kind is not _PRIVATE]
    shared.extend(name for name, kind in held.items() if kind is _PRIVATE)
    return shared

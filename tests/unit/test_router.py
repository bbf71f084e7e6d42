"""Tests for ranger_py.router: subscriptions, routing keys, frames, the order-book cache.

Acceptance cases from Rango (hub_test.go, client_test.go) and Ruby Ranger (router_spec.rb,
web_socket_spec.rb 16-19) are replayed at the router level, adapted where docs/wire-contract.md
decides differently (noted at each case).
"""

from __future__ import annotations

import json
import logging

import pytest

from ranger_py import errors
from ranger_py.auth import Auth
from ranger_py.bindings import STATIC_KEYS, Bindings
from ranger_py.protocol import Request, StreamKind, parse_request
from ranger_py.router import DROP_REASONS, RESYNC_REASONS, Delivery, Dropped, Resync, Router
from tests.router_view import cached_book, cached_books, subscribed_clients, subscription_counts

PUBLIC, PRIVATE, PREFIXED = StreamKind.PUBLIC, StreamKind.PRIVATE, StreamKind.PREFIXED


class Client:
    """A fake connection: an identity, and the frames the router handed to it."""

    def __init__(self, uid: str = "", role: str = "") -> None:
        self.auth = Auth(uid=uid, role=role)
        self.received: list[bytes] = []

    def __repr__(self) -> str:
        return f"Client({self.auth.uid!r}, {self.auth.role!r})"


def subscribed(*streams: str) -> bytes:
    return json.dumps(
        {"success": {"message": "subscribed", "streams": list(streams)}}, separators=(",", ":")
    ).encode()


def unsubscribed(*streams: str) -> bytes:
    return json.dumps(
        {"success": {"message": "unsubscribed", "streams": list(streams)}}, separators=(",", ":")
    ).encode()


def publish(router: Router, routing_key: str, body: bytes | str) -> Delivery | Dropped:
    """Route one message and hand its payload to each recipient, as the consumer would."""
    result = router.route(routing_key, body.encode() if isinstance(body, str) else body)
    if isinstance(result, Delivery):
        if isinstance(result, Resync):
            assert result.reason in RESYNC_REASONS
        for client in result.recipients:
            assert isinstance(client, Client)
            client.received.append(result.payload)
    else:
        assert result.reason in DROP_REASONS
    return result


def assert_empty(router: Router) -> None:
    """Nothing left behind: no client entry, no (even empty) subscriber set."""
    assert subscribed_clients(router) == 0
    assert subscription_counts(router) == {}


@pytest.fixture
def router() -> Router:
    return Router({"admin": frozenset({"admin", "superadmin"}), "broker": frozenset({"broker"})})


# -- Rango hub_test.go: TestAnonymous / TestAuthenticated --------------------------------------


def test_anonymous_public_single_stream(router: Router) -> None:
    client = Client()
    assert router.subscribe(client, ["eurusd.trades"]) == [subscribed("eurusd.trades")]
    assert subscription_counts(router) == {(PUBLIC, "eurusd.trades"): 1}
    assert router.unsubscribe(client, ["eurusd.trades"]) == unsubscribed()
    assert_empty(router)


def test_anonymous_multiple_public_streams(router: Router) -> None:
    client = Client()
    reply = router.subscribe(client, ["eurusd.trades", "eurusd.updates"])
    assert reply == [subscribed("eurusd.trades", "eurusd.updates")]
    assert subscription_counts(router) == {
        (PUBLIC, "eurusd.trades"): 1,
        (PUBLIC, "eurusd.updates"): 1,
    }
    assert router.unsubscribe(client, ["eurusd.trades", "eurusd.updates"]) == unsubscribed()
    assert_empty(router)


def test_anonymous_private_stream_is_silently_not_subscribed(router: Router) -> None:
    client = Client()
    assert router.subscribe(client, ["trades"]) == [subscribed()]
    assert router.streams(client) == []
    assert_empty(router)


def test_anonymous_valid_token_without_uid_is_anonymous_for_private(router: Router) -> None:
    client = Client(uid="", role="admin")
    assert router.subscribe(client, ["order", "eurusd.trades"]) == [subscribed("eurusd.trades")]


def test_authenticated_private_single_stream(router: Router) -> None:
    client = Client("UIDABC00001")
    assert router.subscribe(client, ["trades"]) == [subscribed("trades")]
    assert subscription_counts(router) == {(PRIVATE, "trades"): 1}
    assert router.unsubscribe(client, ["trades"]) == unsubscribed()
    assert_empty(router)


def test_authenticated_multiple_private_streams(router: Router) -> None:
    client = Client("UIDABC00001")
    assert router.subscribe(client, ["trades", "orders"]) == [subscribed("trades", "orders")]
    assert subscription_counts(router) == {(PRIVATE, "trades"): 1, (PRIVATE, "orders"): 1}
    assert router.unsubscribe(client, ["trades", "orders"]) == unsubscribed()
    assert_empty(router)


def test_authenticated_private_and_public_streams(router: Router) -> None:
    client = Client("UIDABC00001")
    reply = router.subscribe(client, ["trades", "orders", "eurusd.updates"])
    assert reply == [subscribed("eurusd.updates", "trades", "orders")]
    assert subscription_counts(router) == {
        (PUBLIC, "eurusd.updates"): 1,
        (PRIVATE, "trades"): 1,
        (PRIVATE, "orders"): 1,
    }
    reply2 = router.unsubscribe(client, ["trades", "orders", "eurusd.updates"])
    assert reply2 == unsubscribed()
    assert_empty(router)


# -- Rango client_test.go: TestClient (stream list order) ------------------------------------


def test_stream_list_is_public_then_private_in_first_subscribed_order(router: Router) -> None:
    client = Client("U1")
    router.subscribe(client, ["b"])
    router.subscribe(client, ["a.x"])
    router.subscribe(client, ["c", "a.y"])
    assert router.streams(client) == ["a.x", "a.y", "b", "c"]
    assert router.unsubscribe(client, ["a.x"]) == unsubscribed("a.y", "b", "c")
    assert router.unsubscribe(client, ["b"]) == unsubscribed("a.y", "c")
    router.subscribe(client, ["b", "a.x"])
    assert router.streams(client) == ["a.y", "a.x", "c", "b"]
    assert router.unsubscribe(client, ["a.y", "a.x", "c", "b"]) == unsubscribed()
    assert router.streams(client) == []
    assert_empty(router)


def test_prefixed_names_are_listed_with_public_ones(router: Router) -> None:
    client = Client("U1", "admin")
    router.subscribe(client, ["order", "admin.eurusd.sys", "eurusd.trades"])
    assert router.streams(client) == ["admin.eurusd.sys", "eurusd.trades", "order"]


def test_duplicates_and_held_streams_are_not_added_twice(router: Router) -> None:
    client = Client("U1")
    assert router.subscribe(client, ["a.b", "a.b", "x"]) == [subscribed("a.b", "x")]
    assert router.subscribe(client, ["x", "a.b", ""]) == [subscribed("a.b", "x")]
    assert subscription_counts(router) == {(PUBLIC, "a.b"): 1, (PRIVATE, "x"): 1}


def test_unsubscribe_unknown_changes_nothing_but_replies(router: Router) -> None:
    client = Client("U1")
    assert router.unsubscribe(client, ["a.b"]) == unsubscribed()
    assert_empty(router)
    router.subscribe(client, ["a.b"])
    assert router.unsubscribe(client, ["c.d", "x", ""]) == unsubscribed("a.b")
    assert subscription_counts(router) == {(PUBLIC, "a.b"): 1}


# -- Rango TestIsIncremental / TestGetTopic / TestHandleMessage ------------------------------


@pytest.mark.parametrize(
    ("routing_key", "uid", "stream", "key"),
    [
        ("public.abc.count", "", "abc.count", "abc.count"),
        ("global.abc.count", "", "abc.count", "abc.count"),
        ("private.abc.count", "abc", "count", "count"),
        ("private.abc.count-snap", "abc", "count-inc", "count-inc"),
        ("private.abc.count-inc", "abc", "count-inc", "count-inc"),
        ("public.global.tickers", "", "global.tickers", "global.tickers"),
        ("public.eurusd.kline-12h", "", "eurusd.kline-12h", "eurusd.kline-12h"),
        ("public.x", "", "public.x", "public.x"),
        ("global.tickers", "", "global.tickers", "global.tickers"),
        ("admin.abc.count", "", "admin.abc.count", "abc.count"),
        ("admin.abc.count-snap", "", "admin.abc.count-inc", "abc.count-inc"),
        ("admin.abc.count-inc", "", "admin.abc.count-inc", "abc.count-inc"),
    ],
)
def test_topic_of_routing_key(
    router: Router, routing_key: str, uid: str, stream: str, key: str
) -> None:
    client = Client(uid, "admin")
    router.subscribe(client, [stream])
    result = publish(router, routing_key, '{"some":"data"}')
    assert isinstance(result, Delivery)
    assert client.received == [b'{"%s":{"some":"data"}}' % key.encode()]


def test_handle_message(router: Router) -> None:
    client = Client()
    router.subscribe(client, ["abc.ticker"])
    publish(router, "public.abc.ticker", '{"some":"data"}')
    assert client.received == [b'{"abc.ticker":{"some":"data"}}']


@pytest.mark.parametrize(
    ("event", "cached"),
    [("ob-inc", False), ("ob-snap", True), ("ob", False), ("anything-snap", True)],
)
def test_only_snap_suffix_is_cached(router: Router, event: str, cached: bool) -> None:
    result = publish(router, f"public.eurusd.{event}", "{}")
    assert (cached_books(router) == 1) is cached
    if event.endswith("-inc"):
        assert result == Dropped("no_snapshot")


# -- Rango TestIncrementalObjectStorage, Ruby router_spec 10-12 --------------------------------


def test_incremental_object_storage(router: Router) -> None:
    assert publish(router, "public.abc.count-inc", '{"data":1,"sequence":11}') == Dropped(
        "no_snapshot"
    )
    assert cached_books(router) == 0
    result = publish(router, "public.abc.count-snap", '{"data":[2,3,4],"sequence":12}')
    assert isinstance(result, Delivery)
    assert not result.recipients
    snap = b'{"abc.count-snap":{"data":[2,3,4],"sequence":12}}'
    assert cached_book(router, "abc.count-inc") == [snap]
    publish(router, "public.abc.count-inc", '{"data":5,"sequence":13}')
    publish(router, "public.abc.count-inc", '{"data":6,"sequence":14}')
    assert cached_book(router, "abc.count-inc") == [
        snap,
        b'{"abc.count-inc":{"data":5,"sequence":13}}',
        b'{"abc.count-inc":{"data":6,"sequence":14}}',
    ]
    publish(router, "public.abc.count-snap", '{"data":[7],"sequence":15}')
    assert cached_book(router, "abc.count-inc") == [
        b'{"abc.count-snap":{"data":[7],"sequence":15}}'
    ]
    assert cached_book(router, "abc.count-snap") == []


def test_replay_snapshot_then_increments_then_reply(router: Router) -> None:
    publish(router, "public.abc.object-snap", "[1,2,3]")
    publish(router, "public.abc.object-inc", "[4]")
    client = Client()
    assert router.subscribe(client, ["abc.object-inc"]) == [
        b'{"abc.object-snap":[1,2,3]}',
        b'{"abc.object-inc":[4]}',
        subscribed("abc.object-inc"),
    ]


def test_new_snapshot_not_sent_live_increment_is(router: Router) -> None:
    publish(router, "public.abc.object-snap", "[1,2,3]")
    client = Client()
    router.subscribe(client, ["abc.object-inc"])
    publish(router, "public.abc.object-snap", "[1,2,3,4]")
    publish(router, "public.abc.object-inc", "[5]")
    assert client.received == [b'{"abc.object-inc":[5]}']


def test_increment_before_snapshot_is_dropped_and_first_snapshot_reaches_waiting_subscribers(
    router: Router,
) -> None:
    # Ruby router_spec 12: a subscriber that came before any snapshot gets the first one live,
    # or the increments after it would be useless. Later snapshots are not broadcast.
    client = Client()
    assert publish(router, "public.abc.object-inc", "[4]") == Dropped("no_snapshot")
    assert router.subscribe(client, ["abc.object-inc"]) == [subscribed("abc.object-inc")]
    assert client.received == []
    publish(router, "public.abc.object-snap", "[1,2,3]")
    publish(router, "public.abc.object-inc", "[5]")
    publish(router, "public.abc.object-snap", "[1,2,3,5]")
    assert client.received == [b'{"abc.object-snap":[1,2,3]}', b'{"abc.object-inc":[5]}']


def test_already_subscribed_gets_no_replay(router: Router) -> None:
    publish(router, "public.abc.ob-snap", "[1]")
    client = Client()
    router.subscribe(client, ["abc.ob-inc"])
    assert router.subscribe(client, ["abc.ob-inc", "abc.trades"]) == [
        subscribed("abc.ob-inc", "abc.trades")
    ]


def test_replays_in_request_order_with_refusals(router: Router) -> None:
    publish(router, "public.m.ob-snap", '"m0"')
    publish(router, "public.m.ob-inc", '"m1"')
    publish(router, "global.n.ob-snap", '"n0"')
    client = Client("U1", "user")
    assert router.subscribe(client, ["n.ob-inc", "admin.m.ob-inc", "order", "m.ob-inc"]) == [
        b'{"n.ob-snap":"n0"}',
        b'{"success":{"message":"cannot subscribe to admin.m.ob-inc"}}',
        b'{"m.ob-snap":"m0"}',
        b'{"m.ob-inc":"m1"}',
        subscribed("n.ob-inc", "m.ob-inc", "order"),
    ]


def test_two_word_snapshot_is_cached_under_its_topic(router: Router) -> None:
    publish(router, "public.ob-snap", "[0]")
    client = Client()
    assert router.subscribe(client, ["public.ob-inc"]) == [
        b'{"public.ob-snap":[0]}',
        subscribed("public.ob-inc"),
    ]


def test_private_and_prefixed_books_are_not_cached(router: Router) -> None:
    owner = Client("U1", "admin")
    router.subscribe(owner, ["ob-inc", "admin.m.ob-inc"])
    publish(router, "private.U1.ob-snap", "[1]")
    publish(router, "private.U1.ob-inc", "[2]")
    publish(router, "admin.m.ob-snap", "[3]")
    publish(router, "admin.m.ob-inc", "[4]")
    assert cached_books(router) == 0
    assert owner.received == [
        b'{"ob-inc":[1]}',
        b'{"ob-inc":[2]}',
        b'{"m.ob-inc":[3]}',
        b'{"m.ob-inc":[4]}',
    ]


def test_prefixed_inc_subscription_does_not_replay_public_book(router: Router) -> None:
    # Rango replays the public "<m>.<x>-inc" book to "<p>.<m>.<x>-inc"; §6 caches public only.
    publish(router, "public.m.ob-snap", "[1]")
    client = Client(role="admin")
    assert router.subscribe(client, ["admin.m.ob-inc"]) == [subscribed("admin.m.ob-inc")]


def test_increment_bound_drops_book_until_next_snapshot(caplog: pytest.LogCaptureFixture) -> None:
    router = Router({}, max_increments=2)
    client = Client()
    router.subscribe(client, ["m.ob-inc"])
    publish(router, "public.m.ob-snap", "[0]")
    publish(router, "public.m.ob-inc", "[1]")
    publish(router, "public.m.ob-inc", "[2]")
    assert len(cached_book(router, "m.ob-inc")) == 3
    with caplog.at_level(logging.WARNING, logger="ranger_py.router"):
        assert publish(router, "public.m.ob-inc", "[3]") == Dropped("book_overflow")
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "m.ob-inc" in caplog.records[0].getMessage()
    assert cached_books(router) == 0
    assert publish(router, "public.m.ob-inc", "[4]") == Dropped("no_snapshot")
    late = Client()
    assert router.subscribe(late, ["m.ob-inc"]) == [subscribed("m.ob-inc")]
    publish(router, "public.m.ob-snap", "[5]")
    publish(router, "public.m.ob-inc", "[6]")
    # After the overflow the next snapshot goes to the subscribers live: their book is gone.
    assert client.received == [
        b'{"m.ob-snap":[0]}',
        b'{"m.ob-inc":[1]}',
        b'{"m.ob-inc":[2]}',
        b'{"m.ob-snap":[5]}',
        b'{"m.ob-inc":[6]}',
    ]
    assert late.received == [b'{"m.ob-snap":[5]}', b'{"m.ob-inc":[6]}']
    assert cached_book(router, "m.ob-inc") == [b'{"m.ob-snap":[5]}', b'{"m.ob-inc":[6]}']


def test_increments_are_cached_without_subscribers(router: Router) -> None:
    publish(router, "public.m.ob-snap", "[0]")
    result = publish(router, "public.m.ob-inc", "[1]")
    assert isinstance(result, Delivery)
    assert not result.recipients
    assert len(cached_book(router, "m.ob-inc")) == 2


# -- §6 sequences: a book out of sequence is never replayed -------------------------------------


def snap(sequence: object, levels: str = "[]") -> str:
    return f'{{"asks":{levels},"sequence":{json.dumps(sequence)}}}'


def inc(sequence: object, price: str = "1.0") -> str:
    return f'{{"asks":["{price}","2.0"],"sequence":{json.dumps(sequence)}}}'


def snap_frame(sequence: object, levels: str = "[]") -> bytes:
    return b'{"m.ob-snap":%s}' % snap(sequence, levels).encode()


def inc_frame(sequence: object, price: str = "1.0") -> bytes:
    return b'{"m.ob-inc":%s}' % inc(sequence, price).encode()


def test_consecutive_sequences_are_cached_and_replayed(router: Router) -> None:
    publish(router, "public.m.ob-snap", snap(1))
    for sequence in (2, 3):
        result = publish(router, "public.m.ob-inc", inc(sequence))
        assert type(result) is Delivery
    assert router.subscribe(Client(), ["m.ob-inc"]) == [
        snap_frame(1),
        inc_frame(2),
        inc_frame(3),
        subscribed("m.ob-inc"),
    ]


def test_gap_breaks_the_book_until_the_next_snapshot_which_goes_live(
    router: Router, caplog: pytest.LogCaptureFixture
) -> None:
    current = Client()
    router.subscribe(current, ["m.ob-inc"])
    publish(router, "public.m.ob-snap", snap(1))  # the first one: live
    publish(router, "public.m.ob-inc", inc(2))
    with caplog.at_level(logging.WARNING, logger="ranger_py.router"):
        result = publish(router, "public.m.ob-inc", inc(4))  # 3 lost upstream
    assert result == Resync(inc_frame(4), {current}, "gap")
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "m.ob-inc" in caplog.records[0].getMessage()
    assert cached_book(router, "m.ob-inc") == []
    assert cached_books(router) == 0

    # A late subscriber gets nothing of the book: no snapshot, no increments.
    late = Client()
    assert router.subscribe(late, ["m.ob-inc"]) == [subscribed("m.ob-inc")]
    # Until the next snapshot, increments go on live to the subscribers and are not cached.
    assert type(publish(router, "public.m.ob-inc", inc(5))) is Delivery
    assert cached_book(router, "m.ob-inc") == []
    assert router.subscribe(Client(), ["m.ob-inc"]) == [subscribed("m.ob-inc")]

    result = publish(router, "public.m.ob-snap", snap(10))
    assert type(result) is Delivery  # the break was counted once, at the increment
    publish(router, "public.m.ob-inc", inc(11))
    assert current.received == [
        snap_frame(1),
        inc_frame(2),
        inc_frame(4),
        inc_frame(5),
        snap_frame(10),
        inc_frame(11),
    ]
    assert late.received == [inc_frame(5), snap_frame(10), inc_frame(11)]
    assert router.subscribe(Client(), ["m.ob-inc"]) == [
        snap_frame(10),
        inc_frame(11),
        subscribed("m.ob-inc"),
    ]


def test_a_broken_book_forwards_every_increment_unchecked(router: Router) -> None:
    current = Client()
    publish(router, "public.m.ob-snap", snap(1))
    router.subscribe(current, ["m.ob-inc"])
    assert publish(router, "public.m.ob-inc", inc(3)) == Resync(inc_frame(3), {current}, "gap")
    # Counted once per break: what follows until the snapshot is plain delivery, repeats too.
    for sequence in (3, 2, 7, None):
        result = publish(router, "public.m.ob-inc", inc(sequence))
        assert type(result) is Delivery
        assert set(result.recipients) == {current}
    assert current.received == [inc_frame(s) for s in (3, 3, 2, 7, None)]


def test_duplicate_is_dropped_and_does_not_break_the_book(router: Router) -> None:
    current = Client()
    publish(router, "public.m.ob-snap", snap(1))
    router.subscribe(current, ["m.ob-inc"])
    publish(router, "public.m.ob-inc", inc(2))
    assert publish(router, "public.m.ob-inc", inc(2, "9.0")) == Dropped("duplicate")
    publish(router, "public.m.ob-inc", inc(3))
    assert current.received == [inc_frame(2), inc_frame(3)]
    assert cached_book(router, "m.ob-inc") == [snap_frame(1), inc_frame(2), inc_frame(3)]


def test_an_increment_with_the_snapshots_sequence_is_a_duplicate(router: Router) -> None:
    # Peatio's snapshot carries the sequence of the last change it includes.
    publish(router, "public.m.ob-snap", snap(5))
    assert publish(router, "public.m.ob-inc", inc(5)) == Dropped("duplicate")
    assert cached_book(router, "m.ob-inc") == [snap_frame(5)]


def test_step_back_breaks_the_book(router: Router) -> None:
    current = Client()
    publish(router, "public.m.ob-snap", snap(5))
    router.subscribe(current, ["m.ob-inc"])
    publish(router, "public.m.ob-inc", inc(6))
    publish(router, "public.m.ob-inc", inc(7))
    assert publish(router, "public.m.ob-inc", inc(6, "3.0")) == Resync(
        inc_frame(6, "3.0"), {current}, "step_back"
    )
    assert cached_books(router) == 0


def test_reordered_increments_break_the_book_at_the_first_out_of_place(router: Router) -> None:
    publish(router, "public.m.ob-snap", snap(1))
    publish(router, "public.m.ob-inc", inc(2))
    outcomes = [publish(router, "public.m.ob-inc", inc(s)) for s in (4, 3, 5)]
    assert [getattr(outcome, "reason", None) for outcome in outcomes] == ["gap", None, None]
    late = Client()
    assert router.subscribe(late, ["m.ob-inc"]) == [subscribed("m.ob-inc")]


def test_snapshot_below_the_last_increment_replaces_the_book_and_goes_live(
    router: Router,
) -> None:
    # A publisher that restarted counts again from the start: its snapshot is the book now,
    # and the current subscribers must get it, or its increments look like a step back.
    current = Client()
    publish(router, "public.m.ob-snap", snap(100))
    router.subscribe(current, ["m.ob-inc"])
    publish(router, "public.m.ob-inc", inc(101))
    assert publish(router, "public.m.ob-snap", snap(1)) == Resync(
        snap_frame(1), {current}, "restart"
    )
    publish(router, "public.m.ob-inc", inc(2))
    assert current.received == [inc_frame(101), snap_frame(1), inc_frame(2)]
    assert cached_book(router, "m.ob-inc") == [snap_frame(1), inc_frame(2)]


def test_snapshot_past_the_last_increment_goes_live(router: Router) -> None:
    # The increments between were lost: the subscribers' books are behind this one.
    current = Client()
    publish(router, "public.m.ob-snap", snap(1))
    router.subscribe(current, ["m.ob-inc"])
    publish(router, "public.m.ob-inc", inc(2))
    assert publish(router, "public.m.ob-snap", snap(5)) == Resync(snap_frame(5), {current}, "gap")
    publish(router, "public.m.ob-inc", inc(6))
    assert current.received == [inc_frame(2), snap_frame(5), inc_frame(6)]


def test_snapshot_in_step_is_cached_only(router: Router) -> None:
    current = Client()
    publish(router, "public.m.ob-snap", snap(1))
    router.subscribe(current, ["m.ob-inc"])
    publish(router, "public.m.ob-inc", inc(2))
    result = publish(router, "public.m.ob-snap", snap(2))
    assert result == Delivery(snap_frame(2), frozenset())
    assert type(result) is Delivery
    assert current.received == [inc_frame(2)]


@pytest.mark.parametrize("sequence", [None, "2", 2.0, True, [2], {"n": 2}, "missing"])
def test_books_without_an_integer_sequence_are_never_checked(
    router: Router, sequence: object
) -> None:
    body = '{"asks":[]}' if sequence == "missing" else snap(sequence)
    current = Client()
    router.subscribe(current, ["m.ob-inc"])
    publish(router, "public.m.ob-snap", body)
    # Repeats, gaps and steps back are all cached and forwarded, as without any sequence.
    for number in (5, 5, 9, 1):
        assert type(publish(router, "public.m.ob-inc", inc(number))) is Delivery
    assert type(publish(router, "public.m.ob-snap", body)) is Delivery
    frame = b'{"m.ob-snap":%s}' % body.encode()
    assert current.received == [frame] + [inc_frame(n) for n in (5, 5, 9, 1)]


def test_bodies_that_are_not_objects_are_books_without_a_sequence(router: Router) -> None:
    publish(router, "public.m.ob-snap", "[1]")
    publish(router, "public.m.ob-inc", "[3]")
    publish(router, "public.m.ob-inc", "[3]")
    assert cached_book(router, "m.ob-inc") == [
        b'{"m.ob-snap":[1]}',
        b'{"m.ob-inc":[3]}',
        b'{"m.ob-inc":[3]}',
    ]


@pytest.mark.parametrize("body", [inc(None), inc(3.0), inc(True), inc("3"), '{"asks":[]}', "[3]"])
def test_increment_without_an_integer_sequence_breaks_a_sequenced_book(
    router: Router, body: str
) -> None:
    # Nobody could tell whether it follows on; a client checking sequences would drop the book.
    current = Client()
    publish(router, "public.m.ob-snap", snap(1))
    router.subscribe(current, ["m.ob-inc"])
    publish(router, "public.m.ob-inc", inc(2))
    result = publish(router, "public.m.ob-inc", body)
    assert result == Resync(b'{"m.ob-inc":%s}' % body.encode(), {current}, "no_sequence")
    assert router.subscribe(Client(), ["m.ob-inc"]) == [subscribed("m.ob-inc")]


def test_a_sequenced_snapshot_after_an_unsequenced_one_starts_checking(router: Router) -> None:
    current = Client()
    publish(router, "public.m.ob-snap", '{"asks":[]}')
    router.subscribe(current, ["m.ob-inc"])
    publish(router, "public.m.ob-inc", inc(50))
    # The book was cached and is not out of sequence: cached only, as before.
    assert publish(router, "public.m.ob-snap", snap(7)) == Delivery(snap_frame(7), frozenset())
    assert publish(router, "public.m.ob-inc", inc(9)) == Resync(inc_frame(9), {current}, "gap")


def test_an_unsequenced_snapshot_mends_a_broken_book_and_stops_checking(router: Router) -> None:
    current = Client()
    publish(router, "public.m.ob-snap", snap(1))
    router.subscribe(current, ["m.ob-inc"])
    publish(router, "public.m.ob-inc", inc(3))
    assert publish(router, "public.m.ob-snap", "[0]") == Delivery(b'{"m.ob-snap":[0]}', {current})
    assert type(publish(router, "public.m.ob-inc", inc(9))) is Delivery
    assert cached_book(router, "m.ob-inc") == [b'{"m.ob-snap":[0]}', inc_frame(9)]


def test_overflow_forgets_the_sequence_with_the_book() -> None:
    router = Router({}, max_increments=1)
    current = Client()
    router.subscribe(current, ["m.ob-inc"])
    publish(router, "public.m.ob-snap", snap(1))
    publish(router, "public.m.ob-inc", inc(2))
    assert publish(router, "public.m.ob-inc", inc(3)) == Dropped("book_overflow")
    assert publish(router, "public.m.ob-inc", inc(4)) == Dropped("no_snapshot")
    # No book, so live as every first snapshot; not a resync: nobody holds a book to resync.
    assert publish(router, "public.m.ob-snap", snap(20)) == Delivery(snap_frame(20), {current})
    assert type(publish(router, "public.m.ob-inc", inc(21))) is Delivery


def test_a_mended_book_is_no_longer_broken() -> None:
    router = Router({}, max_increments=1)
    publish(router, "public.m.ob-snap", snap(1))
    publish(router, "public.m.ob-inc", inc(3))  # broken
    publish(router, "public.m.ob-snap", snap(3))  # mended
    publish(router, "public.m.ob-inc", inc(4))
    assert publish(router, "public.m.ob-inc", inc(5)) == Dropped("book_overflow")
    # Gone by the bound, not out of sequence: increments are dropped again, not forwarded.
    assert publish(router, "public.m.ob-inc", inc(6)) == Dropped("no_snapshot")


def test_sequences_are_kept_per_book(router: Router) -> None:
    publish(router, "public.m.ob-snap", snap(1))
    publish(router, "public.m.ob-inc", inc(3))
    publish(router, "public.n.ob-snap", '{"sequence":1}')
    assert type(publish(router, "public.n.ob-inc", '{"sequence":2}')) is Delivery
    assert cached_book(router, "n.ob-inc") == [
        b'{"n.ob-snap":{"sequence":1}}',
        b'{"n.ob-inc":{"sequence":2}}',
    ]
    assert cached_book(router, "m.ob-inc") == []


def test_private_and_prefixed_books_are_never_checked(router: Router) -> None:
    owner = Client("U1", "admin")
    router.subscribe(owner, ["ob-inc", "admin.m.ob-inc"])
    for key in ("private.U1", "admin.m"):
        publish(router, f"{key}.ob-snap", snap(1))
        for sequence in (1, 5, 2):
            assert type(publish(router, f"{key}.ob-inc", inc(sequence))) is Delivery
    assert len(owner.received) == 8


# -- Ruby router_spec 6-9 (flat names there; public names here) ------------------------------


def test_no_connections_no_stats(router: Router) -> None:
    assert_empty(router)
    assert cached_books(router) == 0


def test_two_anonymous_connections(router: Router) -> None:
    a1, a2 = Client(), Client()
    router.subscribe(a1, ["some.feed"])
    router.subscribe(a2, ["some.feed", "another.feed"])
    assert subscribed_clients(router) == 2
    assert subscription_counts(router) == {(PUBLIC, "some.feed"): 2, (PUBLIC, "another.feed"): 1}
    delivery = router.route("public.some.feed", b"1")
    assert isinstance(delivery, Delivery)
    assert set(delivery.recipients) == {a1, a2}
    router.remove(a1)
    router.remove(a2)
    assert_empty(router)


def test_unsubscribe_empties_topics(router: Router) -> None:
    a1, a2 = Client(), Client()
    router.subscribe(a1, ["some.feed"])
    router.subscribe(a2, ["some.feed", "another.feed"])
    assert sum(subscription_counts(router).values()) == 3
    assert len(subscription_counts(router)) == 2
    router.unsubscribe(a1, ["some.feed"])
    router.unsubscribe(a2, ["some.feed", "another.feed"])
    assert_empty(router)


def test_authorized_users_are_filed_per_uid(router: Router) -> None:
    u1, u2 = Client("user1"), Client("user2")
    router.subscribe(u1, ["order"])
    router.subscribe(u2, ["order"])
    assert subscription_counts(router) == {(PRIVATE, "order"): 2}
    publish(router, "private.user1.order", '{"id":1}')
    assert u1.received == [b'{"order":{"id":1}}']
    assert u2.received == []
    router.remove(u1)
    router.remove(u2)
    assert_empty(router)


# -- Ruby web_socket_spec 16-19, at the router level -----------------------------------------


def test_private_streams_reach_only_their_uid() -> None:
    router = Router({})
    client = Client("IDE8E2280FD1")
    router.subscribe(client, ["stream_1", "stream_2"])
    publish(router, "private.IDE8E2280FD1.stream_1", '{"key":"stream_1_user_1"}')
    publish(router, "private.SOMEUSER2.stream_2", '{"key":"stream_2_user_2"}')
    publish(router, "private.IDE8E2280FD1.stream_2", '{"key":"stream_2_user_1"}')
    publish(router, "private.IDE8E2280FD1.stream_3", '{"key":"stream_3_user_1"}')
    publish(router, "private.IDE8E2280FD1.stream_2", '{"key":"stream_2_user_1_message_2"}')
    assert client.received == [
        b'{"stream_1":{"key":"stream_1_user_1"}}',
        b'{"stream_2":{"key":"stream_2_user_1"}}',
        b'{"stream_2":{"key":"stream_2_user_1_message_2"}}',
    ]


def test_anonymous_public_stream_gets_only_its_topic() -> None:
    router = Router({})
    client = Client()
    router.subscribe(client, ["btcusd.order"])
    for n in (1, 2, 3):
        publish(router, "public.btcusd.order", f'{{"key":"btcusd_order_{n}"}}')
    publish(router, "public.btcusd.trade", '{"key":"btcusd_trade"}')
    publish(router, "public.ethusd.order", '{"key":"ethusd_order"}')
    expected = [b'{"btcusd.order":{"key":"btcusd_order_%d"}}' % n for n in (1, 2, 3)]
    assert client.received == expected


def test_subscribe_message_then_stream() -> None:
    router = Router({})
    client = Client()
    assert router.subscribe(client, []) == [subscribed()]
    request = parse_request('{"event":"subscribe","streams":["btcusd.order"]}')
    assert isinstance(request, Request)
    assert router.subscribe(client, request.streams) == [subscribed("btcusd.order")]
    for n in (1, 2, 3):
        publish(router, "public.btcusd.order", f'{{"key":"btcusd_order_{n}"}}')
    assert len(client.received) == 3


def test_unsubscribe_stops_delivery() -> None:
    router = Router({})
    client = Client()
    router.subscribe(client, ["btcusd.order"])
    request = parse_request('{"event":"unsubscribe","streams":["btcusd.order"]}')
    assert isinstance(request, Request)
    assert router.unsubscribe(client, request.streams) == unsubscribed()
    result = publish(router, "public.btcusd.order", "{}")
    assert isinstance(result, Delivery)
    assert not result.recipients
    assert client.received == []


# -- RBAC and prefixed streams (PROTOCOL §4, §5) -------------------------------------------------


@pytest.mark.parametrize(
    ("role", "stream", "allowed"),
    [
        ("admin", "admin.eurusd.sys", True),
        ("superadmin", "admin.eurusd.sys", True),
        ("broker", "broker.eurusd.sys", True),
        ("broker", "admin.eurusd.sys", False),
        ("Admin", "admin.eurusd.sys", False),
        ("", "admin.eurusd.sys", False),
        ("admin", "Admin.eurusd.sys", False),
        ("admin", "other.eurusd.sys", False),
        ("admin", ".eurusd.sys", False),
    ],
)
def test_rbac(router: Router, role: str, stream: str, allowed: bool) -> None:
    client = Client("U1", role)
    frames = router.subscribe(client, [stream])
    if allowed:
        assert frames == [subscribed(stream)]
        assert subscription_counts(router) == {(PREFIXED, stream): 1}
    else:
        assert frames == [
            b'{"success":{"message":"cannot subscribe to %s"}}' % stream.encode(),
            subscribed(),
        ]
        assert_empty(router)


def test_empty_role_matches_only_when_listed() -> None:
    router = Router({"open": frozenset({""})})
    client = Client()
    assert router.subscribe(client, ["open.m.e"]) == [subscribed("open.m.e")]


def test_unsubscribe_prefixed_removes_exactly_that_stream(router: Router) -> None:
    # Rango strips the prefix on unsubscribe and crashes unless "eurusd.sys" is also held.
    client = Client("U1", "admin")
    router.subscribe(client, ["admin.eurusd.sys", "eurusd.sys"])
    assert router.unsubscribe(client, ["admin.eurusd.sys"]) == unsubscribed("eurusd.sys")
    assert subscription_counts(router) == {(PUBLIC, "eurusd.sys"): 1}
    assert router.unsubscribe(client, ["admin.eurusd.sys"]) == unsubscribed("eurusd.sys")
    router.subscribe(client, ["admin.eurusd.sys"])
    assert router.unsubscribe(client, ["admin.eurusd.sys"]) == unsubscribed("eurusd.sys")


def test_prefixed_frames_drop_the_prefix_and_never_reach_public_subscribers(
    router: Router,
) -> None:
    admin, public = Client("U1", "admin"), Client()
    router.subscribe(admin, ["admin.eurusd.sys"])
    router.subscribe(public, ["eurusd.sys"])
    result = publish(router, "admin.eurusd.sys", '{"halt":true}')
    assert isinstance(result, Delivery)
    assert list(result.recipients) == [admin]
    assert admin.received == [b'{"eurusd.sys":{"halt":true}}']
    assert public.received == []
    publish(router, "public.eurusd.sys", '{"open":true}')
    assert admin.received == [b'{"eurusd.sys":{"halt":true}}']
    assert public.received == [b'{"eurusd.sys":{"open":true}}']


def test_prefixed_message_for_other_prefix_reaches_nobody(router: Router) -> None:
    admin = Client("U1", "admin")
    router.subscribe(admin, ["admin.eurusd.sys"])
    publish(router, "broker.eurusd.sys", "{}")
    assert admin.received == []


# -- private streams -----------------------------------------------------------------------------


def test_private_isolation_and_every_connection_of_a_uid(router: Router) -> None:
    alice1, alice2, bob, anon = Client("alice"), Client("alice"), Client("bob"), Client()
    router.subscribe(alice1, ["order", "trade"])
    router.subscribe(alice2, ["order"])
    router.subscribe(bob, ["order"])
    router.subscribe(anon, ["order"])
    publish(router, "private.alice.order", '{"id":1}')
    publish(router, "private.alice.trade", '{"id":2}')
    publish(router, "private.bob.order", '{"id":3}')
    publish(router, "private.carol.order", '{"id":4}')
    assert alice1.received == [b'{"order":{"id":1}}', b'{"trade":{"id":2}}']
    assert alice2.received == [b'{"order":{"id":1}}']
    assert bob.received == [b'{"order":{"id":3}}']
    assert anon.received == []
    router.remove(alice1)
    publish(router, "private.alice.order", '{"id":5}')
    assert alice2.received[-1] == b'{"order":{"id":5}}'
    assert subscription_counts(router) == {(PRIVATE, "order"): 2}


def test_private_message_does_not_reach_public_names(router: Router) -> None:
    client = Client("alice")
    router.subscribe(client, ["alice.order", "private.order"])
    publish(router, "private.alice.order", "{}")
    assert client.received == []


# -- routing keys and bodies (PROTOCOL §5) -------------------------------------------------------


@pytest.mark.parametrize(
    "routing_key",
    [
        "",
        "public",
        "trades",
        "private.order",
        "admin.sys",
        "public.",
        ".trades",
        "public..trades",
        ".eurusd.trades",
        "public.eurusd.",
        "private..order",
        "private.uid.",
        "a.b.c.d",
        "public.eurusd.trades.x",
        "..",
        "...",
    ],
)
def test_bad_routing_keys_are_dropped(router: Router, routing_key: str) -> None:
    assert router.route(routing_key, b"{}") == Dropped("bad_routing_key")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   ",
        b"{",
        b"{} {}",
        b"{'a':1}",
        b"NaN",
        b"[Infinity]",
        b'{"a":-Infinity}',
        b'"\xff"',
        b"\xef\xbb\xbf{}",
        '{"a":1}'.encode("utf-16"),
        '{"a":1}'.encode("utf-32-le"),
        b"[" * 100_000 + b"]" * 100_000,
        b"\x0c{}",
        b"{}\x0b",
        b"{}\x00",
        b"[1] 2",
    ],
)
def test_invalid_json_body_is_dropped(router: Router, body: bytes) -> None:
    client = Client()
    router.subscribe(client, ["m.e"])
    assert router.route("public.m.e", body) == Dropped("bad_json")


@pytest.mark.parametrize("body", [b"null", b"1", b'"x"', b"[]", b"true", b"-0.0e+1", b"1e400"])
def test_any_json_value_is_a_body(router: Router, body: bytes) -> None:
    client = Client()
    router.subscribe(client, ["m.e"])
    publish(router, "public.m.e", body)
    assert client.received == [b'{"m.e":' + body + b"}"]


def test_body_is_forwarded_byte_for_byte(router: Router) -> None:
    client = Client()
    router.subscribe(client, ["global.tickers"])
    body = (
        '{"eurusd":{"open":1000.0,"at":1588001398,"buy":"1000.0","vol":1.10e-7,'
        '"big":12345678901234567890,"name":"€ <&> \\u2028","a":[ 1 , 2 ]}}'
    ).encode()
    publish(router, "public.global.tickers", b" \n" + body + b"\r\n\t ")
    assert client.received == [b'{"global.tickers":' + body + b"}"]


def test_payload_is_one_object_for_every_recipient(router: Router) -> None:
    clients = [Client() for _ in range(5)]
    for client in clients:
        router.subscribe(client, ["m.e"])
    publish(router, "public.m.e", "[1]")
    assert all(client.received[0] is clients[0].received[0] for client in clients)


@pytest.mark.parametrize(
    ("routing_key", "stream", "topic"),
    [
        ('public.a"b.c\\d', 'a"b.c\\d', 'a"b.c\\d'),
        ("public.é.\u2028", "é.\u2028", "é.\u2028"),
        ('private.u.o"rder', 'o"rder', 'o"rder'),
        ('admin.m.{"x', 'admin.m.{"x', 'm.{"x'),
    ],
)
def test_odd_topics_are_json_escaped(
    router: Router, routing_key: str, stream: str, topic: str
) -> None:
    client = Client("u", "admin")
    router.subscribe(client, [stream])
    publish(router, routing_key, '{"v":1}')
    assert len(client.received) == 1
    assert json.loads(client.received[0]) == {topic: {"v": 1}}
    client.received[0].decode("ascii")


def test_no_subscribers_is_an_empty_delivery(router: Router) -> None:
    result = router.route("public.m.e", b"{}")
    assert isinstance(result, Delivery)
    assert result.payload == b'{"m.e":{}}'
    assert len(result.recipients) == 0


# -- limits and cleanup ----------------------------------------------------------------------------


def test_too_many_streams_changes_nothing() -> None:
    router = Router({}, max_streams=3)
    client = Client("U1")
    router.subscribe(client, ["a.b", "c"])
    before = (router.streams(client), subscription_counts(router))
    with pytest.raises(errors.TooManyStreams):
        router.subscribe(client, ["d.e", "f"])
    assert (router.streams(client), subscription_counts(router)) == before
    assert router.subscribe(client, ["a.b", "c", "d.e"]) == [subscribed("a.b", "d.e", "c")]
    with pytest.raises(errors.TooManyStreams):
        router.subscribe(client, ["x.y"])


def test_too_many_streams_on_first_subscription_leaves_no_entry() -> None:
    router = Router({}, max_streams=1)
    client = Client("U1")
    with pytest.raises(errors.TooManyStreams):
        router.subscribe(client, ["a.b", "c.d"])
    assert_empty(router)


def test_refused_streams_do_not_count_towards_the_limit() -> None:
    router = Router({}, max_streams=1)
    client = Client()
    frames = router.subscribe(client, ["admin.x.y", "order", "a.b"])
    assert frames[-1] == subscribed("a.b")


def test_remove_cleans_every_table_and_is_idempotent(router: Router) -> None:
    publish(router, "public.m.ob-snap", "[0]")
    clients = [Client("U1", "admin"), Client("U1"), Client("U2"), Client()]
    for client in clients:
        router.subscribe(client, ["m.ob-inc", "order", "trade", "admin.m.sys", "x.y"])
    assert subscribed_clients(router) == 4
    for client in clients:
        router.remove(client)
        router.remove(client)
    assert_empty(router)
    for client in clients:
        assert router.streams(client) == []
    assert router.route("private.U1.order", b"{}") == Delivery(b'{"order":{}}', frozenset())
    assert cached_books(router) == 1


def test_never_subscribed_clients_cost_nothing(router: Router) -> None:
    client = Client()
    router.subscribe(client, [])
    router.subscribe(client, ["order", "admin.a.b"])
    router.unsubscribe(client, ["order"])
    router.remove(client)
    assert_empty(router)


@pytest.mark.parametrize("name", ["\ud800.x", "x.\udfff", "m." + "z" * 254, "ü" * 128])
def test_a_stream_name_nothing_can_be_published_to_is_refused_and_changes_nothing(
    name: str,
) -> None:
    router = Router({})
    client = Client("U1")
    router.subscribe(client, ["a.b"])
    before = (router.streams(client), subscription_counts(router))
    with pytest.raises(errors.InvalidStreamName) as raised:
        router.subscribe(client, ["c.d", name])
    assert raised.value.reply == b'{"error":"Invalid stream name"}'
    assert (router.streams(client), subscription_counts(router)) == before


def test_the_longest_routable_names_are_accepted() -> None:
    router = Router({})
    client = Client("U1")
    longest = "m." + "z" * 253  # 255 bytes, as long as a routing key may be
    multibyte = "ü" * 126 + ".x"  # 254 + 2 bytes would not fit; 252 + 2 do
    assert router.subscribe(client, [longest, multibyte]) == [subscribed(longest, multibyte)]


# -- bindings (RANGER_BROKER_ROUTING=subscribed) ----------------------------------------------


def _bound_router() -> tuple[Router, Bindings]:
    bindings = Bindings(STATIC_KEYS, unbind_delay=0.0)
    bindings.consuming(bindings.declared())
    router = Router({"admin": frozenset({"superadmin"})}, bindings=bindings)
    return router, bindings


def test_a_subscription_holds_its_keys_and_a_removal_lets_them_go() -> None:
    router, bindings = _bound_router()
    alice = Client(uid="IDA")
    router.subscribe(alice, ["btcusd.trades", "order", "trade", "btcusd.ob-inc"])
    # One key per public stream, one for all of a user's private streams, none for the books.
    assert sorted(key for _, key in bindings.pending()) == ["*.btcusd.trades", "private.IDA.*"]
    router.remove(alice)
    bindings.expire()
    assert sorted(bindings.pending()) == [(False, "*.btcusd.trades"), (False, "private.IDA.*")]


def test_only_streams_the_request_would_add_wait_for_a_binding() -> None:
    router, bindings = _bound_router()
    anonymous, admin = Client(), Client(uid="IDB", role="superadmin")
    # Anonymous private streams, refused prefixed ones, invalid names and books bind nothing.
    assert router.unbound_keys(anonymous, ["order", "admin.m.sys", "\ud800", "m.ob-inc"]) == []
    assert router.unbound_keys(admin, ["admin.m.sys", "order"]) == ["admin.m.sys", "private.IDB.*"]
    router.subscribe(anonymous, ["m.trades"])
    for _ in bindings.pending():
        bindings.confirmed()
    assert router.unbound_keys(anonymous, ["m.trades"]) == []  # held already
    assert router.unbound_keys(Client(), ["m.trades"]) == []  # bound already


def test_no_wait_without_bindings_or_while_the_broker_is_away() -> None:
    assert Router({}).unbound_keys(Client(), ["m.trades"]) == []
    router, bindings = _bound_router()
    bindings.lost()
    assert router.unbound_keys(Client(), ["m.trades"]) == []


def test_an_unbound_key_drops_the_order_book_it_fed_once_nobody_reads_it() -> None:
    router, _ = _bound_router()
    publish(router, "public.m.x-snap", '{"sequence":1}')
    reader = Client()
    router.subscribe(reader, ["m.x-inc"])
    router.unbound("public.m.x-inc")  # e.g. a prefixed "public.m.x-inc" stream let go of it
    assert cached_book(router, "m.x-inc") != []  # still read: still fed by "*.m.x-inc"
    router.remove(reader)
    router.unbound("*.m.x-snap")
    assert cached_book(router, "m.x-inc") == []
    router.unbound("*.m.trades")  # feeds no book: nothing happens

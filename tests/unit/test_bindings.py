"""The queue's bindings as a pure state machine: keys per stream, holds, waits, replies, losses."""

from __future__ import annotations

import pytest

from ranger_py.bindings import ALL_KEYS, STATIC_KEYS, Bindings, binding_keys, book_topic
from ranger_py.protocol import StreamKind

PUBLIC, PRIVATE, PREFIXED = StreamKind.PUBLIC, StreamKind.PRIVATE, StreamKind.PREFIXED


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _bindings(
    delay: float = 30.0, static: tuple[str, ...] = STATIC_KEYS
) -> tuple[Bindings, Clock, list[str]]:
    """Bindings consuming on a first connection, their clock, and the keys they said unbound."""
    clock = Clock()
    unbound: list[str] = []
    bindings = Bindings(static, delay, on_unbound=unbound.append, clock=clock)
    bindings.consuming(bindings.declared())
    return bindings, clock, unbound


def _reply_all(bindings: Bindings) -> list[tuple[bool, str]]:
    """Send what is pending and answer every op, as the broker does, in order."""
    ops = bindings.pending()
    for _ in ops:
        bindings.confirmed()
    return ops


@pytest.mark.parametrize(
    ("kind", "name", "uid", "keys"),
    [
        (PUBLIC, "btcusd.trades", "", ("*.btcusd.trades",)),
        (PUBLIC, "btcusd.kline-1m", "U1", ("*.btcusd.kline-1m",)),
        (PUBLIC, "btcusd.ob-inc", "", ("*.btcusd.ob-inc", "*.btcusd.ob-snap")),
        (PUBLIC, "global.tickers", "", ("*.global.tickers", "global.tickers")),
        (PUBLIC, "public.tickers", "", ("*.public.tickers", "public.tickers")),
        (PUBLIC, "a.b.c.d", "", ()),  # 3+ dots: nothing is ever routed to it
        (PRIVATE, "order", "ID123", ("private.ID123.*",)),
        (PRIVATE, "trade", "ID123", ("private.ID123.*",)),
        (PREFIXED, "admin.btcusd.sys", "", ("admin.btcusd.sys",)),
        (PREFIXED, "admin.btcusd.x-inc", "", ("admin.btcusd.x-inc", "admin.btcusd.x-snap")),
    ],
)
def test_each_stream_binds_the_keys_its_messages_are_published_under(
    kind: StreamKind, name: str, uid: str, keys: tuple[str, ...]
) -> None:
    assert binding_keys(kind, name, uid) == keys


def test_a_key_longer_than_an_amqp_short_string_is_never_bound() -> None:
    assert binding_keys(PRIVATE, "order", "u" * 250) == ()  # "private.<250>.*" is 260 bytes


@pytest.mark.parametrize(
    ("key", "topic"),
    [
        ("*.btcusd.x-inc", "btcusd.x-inc"),
        ("*.btcusd.x-snap", "btcusd.x-inc"),
        ("public.btcusd.x-inc", "btcusd.x-inc"),
        ("*.btcusd.trades", None),
        ("private.ID1.*", None),
        ("admin.btcusd.x-inc", None),
    ],
)
def test_the_order_book_a_key_feeds(key: str, topic: str | None) -> None:
    assert book_topic(key) == topic


def test_order_book_keys_and_everything_under_all_need_no_binding_of_their_own() -> None:
    bindings, _, _ = _bindings()
    assert bindings.covered("public.btcusd.ob-inc")
    assert bindings.covered("global.btcusd.ob-snap")
    assert bindings.covered("*.btcusd.ob-inc")  # a public stream's keys: public. and global.
    assert not bindings.covered("*.btcusd.x-inc")
    assert not bindings.covered("public.btcusd.trades")
    everything, _, _ = _bindings(static=ALL_KEYS)
    assert everything.covered("*.btcusd.trades") and everything.covered("private.U.*")
    everything.hold("*.btcusd.trades")
    assert everything.pending() == [] and everything.missing(["private.U.*"]) == []


def test_the_first_hold_binds_and_the_others_only_count() -> None:
    bindings, _, _ = _bindings()
    bindings.hold("*.btcusd.trades")
    bindings.hold("*.btcusd.trades")
    assert bindings.missing(["*.btcusd.trades"]) == ["*.btcusd.trades"]
    assert _reply_all(bindings) == [(True, "*.btcusd.trades")]
    assert bindings.missing(["*.btcusd.trades"]) == []
    assert len(bindings) == len(STATIC_KEYS) + 1


def test_the_last_release_unbinds_only_after_the_delay() -> None:
    bindings, clock, unbound = _bindings(delay=30.0)
    bindings.hold("*.m.e")
    _reply_all(bindings)
    bindings.release("*.m.e")
    clock.now += 29.0
    bindings.expire()
    assert bindings.pending() == []
    clock.now += 1.0
    bindings.expire()
    assert _reply_all(bindings) == [(False, "*.m.e")]
    assert unbound == ["*.m.e"]
    assert len(bindings) == len(STATIC_KEYS)


def test_a_key_held_again_within_the_delay_is_never_unbound() -> None:
    bindings, clock, _ = _bindings(delay=30.0)
    bindings.hold("*.m.e")
    _reply_all(bindings)
    bindings.release("*.m.e")
    clock.now += 20.0
    bindings.hold("*.m.e")  # churn: the same stream again
    clock.now += 60.0
    bindings.expire()
    assert bindings.pending() == []
    assert bindings.missing(["*.m.e"]) == []


def test_a_waiting_request_goes_ahead_when_its_last_key_is_confirmed() -> None:
    bindings, _, _ = _bindings()
    answered: list[str] = []
    keys = bindings.missing(["*.a.x", "*.b.x"])
    bindings.wait(keys, lambda: answered.append("subscribed"))
    assert bindings.pending() == [(True, "*.a.x"), (True, "*.b.x")]
    bindings.confirmed()
    assert answered == []
    bindings.confirmed()
    assert answered == ["subscribed"]


def test_the_wait_holds_its_keys_until_the_subscription_takes_them() -> None:
    bindings, clock, _ = _bindings(delay=0.0)

    def subscribe() -> None:
        bindings.hold("*.a.x")  # what the router does for the new subscription

    bindings.wait(bindings.missing(["*.a.x"]), subscribe)
    bindings.expire()
    assert _reply_all(bindings) == [(True, "*.a.x")]  # no unbind while it waited
    clock.now += 1.0
    bindings.expire()
    assert bindings.pending() == []  # the subscription holds it now


def test_a_request_refused_after_its_wait_lets_the_key_go() -> None:
    bindings, clock, _ = _bindings(delay=5.0)
    bindings.wait(bindings.missing(["*.a.x"]), lambda: None)  # e.g. too many streams
    _reply_all(bindings)
    clock.now += 5.0
    bindings.expire()
    assert bindings.pending() == [(False, "*.a.x")]


def test_unbind_then_bind_again_is_bound_only_by_the_later_reply() -> None:
    bindings, _, _ = _bindings(delay=0.0)
    bindings.hold("*.a.x")
    _reply_all(bindings)
    bindings.release("*.a.x")
    bindings.expire()
    assert bindings.pending() == [(False, "*.a.x")]  # sent, not answered yet
    bindings.hold("*.a.x")
    assert bindings.missing(["*.a.x"]) == ["*.a.x"]
    assert bindings.pending() == [(True, "*.a.x")]
    bindings.confirmed()  # the unbind's reply
    assert bindings.missing(["*.a.x"]) == ["*.a.x"]
    bindings.confirmed()  # the bind's
    assert bindings.missing(["*.a.x"]) == []


def test_an_unbind_not_sent_yet_is_cancelled_by_a_new_hold() -> None:
    bindings, _, unbound = _bindings(delay=0.0)
    bindings.hold("*.a.x")
    _reply_all(bindings)
    bindings.release("*.a.x")
    bindings.expire()  # scheduled, not sent
    bindings.hold("*.a.x")
    assert bindings.pending() == [(True, "*.a.x")]  # idempotent at the broker
    assert unbound == []


def test_nothing_waits_while_the_broker_connection_is_down() -> None:
    bindings, _, _ = _bindings()
    bindings.lost()
    bindings.hold("*.a.x")
    assert bindings.missing(["*.a.x"]) == []
    assert bindings.pending() == []
    assert len(bindings) == 0


def test_a_lost_connection_lets_every_waiting_request_go_ahead() -> None:
    bindings, _, _ = _bindings()
    answered: list[int] = []
    bindings.wait(bindings.missing(["*.a.x"]), lambda: answered.append(1))
    bindings.wait(bindings.missing(["*.a.x", "*.b.x"]), lambda: answered.append(2))
    bindings.pending()
    bindings.lost()
    assert sorted(answered) == [1, 2]


def test_a_new_connection_declares_exactly_the_wanted_keys_and_unbinds_the_rest() -> None:
    bindings, clock, _ = _bindings(delay=0.0)
    for key in ("*.a.x", "*.b.x", "*.c.x"):
        bindings.hold(key)
    _reply_all(bindings)
    bindings.lost()
    # While disconnected, one stream is left and another taken.
    bindings.release("*.a.x")
    bindings.hold("*.d.x")
    clock.now += 1.0
    bindings.expire()
    declared = bindings.declared()
    assert declared == [*STATIC_KEYS, "*.b.x", "*.c.x", "*.d.x"]
    bindings.consuming(declared)
    # The queue outlived the connection: it may still hold "*.a.x".
    assert _reply_all(bindings) == [(False, "*.a.x")]
    assert bindings.missing(["*.b.x", "*.c.x", "*.d.x"]) == []
    assert len(bindings) == len(STATIC_KEYS) + 3


def test_a_key_released_while_the_queue_was_declared_is_unbound_once_consuming() -> None:
    bindings, clock, _ = _bindings(delay=0.0)
    bindings.hold("*.a.x")
    _reply_all(bindings)
    bindings.lost()
    declared = bindings.declared()
    bindings.release("*.a.x")  # another greenlet, while kombu declared
    bindings.hold("*.b.x")
    clock.now += 1.0
    bindings.expire()
    bindings.consuming(declared)
    assert sorted(_reply_all(bindings)) == [(False, "*.a.x"), (True, "*.b.x")]


def test_a_reply_that_is_not_ours_changes_nothing() -> None:
    bindings, _, _ = _bindings()
    bindings.confirmed()  # nothing sent
    assert len(bindings) == len(STATIC_KEYS)

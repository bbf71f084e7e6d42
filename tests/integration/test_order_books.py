"""Order-book snapshots and increments end to end (PROTOCOL §6, Ruby router_spec cases 10-12)."""

from __future__ import annotations

from .harness import Connect, Server, ServerPool, unique
from .scrape import key, wait_for_figures
from .wsclient import subscribed

SNAP = (
    '{"asks":[["12.0","1.0"],["14.0","1.0"]],"bids":[["11.0","2.0"],["10.0","2.0"]],"sequence":1}'
)
RESYNCS = "ranger_orderbook_resyncs_total"
DROPPED = "ranger_messages_dropped_total"


def _snap(sequence: int) -> str:
    return SNAP.replace('"sequence":1', f'"sequence":{sequence}')


def _inc(sequence: int, price: str = "10.0") -> str:
    return f'{{"asks":["{price}","5.0"],"sequence":{sequence}}}'


def test_new_subscriber_gets_snapshot_then_increments_then_reply(
    server: Server, connect: Connect
) -> None:
    market = unique()
    inc, snap = f"{market}.ob-inc", f"{market}.ob-snap"
    server.publish(f"public.{market}.ob-inc", _inc(0))  # before any snapshot: dropped
    server.publish(f"public.{market}.ob-snap", SNAP)
    server.publish(f"public.{market}.ob-inc", _inc(2))
    server.publish(f"public.{market}.ob-inc", _inc(3, "11.0"))
    server.sync()

    at_connect = connect(server, f"/public?stream={inc}")
    assert at_connect.recv_many(4) == [
        f'{{"{snap}":{SNAP}}}',
        f'{{"{inc}":{_inc(2)}}}',
        f'{{"{inc}":{_inc(3, "11.0")}}}',
        subscribed(inc),
    ]
    server.publish(f"public.{market}.ob-inc", _inc(4))
    assert at_connect.recv() == f'{{"{inc}":{_inc(4)}}}'

    later = connect(server, "/public")
    assert later.recv() == subscribed()
    later.send(f'{{"event":"subscribe","streams":["{inc}"]}}')
    assert later.recv_many(5) == [
        f'{{"{snap}":{SNAP}}}',
        f'{{"{inc}":{_inc(2)}}}',
        f'{{"{inc}":{_inc(3, "11.0")}}}',
        f'{{"{inc}":{_inc(4)}}}',
        subscribed(inc),
    ]
    # Already subscribed: no replay (Ruby Ranger).
    assert later.subscribe(inc) == subscribed(inc)


def test_new_snapshot_is_not_broadcast_and_resets_increments(
    server: Server, connect: Connect
) -> None:
    market = unique()
    inc, snap = f"{market}.ob-inc", f"{market}.ob-snap"
    server.publish(f"public.{market}.ob-snap", SNAP)
    server.publish(f"public.{market}.ob-inc", _inc(2))
    server.sync()
    client = connect(server, f"/?stream={inc}")
    assert client.recv_many(3) == [
        f'{{"{snap}":{SNAP}}}',
        f'{{"{inc}":{_inc(2)}}}',
        subscribed(inc),
    ]

    # In sequence: Peatio's snapshot carries the sequence of the last change it includes.
    second = _snap(2)
    server.publish(f"public.{market}.ob-snap", second)
    server.publish(f"public.{market}.ob-inc", _inc(3))
    assert client.recv() == f'{{"{inc}":{_inc(3)}}}'

    newcomer = connect(server, f"/?stream={inc}")
    assert newcomer.recv_many(3) == [
        f'{{"{snap}":{second}}}',
        f'{{"{inc}":{_inc(3)}}}',
        subscribed(inc),
    ]


def test_increment_before_any_snapshot_is_dropped(server: Server, connect: Connect) -> None:
    market = unique()
    inc, snap = f"{market}.ob-inc", f"{market}.ob-snap"
    client = connect(server, f"/?stream={inc}")
    assert client.recv() == subscribed(inc)
    server.publish(f"public.{market}.ob-inc", _inc(5))
    # A subscriber that came before any snapshot gets the first one live (Ruby Ranger's rule,
    # kept on purpose: the increments that follow are useless without it); later snapshots are
    # only cached (Rango and Ranger).
    server.publish(f"public.{market}.ob-snap", SNAP)
    server.publish(f"public.{market}.ob-inc", _inc(2))
    server.publish(f"public.{market}.ob-snap", _snap(2))
    assert client.recv_many(2) == [f'{{"{snap}":{SNAP}}}', f'{{"{inc}":{_inc(2)}}}']
    client.unsubscribe(inc)
    server.publish(f"public.{market}.ob-inc", _inc(3))
    server.sync()
    assert client.subscribe(inc) == f'{{"{snap}":{_snap(2)}}}'
    assert client.recv_many(2) == [f'{{"{inc}":{_inc(3)}}}', subscribed(inc)]


def test_snapshot_stream_itself_receives_nothing(server: Server, connect: Connect) -> None:
    market = unique()
    client = connect(server, f"/?stream={market}.ob-snap&stream={market}.trades")
    assert client.recv() == subscribed(f"{market}.ob-snap", f"{market}.trades")
    server.publish(f"public.{market}.ob-snap", SNAP)
    server.publish(f"public.{market}.trades", '{"sentinel":1}')
    assert client.recv() == f'{{"{market}.trades":{{"sentinel":1}}}}'


def test_any_snap_inc_pair_is_cached(pool: ServerPool, connect: Connect) -> None:
    # With broker-side routing, other books than Peatio's are kept bound, and so cached, when named.
    server = pool.shared(
        {"RANGER_BROKER_ROUTING": "subscribed", "RANGER_BROKER_BOOKS": "ob,object"}
    )
    market = unique()
    server.publish(f"public.{market}.object-snap", "[1,2,3]")
    server.publish(f"public.{market}.object-inc", "[4]")
    server.sync()
    client = connect(server, f"/?stream={market}.object-inc")
    assert client.recv_many(3) == [
        f'{{"{market}.object-snap":[1,2,3]}}',
        f'{{"{market}.object-inc":[4]}}',
        subscribed(f"{market}.object-inc"),
    ]


def test_book_past_its_bound_is_dropped_until_next_snapshot(
    pool: ServerPool, connect: Connect
) -> None:
    server = pool.shared({"RANGER_ORDERBOOK_MAX_INCREMENTS": "3"})
    market = unique()
    inc, snap = f"{market}.ob-inc", f"{market}.ob-snap"
    server.publish(f"public.{market}.ob-snap", SNAP)
    for sequence in range(2, 6):  # four increments, one past the bound
        server.publish(f"public.{market}.ob-inc", _inc(sequence))
    server.sync()
    warnings = [line for line in server.log_text().splitlines() if "WARNING" in line]
    assert any(inc in line for line in warnings), "no warning names the dropped book"
    assert connect(server, f"/?stream={inc}").recv() == subscribed(inc)  # nothing to replay

    server.publish(f"public.{market}.ob-snap", SNAP)
    server.publish(f"public.{market}.ob-inc", _inc(2))
    server.sync()
    assert connect(server, f"/?stream={inc}").recv_many(3) == [
        f'{{"{snap}":{SNAP}}}',
        f'{{"{inc}":{_inc(2)}}}',
        subscribed(inc),
    ]


def test_a_book_out_of_sequence_is_not_replayed_until_its_next_snapshot(
    server: Server, connect: Connect
) -> None:
    market = unique()
    inc, snap = f"{market}.ob-inc", f"{market}.ob-snap"
    before = server.scrape()
    current = connect(server, f"/?stream={inc}")
    assert current.recv() == subscribed(inc)
    server.publish(f"public.{market}.ob-snap", _snap(1))
    server.publish(f"public.{market}.ob-inc", _inc(2))
    server.publish(f"public.{market}.ob-inc", _inc(4))  # 3 lost upstream
    assert current.recv_many(3) == [
        f'{{"{snap}":{_snap(1)}}}',
        f'{{"{inc}":{_inc(2)}}}',
        f'{{"{inc}":{_inc(4)}}}',
    ]
    server.sync()
    late = connect(server, f"/?stream={inc}")
    assert late.recv() == subscribed(inc)  # no snapshot, no increments: the book is broken

    server.publish(f"public.{market}.ob-snap", _snap(10))
    server.publish(f"public.{market}.ob-inc", _inc(11))
    server.publish(f"public.{market}.ob-inc", _inc(11))  # a duplicate: dropped
    server.publish(f"public.{market}.ob-inc", _inc(12))
    for client in (current, late):
        assert client.recv_many(3) == [
            f'{{"{snap}":{_snap(10)}}}',
            f'{{"{inc}":{_inc(11)}}}',
            f'{{"{inc}":{_inc(12)}}}',
        ]
    assert connect(server, f"/?stream={inc}").recv_many(4) == [
        f'{{"{snap}":{_snap(10)}}}',
        f'{{"{inc}":{_inc(11)}}}',
        f'{{"{inc}":{_inc(12)}}}',
        subscribed(inc),
    ]
    wait_for_figures(
        server.scrape,
        {
            key(RESYNCS, reason="gap"): before.value(RESYNCS, reason="gap") + 1,
            key(DROPPED, reason="duplicate"): before.value(DROPPED, reason="duplicate") + 1,
        },
    )


def test_a_restarted_publishers_snapshot_goes_live(server: Server, connect: Connect) -> None:
    market = unique()
    inc, snap = f"{market}.ob-inc", f"{market}.ob-snap"
    before = server.scrape()
    server.publish(f"public.{market}.ob-snap", _snap(500))
    server.publish(f"public.{market}.ob-inc", _inc(501))
    server.sync()
    client = connect(server, f"/?stream={inc}")
    assert client.recv_many(3) == [
        f'{{"{snap}":{_snap(500)}}}',
        f'{{"{inc}":{_inc(501)}}}',
        subscribed(inc),
    ]
    server.publish(f"public.{market}.ob-snap", _snap(1))  # the engine counts from the start
    server.publish(f"public.{market}.ob-inc", _inc(2))
    assert client.recv_many(2) == [f'{{"{snap}":{_snap(1)}}}', f'{{"{inc}":{_inc(2)}}}']
    wait_for_figures(
        server.scrape, {key(RESYNCS, reason="restart"): before.value(RESYNCS, reason="restart") + 1}
    )


def test_a_book_not_kept_bound_is_cached_once_a_client_holds_it(
    pool: ServerPool, connect: Connect
) -> None:
    server = pool.shared({"RANGER_BROKER_ROUTING": "subscribed"})
    market = unique()
    server.publish(f"public.{market}.object-snap", "[1,2,3]")  # bound by nobody: not cached
    server.sync()
    first = connect(server, f"/?stream={market}.object-inc")
    assert first.recv() == subscribed(f"{market}.object-inc")
    server.publish(f"public.{market}.object-snap", "[5]")  # no book yet: sent live (§6)
    server.publish(f"public.{market}.object-inc", "[6]")
    assert first.recv_many(2) == [
        f'{{"{market}.object-snap":[5]}}',
        f'{{"{market}.object-inc":[6]}}',
    ]
    later = connect(server, f"/?stream={market}.object-inc")
    assert later.recv_many(3) == [
        f'{{"{market}.object-snap":[5]}}',
        f'{{"{market}.object-inc":[6]}}',
        subscribed(f"{market}.object-inc"),
    ]

"""Public streams end to end (PROTOCOL §4-§5), with Ruby Ranger's web_socket_spec cases 17-19."""

from __future__ import annotations

import json

from .harness import Connect, Server, unique
from .tokens import SigningKey
from .wsclient import subscribed, unsubscribed


def _order(market: str, n: int) -> str:
    return f'{{"{market}.order":{{"key":"{market}_order_{n}"}}}}'


def test_subscribe_then_receive_a_trade(server: Server, connect: Connect) -> None:
    market = unique()
    client = connect(server)
    assert client.recv() == subscribed()
    assert client.subscribe(f"{market}.trades") == subscribed(f"{market}.trades")
    body = '{"trades":[{"tid":1,"taker_type":"buy","date":1700000000,"price":"1.5","amount":"2"}]}'
    server.publish(f"public.{market}.trades", body)
    assert client.recv() == f'{{"{market}.trades":{body}}}'


def test_ruby_case_17_anonymous_query_stream_gets_only_its_stream(
    server: Server, connect: Connect
) -> None:
    market, other = unique(), unique()
    client = connect(server, f"/?stream={market}.order")
    assert client.recv() == subscribed(f"{market}.order")
    for n in (1, 2, 3):
        server.publish(f"public.{market}.order", {"key": f"{market}_order_{n}"})
    server.publish(f"public.{market}.trade", {"key": "trade"})
    server.publish(f"public.{other}.order", {"key": "other"})
    # A fourth message after the others: anything leaked would arrive before it.
    server.publish(f"public.{market}.order", {"key": f"{market}_order_4"})
    assert client.recv_many(4) == [_order(market, n) for n in (1, 2, 3, 4)]


def test_ruby_case_18_subscribe_message_then_messages(server: Server, connect: Connect) -> None:
    market = unique()
    client = connect(server, "/")
    assert client.recv() == subscribed()
    assert client.subscribe(f"{market}.order") == subscribed(f"{market}.order")
    for n in (1, 2, 3):
        server.publish(f"public.{market}.order", {"key": f"{market}_order_{n}"})
    assert client.recv_many(3) == [_order(market, n) for n in (1, 2, 3)]


def test_ruby_case_19_unsubscribe_stops_delivery(server: Server, connect: Connect) -> None:
    market, sentinel = unique(), unique()
    client = connect(server, f"/?stream={market}.order")
    assert client.recv() == subscribed(f"{market}.order")
    assert client.unsubscribe(f"{market}.order") == unsubscribed()
    assert client.subscribe(f"{sentinel}.order") == subscribed(f"{sentinel}.order")
    server.publish(f"public.{market}.order", {"key": "late"})
    server.publish(f"public.{sentinel}.order", {"key": "sentinel"})
    assert client.recv() == f'{{"{sentinel}.order":{{"key":"sentinel"}}}}'


def test_query_streams_repeated_parameter(server: Server, connect: Connect) -> None:
    a, b = f"{unique()}.trades", f"{unique()}.trades"
    client = connect(server, f"/public?stream={a}&stream={b}")
    assert client.recv() == subscribed(a, b)
    server.publish(f"public.{b}", '{"n":1}')
    server.publish(f"public.{a}", '{"n":2}')
    assert client.recv_many(2) == [f'{{"{b}":{{"n":1}}}}', f'{{"{a}":{{"n":2}}}}']


def test_query_streams_comma_list(server: Server, connect: Connect) -> None:
    a, b = f"{unique()}.trades", f"{unique()}.kline-1m"
    client = connect(server, f"/public?stream={a},{b}")
    assert client.recv() == subscribed(a, b)
    server.publish(f"public.{b}", "[1700000000,1,2,0.5,1.5,10]")
    assert client.recv() == f'{{"{b}":[1700000000,1,2,0.5,1.5,10]}}'


def test_query_streams_decoded_empty_skipped_others_ignored(
    server: Server, connect: Connect
) -> None:
    market = unique()
    client = connect(
        server, f"/?foo=bar&stream={market}%2Etrades&stream=&stream={market}.order&x=stream"
    )
    assert client.recv() == subscribed(f"{market}.trades", f"{market}.order")


def test_global_tickers_from_both_routing_key_forms(server: Server, connect: Connect) -> None:
    client = connect(server, "/public?stream=global.tickers")
    assert client.recv() == subscribed("global.tickers")
    tickers = {"btcusd": {"at": "1700000000", "last": "1000.0", "price_change_percent": "+1.25%"}}
    body = json.dumps(tickers, separators=(",", ":"))
    server.publish("public.global.tickers", body)
    # The 2-word key global.<e> is topic global.<e> (Rango).
    server.publish("global.tickers", '{"two":"words"}')
    assert client.recv_many(2) == [
        f'{{"global.tickers":{body}}}',
        '{"global.tickers":{"two":"words"}}',
    ]


def test_global_scope_routes_like_public(server: Server, connect: Connect) -> None:
    market = unique()
    client = connect(server, f"/?stream={market}.trades")
    assert client.recv() == subscribed(f"{market}.trades")
    server.publish(f"global.{market}.trades", '{"scope":"global"}')
    assert client.recv() == f'{{"{market}.trades":{{"scope":"global"}}}}'


def test_body_forwarded_byte_for_byte(server: Server, connect: Connect) -> None:
    market = unique()
    client = connect(server, f"/?stream={market}.trades")
    assert client.recv() == subscribed(f"{market}.trades")
    # Key order, 1000.0, big integers, spacing, escapes and raw UTF-8 all kept (PROTOCOL §5).
    body = (
        '{"z": 1, "a":1000.0,"price":"1000.0","big":123456789012345678901234567890,'
        '"e":1E+2,"s":"caf\\u00e9 café \\/ \\"q\\"","n":[0.10,-0.0]}'
    )
    server.publish(f"public.{market}.trades", body.encode())
    assert client.recv() == f'{{"{market}.trades":{body}}}'


def test_invalid_json_body_is_dropped(server: Server, connect: Connect) -> None:
    market = unique()
    client = connect(server, f"/?stream={market}.trades")
    assert client.recv() == subscribed(f"{market}.trades")
    server.publish(f"public.{market}.trades", b"{not json")
    server.publish(f"public.{market}.trades", b"\xff\xfe")
    server.publish(f"public.{market}.trades", '{"ok":true}')
    assert client.recv() == f'{{"{market}.trades":{{"ok":true}}}}'


def test_one_message_reaches_every_subscriber(server: Server, connect: Connect) -> None:
    market = unique()
    clients = [connect(server, f"/?stream={market}.trades") for _ in range(5)]
    for client in clients:
        assert client.recv() == subscribed(f"{market}.trades")
    server.publish(f"public.{market}.trades", '{"n":1}')
    for client in clients:
        assert client.recv() == f'{{"{market}.trades":{{"n":1}}}}'


def test_subscription_list_order_and_no_duplicates(
    server: Server, connect: Connect, rsa: SigningKey
) -> None:
    a, b, c = f"{unique()}.trades", f"{unique()}.trades", f"{unique()}.trades"
    client = connect(server, "/public", headers={"Authorization": rsa.bearer(unique("ID"))})
    assert client.recv() == subscribed()
    # Public and prefixed in first-subscribed order, then private (PROTOCOL §4).
    assert client.subscribe("order", a, "trade", b) == subscribed(a, b, "order", "trade")
    assert client.subscribe(b, c, "order", a) == subscribed(a, b, c, "order", "trade")
    assert client.unsubscribe("nothing.here", "unknown") == unsubscribed(a, b, c, "order", "trade")
    assert client.unsubscribe(a, "order") == unsubscribed(b, c, "trade")

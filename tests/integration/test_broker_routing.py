"""RabbitMQ routes (RANGER_BROKER_ROUTING=subscribed): each worker's queue is bound only to what
its clients hold, and a subscription misses nothing published after its reply.

What the broker holds is read with ``rabbitmqctl list_bindings`` in the test vhost; what a worker
received, from ``ranger_messages_received_total``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest

from ranger_py.bindings import STATIC_KEYS

from .broker import Broker
from .harness import Connect, Server, ServerPool, StartServer, unique, wait_until
from .tcp_proxy import TcpProxy
from .tokens import SigningKey
from .wsclient import subscribed, unsubscribed

ROUTED = {"RANGER_BROKER_ROUTING": "subscribed"}
RECEIVED = "ranger_messages_received_total"
BINDINGS = "ranger_broker_bindings"


@pytest.fixture
def proxy(broker: Broker) -> Iterator[TcpProxy]:
    proxy = TcpProxy(broker.host, broker.port)
    yield proxy
    proxy.close()


def _keys(broker: Broker, server: Server) -> set[str]:
    """The routing keys of the server's one worker queue."""
    queues = broker.bindings(server.exchange)
    assert len(queues) == 1, queues
    return next(iter(queues.values()))


def test_a_queue_is_bound_to_what_its_clients_hold_and_the_order_books(
    start_server: StartServer, connect: Connect, broker: Broker, rsa: SigningKey
) -> None:
    server = start_server({**ROUTED, "JWT_PUBLIC_KEY": rsa.public_env}, name="routing")
    assert _keys(broker, server) == set(STATIC_KEYS)
    market, uid = unique(), unique("ID")
    trades = connect(server, f"/public?stream={market}.trades&stream=global.tickers")
    assert trades.recv() == subscribed(f"{market}.trades", "global.tickers")
    owner = connect(
        server, "/private?stream=order&stream=trade", headers={"Authorization": rsa.bearer(uid)}
    )
    assert owner.recv() == subscribed("order", "trade")
    expected = {
        *STATIC_KEYS,
        f"*.{market}.trades",
        "*.global.tickers",
        "global.tickers",
        f"private.{uid}.*",
    }
    assert _keys(broker, server) == expected
    wait_until(
        lambda: server.scrape().value(BINDINGS) == len(expected),
        timeout=5,
        what="the bindings gauge (flushed once a second)",
    )


def test_a_worker_receives_only_what_its_clients_subscribed_to(
    start_server: StartServer, connect: Connect
) -> None:
    server = start_server(ROUTED, name="routing")
    watched, ignored = unique(), unique()
    client = connect(server, f"/public?stream={watched}.trades")
    assert client.recv() == subscribed(f"{watched}.trades")
    before = server.scrape().value(RECEIVED)
    for n in range(50):
        server.publish(f"public.{ignored}.trades", {"n": n})
        server.publish(f"private.{unique('ID')}.order", {"n": n})
    server.publish(f"public.{watched}.trades", {"n": 0})
    assert client.recv() == f'{{"{watched}.trades":{{"n":0}}}}'
    wait_until(
        lambda: server.scrape().value(RECEIVED) >= before + 1,
        timeout=5,
        what="the received counter",
    )
    # The broker kept the 100 others away: one message reached the worker.
    assert server.scrape().value(RECEIVED) == before + 1


def test_nothing_published_after_the_reply_is_lost_under_churn(
    start_server: StartServer, connect: Connect
) -> None:
    # No debounce: every unsubscribe really unbinds, every subscribe binds again.
    server = start_server({**ROUTED, "RANGER_BROKER_UNBIND_DELAY": "0"}, name="churn")
    clients = [connect(server, "/public") for _ in range(4)]
    for client in clients:
        assert client.recv() == subscribed()
    failures: list[str] = []
    done: list[int] = []
    publishing = threading.Lock()  # one publisher connection for the four threads

    def churn(index: int) -> None:
        client = clients[index]
        for n in range(40):
            # A stream no worker holds yet, every round: each subscribe needs a new binding.
            stream = f"{unique()}.trades"
            assert client.subscribe(stream) == subscribed(stream)
            with publishing:
                server.publish(f"public.{stream}", {"n": n})  # right after the reply
            assert json.loads(client.recv()) == {stream: {"n": n}}, (index, n)
            assert client.unsubscribe(stream) == unsubscribed()
        done.append(index)

    def run(index: int) -> None:
        try:
            churn(index)
        except BaseException as exc:  # reported by the test thread
            failures.append(f"client {index}: {exc!r}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert failures == []
    assert sorted(done) == [0, 1, 2, 3]


def test_an_unsubscribed_stream_stays_bound_for_the_delay(
    start_server: StartServer, connect: Connect, broker: Broker
) -> None:
    server = start_server({**ROUTED, "RANGER_BROKER_UNBIND_DELAY": "2"}, name="debounce")
    stream = f"{unique()}.trades"
    client = connect(server, f"/public?stream={stream}")
    assert client.recv() == subscribed(stream)
    assert client.unsubscribe(stream) == unsubscribed()
    assert f"*.{stream}" in _keys(broker, server)  # not yet
    wait_until(
        lambda: f"*.{stream}" not in _keys(broker, server),
        timeout=10,
        what="the unbinding after RANGER_BROKER_UNBIND_DELAY",
    )


def test_requests_sent_during_the_wait_are_answered_in_order(
    pool: ServerPool, connect: Connect
) -> None:
    server = pool.shared(ROUTED)
    client = connect(server, "/public")
    assert client.recv() == subscribed()
    a, b = f"{unique()}.trades", f"{unique()}.trades"
    for message in (
        json.dumps({"event": "subscribe", "streams": [a]}),  # waits for its binding
        "ping",
        json.dumps({"event": "subscribe", "streams": [b]}),  # and this one for its own
        json.dumps({"event": "unsubscribe", "streams": [a]}),
    ):
        client.send(message)
    assert client.recv_many(4) == [
        subscribed(a),
        "pong",
        subscribed(a, b),
        unsubscribed(b),
    ]


def test_a_reconnect_declares_exactly_the_current_bindings(
    start_server: StartServer, proxy: TcpProxy, connect: Connect, broker: Broker
) -> None:
    server = start_server(
        {**ROUTED, "RANGER_BROKER_UNBIND_DELAY": "0"},
        rabbitmq=("127.0.0.1", proxy.port),
        name="redeclare",
    )
    kept, left, new = (f"{unique()}.trades" for _ in range(3))
    client = connect(server, f"/public?stream={kept}&stream={left}")
    assert client.recv() == subscribed(kept, left)
    proxy.cut()
    wait_until(
        lambda: (r := server.readyz()) is not None and r.status == 503,
        timeout=30,
        what="/readyz 503 once the broker connection is cut",
    )
    # While the worker cannot reach the broker: one stream left, one taken (answered at once).
    assert client.unsubscribe(left) == unsubscribed(kept)
    assert client.subscribe(new) == subscribed(kept, new)
    proxy.restore()
    wait_until(
        lambda: (r := server.readyz()) is not None and r.status == 200,
        timeout=60,
        what="/readyz 200 after the cut",
    )
    wait_until(
        lambda: _keys(broker, server) == {*STATIC_KEYS, f"*.{kept}", f"*.{new}"},
        timeout=10,
        what="the queue bound to exactly the current streams",
    )
    for stream in (left, kept, new):
        server.publish(f"public.{stream}", {"s": stream})
    assert [json.loads(frame) for frame in client.recv_many(2)] == [
        {kept: {"s": kept}},
        {new: {"s": new}},
    ]
    client.assert_alive()

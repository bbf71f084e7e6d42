"""The gateway's broker connection drops or freezes; Peatio keeps publishing (PROTOCOL §5).

The server reaches RabbitMQ through a proxy the test can cut (the connection drops, reconnects are
refused) or freeze (the connection stays open, nothing crosses it, as behind a dead load balancer);
the publisher talks to the broker directly, as Peatio does, and never stops. The worker's queue
outlives the blip, so every message published before, during and after it reaches every
subscriber exactly once, in order.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from .broker import Broker
from .harness import Connect, Server, StartServer, unique, wait_until
from .tcp_proxy import TcpProxy
from .tokens import SigningKey
from .wsclient import Client, subscribed

# Messages per second on each stream while the blip lasts.
RATE = 20.0


@pytest.fixture
def proxy(broker: Broker) -> Iterator[TcpProxy]:
    proxy = TcpProxy(broker.host, broker.port)
    yield proxy
    proxy.close()


class Feed:
    """Publishes numbered messages on a public and a private stream until stopped."""

    def __init__(self, server: Server, public: str, uid: str) -> None:
        self._server = server
        self._keys = (f"public.{public}", f"private.{uid}.order")
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Feed:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            for key in self._keys:
                self._server.publish(key, {"n": self.sent})
            self.sent += 1
            # Paced by a schedule (message n is due at start + n / RATE), not by a fixed sleep.
            self._stop.wait(max(0.0, start + self.sent / RATE - time.monotonic()))


def _numbers(client: Client, stream: str, count: int) -> list[int]:
    frames = client.recv_many(count, timeout=60)
    return [json.loads(frame)[stream]["n"] for frame in frames]


def _through_a_blip(
    start_server: StartServer,
    proxy: TcpProxy,
    connect: Connect,
    rsa: SigningKey,
    blip: Callable[[Server], None],
) -> None:
    server = start_server(
        {"JWT_PUBLIC_KEY": rsa.public_env}, rabbitmq=("127.0.0.1", proxy.port), name="blips"
    )
    public = f"{unique()}.trades"
    uid = unique("ID")
    watcher = connect(server, f"/public?stream={public}")
    owner = connect(server, "/private?stream=order", headers={"Authorization": rsa.bearer(uid)})
    assert watcher.recv() == subscribed(public)
    assert owner.recv() == subscribed("order")
    with Feed(server, public, uid) as feed:
        wait_until(lambda: feed.sent >= 20, timeout=10, what="a second of messages")
        blip(server)
        wait_until(
            lambda: (r := server.readyz()) is not None and r.status == 200,
            timeout=60,
            what="/readyz 200 after the blip",
        )
        sent_at_recovery = feed.sent
        wait_until(lambda: feed.sent >= sent_at_recovery + 20, timeout=10, what="a second more")
    total = feed.sent
    expected = list(range(total))
    # Exactly once, in order: the list is compared whole, so a gap, a repeat or a swap fails.
    assert _numbers(watcher, public, total) == expected
    assert _numbers(owner, "order", total) == expected
    # Nothing after them either: a ping is answered after whatever was already queued.
    watcher.assert_alive()
    owner.assert_alive()
    wait_until(
        lambda: server.scrape().value("ranger_broker_reconnects_total") == 1,
        timeout=5,
        what="the reconnect in the metrics (flushed once a second)",
    )
    scrape = server.scrape()
    # What the broker pushed again is counted, and never more dropped than pushed again.
    assert scrape.value("ranger_broker_duplicates_dropped_total") <= scrape.value(
        "ranger_broker_redelivered_total"
    )
    assert server.alive


def test_a_cut_of_10_s_loses_nothing_and_repeats_nothing(
    start_server: StartServer, proxy: TcpProxy, connect: Connect, rsa: SigningKey
) -> None:
    def cut(server: Server) -> None:
        proxy.cut()
        wait_until(
            lambda: (r := server.readyz()) is not None and r.status == 503,
            timeout=15,
            what="/readyz 503 during the cut",
        )
        time.sleep(10)  # the blip itself: how long the broker stays out of reach
        proxy.restore()

    _through_a_blip(start_server, proxy, connect, rsa, cut)


def test_a_freeze_of_30_s_loses_nothing_and_repeats_nothing(
    start_server: StartServer, proxy: TcpProxy, connect: Connect, rsa: SigningKey
) -> None:
    def freeze(server: Server) -> None:
        proxy.freeze()
        time.sleep(30)  # the blip itself: the frozen path is replaced meanwhile (heartbeats)
        proxy.restore()

    _through_a_blip(start_server, proxy, connect, rsa, freeze)

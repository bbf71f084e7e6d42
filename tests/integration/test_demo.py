"""The demo feed end to end: ``RANGER_DEMO=on`` without any broker, and ``ranger-py demo``
publishing to the real one (ranger_py.demo).

The demo server is started as users start it, with RABBITMQ_HOST/PORT pointing at a closed port:
it must not need them. The command runs as ``python -m ranger_py.demo`` with the configuration of
a server of the harness, so that server's clients see what it publishes.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from ranger_py.demo import DEMO_UID, MARKETS, Feed

from .harness import REPO, Connect, Server, ServerPool, StartServer, free_port, wait_until
from .tokens import SigningKey
from .wsclient import Client, subscribed

MARKET = MARKETS[0].name  # btcusd
INC, SNAP = f"{MARKET}.ob-inc", f"{MARKET}.ob-snap"
FEED_TIMEOUT = 15.0  # the in-server feed sends ~20 messages/s, tickers and orders about 1/s


@pytest.fixture(scope="module")
def demo_server(pool: ServerPool, rsa: SigningKey) -> Iterator[Server]:
    """A demo server; RabbitMQ settings name a port where nothing listens."""
    server = pool.new(
        {"RANGER_DEMO": "on", "JWT_PUBLIC_KEY": rsa.public_env},
        rabbitmq=("127.0.0.1", free_port()),
        name="demo",
    )
    try:
        yield server.start()
    finally:
        server.stop()


def frames(client: Client, timeout: float = FEED_TIMEOUT) -> Iterator[Any]:
    """The client's frames, parsed, for as long as the caller wants them."""
    while True:
        yield json.loads(client.recv(timeout))


def book_frames(client: Client, increments: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The snapshot a subscriber of INC gets, and the ``increments`` increments that follow.

    The subscribed reply comes after the replay of a cached book, or before the book's first
    snapshot if none was cached yet (then the snapshot arrives live); it is skipped.
    """
    reply = json.loads(subscribed(INC))
    stream = (frame for frame in frames(client) if frame != reply)
    first = next(stream)
    assert list(first) == [SNAP], first
    received = []
    for frame in stream:
        assert list(frame) == [INC], frame
        received.append(frame[INC])
        if len(received) == increments:
            break
    return first[SNAP], received


def assert_gap_free(snapshot: dict[str, Any], increments: list[dict[str, Any]]) -> None:
    sequences = [increment["sequence"] for increment in increments]
    start = snapshot["sequence"] + 1
    assert sequences == list(range(start, start + len(increments)))


# RANGER_DEMO=on


def test_demo_server_is_ready_without_any_broker(demo_server: Server) -> None:
    response = demo_server.http("/readyz")
    (worker,) = demo_server.worker_pids()
    assert (response.status, response.json()) == (200, {"status": "ready", "worker": worker})
    log = demo_server.log_text()
    assert log.count("demo mode, no broker") == 1
    assert "cannot connect to broker" not in log


def test_order_book_subscriber_gets_the_snapshot_then_gap_free_increments(
    demo_server: Server, connect: Connect
) -> None:
    client = connect(demo_server, f"/public?stream={INC}")
    snapshot, increments = book_frames(client, 30)
    assert snapshot["asks"] and snapshot["bids"]
    assert_gap_free(snapshot, increments)

    # A second subscriber, later, joins the same book: its replay and the live ones agree.
    later = connect(demo_server, "/public")
    assert later.recv() == subscribed()
    later.send(json.dumps({"event": "subscribe", "streams": [INC]}))
    snapshot, increments = book_frames(later, 10)
    assert_gap_free(snapshot, increments)


def test_tickers_subscriber_gets_every_market(demo_server: Server, connect: Connect) -> None:
    client = connect(demo_server, "/public?stream=global.tickers")
    assert client.recv() == subscribed("global.tickers")
    frame = next(frames(client))
    assert list(frame) == ["global.tickers"]
    tickers = frame["global.tickers"]
    assert set(tickers) == {market.name for market in MARKETS}
    assert {"last", "low", "high", "open", "volume", "price_change_percent", "at"} <= set(
        tickers[MARKET]
    )


def test_demo_user_gets_its_order_events(
    demo_server: Server, connect: Connect, rsa: SigningKey
) -> None:
    client = connect(
        demo_server, "/private?stream=order", headers={"Authorization": rsa.bearer(DEMO_UID)}
    )
    assert client.recv() == subscribed("order")
    frame = next(frames(client))
    assert list(frame) == ["order"]
    assert frame["order"]["market"] in {market.name for market in MARKETS}
    assert frame["order"]["state"] in ("wait", "done", "cancel")

    # Someone else's token hears nothing of the demo user's orders: the same server, another uid.
    other = connect(
        demo_server, "/private?stream=order", headers={"Authorization": rsa.bearer("IDOTHER00001")}
    )
    assert other.recv() == subscribed("order")
    next(frames(client))  # by now the demo user got another order event...
    with pytest.raises(AssertionError, match="no frame"):
        other.recv(timeout=0.2)  # ...which did not reach the other user


def test_demo_needs_one_worker(pool: ServerPool) -> None:
    server = pool.new({"RANGER_DEMO": "on", "WEB_CONCURRENCY": "2"}, name="demo-workers")
    server.start(wait=False)
    assert server.wait_exit() != 0
    assert "invalid configuration: RANGER_DEMO:" in server.log_text()
    assert "WEB_CONCURRENCY=1" in server.log_text()


# ranger-py demo, publishing to the real broker


def demo_command(env: Mapping[str, str], *args: str, **options: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ranger_py.demo", *args],
        cwd=REPO,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **options,
    )


def test_command_publishes_a_book_to_the_servers_exchange(
    start_server: StartServer, connect: Connect
) -> None:
    server = start_server()  # an exchange of its own in the session's vhost
    client = connect(server, f"/public?stream={INC}")
    assert client.recv() == subscribed(INC)  # subscribed before the first snapshot

    seed = 5
    command = demo_command(server.env, "--rate", "100", "--duration", "2", "--seed", str(seed))
    _, errors = command.communicate(timeout=60)
    assert command.returncode == 0, errors
    published = int(errors.rsplit("published ", 1)[1].split()[0])
    assert published > 100

    # The seed fixes the series: its first `published` messages hold this many increments of the
    # book (no second snapshot in 2 s: Peatio's rule waits at least 10 s).
    replay = Feed(random.Random(seed), lambda: 0.0)
    keys = [next(replay)[0] for _ in range(published)]
    expected = keys.count(f"public.{INC}")
    snapshot, increments = book_frames(client, expected)
    assert snapshot["sequence"] == 1
    assert_gap_free(snapshot, increments)


def test_command_reports_an_unreachable_broker(server: Server) -> None:
    env = {**server.env, "RABBITMQ_HOST": "127.0.0.1", "RABBITMQ_PORT": str(free_port())}
    command = demo_command(env, "--duration", "1")
    output, errors = command.communicate(timeout=60)
    assert command.returncode == 1
    assert output == ""
    lines = errors.splitlines()
    assert len(lines) == 1, errors
    assert lines[0].startswith("ranger-py demo: cannot reach the broker at amqp://guest:***@")


def test_command_stops_quietly_on_ctrl_c(start_server: StartServer) -> None:
    server = start_server()
    command = demo_command(server.env, "--rate", "50")
    try:
        assert command.stderr is not None
        started = command.stderr.readline()
        assert "Ctrl-C stops" in started
        wait_until(
            lambda: server.scrape().value("ranger_messages_received_total") > 0,
            timeout=10,
            what="the server receiving the command's messages",
        )
        command.send_signal(signal.SIGINT)
        _, errors = command.communicate(timeout=30)
    finally:
        if command.poll() is None:
            command.kill()
            command.wait()
    assert command.returncode == 0
    assert errors == "", errors

"""Operating a real 2-worker server (PROTOCOL §2, §5, §7): readiness and broker metrics across a
broker outage, SIGTERM with many clients, and gunicorn's graceful reload (HUP).

The outage is faked with the TCP proxy (the shared broker is never stopped). A stop or reload must
close every client with 1001 so it reconnects elsewhere, and leave nothing running or bound.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .broker import Broker
from .harness import Connect, Server, StartServer, unique, wait_until
from .scrape import key, wait_for_figures
from .tcp_proxy import TcpProxy
from .tokens import SigningKey
from .wsclient import subscribed

CLIENTS = "rango_hub_clients_count"
CONNECTED = "ranger_broker_connected"
RECONNECTS = "ranger_broker_reconnects_total"
WORKERS = 2
# Small, so a hang shows quickly; RANGER_GRACEFUL_TIMEOUT is gunicorn's graceful_timeout.
GRACEFUL_TIMEOUT = 5
# The consumer retries every 1, 2, ... 5 s: a few rounds of that.
RECONNECT_TIMEOUT = 30.0


@pytest.fixture
def proxy(broker: Broker) -> Iterator[TcpProxy]:
    proxy = TcpProxy(broker.host, broker.port)
    yield proxy
    proxy.close()


def _readyz(server: Server) -> tuple[int, Any] | None:
    """One /readyz answer's status and body, the body's ``worker`` checked and left out."""
    response = server.readyz()
    if response is None:
        return None
    body = response.json()
    assert isinstance(body, dict) and body.pop("worker") in server.worker_pids(), body
    return response.status, body


def test_readyz_and_broker_metrics_follow_a_broker_outage(
    start_server: StartServer, proxy: TcpProxy, connect: Connect
) -> None:
    server = start_server(
        {"WEB_CONCURRENCY": str(WORKERS)}, rabbitmq=("127.0.0.1", proxy.port), name="outage"
    )
    wait_for_figures(server.scrape, {key(CONNECTED): WORKERS, key(RECONNECTS): 0})
    assert _readyz(server) == (200, {"status": "ready"})
    stream = f"{unique()}.trades"
    client = connect(server, f"/?stream={stream}")
    assert client.recv() == subscribed(stream)

    proxy.cut()

    def unready() -> tuple[int, Any] | None:
        answer = _readyz(server)
        return answer if answer is not None and answer[0] == 503 else None

    wait_until(unready, timeout=15, what="/readyz 503")
    wait_for_figures(server.scrape, {key(CONNECTED): 0, key(RECONNECTS): 0})
    # Both workers have lost it: whichever one answers says 503, and why.
    for _ in range(6):
        answer = unready()
        assert answer is not None
        body = answer[1]
        assert set(body) == {"status", "reason"} and body["status"] == "unavailable", body
        assert isinstance(body["reason"], str) and "broker" in body["reason"], body
    client.assert_alive()

    proxy.restore()
    # Each worker's consumer reconnects once.
    wait_for_figures(
        server.scrape,
        {key(CONNECTED): WORKERS, key(RECONNECTS): WORKERS},
        timeout=RECONNECT_TIMEOUT,
    )
    for _ in range(6):
        assert _readyz(server) == (200, {"status": "ready"})
    server.publish(f"public.{stream}", '{"n":1}')
    assert client.recv() == f'{{"{stream}":{{"n":1}}}}'


def _accepts_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return False
    return True


def _can_bind(port: int) -> bool:
    with socket.socket() as sock:
        # As any server would: the old server's closed connections may linger in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _process_group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_closes_50_clients_with_1001_exits_in_time_and_frees_ports(
    start_server: StartServer, connect: Connect, rsa: SigningKey
) -> None:
    server = start_server(
        {
            "WEB_CONCURRENCY": str(WORKERS),
            "RANGER_GRACEFUL_TIMEOUT": str(GRACEFUL_TIMEOUT),
            "JWT_PUBLIC_KEY": rsa.public_env,
        },
        name="sigterm-50",
    )
    assert server.process is not None
    stream, private = f"{unique()}.trades", unique("ev")
    clients = [connect(server, f"/public?stream={stream}") for _ in range(40)]
    for client in clients:
        assert client.recv() == subscribed(stream)
    for _ in range(10):
        trader = connect(
            server, f"/private?stream={private}", headers={"Authorization": rsa.bearer()}
        )
        assert trader.recv() == subscribed(private)
        clients.append(trader)
    wait_for_figures(server.scrape, {key(CLIENTS): 50})

    started = time.monotonic()
    server.signal(signal.SIGTERM)
    for client in clients:
        frames, closed = client.wait_closed(timeout=GRACEFUL_TIMEOUT)
        assert frames == []
        assert closed.code == 1001, closed
    assert server.wait_exit(timeout=GRACEFUL_TIMEOUT + 10) == 0
    assert time.monotonic() - started < GRACEFUL_TIMEOUT

    # Nothing left running, nothing left bound.
    assert not _process_group_exists(server.process.pid)
    for port in (server.port, server.metrics_port):
        assert not _accepts_connections(port), port
        assert _can_bind(port), port


def test_hup_reload_closes_old_clients_with_1001_and_new_workers_serve(
    start_server: StartServer, connect: Connect, tmp_path: Path
) -> None:
    server = start_server(
        {
            "WEB_CONCURRENCY": str(WORKERS),
            "RANGER_GRACEFUL_TIMEOUT": str(GRACEFUL_TIMEOUT),
            # A directory of the test's: after a reload the server no longer removes its own.
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        },
        name="hup",
    )
    old_workers = set(server.worker_pids())
    stream = f"{unique()}.trades"
    clients = [connect(server, f"/?stream={stream}") for _ in range(6)]
    for client in clients:
        assert client.recv() == subscribed(stream)

    server.signal(signal.SIGHUP)
    for client in clients:
        frames, closed = client.wait_closed(timeout=GRACEFUL_TIMEOUT + 5)
        assert frames == []
        assert closed.code == 1001, closed

    def replaced() -> bool:
        workers = set(server.worker_pids())
        return len(workers) == WORKERS and not workers & old_workers

    wait_until(replaced, timeout=20, what="new workers in place of the old ones")
    # The old workers' gauges are gone with them; the new workers consume.
    wait_for_figures(server.scrape, {key(CLIENTS): 0, key(CONNECTED): WORKERS}, timeout=20)
    newcomer = connect(server, f"/?stream={stream}")
    assert newcomer.recv() == subscribed(stream)
    server.publish(f"public.{stream}", '{"n":1}')
    assert newcomer.recv() == f'{{"{stream}":{{"n":1}}}}'
    assert server.alive

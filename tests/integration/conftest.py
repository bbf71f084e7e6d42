"""Session fixtures for the integration tests.

RabbitMQ must be running on 127.0.0.1:5672: if it is not, the run stops with how to start it; these
tests are never skipped. The session works in a vhost of its own, deleted at the end. A failing
test's report carries the log of every server that ran during it.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Mapping

import pytest

from .broker import Broker, BrokerUnavailable, Publisher
from .harness import DEFAULT_EXCHANGE, Connect, Server, ServerPool, StartServer
from .tokens import SigningKey, rsa_key
from .wsclient import Client

_LOGS = pytest.StashKey[Callable[[], list[tuple[str, str]]]]()

# RBAC of the shared server: roles with spaces around them must be trimmed (PROTOCOL §1).
RBAC_ADMIN = " admin , superadmin"


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    try:
        broker = Broker()
        broker.check_reachable()
        broker.create_vhost()
    except BrokerUnavailable as exc:
        pytest.exit(f"integration tests need RabbitMQ: {exc}", returncode=1)
    try:
        yield broker
    finally:
        broker.delete_vhost()


@pytest.fixture(scope="session")
def publisher(broker: Broker) -> Iterator[Publisher]:
    publisher = broker.publisher()
    try:
        yield publisher
    finally:
        publisher.close()


@pytest.fixture(scope="session")
def pool(
    broker: Broker, publisher: Publisher, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerPool]:
    pool = ServerPool(broker, publisher, tmp_path_factory.mktemp("server-logs"))
    try:
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture(scope="session")
def rsa() -> SigningKey:
    return rsa_key()


@pytest.fixture
def server(pool: ServerPool, rsa: SigningKey) -> Server:
    """The shared server: Peatio's default exchange, the RSA key, ``admin`` RBAC, default limits."""
    return pool.shared(
        {"JWT_PUBLIC_KEY": rsa.public_env, "RANGO_RBAC_ADMIN": RBAC_ADMIN},
        exchange=DEFAULT_EXCHANGE,
    )


@pytest.fixture
def start_server(pool: ServerPool) -> Iterator[StartServer]:
    """Start a server of the test's own, stopped (if still running) at the end of the test."""
    started: list[Server] = []

    def start(env: Mapping[str, str] | None = None, **options: object) -> Server:
        server = pool.new(env, **options)  # type: ignore[arg-type]
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def connect() -> Iterator[Connect]:
    """``connect(server, path="/public", **client_options)``; every client is closed at the end."""
    clients: list[Client] = []

    def open_client(server: Server, path: str = "/public", **kwargs: object) -> Client:
        client = server.connect(path, **kwargs)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        client.close()


@pytest.fixture(autouse=True)
def _server_logs(request: pytest.FixtureRequest, pool: ServerPool) -> None:
    """Remember where each server's log stood, to show what it wrote if the test fails."""
    offsets = {server: server.log_size() for server in pool.servers if server.alive}
    known = len(pool.servers)

    def logs() -> list[tuple[str, str]]:
        shown = [*offsets.items(), *((server, 0) for server in pool.servers[known:])]
        tails = [(server, server.log_tail(offset)) for server, offset in shown]
        return [
            (f"log of {server.name} (port {server.port})", tail) for server, tail in tails if tail
        ]

    request.node.stash[_LOGS] = logs


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and _LOGS in item.stash:
        for title, text in item.stash[_LOGS]():
            report.sections.append((title, text))
    return report

"""Several gunicorn workers (WEB_CONCURRENCY=2): each worker consumes its own queue, so every client
gets every message exactly once, whichever worker holds it (PROTOCOL §5)."""

from __future__ import annotations

import pytest

from .harness import Connect, Server, ServerPool, unique
from .tokens import SigningKey
from .wsclient import subscribed

CLIENTS = 8
MESSAGES = 50
PROBES = 200


@pytest.fixture
def two_workers(pool: ServerPool, rsa: SigningKey) -> Server:
    return pool.shared(
        {"WEB_CONCURRENCY": "2", "JWT_PUBLIC_KEY": rsa.public_env, "LOG_LEVEL": "info"}
    )


def test_every_client_gets_every_public_message_once(two_workers: Server, connect: Connect) -> None:
    stream = f"{unique()}.trades"
    clients = [connect(two_workers, f"/public?stream={stream}") for _ in range(CLIENTS)]
    for client in clients:
        assert client.recv() == subscribed(stream)
    for n in range(MESSAGES):
        two_workers.publish(f"public.{stream}", f'{{"n":{n}}}')
    two_workers.publish(f"public.{stream}", '"end"')
    expected = [f'{{"{stream}":{{"n":{n}}}}}' for n in range(MESSAGES)]
    for client in clients:
        # In order, no gaps, and nothing twice: the end marker comes right after the last one.
        assert client.recv_many(MESSAGES + 1) == [*expected, f'{{"{stream}":"end"}}']


def test_every_connection_of_a_user_gets_private_messages_once(
    two_workers: Server, connect: Connect, rsa: SigningKey
) -> None:
    uid = unique("ID")
    headers = {"Authorization": rsa.bearer(uid)}
    clients = [
        connect(two_workers, "/private?stream=order", headers=headers) for _ in range(CLIENTS)
    ]
    for client in clients:
        assert client.recv() == subscribed("order")
    two_workers.publish(f"private.{uid}.order", '{"id":1}')
    two_workers.publish(f"private.{uid}.order", '{"id":2}')
    for client in clients:
        assert client.recv_many(2) == ['{"order":{"id":1}}', '{"order":{"id":2}}']


@pytest.mark.parametrize(("path", "status"), [("/readyz", "ready"), ("/healthz", "ok")])
def test_health_probes_answer_on_every_worker(two_workers: Server, path: str, status: str) -> None:
    # Each request comes on a new connection, which either worker may accept; the body names the
    # one that answered. Ask until every worker has answered, within a bound.
    workers = set(two_workers.worker_pids())
    assert len(workers) == 2, workers
    answered: set[int] = set()
    for _ in range(PROBES):
        response = two_workers.http(path)
        body = response.json()
        assert response.status == 200, (path, response)
        assert isinstance(body, dict) and body["status"] == status, body
        assert body["worker"] in workers, (body, workers)
        answered.add(body["worker"])
        if answered == workers:
            break
    missing = sorted(workers - answered)
    assert not missing, f"worker {missing} never answered {path} in {PROBES} requests"


def test_rangers_healthcheck_answers_ok(two_workers: Server) -> None:
    assert two_workers.http("/healthcheck").body == b"OK"

"""``LOG_FORMAT=json`` (PROTOCOL §3): a whole server lifetime, from startup to SIGTERM.

Every line the server writes is one JSON object; each connection has an open and a close line
with its id (per worker: the pid tells workers apart), path and uid; no token is ever written,
whether accepted or refused.
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from .harness import ServerPool, unique, wait_until
from .tokens import SigningKey, rsa_key
from .wsclient import Client, subscribed

_OPEN = re.compile(r"connection (\d+) open path=(\S+) uid=(\S+)")
_CLOSED = re.compile(r"connection (\d+) closed path=(\S+) uid=(\S+): (.+)")


@dataclass(frozen=True)
class Lifetime:
    """What one server wrote, and what the test did to it."""

    text: str
    entries: list[dict[str, Any]]
    uid: str
    tokens: list[str]
    connections: int


def _entries(text: str) -> list[dict[str, Any]]:
    entries = []
    for line in text.splitlines():
        entry = json.loads(line)  # fails the test on any line that is not JSON
        assert isinstance(entry, dict), line
        entries.append(entry)
    return entries


@pytest.fixture(scope="module")
def lifetime(pool: ServerPool, rsa: SigningKey) -> Iterator[Lifetime]:
    server = pool.new(
        {"LOG_FORMAT": "json", "WEB_CONCURRENCY": "2", "JWT_PUBLIC_KEY": rsa.public_env},
        name="json-logs",
    ).start()
    try:
        uid = unique("ID")
        token, foreign = rsa.token(uid), rsa_key().token(uid)
        stream = f"{unique()}.trades"
        clients = [
            Client(
                server.url("/private?stream=order"), headers={"Authorization": f"Bearer {token}"}
            ),
            Client(server.url("/?stream=order"), headers={"Authorization": f"Bearer {token}"}),
            Client(server.url(f"/public?stream={stream}")),
            # A refused token on a public path leaves the client anonymous (logged at debug).
            Client(server.url("/public"), headers={"Authorization": f"Bearer {foreign}"}),
        ]
        replies = [client.recv() for client in clients]
        assert replies == [
            subscribed("order"),
            subscribed("order"),
            subscribed(stream),
            subscribed(),
        ]
        with pytest.raises(InvalidStatus):
            Client(server.url("/private"), headers={"Authorization": f"Bearer {foreign}"})
        server.publish(f"private.{uid}.order", '{"id":1}')
        server.publish("not.a.valid.key", "{}")
        assert [client.recv() for client in clients[:2]] == ['{"order":{"id":1}}'] * 2
        for client in clients:
            client.close()
        wait_until(
            lambda: len(_CLOSED.findall(server.log_text())) >= len(clients),
            timeout=10,
            what="a close line for every connection",
        )
        server.signal(signal.SIGTERM)
        assert server.wait_exit() == 0
        text = server.log_text()
        yield Lifetime(text, _entries(text), uid, [token, foreign], len(clients))
    finally:
        server.stop()


def test_every_line_is_a_json_object(lifetime: Lifetime) -> None:
    for entry in lifetime.entries:
        assert {"time", "level", "logger", "pid", "message"} <= set(entry), entry
        assert isinstance(entry["message"], str)
    messages = [entry["message"] for entry in lifetime.entries]
    # From startup (the effective configuration) to the master's exit, master and workers alike.
    assert "config LOG_FORMAT=json" in messages
    assert messages[-1] == "Shutting down: Master"
    assert len({entry["pid"] for entry in lifetime.entries}) == 3


def test_no_token_is_ever_written(lifetime: Lifetime) -> None:
    for token in lifetime.tokens:
        signature = token.rsplit(".", 1)[1]
        assert token not in lifetime.text
        assert signature not in lifetime.text


def _matches(lifetime: Lifetime, pattern: re.Pattern[str]) -> dict[tuple[int, int], list[str]]:
    """Lines matching ``pattern`` by (pid, connection id): connection ids count per worker."""
    found: dict[tuple[int, int], list[str]] = {}
    for entry in lifetime.entries:
        match = pattern.fullmatch(entry["message"])
        if match is not None:
            connection = (entry["pid"], int(match[1]))
            assert connection not in found, f"two lines for connection {connection}"
            found[connection] = list(match.groups()[1:])
    return found


def test_each_connection_has_an_open_line_with_path_and_uid_and_a_close_line(
    lifetime: Lifetime,
) -> None:
    opened = _matches(lifetime, _OPEN)
    closed = _matches(lifetime, _CLOSED)
    uid = lifetime.uid
    assert sorted(opened.values()) == sorted(
        [["/private", uid], ["/", uid], ["/public", "-"], ["/public", "-"]]
    )
    assert set(closed) == set(opened)
    for connection, (path, uid_seen, reason) in closed.items():
        assert [path, uid_seen] == opened[connection]  # the close line names the same client
        assert "1000" in reason, reason  # the clients closed normally

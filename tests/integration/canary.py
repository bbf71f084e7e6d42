"""A canary: a bystander client that proves an attack on the server hurt nobody else.

A :class:`Canary` holds one client on a fresh public stream and, given a signing key, a second
one on ``/private`` with a user of its own subscribed to a private stream. Numbered messages are
published to both (:meth:`Canary.send`, e.g. while an attack runs) and then collected
(:meth:`Canary.expect`): every one must arrive, in order, with nothing else in between or after,
within a deadline. It also checks that the server process is alive and that no worker was replaced
(a crashed gunicorn worker is restarted by the master, which alone would look alive).

    with Canary(server, rsa) as canary:
        canary.send(3)       # during the attack
        ...                  # the attack
        canary.expect()      # what was sent during it
        canary.check(5)      # send and expect, after it
"""

from __future__ import annotations

import time
from types import TracebackType

from .harness import Server, unique
from .tokens import SigningKey
from .wsclient import Client, subscribed

__all__ = ["Canary"]

DEADLINE = 5.0
PRIVATE_EVENT = "canary"


class Canary:
    """Bystander clients on ``server``; ``key`` adds a private one (a user of its own)."""

    def __init__(self, server: Server, key: SigningKey | None = None) -> None:
        self.server = server
        self.stream = f"{unique('canary')}.trades"
        self.uid = unique("CANARY") if key is not None else None
        self.workers = sorted(server.worker_pids())
        self._next = 0
        # Each client with the frames it is owed, in order, and the routing key that feeds it.
        self._clients: list[tuple[Client, str, str]] = []
        self._pending: dict[int, list[str]] = {}
        try:
            public = server.connect(f"/public?stream={self.stream}")
            self._clients.append((public, f"public.{self.stream}", self.stream))
            assert public.recv() == subscribed(self.stream)
            if key is not None:
                headers = {"Authorization": key.bearer(self.uid)}
                private = server.connect(f"/private?stream={PRIVATE_EVENT}", headers=headers)
                self._clients.append(
                    (private, f"private.{self.uid}.{PRIVATE_EVENT}", PRIVATE_EVENT)
                )
                assert private.recv() == subscribed(PRIVATE_EVENT)
        except BaseException:
            self.close()
            raise
        self._pending = {index: [] for index in range(len(self._clients))}

    def __enter__(self) -> Canary:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def clients(self) -> list[Client]:
        return [client for client, _, _ in self._clients]

    def send(self, count: int = 3) -> None:
        """Publish ``count`` numbered messages to every canary client, without waiting."""
        for _ in range(count):
            number = self._next
            self._next += 1
            for index, (_, routing_key, topic) in enumerate(self._clients):
                body = f'{{"canary":{number},"to":"{topic}"}}'
                self.server.publish(routing_key, body)
                self._pending[index].append(f'{{"{topic}":{body}}}')

    def expect(self, deadline: float = DEADLINE) -> None:
        """Every message sent so far arrived, in order, nothing extra; the server is intact."""
        end = time.monotonic() + deadline
        for index, (client, _, topic) in enumerate(self._clients):
            owed, self._pending[index] = self._pending[index], []
            for position, frame in enumerate(owed):
                left = max(end - time.monotonic(), 0.05)
                try:
                    received = client.recv(timeout=left)
                except AssertionError as exc:
                    raise AssertionError(
                        f"canary {topic}: message {position + 1} of {len(owed)} missing: {exc}"
                    ) from None
                assert received == frame, f"canary {topic}: got {received!r}, expected {frame!r}"
            # ping is answered after anything already queued: an extra frame would come first.
            reply = client.request("ping", timeout=max(end - time.monotonic(), 0.05))
            assert reply == "pong", f"canary {topic}: unexpected frame {reply!r}"
        self.assert_server_intact()

    def check(self, count: int = 5, deadline: float = DEADLINE) -> None:
        """:meth:`send` then :meth:`expect`."""
        self.send(count)
        self.expect(deadline)

    def assert_server_intact(self) -> None:
        """The gunicorn master runs, with the very workers it had when the canary opened."""
        assert self.server.alive, f"{self.server.name} is not running"
        workers = sorted(self.server.worker_pids())
        assert workers == self.workers, f"workers replaced: {self.workers} -> {workers}"

    def close(self) -> None:
        for client, _, _ in self._clients:
            client.close()

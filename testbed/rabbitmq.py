"""A vhost of our own on the shared RabbitMQ, administered with ``rabbitmqctl``.

The broker is shared: only the vhost named here is created, listed or deleted, and the broker
itself is never reconfigured or stopped.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from typing import Any

__all__ = ["START_HINT", "BrokerUnavailable", "VhostAdmin"]

START_HINT = (
    "start it with `rabbitmq-server -detached && rabbitmqctl await_startup` "
    "(install it with `apt-get install rabbitmq-server`)"
)


class BrokerUnavailable(Exception):
    """RabbitMQ cannot be used; the message says how to fix it."""


class VhostAdmin:
    """The vhost ``vhost`` on the broker at ``host:port``, for ``user``."""

    def __init__(
        self,
        vhost: str,
        *,
        host: str = "127.0.0.1",
        port: int = 5672,
        user: str = "guest",
        password: str = "guest",
    ) -> None:
        self.vhost = vhost
        self.host, self.port, self.user, self.password = host, port, user, password
        # Looked up now, required only when used: a given vhost with one worker needs no ctl.
        self._ctl = shutil.which("rabbitmqctl")

    def check_reachable(self) -> None:
        try:
            socket.create_connection((self.host, self.port), timeout=3).close()
        except OSError as exc:
            raise BrokerUnavailable(
                f"RabbitMQ is not reachable on {self.host}:{self.port} ({exc}); {START_HINT}"
            ) from exc

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        if self._ctl is None:
            raise BrokerUnavailable(f"rabbitmqctl is not installed; {START_HINT}")
        result = subprocess.run(
            [self._ctl, "-q", *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            raise BrokerUnavailable(
                f"rabbitmqctl {' '.join(args)} failed ({result.returncode}): "
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        return result.stdout

    def create_vhost(self) -> None:
        self.ctl("add_vhost", self.vhost)
        self.ctl("set_permissions", "-p", self.vhost, self.user, ".*", ".*", ".*")

    def delete_vhost(self) -> None:
        self.ctl("delete_vhost", self.vhost)

    def _list(self, *args: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads(
            self.ctl(*args, "-p", self.vhost, "--formatter", "json") or "[]"
        )
        return rows

    def bindings(self, exchange: str) -> dict[str, set[str]]:
        """Queue name -> the routing keys it is bound to on ``exchange``."""
        bound: dict[str, set[str]] = {}
        for row in self._list(
            "list_bindings", "source_name", "destination_name", "destination_kind", "routing_key"
        ):
            if row["source_name"] == exchange and row["destination_kind"] == "queue":
                bound.setdefault(row["destination_name"], set()).add(row["routing_key"])
        return bound

    def consuming_queues(self, exchange: str) -> int:
        """Queues bound to ``exchange`` that have a consumer: one per ready server worker."""
        bound = {
            row["destination_name"]
            for row in self._list(
                "list_bindings", "source_name", "destination_name", "destination_kind"
            )
            if row["source_name"] == exchange and row["destination_kind"] == "queue"
        }
        return sum(
            1
            for row in self._list("list_queues", "name", "consumers")
            if row["name"] in bound and int(row["consumers"]) > 0
        )

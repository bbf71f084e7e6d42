"""Each worker's own count of broker messages, read from its health answer.

ranger-py's ``GET /healthz`` answers ``{"status":"ok","worker":<pid>,"received":<n>}``: the pid
of the worker that answered and the broker messages it has received since it started. The
workers share the port and each request reaches whichever accepts it, so :func:`collect` asks
until every worker has answered, within a bound. A gateway whose answer lacks either field (or
that has no ``/healthz``) gives nothing: the scenario then reports totals only.
"""

from __future__ import annotations

import contextlib
import http.client
import json
from collections.abc import Callable

__all__ = ["Answer", "collect", "fetch", "parse"]

Answer = tuple[int, int]  # (worker pid, messages received)

# Answers without the fields, in a row and before any with them, after which asking stops.
_GIVE_UP_AFTER = 3


def parse(body: bytes) -> Answer | None:
    """(worker, received) from a health answer's body; None without both as integers.

    >>> parse(b'{"status":"ok","worker":12,"received":345}'), parse(b'{"status":"ok"}')
    ((12, 345), None)
    """
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    worker, received = value.get("worker"), value.get("received")
    if type(worker) is not int or type(received) is not int:
        return None
    return worker, received


def fetch(host: str, port: int, timeout: float = 2.0) -> Answer | None:
    """One ``GET /healthz`` on a connection of its own; None if it fails or lacks the fields."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    with contextlib.suppress(OSError, http.client.HTTPException):
        try:
            connection.request("GET", "/healthz", headers={"Connection": "close"})
            response = connection.getresponse()
            if response.status == 200:
                return parse(response.read())
        finally:
            connection.close()
    return None


def collect(ask: Callable[[], Answer | None], workers: set[int], tries: int) -> dict[int, int]:
    """Each worker's received count, by asking ``ask`` until every one of ``workers`` answered
    (at most ``tries`` times; workers not among ``workers`` are kept too). Empty when the
    answers do not carry the count."""
    found: dict[int, int] = {}
    misses = 0
    for _ in range(tries):
        answer = ask()
        if answer is None:
            misses += 1
            if not found and misses >= _GIVE_UP_AFTER:
                break
            continue
        worker, received = answer
        found.setdefault(worker, received)
        if workers <= found.keys():
            break
    return found

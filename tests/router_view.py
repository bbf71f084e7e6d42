"""What the tests read of a Router's tables: the counts and caches production never asks for.

The router answers subscribe, unsubscribe, remove and route; nothing in the server needs to list
its tables, so these read-outs live with the tests that check them (they read its private tables
on purpose: a test of the router's bookkeeping must see the bookkeeping).
"""

from __future__ import annotations

from ranger_py.protocol import StreamKind, stream_kind
from ranger_py.router import Router

__all__ = ["cached_book", "cached_books", "subscribed_clients", "subscription_counts"]


def subscribed_clients(router: Router) -> int:
    """Connections holding at least one stream (not every open connection)."""
    return len(router._clients)


def subscription_counts(router: Router) -> dict[tuple[StreamKind, str], int]:
    """Subscribers per (kind, stream name), private ones summed over users (PROTOCOL §7)."""
    counts = {(stream_kind(name), name): len(members) for name, members in router._topics.items()}
    for (_uid, name), members in router._private.items():
        key = (StreamKind.PRIVATE, name)
        counts[key] = counts.get(key, 0) + len(members)
    return counts


def cached_book(router: Router, topic: str) -> list[bytes]:
    """The replay of a public ``-inc`` topic: snapshot frame, then increments; [] if none."""
    return list(router._books.get(topic, ()))


def cached_books(router: Router) -> int:
    """Number of order books (snapshots) cached."""
    return len(router._books)

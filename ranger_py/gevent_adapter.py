"""Every use ranger-py makes of gevent's event loop directly, in one place.

Websockets are driven by raw loop watchers rather than greenlets (see websocket.py). gevent
describes its loop's interface only in a private module, and the io watcher takes bare event
numbers, so this module names them and makes every watcher. ``tests/unit/test_adapters.py``
checks each reliance and names the version when an upgrade breaks it.

Relies on (gevent 26.9.0, default libev loop): ``gevent.get_hub().loop``; ``loop.io(fd, events)``
with events a bitmask of 1 (readable) and 2 (writable), libev's EV_READ/EV_WRITE, which gevent
names only in its deprecated ``gevent.core``; ``loop.timer(after, repeat)``;
``loop.run_callback(func)``; and watchers' ``start(callback)``, ``stop()`` and ``close()``.

Nothing here sits on a per-frame path: a watcher is made once per connection or per stall, and
callbacks are scheduled through ``loop.run_callback`` itself (see ``callback_scheduler``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import gevent

__all__ = [
    "READ",
    "WRITE",
    "Watcher",
    "callback_scheduler",
    "close_watcher",
    "hub_loop",
    "read_watcher",
    "repeating_timer",
    "write_watcher",
    "yield_to_loop",
]

READ = 1  # libev's EV_READ: the fd has bytes to read (or EOF)
WRITE = 2  # libev's EV_WRITE: the fd can take more bytes


class Watcher(Protocol):
    """What ranger-py does with a watcher: start it with a callback, stop it, release it."""

    def start(self, callback: Callable[[], None]) -> None: ...

    def stop(self) -> None: ...

    def close(self) -> None: ...


def hub_loop() -> Any:
    """The event loop of this thread's gevent hub (gevent ships no types for it)."""
    return gevent.get_hub().loop


def read_watcher(loop: Any, fd: int, callback: Callable[[], None]) -> Watcher:
    """Start calling ``callback`` in the hub whenever ``fd`` is readable."""
    watcher: Watcher = loop.io(fd, READ)
    watcher.start(callback)
    return watcher


def write_watcher(loop: Any, fd: int, callback: Callable[[], None]) -> Watcher:
    """Start calling ``callback`` in the hub whenever ``fd`` is writable."""
    watcher: Watcher = loop.io(fd, WRITE)
    watcher.start(callback)
    return watcher


def repeating_timer(loop: Any, interval: float, callback: Callable[[], None]) -> Watcher:
    """Start calling ``callback`` in the hub every ``interval`` seconds."""
    watcher: Watcher = loop.timer(interval, interval)
    watcher.start(callback)
    return watcher


def close_watcher(watcher: Watcher) -> None:
    """Stop ``watcher`` and release it; it never fires again."""
    watcher.stop()
    watcher.close()


def callback_scheduler(loop: Any) -> Callable[[Callable[[], None]], object]:
    """``loop.run_callback``, bound once: runs a function on the loop's next turn.

    Returned as the bound method itself so that the flush path calls gevent with no wrapper.
    """
    schedule: Callable[[Callable[[], None]], object] = loop.run_callback
    return schedule


def yield_to_loop() -> None:
    """Let the loop run every other ready callback and greenlet, then come back."""
    gevent.sleep(0)

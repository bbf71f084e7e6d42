"""The one way to wait for a condition: poll it, never sleep for a guessed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["TimedOut", "wait_until"]

T = TypeVar("T")


class TimedOut(AssertionError):
    """A condition stayed false past its timeout.

    An AssertionError, so pytest reports it as a failed check; a class of its own, so a caller
    can tell it from an assertion inside the condition.
    """


def wait_until(
    condition: Callable[[], T | None],
    *,
    timeout: float,
    what: str | Callable[[], str],
    interval: float = 0.05,
) -> T:
    """Poll ``condition`` until it returns something truthy, and return that (never None).

    After ``timeout`` seconds raise :class:`TimedOut` naming ``what``; a callable ``what`` is
    asked only then, so the message can show the last state seen.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            waited_for = what() if callable(what) else what
            raise TimedOut(f"timed out after {timeout} s waiting for {waited_for}")
        time.sleep(interval)

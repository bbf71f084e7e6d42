"""gunicorn glue: the gevent worker, taught two things about websockets.

1. A request whose socket was handed to the gateway (``app.HANDED_OVER``) ends its greenlet without
   gunicorn closing the socket or reading another request from it.
2. A graceful stop (SIGTERM, or the old workers of a HUP reload) closes every websocket with
   1001 before the worker exits (PROTOCOL §2), instead of dropping them without a close frame.

gunicorn imports this module in the master, before any worker has patched the standard library
with gevent, so it must not import the application at module level.

The methods overridden here are not gunicorn's documented API: ranger_py.gunicorn_adapter names
each and what it relies on.
"""

from __future__ import annotations

from typing import Any

from gunicorn.workers.ggevent import GeventWorker

from ranger_py import gunicorn_adapter

__all__ = ["RangerWorker"]


class RangerWorker(GeventWorker):  # type: ignore[misc]
    _handed_over: object = None

    def load_wsgi(self) -> None:
        # Runs in the worker after gevent's patch_all (GeventWorker.init_process).
        from ranger_py.app import HANDED_OVER  # noqa: PLC0415 (after patching, on purpose)

        self._handed_over = HANDED_OVER
        super().load_wsgi()

    def is_already_handled(self, respiter: Any) -> bool:
        if respiter is self._handed_over:
            # The socket was detached from its object: gunicorn's close() leaves the fd to the
            # gateway.
            gunicorn_adapter.leave_connection()
        return bool(super().is_already_handled(respiter))

    def run(self) -> None:
        super().run()  # returns once this worker stops accepting and its requests are done
        close = getattr(self.wsgi, "close", None)
        if close is not None:
            # Leave a second of gunicorn's graceful timeout for the process to exit.
            close(timeout=max(1.0, float(self.cfg.graceful_timeout) - 1.0))

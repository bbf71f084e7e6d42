"""Every use ranger-py makes of gunicorn beyond its documented settings and hooks, in one place.

gunicorn documents its settings, its server hooks and its signals, not the objects the hooks are
given (the Arbiter, the worker) nor the worker classes' methods. The calls ranger-py makes on those
objects are the functions below, each saying what it relies on and since which version;
``tests/unit/test_adapters.py`` checks each reliance and names the version when an upgrade breaks
it.

More reliances live in worker.py because they are overrides, not calls: ``RangerWorker`` subclasses
``gunicorn.workers.ggevent.GeventWorker`` (gunicorn 27.0.1) and replaces three of its methods, and
the same test file checks each:

- ``load_wsgi()``: called once in the worker, after ``init_process`` has patched the standard
  library with gevent and before ``run()``; it sets ``self.wsgi`` to the application.
- ``is_already_handled(respiter)``: asked by ``AsyncWorker.handle_request`` with what the
  application returned, before any byte of a response is written. Raising StopIteration there
  ends ``AsyncWorker.handle``'s keep-alive loop (no further request is read, no error answer is
  written), and the socket object it then closes has had its fd detached, so the fd is left open.
- ``run()``: returns once the worker has stopped accepting (``alive`` turned False, which
  ``handle_exit`` does) and its request greenlets are done, or ``graceful_timeout`` has passed.

It also reads ``self.wsgi`` (set by ``load_wsgi``) and ``self.cfg.graceful_timeout``, the
``graceful_timeout`` setting in seconds.

gunicorn_conf.py imports this module in the master, before gevent has patched anything: nothing
here imports gevent.
"""

from __future__ import annotations

import signal
from typing import Any, NoReturn

from gunicorn import systemd

__all__ = [
    "detach_socket",
    "inherits_listeners",
    "leave_connection",
    "sigint_stops_master_gracefully",
    "sigint_stops_worker_gracefully",
]


def sigint_stops_master_gracefully(arbiter: Any) -> None:
    """Make the master's SIGINT (Ctrl-C) the graceful stop that SIGTERM is.

    Relies on (gunicorn 27.0.1): the Arbiter's main loop looking up ``handle_<signal name>`` on
    the instance each time a signal arrives, so an instance attribute replaces the method; and
    ``handle_term()`` being the graceful stop (workers get SIGTERM), ``handle_int()`` the quick one.
    A second Ctrl-C still hurries: gunicorn's graceful stop itself turns a SIGINT into a quick stop.
    """
    arbiter.handle_int = arbiter.handle_term


def inherits_listeners(arbiter: Any) -> bool:
    """Whether this master was handed its listening sockets already bound, from ``on_starting``.

    Relies on (gunicorn 27.0.1): ``arbiter.master_pid``, the old master's pid in the new master a
    USR2 re-exec starts (0 otherwise), set before ``on_starting`` is called; and
    ``gunicorn.systemd.listen_fds(unset_environment)``, the number of sockets systemd's socket
    activation passed to this process, which with False leaves LISTEN_FDS and LISTEN_PID for
    gunicorn to read after the hook.
    """
    return bool(arbiter.master_pid or systemd.listen_fds(False))


def sigint_stops_worker_gracefully(worker: Any) -> None:
    """In a worker: make SIGINT the graceful stop SIGTERM is (a terminal signals every process).

    Relies on (gunicorn 27.0.1): the worker's ``handle_exit(sig, frame)``, the signal handler
    ``init_signals`` installs for SIGTERM, which stops accepting and lets ``run()`` finish.
    """
    signal.signal(signal.SIGINT, worker.handle_exit)
    signal.siginterrupt(signal.SIGINT, False)  # a blocking call in progress resumes


def leave_connection() -> NoReturn:
    """From ``is_already_handled``: gunicorn stops serving this connection and writes nothing.

    Relies on (gunicorn 27.0.1): see the module docstring (``is_already_handled``).
    """
    raise StopIteration


def detach_socket(environ: dict[str, Any]) -> int:
    """Take the request's connection away from gunicorn: its fd, which the caller now owns.

    Relies on (gunicorn 27.0.1): ``environ["gunicorn.socket"]``, the connection's socket object
    (a gevent socket in the gevent worker), whose ``detach()`` returns the fd and leaves the
    object closed without closing the fd, so gunicorn's own ``close()`` of it later does nothing.
    """
    fd: int = environ["gunicorn.socket"].detach()
    return fd

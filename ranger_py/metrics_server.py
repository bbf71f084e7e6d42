"""The metrics endpoint's own process (PROTOCOL §7), and the gunicorn master's handle on it.

Why a process: prometheus_client's multiprocess values share one lock that presumes a process
without threads. Were the master to serve scrapes from a thread, a scrape could hold that lock
(the endpoint's own counters are such values) at the moment gunicorn forks a worker, and the
worker's copy of the lock would stay held forever: it would hang on its first metric. So the
master runs no thread and writes no value. It binds the port itself, so that a busy port stops
startup in one line before any worker exists, and hands the listening socket to
``python -m ranger_py.metrics_server``, which serves scrapes from threads and never forks again.

The endpoint is not a child of the master: its launcher forks it and exits at once, so the
master's children are exactly gunicorn's workers (what gunicorn reaps, what ``process_*`` sums).
It runs in a session of its own (a terminal's Ctrl-C or hangup is for the master to act on) and
stops with the master: it holds one end of a socket pair whose other end only the master keeps
(workers close theirs after the fork), so it reads EOF when the master stops, or dies of SIGKILL.

The handle lives here, not on gunicorn's arbiter: a HUP runs the config module again as a fresh
module, but this module stays imported, so the endpoint is neither started twice nor lost.
"""

from __future__ import annotations

import argparse
import logging
import logging.config
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from ranger_py.errors import RangerError
from ranger_py.logs import logging_config

__all__ = ["EndpointFailed", "MetricsEndpoint", "claim", "current", "main"]

log = logging.getLogger(__name__)

# The endpoint imports prometheus_client and answers "ready" well within this, even on a loaded
# host; past it, startup stops rather than run without metrics.
START_TIMEOUT = 30.0
# A stopping master waits this long for the endpoint to let go of the port.
STOP_TIMEOUT = 5.0
_BACKLOG = 64


class EndpointFailed(RangerError):
    """The metrics endpoint process did not start; startup stops."""


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, bound as any server binds (raises OSError)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(_BACKLOG)
    except OSError:
        listener.close()
        raise
    return listener


class MetricsEndpoint:
    """The master's side: the bound port, the endpoint process, and the value directory."""

    def __init__(self, host: str, port: int, directory: str, owns_directory: bool) -> None:
        self.host = host
        self.port = port
        self.directory = directory
        self.owns_directory = owns_directory
        self.pid: int | None = None
        self._listener: socket.socket | None = _bind(host, port)
        self._control: socket.socket | None = None

    def start(self, log_level: str, log_format: str) -> int:
        """Start the endpoint process and wait until it serves; returns its pid."""
        assert self._listener is not None, "started after stop()"
        ours, theirs = socket.socketpair()
        with theirs:
            command = [
                sys.executable,
                "-m",
                __name__,
                f"--listen-fd={self._listener.fileno()}",
                f"--control-fd={theirs.fileno()}",
                f"--master={os.getpid()}",
                f"--directory={self.directory}",
                f"--log-level={log_level}",
                f"--log-format={log_format}",
            ]
            launcher = subprocess.Popen(
                command,
                pass_fds=(self._listener.fileno(), theirs.fileno()),
                stdin=subprocess.DEVNULL,
            )
            # The launcher only forks the endpoint and exits. (gunicorn's SIGCHLD handler
            # queues the signal, and its reaping of unknown children tolerates this one.)
            launcher.wait()
        ours.settimeout(START_TIMEOUT)
        answer = b""
        try:
            while not answer.endswith(b"\n"):
                chunk = ours.recv(64)
                if not chunk:
                    break  # it exited before serving (its traceback is in the log)
                answer += chunk
        except TimeoutError:
            pass
        if not answer.startswith(b"ready "):
            ours.close()
            raise EndpointFailed(
                f"the metrics endpoint did not start (launcher exit code {launcher.returncode})"
            )
        ours.settimeout(None)
        self._control = ours
        self.pid = int(answer.split()[1])
        return self.pid

    def alive(self) -> bool:
        """Whether the endpoint still runs: it never writes after "ready", so readable is EOF."""
        if self._control is None:
            return False
        readable, _, _ = select.select([self._control], [], [], 0)
        return not readable

    def close_in_child(self) -> None:
        """In a forked worker: let go of the port and of the master's end of the lifeline.

        A worker outliving a killed master would otherwise keep the endpoint running.
        """
        for sock in (self._listener, self._control):
            if sock is not None:
                sock.close()  # close, not shutdown: the master's copy stays connected
        self._listener = self._control = None

    def stop(self) -> None:
        """Stop the endpoint, wait until it has let go of the port, remove our directory."""
        control, self._control = self._control, None
        if control is not None:
            control.shutdown(socket.SHUT_WR)  # the endpoint reads EOF and exits
            deadline = time.monotonic() + STOP_TIMEOUT
            try:
                while True:
                    control.settimeout(max(deadline - time.monotonic(), 0.0))
                    if not control.recv(64):
                        break  # its end closed: it has exited
            except OSError:
                log.warning("the metrics endpoint (pid %s) did not stop in time", self.pid)
            control.close()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self.owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)


# At most one: a second claim (the config module run again by a HUP) gets the first.
_claimed: list[MetricsEndpoint] = []


def claim(host: str, port: int, directory: str, owns_directory: bool) -> MetricsEndpoint:
    """The server's one endpoint handle: bound on the first call (raises OSError)."""
    if not _claimed:
        _claimed.append(MetricsEndpoint(host, port, directory, owns_directory))
    return _claimed[0]


def current() -> MetricsEndpoint | None:
    """The handle ``claim`` made in this process, if any."""
    return _claimed[0] if _claimed else None


# -- the endpoint process ---------------------------------------------------------------------


class _Server(ThreadingMixIn, WSGIServer):
    """wsgiref's threading server on a listening socket the master bound."""

    daemon_threads = True

    def __init__(self, listener: socket.socket, app: Any) -> None:
        host, port = listener.getsockname()[:2]
        super().__init__((host, port), _QuietHandler, bind_and_activate=False)
        self.socket.close()  # the unbound one socketserver made
        self.socket = listener
        self.server_address = (host, port)
        # What binding would have set; no reverse DNS lookup of the address.
        self.server_name = host
        self.server_port = port
        self.setup_environ()
        self.set_app(app)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would drown the log


def _serve(listener: socket.socket, control: socket.socket, master: int, directory: str) -> None:
    from ranger_py import metrics  # noqa: PLC0415 (prometheus_client: only after the fork)

    server = _Server(listener, metrics.endpoint_app(master, directory))
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    try:
        control.sendall(f"ready {os.getpid()}\n".encode())
        while control.recv(64):
            pass  # the master never writes: EOF means it stopped or died
    finally:
        server.shutdown()
        server.server_close()
        metrics.mark_worker_dead(os.getpid())  # our in-flight gauge leaves with us


def _on_term(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ranger_py.metrics_server")
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--master", type=int, required=True)
    parser.add_argument("--directory", required=True)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", default="text")
    args = parser.parse_args(argv)
    if os.fork():
        os._exit(0)  # the launcher: the master waits for it; the endpoint is not its child
    os.setsid()
    signal.signal(signal.SIGTERM, _on_term)
    logging.config.dictConfig(logging_config(args.log_level, args.log_format))
    listener = socket.socket(fileno=args.listen_fd)
    control = socket.socket(fileno=args.control_fd)
    try:
        _serve(listener, control, args.master, args.directory)
    except Exception:
        log.exception("metrics endpoint failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

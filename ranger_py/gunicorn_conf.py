"""gunicorn's settings and hooks for ranger-py: the one definition of how the server runs.

``ranger-py serve`` hands this file's path to ``gunicorn -c``; the repository's gunicorn.conf.py
(the Procfile's ``gunicorn -c gunicorn.conf.py``) re-exports what ``__all__`` names. gunicorn
reads the settings as module globals and calls the hooks in the master.

Every value comes from ranger_py.config, the one reader of the environment, so an invalid variable
stops startup here with a message naming it (every invalid one, not only the first). The hooks bind
the metrics port in the master and run the endpoint in a process of its own
(ranger_py.metrics_server), so one scrape reports every worker and the master, which forks, runs no
thread; check that the listen port is free before gunicorn tries it (one line instead of five
retries); and make Ctrl-C (SIGINT) the graceful stop SIGTERM is, so clients are closed with 1001.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from typing import Any, NoReturn

from ranger_py import gunicorn_adapter
from ranger_py.config import Config, config_errors
from ranger_py.errors import ConfigError
from ranger_py.logs import logging_config

__all__ = [
    "bind",
    "child_exit",
    "control_socket_disable",
    "graceful_timeout",
    "keepalive",
    "limit_request_field_size",
    "limit_request_fields",
    "logconfig_dict",
    "loglevel",
    "on_exit",
    "on_reload",
    "on_starting",
    "post_fork",
    "post_worker_init",
    "preload_app",
    "when_ready",
    "worker_class",
    "worker_connections",
    "workers",
    "wsgi_app",
]

_INVALID = "ranger-py: invalid configuration"


def _load() -> Config:
    try:
        return Config.load()
    except ConfigError as first:
        # Startup stops anyway, so every invalid variable is named at once (this also reads the
        # key, importing cryptography, which is harmless in a process about to exit).
        errors = config_errors() or [first]
        sys.exit("\n".join(f"{_INVALID}: {error}" for error in errors))


_config = _load()

# The key is read before anything listens, so a bad one is one line naming JWT_PUBLIC_KEY, not a
# traceback in every worker. It is read in a child process: had the master imported cryptography,
# the workers would share those pages copy-on-write and copy them on their first connects (bench's
# idle scenario measured +0.3 KB per idle connection).
if _config.jwt_public_key:
    _checked = subprocess.run([sys.executable, "-m", "ranger_py.config", "--check"], check=False)
    if _checked.returncode:
        sys.exit(_checked.returncode)  # the check printed the error

# prometheus_client chooses where values live when it is first imported: every process of this
# server must see the same directory, so it is put in the environment before anything imports
# it (workers inherit it). A directory we made is ours to remove at exit.
_metrics_dir_is_ours = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _metrics_dir_is_ours:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="ranger-py-metrics-")
os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
os.environ.setdefault("PROMETHEUS_DISABLE_CREATED_SERIES", "True")  # as Go's client: no *_created

_host = f"[{_config.host}]" if ":" in _config.host else _config.host
bind = [f"{_host}:{_config.port}"]
workers = _config.workers
worker_class = "ranger_py.worker.RangerWorker"
wsgi_app = "ranger_py.gateway:create_app()"
# Each worker must build its own gateway and consumer after gevent has patched the process.
preload_app = False
# Several instances on one host must not fight over gunicorn's control socket (it
# is a fixed path by default).
control_socket_disable = True
# Websockets are capped by RANGER_MAX_CONNECTIONS; this only bounds handshakes in flight. A
# handed-over websocket frees its slot, so the slots are only taken by clients still sending their
# request, and each for at most `keepalive` seconds: gunicorn reads every request head under that
# deadline. Many cheap slots and a short deadline keep trickling sockets (slowloris) from making
# real clients wait.
worker_connections = _config.max_handshakes
keepalive = _config.handshake_timeout
# A bearer token may be long (many claims, an RS512 signature): header lines up to 16 KB. Fewer
# header lines than gunicorn's default 100 keep the most one request head may buffer where it was
# (50 x 16 KB, about 800 KB); a websocket upgrade through a proxy carries some 10-30 headers.
limit_request_field_size = 16384
limit_request_fields = 50
graceful_timeout = _config.graceful_timeout
loglevel = _config.log_level.lower()

logconfig_dict = logging_config(_config.log_level, _config.log_format)


def _cannot_listen(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound now, or None; bound as gunicorn will bind it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _abort(message: str) -> NoReturn:
    """Stop a start that cannot succeed: one line, and no metrics directory left behind."""
    from ranger_py import metrics_server  # noqa: PLC0415

    endpoint = metrics_server.current()
    if endpoint is not None:
        endpoint.stop()
    elif _metrics_dir_is_ours:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
    sys.exit(message)


# A HUP reload runs this file again as a fresh module: the metrics endpoint's handle (and whether
# the value directory is ours) is kept by ranger_py.metrics_server, which stays imported.


def on_starting(server: Any) -> None:
    from ranger_py import metrics, metrics_server  # noqa: PLC0415 (after PROMETHEUS_MULTIPROC_DIR)

    for variable, value, _ in _config.describe():
        server.log.info("config %s=%s", variable, value)  # secrets are masked by describe()
    for warning in _config.warnings():
        server.log.warning("%s", warning)
    # gunicorn's SIGINT is a quick stop: workers exit at once and clients see the TCP connection
    # drop. Ctrl-C takes SIGTERM's graceful path instead (every client closed with 1001); a second
    # Ctrl-C during that stop still makes gunicorn hurry.
    gunicorn_adapter.sigint_stops_master_gracefully(server)
    # Listeners handed over by a USR2 re-exec or by systemd are already bound: nothing to check.
    if not gunicorn_adapter.inherits_listeners(server):
        problem = _cannot_listen(_config.host, _config.port)
        if problem is not None:
            _abort(f"ranger-py: cannot listen on {bind[0]} (RANGER_HOST/RANGER_PORT): {problem}")
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    metrics.clear_directory(directory)
    # Bound here, before anything else starts: a busy port is one line naming the variables.
    try:
        metrics_server.claim(
            _config.metrics_host, _config.metrics_port, directory, _metrics_dir_is_ours
        )
    except OSError as exc:
        _abort(
            f"ranger-py: cannot serve metrics on {_config.metrics_host}:{_config.metrics_port}"
            f" (METRICS_HOST/METRICS_PORT): {exc.strerror}"
        )


def _start_metrics_endpoint(server: Any) -> None:
    from ranger_py import metrics_server  # noqa: PLC0415

    endpoint = metrics_server.current()
    assert endpoint is not None, "on_starting claims it"
    try:
        pid = endpoint.start(_config.log_level, _config.log_format)
    except metrics_server.EndpointFailed as exc:
        _abort(f"ranger-py: {exc}")
    server.log.info("metrics on http://%s:%d/metrics (pid %d)", endpoint.host, endpoint.port, pid)


def when_ready(server: Any) -> None:
    # Before gunicorn forks the first worker.
    _start_metrics_endpoint(server)


def on_reload(server: Any) -> None:
    from ranger_py import metrics, metrics_server  # noqa: PLC0415

    # The endpoint survives a reload as it is; one that died is started again, as workers are.
    endpoint = metrics_server.current()
    if endpoint is not None and not endpoint.alive():
        server.log.warning(
            "the metrics endpoint (pid %s) had exited; starting it again", endpoint.pid
        )
        if endpoint.pid is not None:
            metrics.mark_worker_dead(endpoint.pid)
        _start_metrics_endpoint(server)


def post_fork(server: Any, worker: Any) -> None:
    from ranger_py import metrics_server  # noqa: PLC0415

    endpoint = metrics_server.current()
    if endpoint is not None:
        endpoint.close_in_child()


def post_worker_init(worker: Any) -> None:
    # A terminal's Ctrl-C reaches the workers too (same process group), and gunicorn's workers
    # quit at once on SIGINT: make it the graceful stop, as SIGTERM (RangerWorker.run closes
    # every client with 1001). The master's quick stop (SIGQUIT) still ends a worker at once.
    gunicorn_adapter.sigint_stops_worker_gracefully(worker)


def child_exit(server: Any, worker: Any) -> None:
    from ranger_py import metrics  # noqa: PLC0415 (after PROMETHEUS_MULTIPROC_DIR is set)

    metrics.mark_worker_dead(worker.pid)


def on_exit(server: Any) -> None:
    from ranger_py import metrics_server  # noqa: PLC0415

    endpoint = metrics_server.current()
    if endpoint is not None:
        endpoint.stop()  # also removes the value directory if this server made it

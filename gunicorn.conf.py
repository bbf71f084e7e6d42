"""gunicorn settings for ranger-py: `gunicorn -c gunicorn.conf.py` (also the Procfile's command).

Every value comes from ranger_py.config, the one reader of the environment, so an invalid
variable stops startup here with a message naming it. The hooks below run the metrics endpoint
in the master, so one scrape reports every worker (PROTOCOL §7).
"""

import os
import shutil
import subprocess
import sys
import tempfile

from ranger_py.config import Config
from ranger_py.errors import ConfigError
from ranger_py.logs import logging_config

try:
    _config = Config.load()
except ConfigError as _exc:
    sys.exit(f"ranger-py: invalid configuration: {_exc}")

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
wsgi_app = "ranger_py.app:create_app()"
# Each worker must build its own hub and consumer after gevent has patched the process.
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

# The hooks keep their state on gunicorn's arbiter (`server`): a HUP reload runs this file again
# as a fresh module, and the metrics endpoint and its directory must outlive that.


def on_starting(server):
    from ranger_py import metrics

    for variable, value, _ in _config.describe():
        server.log.info("config %s=%s", variable, value)  # secrets are masked by describe()
    for warning in _config.warnings():
        server.log.warning("%s", warning)
    server.ranger_metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    server.ranger_metrics_dir_is_ours = _metrics_dir_is_ours
    metrics.clear_directory(server.ranger_metrics_dir)
    try:
        server.ranger_metrics = metrics.MetricsServer(
            _config.metrics_host, _config.metrics_port, lambda: list(server.WORKERS)
        )
    except OSError as exc:
        sys.exit(
            f"ranger-py: cannot serve metrics on {_config.metrics_host}:{_config.metrics_port}"
            f" (METRICS_HOST/METRICS_PORT): {exc.strerror}"
        )


def when_ready(server):
    server.ranger_metrics.start()
    server.log.info("metrics on http://%s:%d/metrics", _config.metrics_host, _config.metrics_port)


def post_fork(server, worker):
    server.ranger_metrics.close_in_child()


def child_exit(server, worker):
    from ranger_py import metrics

    metrics.mark_worker_dead(worker.pid)


def on_exit(server):
    metrics_server = getattr(server, "ranger_metrics", None)
    if metrics_server is not None:
        metrics_server.stop()
    if getattr(server, "ranger_metrics_dir_is_ours", False):
        shutil.rmtree(server.ranger_metrics_dir, ignore_errors=True)

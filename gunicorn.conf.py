"""gunicorn settings for ranger-py: `gunicorn -c gunicorn.conf.py` (also the Procfile's command).

Every value comes from ranger_py.config, the one reader of the environment, so an invalid
variable stops startup here with a message naming it.
"""

import sys

from ranger_py.config import Config
from ranger_py.errors import ConfigError

try:
    _config = Config.load()
except ConfigError as _exc:
    sys.exit(f"ranger-py: invalid configuration: {_exc}")

_host = f"[{_config.host}]" if ":" in _config.host else _config.host
bind = [f"{_host}:{_config.port}"]
workers = _config.workers
worker_class = "ranger_py.worker.RangerWorker"
wsgi_app = "ranger_py.app:create_app()"
# Each worker must build its own hub and consumer after gevent has patched the process.
preload_app = False
# Several instances on one host must not fight over gunicorn's control socket (deps.md §1).
control_socket_disable = True
# Websockets are capped by RANGER_MAX_CONNECTIONS; this only bounds handshakes in flight.
worker_connections = 1000
graceful_timeout = 30
loglevel = _config.log_level.lower()

logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"},
    },
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "stream": "ext://sys.stderr",
        },
    },
    "root": {"level": _config.log_level, "handlers": ["stderr"]},
    "loggers": {
        "gunicorn.error": {"level": _config.log_level, "handlers": ["stderr"], "propagate": False},
        # kombu and amqp log every reconnect attempt; ours summarise them.
        "kombu": {"level": "WARNING"},
        "amqp": {"level": "WARNING"},
    },
}

"""Log configuration: one dict for gunicorn's ``logconfig_dict``, text or JSON lines.

Modules only call ``logging.getLogger(__name__)``; this is the one place that decides where
lines go and what they look like. ``LOG_FORMAT=json`` writes one JSON object
per line for log shippers, with the same fields as the text form.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

__all__ = ["JsonFormatter", "RateLimitedLog", "logging_config"]

_TEXT_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "pid", "message"[, "exception"]}``, one object per line."""

    converter = time.gmtime  # type: ignore[assignment]  # the "Z" in time says UTC

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class RateLimitedLog:
    """Log at most ``burst`` lines per ``period`` seconds; count the rest and say how many.

    For lines an outsider can cause (refused handshakes): one per event is what an operator wants,
    until an attack would turn it into a flood that fills disks and hides everything else.
    """

    def __init__(
        self,
        logger: logging.Logger,
        level: int = logging.INFO,
        burst: int = 20,
        period: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._level = level
        self._burst = burst
        self._period = period
        self._clock = clock
        self._window_start = -period
        self._logged = 0
        self._suppressed = 0

    def log(self, msg: str, *args: object) -> None:
        if not self._logger.isEnabledFor(self._level):
            return
        now = self._clock()
        if now - self._window_start >= self._period:
            if self._suppressed:
                self._logger.log(
                    self._level,
                    "%d similar lines suppressed in the last %.0f s",
                    self._suppressed,
                    now - self._window_start,
                )
            self._window_start = now
            self._logged = 0
            self._suppressed = 0
        if self._logged < self._burst:
            self._logged += 1
            self._logger.log(self._level, msg, *args)
        else:
            self._suppressed += 1


def logging_config(level: str, fmt: str) -> dict[str, Any]:
    """gunicorn's ``logconfig_dict`` for ``LOG_LEVEL`` and ``LOG_FORMAT`` (``text``/``json``)."""
    formatter: dict[str, Any] = (
        {"()": f"{__name__}.JsonFormatter"} if fmt == "json" else {"format": _TEXT_FORMAT}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": formatter},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "main",
                "stream": "ext://sys.stderr",
            },
        },
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": level, "handlers": ["stderr"], "propagate": False},
            # Scrapes and upgrades are not worth a line each; gunicorn's access log stays off.
            "gunicorn.access": {"level": "WARNING", "handlers": ["stderr"], "propagate": False},
            # kombu and amqp log every connection attempt; ranger_py.consumer summarises them.
            "kombu": {"level": "WARNING"},
            "amqp": {"level": "WARNING"},
        },
    }

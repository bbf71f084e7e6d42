"""Log configuration: both formats load into logging, JSON lines parse and carry the fields."""

from __future__ import annotations

import io
import json
import logging
import logging.config

import pytest

from ranger_py.logs import JsonFormatter, RateLimitedLog, logging_config


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_config_is_accepted_by_logging(fmt: str) -> None:
    config = logging_config("DEBUG", fmt)
    logging.config.dictConfig(config)
    assert logging.getLogger().level == logging.DEBUG
    assert logging.getLogger("kombu").level == logging.WARNING


def test_json_line_has_the_fields_and_the_traceback() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("ranger_py.test_logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("connection %d closed: %s", 7, 'slow "client"')
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    first, second = (
        json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")
    )
    assert first["message"] == 'connection 7 closed: slow "client"'
    assert first["level"] == "warning"
    assert first["logger"] == "ranger_py.test_logs"
    assert first["time"].endswith("Z")
    assert isinstance(first["pid"], int)
    assert "ValueError: boom" in second["exception"]


def test_rate_limited_log_says_how_many_lines_it_held_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    limited = RateLimitedLog(
        logging.getLogger("ranger_py.test_limited"), burst=3, period=10, clock=lambda: now[0]
    )
    with caplog.at_level(logging.INFO, logger="ranger_py.test_limited"):
        for n in range(50):
            limited.log("refused %d", n)
        now[0] += 10
        limited.log("refused %d", 50)
    assert [record.getMessage() for record in caplog.records] == [
        "refused 0",
        "refused 1",
        "refused 2",
        "47 similar lines suppressed in the last 10 s",
        "refused 50",
    ]

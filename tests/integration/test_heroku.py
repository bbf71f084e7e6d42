"""Heroku-style deploys (PROTOCOL §1): the Procfile's command with only ``PORT`` and a
broker URL set, and startup refusing an invalid variable with a message that names it.

Heroku runs the Procfile's ``web:`` command through a shell, with the app's executables on PATH;
these tests do the same, with none of the RANGER_* or RABBITMQ_* variables set.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from .broker import Broker
from .harness import DEFAULT_EXCHANGE, REPO, Connect, Server, ServerPool, unique
from .wsclient import subscribed

# The metrics port is kept per server (the default 4242 may be taken by another run on this host).
_KEPT = {"METRICS_HOST", "METRICS_PORT"}


def _procfile_command() -> list[str]:
    for line in (REPO / "Procfile").read_text().splitlines():
        kind, _, command = line.partition(":")
        if kind.strip() == "web":
            return ["/bin/sh", "-c", f"exec {command.strip()}"]
    raise AssertionError("the Procfile has no web process")


def _only(server: Server, env: dict[str, str | None]) -> None:
    """Drop every configuration variable the harness set, then apply ``env`` (None: unset)."""
    for variable in list(server.env):
        if variable.startswith(("RANGER_", "RABBITMQ_", "LOG_")) and variable not in _KEPT:
            del server.env[variable]
    for variable, value in env.items():
        if value is None:
            server.env.pop(variable, None)
        else:
            server.env[variable] = value
    bin_dir = Path(sys.executable).parent  # the app's virtualenv, as a buildpack puts it on PATH
    server.env["PATH"] = f"{bin_dir}{os.pathsep}{server.env.get('PATH', os.defpath)}"
    server.command = _procfile_command()


@pytest.fixture
def heroku(pool: ServerPool, broker: Broker) -> Iterator[Server]:
    server = pool.new(exchange=DEFAULT_EXCHANGE, name="heroku")
    url = f"amqp://{broker.user}:{broker.password}@{broker.host}:{broker.port}/"
    _only(server, {"PORT": str(server.port), "CLOUDAMQP_URL": url + quote(broker.vhost, safe="")})
    yield server.start()
    server.stop()


def test_procfile_serves_and_consumes_with_only_port_and_cloudamqp_url(
    heroku: Server, connect: Connect
) -> None:
    assert not [name for name in heroku.env if name.startswith(("RANGER_", "RABBITMQ_"))]
    assert heroku.http("/healthcheck").body == b"OK"
    stream = f"{unique()}.trades"
    client = connect(heroku, f"/public?stream={stream}")
    assert client.recv() == subscribed(stream)
    heroku.publish(f"public.{stream}", '{"n":1}')
    assert client.recv() == f'{{"{stream}":{{"n":1}}}}'
    log = heroku.log_text()
    # RANGER_HOST unset: every interface, on Heroku's port.
    assert f"Listening at: http://0.0.0.0:{heroku.port}" in log
    assert f"config RANGER_PORT={heroku.port}" in log
    # The effective config is logged with the URL's password masked.
    assert "amqp://guest:***@" in log
    assert "guest:guest@" not in log


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        pytest.param({"RANGER_PORT": "abc"}, "RANGER_PORT", id="RANGER_PORT"),
        pytest.param({"PORT": "abc"}, "PORT", id="PORT"),
        pytest.param(
            {"PORT": "8080", "CLOUDAMQP_URL": "http://user:s3cret@broker.example/"},
            "CLOUDAMQP_URL",
            id="CLOUDAMQP_URL",
        ),
        pytest.param({"PORT": "8080", "LOG_LEVEL": "loud"}, "LOG_LEVEL", id="LOG_LEVEL"),
    ],
)
def test_an_invalid_variable_stops_startup_naming_it(
    pool: ServerPool, env: dict[str, str | None], variable: str
) -> None:
    server = pool.new(name="invalid")
    _only(server, env)
    server.start(wait=False)
    try:
        assert server.wait_exit(timeout=30) != 0
    finally:
        server.stop()
    log = server.log_text()
    assert f"ranger-py: invalid configuration: {variable}: " in log, log
    assert "s3cret" not in log

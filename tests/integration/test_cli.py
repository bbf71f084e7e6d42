"""The installed ``ranger-py`` command, as a user gets it: the wheel in a fresh virtualenv.

Once per session the wheel is built (``pip wheel --no-deps``) from a copy of the sources, and a new
virtualenv outside the checkout gets the locked requirements (requirements.txt, hash-checked) and
the wheel. Every command then runs as a subprocess of that virtualenv, in a directory outside the
checkout, so nothing can come from the working tree. The servers and the broker are the harness's:
the session's vhost, free ports.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
from websockets.exceptions import InvalidStatus

from .broker import Broker, Publisher
from .harness import (
    REPO,
    Connect,
    Server,
    ServerPool,
    StartServer,
    free_port,
    unique,
    wait_until,
)
from .wsclient import Client, http_request, subscribed

# Building the wheel and filling a virtualenv takes most of a minute on a cold pip cache.
pytestmark = pytest.mark.timeout(300)

_CONFIG_PREFIXES = ("RANGER_", "RABBITMQ_", "JWT_", "RANGO_RBAC_", "METRICS_", "API_CORS_", "LOG_")
_CONFIG_NAMES = {"PORT", "WEB_CONCURRENCY", "CLOUDAMQP_URL", "AMQP_URL", "PYTHONPATH"}
_ALGORITHMS = ("RS256", "EdDSA", "ES256")


def _environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any configuration or PYTHONPATH, plus ``env``."""
    base = {
        key: value
        for key, value in os.environ.items()
        if key not in _CONFIG_NAMES and not key.startswith(_CONFIG_PREFIXES)
    }
    return {**base, "PYTHONUNBUFFERED": "1", **(env or {})}


def _check(command: list[str | Path], what: str) -> None:
    result = subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=240, check=False
    )
    assert result.returncode == 0, (
        f"{what} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )


@dataclass(frozen=True)
class Installed:
    """The virtualenv holding the wheel, and a directory outside the checkout to run it in."""

    wheel: Path
    venv: Path
    cwd: Path

    @property
    def command(self) -> Path:
        return self.venv / "bin" / "ranger-py"

    def run(
        self, *args: str, env: Mapping[str, str] | None = None, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.command), *args],
            cwd=self.cwd,
            env=_environment(env),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def popen(self, *args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [str(self.command), *args],
            cwd=self.cwd,
            env=_environment(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("installed")
    assert REPO not in root.parents
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources it builds.
    source = root / "source"
    shutil.copytree(
        REPO / "ranger_py", source / "ranger_py", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    if (REPO / "LICENSE").exists():  # setuptools puts it in the wheel's metadata
        shutil.copy2(REPO / "LICENSE", source / "LICENSE")
    dist = root / "dist"
    pip = ["-m", "pip", "--disable-pip-version-check", "--quiet"]
    _check([sys.executable, *pip, "wheel", "--no-deps", "--wheel-dir", dist, source], "pip wheel")
    (wheel,) = dist.glob("ranger_py-*.whl")
    venv = root / "venv"
    _check([sys.executable, "-m", "venv", venv], "venv")
    python = venv / "bin" / "python"
    requirements = REPO / "requirements.txt"
    _check([python, *pip, "install", "--require-hashes", "-r", requirements], "the locked install")
    _check([python, *pip, "install", "--no-deps", wheel], "the wheel's install")
    cwd = root / "elsewhere"
    cwd.mkdir()
    return Installed(wheel, venv, cwd)


def test_the_wheel_holds_the_package_and_the_command(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = wheel.namelist()
        info = next(name for name in names if name.endswith(".dist-info/METADATA"))
        metadata = wheel.read(info).decode()
        entry_points = wheel.read(info.replace("METADATA", "entry_points.txt")).decode()
    packages = {name.split("/")[0] for name in names}
    assert packages == {"ranger_py", info.split("/")[0]}, packages
    assert "ranger_py/gunicorn_conf.py" in names
    assert "ranger-py = ranger_py.cli:main" in entry_points
    assert "License-Expression: Apache-2.0" in metadata
    located = subprocess.run(
        [
            str(installed.venv / "bin" / "python"),
            "-c",
            "import ranger_py; print(ranger_py.__file__)",
        ],
        cwd=installed.cwd,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert Path(located.stdout.strip()).is_relative_to(installed.venv)
    version = installed.run("--version")
    assert version.returncode == 0
    assert version.stdout.startswith("ranger-py ")


# serve


@pytest.fixture
def installed_server(
    installed: Installed, pool: ServerPool, broker: Broker, publisher: Publisher, tmp_path: Path
) -> Iterator[Server]:
    """A server started with the installed ``ranger-py serve``, outside the checkout."""
    server = Server(
        "installed-serve",
        # The flags must win over the environment's RANGER_HOST and RANGER_PORT.
        {"RANGER_HOST": "0.0.0.0", "RANGER_PORT": str(free_port())},
        broker=broker,
        publisher=publisher,
        log_path=tmp_path / "installed-serve.log",
        exchange=f"ranger.test.cli.{secrets.token_hex(3)}",
    )
    server.env.pop("PYTHONPATH", None)
    server.workers = 2  # ready once both workers consume
    server.cwd = installed.cwd
    server.command = [
        str(installed.command),
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(server.port),
        "--workers",
        "2",
    ]
    pool.servers.append(server)  # its log is shown if the test fails
    yield server
    server.stop()


def test_serve_from_the_wheel_answers_and_ctrl_c_closes_clients_with_1001(
    installed_server: Server, connect: Connect
) -> None:
    server = installed_server.start()
    health = server.http("/healthz")
    body = health.json()
    assert health.status == 200 and isinstance(body, dict), health
    assert body == {"status": "ok", "worker": body["worker"], "received": body["received"]}
    assert isinstance(body["received"], int)
    assert body["worker"] in server.worker_pids()
    log = server.log_text()
    assert f"Listening at: http://127.0.0.1:{server.port}" in log
    assert "config WEB_CONCURRENCY=2" in log
    stream = f"{unique()}.trades"
    clients = [connect(server, f"/public?stream={stream}") for _ in range(4)]
    for client in clients:
        assert client.recv() == subscribed(stream)
    server.publish(f"public.{stream}", '{"n":1}')
    for client in clients:
        assert client.recv() == f'{{"{stream}":{{"n":1}}}}'
    # The master's endpoint sums both workers (their values are flushed once a second).
    wait_until(
        lambda: server.scrape().value("rango_hub_clients_count") == 4,
        timeout=10,
        what="4 clients in the metrics",
    )

    assert server.process is not None
    os.killpg(server.process.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole process group
    for client in clients:
        frames, closed = client.wait_closed(timeout=20)
        assert frames == []
        assert (closed.code, closed.reason) == (1001, "server shutdown")
    assert server.wait_exit(timeout=30) == 0
    assert "Traceback" not in server.log_text()


def test_serve_on_a_busy_port_says_so_in_one_line(installed: Installed) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = installed.run(
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            env={"METRICS_HOST": "127.0.0.1", "METRICS_PORT": str(free_port())},
        )
        elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    expected = f"ranger-py: cannot listen on 127.0.0.1:{port} (RANGER_HOST/RANGER_PORT): "
    errors = [line for line in output.splitlines() if "ERROR" in line or "ranger-py:" in line]
    assert errors == [f"{expected}Address already in use"], output
    assert "Traceback" not in output
    assert elapsed < 10, elapsed  # not gunicorn's five retries a second apart


def test_serve_names_every_bad_variable_before_starting(installed: Installed) -> None:
    result = installed.run("serve", env={"RANGER_PORT": "abc", "API_CORS_ORIGINS": "ftp://x"})
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if "ranger-py" in line]
    assert [line.split(": ")[2] for line in lines] == ["RANGER_PORT", "API_CORS_ORIGINS"], lines
    assert "Listening at" not in result.stdout + result.stderr


# config


def test_config_names_every_bad_variable(installed: Installed) -> None:
    result = installed.run("config", env={"RANGER_PORT": "abc", "LOG_LEVEL": "loud"})
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        'ranger-py: invalid configuration: RANGER_PORT: "abc" is not an integer between 1 and'
        " 65535",
        'ranger-py: invalid configuration: LOG_LEVEL: "loud" is not one of trace, debug, info,'
        " warn, warning, error, fatal, critical or panic",
    ]


def test_config_prints_the_configuration_masked(installed: Installed) -> None:
    result = installed.run("config", env={"RANGER_PORT": "9000", "RABBITMQ_PASSWORD": "s3cret"})
    assert result.returncode == 0, result.stderr
    assert "RANGER_PORT" in result.stdout and " 9000 " in result.stdout
    assert "s3cret" not in result.stdout + result.stderr


# publish


def _broker_env(broker: Broker, **more: str) -> dict[str, str]:
    return {
        "RABBITMQ_HOST": broker.host,
        "RABBITMQ_PORT": str(broker.port),
        "RABBITMQ_VHOST": broker.vhost,
        **more,
    }


def test_publish_reaches_a_client(
    installed: Installed, server: Server, broker: Broker, connect: Connect
) -> None:
    stream = f"{unique()}.trades"
    client = connect(server, f"/public?stream={stream}")
    assert client.recv() == subscribed(stream)
    body = '{"trades":[{"tid":1,"taker_type":"buy","price":"42000.0","amount":"0.1"}]}'
    result = installed.run("publish", f"public.{stream}", body, env=_broker_env(broker))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"published public.{stream} to {server.exchange}"
    assert client.recv() == f'{{"{stream}":{body}}}'
    # The body from standard input, as `echo ... | ranger-py publish KEY` gives it.
    result = installed.run(
        "publish", f"public.{stream}", env=_broker_env(broker), stdin='{"n":2}\n'
    )
    assert result.returncode == 0, result.stderr
    assert client.recv() == f'{{"{stream}":{{"n":2}}}}'


def test_publish_refuses_bad_json_and_reports_an_unreachable_broker(
    installed: Installed, broker: Broker
) -> None:
    result = installed.run("publish", "public.x.trades", "{bad", env=_broker_env(broker))
    assert result.returncode == 2
    assert "the body is not valid JSON" in result.stderr
    closed_port = str(free_port())
    env = _broker_env(broker, RABBITMQ_PORT=closed_port, RABBITMQ_PASSWORD="s3cret")
    result = installed.run("publish", "public.x.trades", "{}", env=env)
    assert result.returncode == 1
    assert result.stderr.startswith("ranger-py publish: cannot publish to peatio.events.ranger at")
    assert f":{closed_port}/" in result.stderr
    assert "s3cret" not in result.stderr


# keygen, token and tail


class Lines:
    """The lines a subprocess writes, read by a thread so a test can wait for each one."""

    def __init__(self, stream: IO[str]) -> None:
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def next(self, timeout: float = 10.0) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout} s; seen: {self.seen}") from None
        assert line is not None, f"the stream ended; seen: {self.seen}"
        self.seen.append(line)
        return line


def _stop_tail(tail: subprocess.Popen[str]) -> int:
    tail.send_signal(signal.SIGINT)  # Ctrl-C
    try:
        return tail.wait(timeout=10)
    finally:
        if tail.poll() is None:
            tail.kill()


@pytest.mark.parametrize("algorithm", _ALGORITHMS)
def test_keygen_token_is_accepted_and_an_expired_one_refused(
    installed: Installed,
    start_server: StartServer,
    connect: Connect,
    tmp_path: Path,
    algorithm: str,
) -> None:
    home = {"HOME": str(tmp_path / "home")}  # keygen's default location, where token looks
    made = installed.run("keygen", "--alg", algorithm, env=home)
    assert made.returncode == 0, made.stderr
    prefix = "export JWT_PUBLIC_KEY="
    assert made.stdout.startswith(prefix)
    assert (tmp_path / "home" / ".config" / "ranger-py" / f"jwt-{algorithm.lower()}.pem").exists()
    server = start_server({"JWT_PUBLIC_KEY": made.stdout.strip().removeprefix(prefix)})

    uid = unique("ID").upper()
    minted = installed.run("token", "--uid", uid, env=home)
    assert minted.returncode == 0, minted.stderr
    good = minted.stdout.strip()
    client = connect(server, "/private?stream=order", headers={"Authorization": f"Bearer {good}"})
    assert client.recv() == subscribed("order")
    server.publish(f"private.{uid}.order", '{"id":1}')
    assert client.recv() == '{"order":{"id":1}}'

    expired = installed.run("token", "--uid", uid, "--ttl=-1h", env=home)
    assert expired.returncode == 0, expired.stderr
    with pytest.raises(InvalidStatus) as refused:
        Client(
            server.url("/private"), headers={"Authorization": f"Bearer {expired.stdout.strip()}"}
        )
    assert refused.value.response.status_code == 401

    # tail: the good token streams the user's events, the expired one is refused with the reason.
    url = f"ws://127.0.0.1:{server.port}"
    refused_tail = installed.run(
        "tail", "--url", url, "--private", "--token", expired.stdout.strip(), "order"
    )
    assert refused_tail.returncode == 1
    assert "refused the connection: HTTP 401" in refused_tail.stderr
    tail = installed.popen("tail", "--url", url, "--private", "--token", good, "order", "trade")
    try:
        lines = Lines(tail.stdout)  # type: ignore[arg-type]
        assert lines.next() == subscribed("order", "trade")
        server.publish(f"private.{uid}.trade", '{"id":7}')
        assert lines.next() == '{"trade":{"id":7}}'
    finally:
        assert _stop_tail(tail) == 0


def test_tail_prints_each_published_frame(installed: Installed, server: Server) -> None:
    stream = f"{unique()}.trades"
    tail = installed.popen("tail", "--url", f"ws://127.0.0.1:{server.port}", stream)
    try:
        lines = Lines(tail.stdout)  # type: ignore[arg-type]
        assert lines.next() == subscribed(stream)
        for number in (1, 2):
            server.publish(f"public.{stream}", f'{{"n":{number}}}')
            assert lines.next() == f'{{"{stream}":{{"n":{number}}}}}'
    finally:
        status = _stop_tail(tail)
    assert status == 0
    assert tail.stderr is not None
    err = tail.stderr.read()
    assert "connected to ws://127.0.0.1" in err
    assert "Traceback" not in err


def test_tail_without_a_server_fails_in_one_line(installed: Installed) -> None:
    result = installed.run("tail", "--url", f"ws://127.0.0.1:{free_port()}", "a.trades")
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("ranger-py tail: cannot connect to ws://127.0.0.1:")


# demo


def _book_frames(client: Client, market: str, count: int) -> list[dict[str, object]]:
    """The next ``count`` ``<market>`` order-book frames, decoded; other streams skipped."""
    frames: list[dict[str, object]] = []
    deadline = time.monotonic() + 30
    while len(frames) < count:
        assert time.monotonic() < deadline, f"only {len(frames)} book frames within 30 s"
        frame = json.loads(client.recv(timeout=10))
        for key in (f"{market}.ob-snap", f"{market}.ob-inc"):
            if key in frame:
                frames.append({"stream": key, **frame[key]})
    return frames


def _assert_gap_free_book(frames: list[dict[str, object]], market: str) -> None:
    assert frames[0]["stream"] == f"{market}.ob-snap", frames[0]
    sequences = [frame["sequence"] for frame in frames]
    increments = frames[1:]
    assert all(frame["stream"] == f"{market}.ob-inc" for frame in increments), frames
    first = sequences[0]
    assert isinstance(first, int), sequences
    assert sequences == list(range(first, first + len(frames))), sequences


def test_demo_publishes_a_book_a_client_applies_without_a_gap(
    installed: Installed, start_server: StartServer, broker: Broker, connect: Connect
) -> None:
    server = start_server(name="demo-target")
    client = connect(server, "/public?stream=btcusd.ob-inc")
    assert client.recv() == subscribed("btcusd.ob-inc")
    demo = installed.popen(
        "demo",
        "--rate",
        "200",
        "--duration",
        "20",
        env=_broker_env(broker, RANGER_EXCHANGE=server.exchange),
    )
    try:
        # The first snapshot of a book with none cached goes out live; increments follow it.
        _assert_gap_free_book(_book_frames(client, "btcusd", 15), "btcusd")
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=20) == 0


def test_serve_demo_serves_every_stream_with_no_broker(
    installed: Installed, connect: Connect, tmp_path: Path
) -> None:
    home = {"HOME": str(tmp_path / "home")}
    made = installed.run("keygen", "--alg", "EdDSA", env=home)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().removeprefix("export JWT_PUBLIC_KEY=")
    with socket.socket() as closed:  # a port where nothing listens: no RabbitMQ at all
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
    port, metrics_port = free_port(), free_port()
    env = {
        **home,
        "RABBITMQ_HOST": "127.0.0.1",
        "RABBITMQ_PORT": str(dead_port),
        "METRICS_HOST": "127.0.0.1",
        "METRICS_PORT": str(metrics_port),
        "JWT_PUBLIC_KEY": key,
    }
    serve = installed.popen("serve", "--demo", "--host", "127.0.0.1", "--port", str(port), env=env)
    try:

        def ready() -> bool:
            assert serve.poll() is None, serve.communicate()
            try:
                return http_request(port, "/readyz", timeout=2).status == 200
            except OSError:
                return False

        wait_until(ready, timeout=60, what="/readyz 200 in demo mode")
        url = f"ws://127.0.0.1:{port}"
        book = Client(f"{url}/public?stream=btcusd.ob-inc")
        tickers = Client(f"{url}/public?stream=global.tickers")
        token = installed.run("token", "--uid", "IDDEMO000001", env=home).stdout.strip()
        private = Client(
            f"{url}/private?stream=order", headers={"Authorization": f"Bearer {token}"}
        )
        try:
            # A late subscriber gets the cached snapshot, then increments with no gap.
            _assert_gap_free_book(_book_frames(book, "btcusd", 10), "btcusd")
            assert tickers.recv() == subscribed("global.tickers")
            assert "global.tickers" in json.loads(tickers.recv(timeout=15))
            assert private.recv() == subscribed("order")
            assert "order" in json.loads(private.recv(timeout=30))
        finally:
            for client in (book, tickers, private):
                client.close()
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        assert serve.wait(timeout=30) == 0

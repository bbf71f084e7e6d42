"""The metrics endpoint and gunicorn's forks (PROTOCOL §7): scrapes never hang a worker.

prometheus_client's multiprocess values share one lock that a fork copies as it is. The endpoint
therefore runs in a process of its own and the forking master runs no thread: a worker forked
while a scrape is served starts with a free lock. These tests scrape in a tight loop while
workers are killed and respawned, then check every scrape answered and every worker serves; and
that the endpoint is started once, survives a HUP, and stops with a SIGKILLed master.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from pathlib import Path

from .harness import Connect, Server, StartServer, unique, wait_until
from .scrape import Scrape
from .wsclient import Client, http_request, subscribed

WORKERS = 2
KILLS = 50
CONNECTED = "ranger_broker_connected"
SCRAPES = "promhttp_metric_handler_requests_total"
# Measured on a loaded 2-core machine: about 1 s per respawn (boot, broker, first flush).
STORM_BUDGET = 100.0

_OPEN_LINE = re.compile(r"\[(\d+)\] \w+ ranger_py\.connection: connection \d+ open ")
_ENDPOINT_LINE = re.compile(r"metrics on http://\S+ \(pid (\d+)\)")


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no Threads line for pid {pid}")


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: nobody may have reaped it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _endpoint_pids(server: Server) -> list[int]:
    return [int(pid) for pid in _ENDPOINT_LINE.findall(server.log_text())]


class _Scraper(threading.Thread):
    """Scrapes the endpoint back to back until stopped; keeps every failure."""

    def __init__(self, port: int) -> None:
        super().__init__(name="scraper", daemon=True)
        self.port = port
        self.stopping = threading.Event()
        self.answered = 0
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                response = http_request(self.port, "/metrics", timeout=10)
                if response.status != 200:
                    self.failures.append(f"status {response.status}")
                    continue
                if not Scrape.parse(response.body.decode()).has("process_resident_memory_bytes"):
                    self.failures.append("a scrape without process_resident_memory_bytes")
                    continue
                self.answered += 1
            except Exception as exc:  # every kind of failure is the finding
                self.failures.append(repr(exc))


def _connected_workers(server: Server) -> float:
    return server.scrape().value(CONNECTED)


def test_scrapes_during_50_worker_kills_all_answer_and_every_worker_serves(
    start_server: StartServer, connect: Connect
) -> None:
    server = start_server({"WEB_CONCURRENCY": str(WORKERS), "LOG_LEVEL": "info"}, name="forks")
    assert server.process is not None
    scraper = _Scraper(server.metrics_port)
    scraper.start()
    started = time.monotonic()
    try:
        for n in range(KILLS):
            workers = server.worker_pids()
            assert len(workers) == WORKERS, workers
            victim = workers[n % WORKERS]
            os.kill(victim, signal.SIGKILL)

            def respawned(victim: int = victim) -> bool:
                now = server.worker_pids()
                return len(now) == WORKERS and victim not in now

            wait_until(respawned, timeout=30, what=f"a worker in place of {victim} (kill {n})")
            # The newcomer consumes and writes its metrics: a worker hung on the lock would not.
            wait_until(
                lambda: _connected_workers(server) == WORKERS,
                timeout=30,
                what=f"{WORKERS} workers connected to the broker (kill {n})",
            )
            response = server.readyz()
            assert response is not None and response.status == 200
    finally:
        elapsed = time.monotonic() - started
        scraper.stopping.set()
        scraper.join(timeout=15)
    print(f"{KILLS} kills and respawns in {elapsed:.1f} s; {scraper.answered} scrapes")
    assert scraper.failures == []
    assert scraper.answered > KILLS
    assert elapsed < STORM_BUDGET
    # Nothing in the master can hold a value's lock at a fork: it runs one thread.
    assert _threads(server.process.pid) == 1

    server.wait_all_consuming(timeout=20)
    stream = f"{unique()}.trades"
    offset = server.log_size()
    clients: list[Client] = []
    while len(clients) < 2 or len(set(_OPEN_LINE.findall(server.log_text(offset)))) < WORKERS:
        assert len(clients) < 100, "every connection landed on the same worker"
        client = connect(server, f"/public?stream={stream}")
        assert client.recv() == subscribed(stream)
        clients.append(client)
    server.publish(f"public.{stream}", '{"after":"storm"}')
    for client in clients:
        assert client.recv() == f'{{"{stream}":{{"after":"storm"}}}}'


def test_the_endpoint_is_one_process_outside_the_workers_kept_by_hup_gone_with_the_master(
    start_server: StartServer, tmp_path: Path
) -> None:
    # A directory of the test's: a SIGKILLed master cannot remove its own.
    server = start_server(
        {"WEB_CONCURRENCY": str(WORKERS), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")},
        name="endpoint",
    )
    assert server.process is not None
    master = server.process.pid
    [endpoint] = _endpoint_pids(server)
    assert _running(endpoint)
    # Not the master's child: the master's children are its workers, all of them.
    assert endpoint not in server.worker_pids()
    assert _threads(master) == 1
    server.scrape()

    old_workers = set(server.worker_pids())
    server.signal(signal.SIGHUP)
    wait_until(
        lambda: len(now := set(server.worker_pids())) == WORKERS and not now & old_workers,
        timeout=30,
        what="new workers after HUP",
    )
    # The same endpoint serves on: not started twice, not lost.
    assert _endpoint_pids(server) == [endpoint]
    assert _running(endpoint)
    before = server.scrape().value(SCRAPES, code="200")
    assert server.scrape().value(SCRAPES, code="200") == before + 1

    workers = server.worker_pids()
    os.kill(master, signal.SIGKILL)
    server.wait_exit(timeout=10)
    try:
        wait_until(lambda: not _running(endpoint), timeout=10, what="the endpoint to stop")
        try:
            http_request(server.metrics_port, "/metrics", timeout=2)
        except OSError:
            pass
        else:
            raise AssertionError("the metrics port still answers")
    finally:
        for worker in workers:  # orphans of the killed master; they would leave on their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)

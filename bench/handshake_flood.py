"""Slow handshakes against real clients: ``python -m bench.handshake_flood``.

A slowloris attacker opens ``--sockets`` connections to one worker, sends the first line of an
upgrade request and then one header byte every ``--trickle`` seconds, and reconnects whenever the
server cuts it. Meanwhile a prober makes one real websocket handshake every ``--probe-interval``
seconds and times it (TCP connect to the 101). Each configuration given with ``--config`` is run
in turn on a fresh server, in one run, so their figures compare; the server's RSS (master and
worker) is read with the attack at full strength.

The attacker runs in a process of its own (asyncio), so its work never delays the prober's clock.
Everything goes to 127.0.0.1; the attack stops by itself after ``--seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import multiprocessing
import os
import resource
import secrets
import socket
import sys
import tempfile
import time
from pathlib import Path

from bench.server import Broker, Server, ServerSpec
from bench.tokens import Signer

# Today's settings and the old effective ones (gunicorn's 1000 slots and 2 s keepalive).
DEFAULT_CONFIGS = [
    "RANGER_MAX_HANDSHAKES=1000,RANGER_HANDSHAKE_TIMEOUT=2",
    "defaults",
]


def _attack(port: int, sockets: int, trickle: float, seconds: float, counts: object) -> None:
    """The slowloris process: ``sockets`` trickling handshakes, each reconnecting when cut."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    stop_at = time.monotonic() + seconds
    head = b"GET /public HTTP/1.1\r\nHost: 127.0.0.1\r\n"

    async def one() -> None:
        while time.monotonic() < stop_at:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            counts[0] += 1  # type: ignore[index]
            try:
                writer.write(head)
                while time.monotonic() < stop_at:
                    writer.write(b"X")
                    await writer.drain()
                    try:
                        data = await asyncio.wait_for(reader.read(1024), trickle)
                    except TimeoutError:
                        continue
                    if not data:
                        counts[1] += 1  # type: ignore[index]
                        break  # cut by the server: reconnect at once, as an attacker would
            except OSError:
                counts[1] += 1  # type: ignore[index]
            finally:
                writer.close()

    async def main() -> None:
        await asyncio.gather(*(one() for _ in range(sockets)))

    asyncio.run(main())


def _handshake_ms(port: int, timeout: float) -> float | None:
    key = base64.b64encode(secrets.token_bytes(16))
    request = (
        b"GET /public HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    start = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    return None
                data += chunk
            if not data.startswith(b"HTTP/1.1 101"):
                return None
    except OSError:
        return None
    return (time.perf_counter() - start) * 1000


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def _run_config(args: argparse.Namespace, broker: Broker, key: str, config: str) -> None:
    env = {}
    if config != "defaults":
        env = dict(item.split("=", 1) for item in config.split(","))
    log = Path(tempfile.mkdtemp(prefix="ranger-flood-")) / "server.log"
    server = Server(
        ServerSpec("ranger-py"), broker, log_path=log, jwt_public_key=key, extra_env=env
    )
    server.start()
    try:
        idle = server.sample()
        counts = multiprocessing.Array("q", 2)
        attacker = multiprocessing.Process(
            target=_attack,
            args=(server.port, args.sockets, args.trickle, args.seconds, counts),
            daemon=True,
        )
        attacker.start()
        time.sleep(args.warmup)
        under_attack = server.sample()
        times: list[float] = []
        failed = 0
        deadline = time.monotonic() + args.seconds - args.warmup - 1
        while time.monotonic() < deadline:
            ms = _handshake_ms(server.port, timeout=10)
            if ms is None:
                failed += 1
            else:
                times.append(ms)
            time.sleep(args.probe_interval)
        attacker.join(timeout=args.seconds + 30)
        if attacker.is_alive():
            attacker.kill()
        print(f"\n{config}")
        print(
            f"  attacker: {args.sockets} sockets, a byte every {args.trickle:g} s;"
            f" {counts[0]} connections opened, {counts[1]} cut by the server"
        )
        print(
            f"  server RSS: {idle.rss_bytes / 1e6:.1f} MB idle,"
            f" {under_attack.rss_bytes / 1e6:.1f} MB under attack"
        )
        if times:
            print(
                f"  real handshakes: {len(times)} ok, {failed} failed;"
                f" p50 {_percentile(times, 50):.1f} ms, p99 {_percentile(times, 99):.1f} ms,"
                f" max {max(times):.1f} ms"
            )
        else:
            print(f"  real handshakes: none succeeded ({failed} failed)")
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.handshake_flood", description=__doc__)
    parser.add_argument("--sockets", type=int, default=3000, help="trickling sockets (3000)")
    parser.add_argument("--trickle", type=float, default=2.0, help="seconds between bytes (2)")
    parser.add_argument("--seconds", type=float, default=40.0, help="attack length (40)")
    parser.add_argument("--warmup", type=float, default=10.0, help="before probing (10)")
    parser.add_argument("--probe-interval", type=float, default=0.05, help="seconds (0.05)")
    parser.add_argument(
        "--config",
        action="append",
        help="NAME=VALUE,... server settings to compare, or 'defaults' (repeatable)",
    )
    args = parser.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the server inherits it
    broker = Broker()
    broker.check_reachable()
    broker.setup()
    try:
        key = Signer().public_env
        print(f"handshake flood on {os.cpu_count()} cores, pid {os.getpid()}; run alone")
        for config in args.config or DEFAULT_CONFIGS:
            _run_config(args, broker, key, config)
    finally:
        broker.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

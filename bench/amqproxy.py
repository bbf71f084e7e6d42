"""A TCP proxy between the server under test and RabbitMQ, whose connections can be cut.

Run by the soak program (:mod:`bench.soak`) as ``python -m bench.amqproxy`` and driven over
:mod:`bench.rpc`. The server's ``RABBITMQ_PORT`` points here; every connection is piped to the
real broker byte for byte. ``cut`` aborts every piped connection on both sides (the server sees
its AMQP connection reset, the broker drops the server's exclusive queue) and stops listening, so
that reconnection attempts are refused (ECONNREFUSED); ``restore`` listens on the same port again.
Only loopback addresses are used.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import time
from typing import Any

import uvloop

from bench import rpc

__all__ = ["Proxy", "main"]

_CHUNK = 1 << 16
_UPSTREAM_TIMEOUT = 5.0
_REBIND_FOR_S = 5.0


def _require_loopback(host: str) -> None:
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"the proxy works on loopback addresses only, not {host!r}")


class Proxy:
    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self.upstream: tuple[str, int] = ("127.0.0.1", 5672)
        self.server: asyncio.AbstractServer | None = None
        self.pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.accepted = 0
        self.upstream_failures = 0
        self.cut_connections = 0
        self.bytes_to_broker = 0
        self.bytes_to_server = 0

    async def listen(self, *, upstream_host: str, upstream_port: int) -> dict[str, Any]:
        _require_loopback(upstream_host)
        self.upstream = (upstream_host, upstream_port)
        self.server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return {"port": self.port}

    async def cut(self) -> dict[str, Any]:
        """Stop listening and abort every piped connection, on both sides."""
        if self.server is not None:
            self.server.close()
            self.server = None
        aborted = 0
        for pair in list(self.pairs):
            for writer in pair:
                writer.transport.abort()
            aborted += 1
        self.pairs.clear()
        self.cut_connections += aborted
        await asyncio.sleep(0)
        return {"aborted": aborted, "mono_s": time.monotonic()}

    async def restore(self) -> dict[str, Any]:
        """Listen on the same port again (retrying briefly while the kernel still holds it)."""
        if self.server is not None:
            return {"mono_s": time.monotonic()}
        deadline = time.monotonic() + _REBIND_FOR_S
        while True:
            try:
                self.server = await asyncio.start_server(
                    self._accept, self.host, self.port, reuse_address=True
                )
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        return {"mono_s": time.monotonic()}

    async def stats(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "listening": self.server is not None,
            "open_connections": len(self.pairs),
            "accepted": self.accepted,
            "upstream_failures": self.upstream_failures,
            "cut_connections": self.cut_connections,
            "bytes_to_broker": self.bytes_to_broker,
            "bytes_to_server": self.bytes_to_server,
        }

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.upstream), _UPSTREAM_TIMEOUT
            )
        except (OSError, TimeoutError):
            self.upstream_failures += 1
            writer.transport.abort()
            return
        if self.server is None:  # cut while connecting upstream
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self.accepted += 1
        pair = (writer, up_writer)
        self.pairs.add(pair)
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, to_broker=True),
                self._pipe(up_reader, writer, to_broker=False),
            )
        finally:
            self.pairs.discard(pair)
            writer.transport.abort()
            up_writer.transport.abort()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, to_broker: bool
    ) -> None:
        """Copy until either side ends; then end the other (AMQP needs no half-close)."""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(_CHUNK):
                if to_broker:
                    self.bytes_to_broker += len(data)
                else:
                    self.bytes_to_server += len(data)
                writer.write(data)
                await writer.drain()
        writer.transport.abort()


async def _main() -> None:
    proxy = Proxy()
    try:
        await rpc.serve_async(
            {
                "listen": proxy.listen,
                "cut": proxy.cut,
                "restore": proxy.restore,
                "stats": proxy.stats,
            }
        )
    finally:
        await proxy.cut()


def main() -> None:
    uvloop.run(_main())


if __name__ == "__main__":
    main()

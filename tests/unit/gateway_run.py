"""A whole worker's gateway, run by tests/unit/test_gateway.py in a process of its own.

The consumer and the demo feed block in the standard library (kombu's polling sleeps,
``threading.Event``), which only gevent's monkey-patching makes cooperative, as gunicorn's worker
does before anything is imported. The unit test process is not patched, so this module is
imported by ``python -c`` right after ``gevent.monkey.patch_all()``; it runs one scenario and
prints what it saw as one JSON object, for the test to check. Log lines go to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent import monkey

from ranger_py.auth import ANONYMOUS, Authenticator
from ranger_py.config import Config
from ranger_py.connection import Connection
from ranger_py.gateway import Gateway
from ranger_py.handshake import switching_protocols
from tests.unit.wsutil import Peer, masked, tcp_pair

__all__ = ["GREETING", "SHUTDOWN_TIMEOUT", "main"]

GREETING = switching_protocols(b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
SHUTDOWN_TIMEOUT = 2.0


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        gevent.sleep(0.02)
    return True


def _connect(gateway: Gateway, streams: list[str]) -> tuple[Connection, Peer]:
    server, client = tcp_pair()
    conn = gateway.attach(server.detach(), GREETING, ANONYMOUS, "/public", streams)
    peer = Peer(client)  # a gevent socket: the standard library is patched
    peer.sock.settimeout(10)
    return conn, peer


def _state(gateway: Gateway) -> dict[str, Any]:
    return {"ready": gateway.ready, "status": gateway.status, "full": gateway.full}


def _text(peer: Peer) -> str:
    opcode, payload = peer.frame()
    return f"{opcode}:{payload.decode()}"


def _answer_close(peer: Peer, started: list[float]) -> dict[str, Any]:
    """A client that plays its part of the closing handshake, as a browser does."""
    opcodes = set()
    while True:
        opcode, payload = peer.frame()
        if opcode == 0x8:
            break
        opcodes.add(opcode)
    peer.sock.sendall(masked(0x8, payload[:2]))
    try:
        peer.frame()
        eof = False
    except EOFError:
        eof = True
    return {
        "close": payload.hex(),
        "before_close": sorted(opcodes),
        "eof": eof,
        "eof_after": time.monotonic() - started[0],
    }


def _read_to_the_end(peer: Peer) -> dict[str, Any]:
    """What a client that never answered finds in its socket afterwards."""
    frames = []
    try:
        while True:
            opcode, payload = peer.frame()
            frames.append(f"{opcode}:{payload.hex()}")
    except EOFError:
        return {"frames": frames, "eof": True}


def scenario() -> dict[str, Any]:
    seen: dict[str, Any] = {}
    config = Config.from_env({"RANGER_DEMO": "on", "RANGER_MAX_CONNECTIONS": "2"})
    gateway = Gateway(config, Authenticator.from_config(config))
    seen["before_start"] = _state(gateway)
    gateway.start()
    seen["ready_within_10s"] = _wait(lambda: gateway.ready, 10.0)
    seen["started"] = _state(gateway)

    answering, answering_peer = _connect(gateway, ["global.tickers"])
    seen["greeting"] = answering_peer.read(len(GREETING)).decode()
    seen["subscribed"] = _text(answering_peer)
    seen["first_live"] = _text(answering_peer)
    seen["received_by_first_live"] = gateway.received
    seen["one_client"] = _state(gateway)

    silent, silent_peer = _connect(gateway, [])
    seen["silent_greeting"] = silent_peer.read(len(GREETING)).decode()
    seen["silent_subscribed"] = _text(silent_peer)
    seen["two_clients"] = _state(gateway)

    started = [0.0]
    answerer = gevent.spawn(_answer_close, answering_peer, started)
    gevent.sleep(0)  # the answerer is reading before the shutdown begins
    started[0] = time.monotonic()
    gateway.shutdown(SHUTDOWN_TIMEOUT)
    seen["shutdown_seconds"] = time.monotonic() - started[0]
    seen["after_shutdown"] = {
        **_state(gateway),
        "accepting": gateway.accepting,
        "clients": len(gateway.clients),
        "consumer_ready": gateway.consumer.ready,
    }
    seen["answering"] = answerer.get(timeout=5)
    seen["silent"] = _read_to_the_end(silent_peer)
    seen["states"] = [answering.state.name, silent.state.name]
    return seen


def main() -> None:
    if not monkey.is_module_patched("socket"):
        raise SystemExit("import this module after gevent.monkey.patch_all()")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    with gevent.Timeout(30):
        seen = scenario()
    print(json.dumps(seen))

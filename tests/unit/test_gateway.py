"""ranger_py.gateway: one worker's parts wired, started, serving a client and shut down.

No broker: ``RANGER_DEMO=on`` makes the real consumer read the demo feed from kombu's in-memory
transport. Both block in the standard library, so the gateway runs in a child process that
patches it with gevent first, as gunicorn's worker does (tests/unit/gateway_run.py); this
process is not patched. The child prints what it saw; the tests below check it.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.unit.gateway_run import GREETING, SHUTDOWN_TIMEOUT

REPO = Path(__file__).resolve().parents[2]
BOOTSTRAP = (
    "from gevent import monkey; monkey.patch_all(); from tests.unit.gateway_run import main; main()"
)
SHUTDOWN_CLOSE = (struct.pack("!H", 1001) + b"server shutdown").hex()


@dataclass(frozen=True)
class Run:
    seen: dict[str, Any]
    log: str


@pytest.fixture(scope="module")
def run() -> Run:
    result = subprocess.run(
        [sys.executable, "-c", BOOTSTRAP],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return Run(json.loads(result.stdout), result.stderr)


def test_the_gateway_becomes_ready_consuming_the_demo_feed(run: Run) -> None:
    assert run.seen["before_start"] == {"ready": False, "status": "connecting", "full": False}
    assert run.seen["ready_within_10s"]
    assert run.seen["started"] == {"ready": True, "status": "consuming", "full": False}


def test_a_client_gets_the_101_its_reply_then_the_demo_feed(run: Run) -> None:
    assert run.seen["greeting"] == GREETING.decode()
    reply = '{"success":{"message":"subscribed","streams":["global.tickers"]}}'
    assert run.seen["subscribed"] == f"1:{reply}"
    opcode, _, payload = run.seen["first_live"].partition(":")
    assert opcode == "1"
    tickers = json.loads(payload)["global.tickers"]
    assert set(tickers) == {"btcusd", "ethusd"}


def test_the_gateways_received_count_has_the_message_the_client_got(run: Run) -> None:
    # What /healthz reports as "received": the worker's own count, not flushed yet or flushed.
    assert run.seen["received_by_first_live"] >= 1


def test_full_at_max_connections(run: Run) -> None:
    assert run.seen["one_client"] == {"ready": True, "status": "consuming", "full": False}
    assert run.seen["silent_subscribed"] == '1:{"success":{"message":"subscribed","streams":[]}}'
    assert run.seen["two_clients"] == {
        "ready": False,
        "status": "too many connections",
        "full": True,
    }


def test_shutdown_closes_every_client_with_1001_server_shutdown(run: Run) -> None:
    answering = run.seen["answering"]
    assert answering["close"] == SHUTDOWN_CLOSE
    # The client answered: its socket is closed at once, not at the deadline.
    assert answering["eof"] and answering["eof_after"] < 1.0
    assert run.seen["silent"] == {"frames": [f"8:{SHUTDOWN_CLOSE}"], "eof": True}
    assert run.seen["states"] == ["CLOSED", "CLOSED"]


def test_shutdown_stops_accepting_and_returns_within_its_timeout(run: Run) -> None:
    assert run.seen["after_shutdown"] == {
        "ready": False,
        "status": "shutting down",
        "full": False,
        "accepting": False,
        "clients": 0,
        "consumer_ready": False,
    }
    # The silent client holds it up to the deadline, not past it.
    assert SHUTDOWN_TIMEOUT <= run.seen["shutdown_seconds"] < SHUTDOWN_TIMEOUT + 0.5


def test_the_log_says_how_each_client_ended(run: Run) -> None:
    lines = run.log.splitlines()
    assert "ranger_py.connection: connection 1 open path=/public uid=-" in lines
    assert (
        "ranger_py.connection: connection 1 closed path=/public uid=-:"
        " closed (close 1001 server shutdown)"
    ) in lines
    assert (
        "ranger_py.connection: connection 2 closed path=/public uid=-:"
        " shutdown timeout (close 1001 server shutdown)"
    ) in lines
    assert "ranger_py.consumer: consumer stopped" in lines
    assert "Traceback" not in run.log

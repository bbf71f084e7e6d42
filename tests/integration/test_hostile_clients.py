"""Clients that try to cost others memory, CPU, metrics or secrets (PROTOCOL §2, §3, §7).

Each test is a regression test of an attack that once worked: the server's answer to the attacker
is asserted exactly, and a canary client subscribed throughout must miss nothing.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import serialization

from .broker import Broker
from .harness import Connect, Server, ServerPool, StartServer, unique, wait_until
from .rawws import OPCODE_PONG, OPCODE_TEXT, RawSocket, masked_frame
from .tcp_proxy import TcpProxy
from .tokens import SigningKey
from .wsclient import Client, http_request, subscribed

# The rate bound off, where a test is about the byte bound alone.
NO_RATE_LIMIT = {"RANGER_CLIENT_RATE": "1000000", "RANGER_CLIENT_BURST": "1000000"}
DEFAULT_BURST = 100


def _canary(server: Server, connect: Connect) -> tuple[Client, str]:
    stream = f"{unique()}.trades"
    canary = connect(server, f"/public?stream={stream}")
    assert canary.recv() == subscribed(stream)
    return canary, stream


def _canary_gets(server: Server, canary: Client, stream: str, numbers: range) -> None:
    for n in numbers:
        server.publish(f"public.{stream}", f'{{"n":{n}}}')
    assert canary.recv_many(len(numbers)) == [f'{{"{stream}":{{"n":{n}}}}}' for n in numbers]


# -- output a client causes but does not read ---------------------------------------------------


def _wait_for_slow_client(server: Server) -> None:
    # The attacker must not read until the server has given up on it: on a loaded machine the
    # server may still be working through the flood, and a client that reads as fast as it is
    # answered is no slow client.
    wait_until(
        lambda: "send queue full, closing slow client" in server.log_text(),
        timeout=30,
        what="the slow-client warning",
    )


def test_a_ping_flood_from_a_client_that_does_not_read_is_a_slow_client(
    start_server: StartServer, connect: Connect
) -> None:
    # Pongs once bypassed the send-queue bound: a client sending pings without reading grew the
    # worker by hundreds of MB. Every byte queued counts now, so it is closed like a slow reader.
    server = start_server(
        {"RANGER_SEND_QUEUE_BYTES": "65536", "RANGER_WRITE_TIMEOUT": "60", **NO_RATE_LIMIT},
        name="ping-flood",
    )
    canary, stream = _canary(server, connect)
    attacker = RawSocket(server.port, receive_buffer=4096)
    assert attacker.status == 101
    pings = masked_frame(0x9, b"p" * 125) * 100
    sent = 0
    for round_ in range(200):  # 20,000 pings: 2.5 MB of pongs owed, far past every buffer
        attacker.send(pings)
        sent += 100
        if round_ % 50 == 0:
            _canary_gets(server, canary, stream, range(round_, round_ + 1))
    _wait_for_slow_client(server)  # read nothing before: reading would make it a fast client
    frames, code, reason = attacker.until_close()
    assert (code, reason) == (1008, b"slow client")
    assert frames[0] == (OPCODE_TEXT, subscribed().encode())
    pongs = frames[1:]
    assert pongs == [(OPCODE_PONG, b"p" * 125)] * len(pongs)
    assert len(pongs) < sent
    _canary_gets(server, canary, stream, range(1000, 1010))
    canary.assert_alive()


def test_a_subscribe_flood_from_a_client_that_does_not_read_is_a_slow_client(
    start_server: StartServer, connect: Connect
) -> None:
    server = start_server(
        {
            "RANGER_SEND_QUEUE_BYTES": "65536",
            "RANGER_WRITE_TIMEOUT": "60",
            # Bound to everything (the default): no request waits for a binding.
            "RANGER_BROKER_ROUTING": "all",
            **NO_RATE_LIMIT,
        },
        name="subscribe-flood",
    )
    canary, stream = _canary(server, connect)
    attacker = RawSocket(server.port, receive_buffer=4096)
    # Each request is answered with the whole list: 30 long names make a reply of ~3.5 KB.
    names = [f"{unique()}.{'x' * 100}" for _ in range(30)]
    request = masked_frame(0x1, json.dumps({"event": "subscribe", "streams": names}).encode())
    for _ in range(1000):
        attacker.send(request)
    _wait_for_slow_client(server)
    frames, code, reason = attacker.until_close()
    assert (code, reason) == (1008, b"slow client")
    assert 1 < len(frames) < 1000
    _canary_gets(server, canary, stream, range(5))


def test_a_flood_behind_a_subscribe_that_waits_for_the_broker_is_closed(
    start_server: StartServer, connect: Connect
) -> None:
    server = start_server(
        {**NO_RATE_LIMIT, "RANGER_BROKER_ROUTING": "subscribed"}, name="held-flood"
    )
    canary, stream = _canary(server, connect)
    attacker = RawSocket(server.port)
    assert attacker.frame() == (OPCODE_TEXT, subscribed().encode())
    # New streams each time: the first request waits for its bindings, the rest are held.
    for _ in range(1000):
        names = [f"{unique()}.trades" for _ in range(30)]
        attacker.send(
            masked_frame(0x1, json.dumps({"event": "subscribe", "streams": names}).encode())
        )
    frames, code, reason = attacker.until_close()
    assert (code, reason) == (1008, b"too many requests awaiting a subscription")
    assert len(frames) < 1000
    _canary_gets(server, canary, stream, range(5))


# -- what a client can make the server do per second ----------------------------------------------


def test_a_ping_flood_is_closed_past_the_burst(server: Server, connect: Connect) -> None:
    canary, stream = _canary(server, connect)
    attacker = RawSocket(server.port)
    assert attacker.frame() == (OPCODE_TEXT, subscribed().encode())
    attacker.send(masked_frame(0x9, b"x") * (DEFAULT_BURST + 50))
    frames, code, reason = attacker.until_close()
    assert (code, reason) == (1008, b"too many messages")
    # The burst is answered (plus at most what the rate refilled meanwhile), nothing after it.
    assert DEFAULT_BURST <= len(frames) <= DEFAULT_BURST + 2
    assert set(frames) == {(OPCODE_PONG, b"x")}
    _canary_gets(server, canary, stream, range(3))


def test_a_subscribe_flood_is_closed_past_the_burst(server: Server, connect: Connect) -> None:
    canary, stream = _canary(server, connect)
    attacker = RawSocket(server.port)
    assert attacker.frame() == (OPCODE_TEXT, subscribed().encode())
    # The canary's stream: bound already, so every request is answered at once (a flood behind
    # one that waits for its binding: test_a_flood_behind_a_subscribe_that_waits...).
    name = stream
    request = masked_frame(0x1, json.dumps({"event": "subscribe", "streams": [name]}).encode())
    attacker.send(request * (DEFAULT_BURST + 50))
    frames, code, reason = attacker.until_close()
    assert (code, reason) == (1008, b"too many messages")
    assert DEFAULT_BURST <= len(frames) <= DEFAULT_BURST + 2
    assert set(frames) == {(OPCODE_TEXT, subscribed(name).encode())}
    _canary_gets(server, canary, stream, range(3))


def test_a_client_within_its_rate_is_served(server: Server, connect: Connect) -> None:
    client = connect(server, "/public")
    assert client.recv() == subscribed()
    for _ in range(DEFAULT_BURST - 5):  # almost the whole burst at once...
        client.send("ping")
    assert client.recv_many(DEFAULT_BURST - 5) == ["pong"] * (DEFAULT_BURST - 5)
    time.sleep(1.5)  # ...then the default rate (10 a second) refills some of it
    for _ in range(15):
        assert client.request("ping") == "pong"


# -- client text reaching metrics ----------------------------------------------------------------


def test_hostile_stream_names_never_break_the_metrics(
    start_server: StartServer, connect: Connect
) -> None:
    # A stream called "\ud800.x" once made every later scrape answer 500 (UnicodeEncodeError in
    # the text exposition), until restart.
    server = start_server(name="hostile-names")
    canary, stream = _canary(server, connect)
    attacker = connect(server, "/public")
    assert attacker.recv() == subscribed()
    no_utf8 = '{"event":"subscribe","streams":["\\ud800.x"]}'
    assert attacker.request(no_utf8) == '{"error":"Invalid stream name"}'
    too_long = json.dumps({"event": "subscribe", "streams": ["m." + "z" * 300]})
    assert attacker.request(too_long) == '{"error":"Invalid stream name"}'
    # Deliverable, but nothing a dashboard should show: held, and counted under "_invalid".
    odd = "bell\u0007\u200b.x"
    assert attacker.request(json.dumps({"event": "subscribe", "streams": [odd]})) == subscribed(odd)

    def invalid_label_counted() -> bool:
        response = http_request(server.metrics_port, "/metrics")
        assert response.status == 200, response.body[:500]
        line = 'rango_hub_subscriptions_count{topic="_invalid",type="public"} 1.0'
        return line in response.body.decode()

    wait_until(invalid_label_counted, timeout=10, what="the _invalid label in a scrape")
    attacker.close()
    for _ in range(3):
        assert http_request(server.metrics_port, "/metrics").status == 200
    _canary_gets(server, canary, stream, range(3))


# -- secrets ---------------------------------------------------------------------------------------


def test_a_private_key_in_jwt_public_key_stops_startup_and_is_never_logged(
    pool: ServerPool, rsa: SigningKey
) -> None:
    pem = rsa.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    value = base64.b64encode(pem).decode()
    server = pool.new({"JWT_PUBLIC_KEY": value, "LOG_LEVEL": "debug"}, name="private-key")
    server.start(wait=False)
    assert server.wait_exit(timeout=30) != 0
    log = server.log_text()
    assert "ranger-py: invalid configuration: JWT_PUBLIC_KEY: holds a PRIVATE KEY;" in log
    assert "Listening at" not in log  # refused before anything listens
    for secret in (value[:40], value[100:140], pem.decode().splitlines()[3]):
        assert secret not in log


def test_the_public_key_is_logged_as_a_fingerprint(server: Server, rsa: SigningKey) -> None:
    log = server.log_text()
    assert "config JWT_PUBLIC_KEY=*** (" in log
    assert rsa.public_env[:40] not in log


# -- origins ---------------------------------------------------------------------------------------


def _upgrade_status(server: Server, origin: str) -> int:
    attacker = RawSocket(server.port, headers={"Origin": origin})
    try:
        return attacker.status
    finally:
        attacker.close()


def test_a_trailing_comma_in_api_cors_origins_lets_no_null_origin_in(
    start_server: StartServer,
) -> None:
    server = start_server({"API_CORS_ORIGINS": "https://exchange.example,"}, name="cors-comma")
    assert _upgrade_status(server, "null") == 403
    assert _upgrade_status(server, "https://evil.example") == 403
    assert _upgrade_status(server, "https://exchange.example") == 101


def test_a_star_in_api_cors_origins_allows_any_origin_with_a_warning(
    start_server: StartServer,
) -> None:
    server = start_server({"API_CORS_ORIGINS": "*"}, name="cors-star")
    assert _upgrade_status(server, "https://anywhere.example") == 101
    assert _upgrade_status(server, "null") == 101
    assert "WARNING gunicorn.error: API_CORS_ORIGINS=*: web pages of every origin" in (
        server.log_text()
    )


def test_an_origin_with_another_scheme_stops_startup(pool: ServerPool) -> None:
    server = pool.new({"API_CORS_ORIGINS": "https://a.example,ftp://x"}, name="cors-ftp")
    server.start(wait=False)
    assert server.wait_exit(timeout=30) != 0
    assert (
        'ranger-py: invalid configuration: API_CORS_ORIGINS: "ftp://x": only http and https'
        " origins can be allowed"
    ) in server.log_text()


# -- handshakes ------------------------------------------------------------------------------------


def test_refused_upgrades_are_logged_one_line_each_and_rate_limited(
    start_server: StartServer,
) -> None:
    server = start_server({"LOG_LEVEL": "info"}, name="refusals")
    for _ in range(30):
        assert _upgrade_status(server, "https://evil.example") == 403
    line = "refused upgrade /public from 127.0.0.1: 403 Origin not allowed"
    wait_until(lambda: line in server.log_text(), timeout=5, what="a refusal line")
    # 20 lines per 10 s at most; a slow machine may cross into a second window.
    assert 20 <= server.log_text().count(line) < 30


def test_a_handshake_that_trickles_is_cut_at_the_deadline(start_server: StartServer) -> None:
    server = start_server({"RANGER_HANDSHAKE_TIMEOUT": "1"}, name="trickle")
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    started = time.monotonic()
    sock.sendall(b"GET /public HTTP/1.1\r\nHost: x\r\n")
    cut = False
    try:
        for _ in range(40):  # a header byte every 0.25 s, as a slowloris does: 10 s at most
            sock.sendall(b"X")
            time.sleep(0.25)
    except OSError:
        cut = True
    if not cut:
        sock.settimeout(1)
        cut = sock.recv(1) == b""
    elapsed = time.monotonic() - started
    sock.close()
    assert cut, "the trickling handshake was never cut"
    assert elapsed < 5, f"cut after {elapsed:.1f} s with a 1 s deadline"
    http_request(server.port, "/healthz")


def test_a_large_token_is_accepted(server: Server, connect: Connect, rsa: SigningKey) -> None:
    # Barong tokens with many claims, signed RS512, pass 8 KB: the header limit is 16 KB.
    bearer = rsa.bearer(uid=f"U{unique()}", pad="x" * 9000)
    assert 9000 < len(bearer) < 16000
    client = connect(server, "/private?stream=order", headers={"Authorization": bearer})
    assert client.recv() == subscribed("order")


def test_a_token_past_the_header_limit_gets_a_4xx(server: Server, rsa: SigningKey) -> None:
    bearer = rsa.bearer(pad="x" * 17000)
    attacker = RawSocket(server.port, "/private", headers={"Authorization": bearer})
    assert attacker.status in (400, 431)
    attacker.close()


def test_readyz_says_unavailable_while_the_worker_is_full(
    start_server: StartServer, connect: Connect
) -> None:
    server = start_server({"RANGER_MAX_CONNECTIONS": "1"}, name="full")
    client = connect(server, "/public")
    assert client.recv() == subscribed()
    response = server.readyz()
    assert response is not None
    (worker,) = server.worker_pids()
    assert (response.status, response.json()) == (
        503,
        {"status": "unavailable", "reason": "too many connections", "worker": worker},
    )
    assert _upgrade_status(server, f"http://127.0.0.1:{server.port}") == 503
    client.close()
    wait_until(
        lambda: (r := server.readyz()) is not None and r.status == 200,
        timeout=10,
        what="/readyz 200 once a slot is free",
    )


# -- a broker that goes silent ---------------------------------------------------------------------


@pytest.fixture
def proxy(broker: Broker) -> Iterator[TcpProxy]:
    proxy = TcpProxy(broker.host, broker.port)
    yield proxy
    proxy.close()


def test_a_broker_connection_that_goes_silent_is_replaced(
    start_server: StartServer, proxy: TcpProxy, connect: Connect
) -> None:
    server = start_server(
        {"RANGER_BROKER_HEARTBEAT": "3"}, rabbitmq=("127.0.0.1", proxy.port), name="frozen"
    )
    canary, stream = _canary(server, connect)
    _canary_gets(server, canary, stream, range(1))
    accepted = proxy.accepted
    proxy.freeze()  # TCP stays open; nothing crosses it any more, not even heartbeats
    started = time.monotonic()
    wait_until(lambda: proxy.accepted > accepted, timeout=20, what="a new broker connection")
    noticed = time.monotonic() - started
    # Two missed heartbeats (6 s) and the once-a-second check; never the old ~20 s.
    assert noticed < 12, f"a silent broker was noticed after {noticed:.1f} s"
    wait_until(
        lambda: (r := server.readyz()) is not None and r.status == 200,
        timeout=20,
        what="/readyz 200 after the reconnect",
    )
    _canary_gets(server, canary, stream, range(1, 4))

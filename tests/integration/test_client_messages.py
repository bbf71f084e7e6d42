"""What clients send, end to end (PROTOCOL §2 and §4): ping, errors, limits; Ruby spec case 15.

Every error reply leaves the connection open, which each test checks with a final ``ping``.
"""

from __future__ import annotations

import contextlib
import json

import pytest
from websockets.exceptions import ConnectionClosed

from .harness import Connect, Server, unique
from .wsclient import Client, subscribed

MAX_MESSAGE_SIZE = 4096  # the default inbound limit (PROTOCOL §2)
MAX_STREAMS = 100  # the default per-connection stream limit (PROTOCOL §4)


@pytest.fixture
def client(server: Server, connect: Connect) -> Client:
    client = connect(server)
    assert client.recv() == subscribed()
    return client


@pytest.mark.parametrize("message", ["ping", " ping", "ping\n", "\t ping \r\n"])
def test_ruby_case_15_ping_gets_pong(client: Client, message: str) -> None:
    assert client.request(message) == "pong"


@pytest.mark.parametrize("message", ["", " ", "\n\t "])
def test_empty_message_is_ignored(client: Client, message: str) -> None:
    client.send(message)
    assert client.request("ping") == "pong"


@pytest.mark.parametrize(
    "message",
    ["hello", "{", '{"event":', "[]", '["subscribe"]', "null", "42", '"text"', "pingpong"],
)
def test_not_json_or_not_an_object(client: Client, message: str) -> None:
    reply = client.request(message)
    prefix = '{"error":"Could not parse message: '
    assert reply.startswith(prefix) and reply.endswith('"}'), reply
    assert set(json.loads(reply)) == {"error"}
    assert len(reply) > len(prefix) + 2  # a reason follows
    client.assert_alive()


@pytest.mark.parametrize(
    "message",
    [
        '{"streams":["a.b"]}',
        '{"event":"subscribed","streams":["a.b"]}',
        '{"event":"SUBSCRIBE","streams":["a.b"]}',
        '{"event":1,"streams":["a.b"]}',
        '{"event":null,"streams":["a.b"]}',
        '{"jwt":"Bearer x"}',
    ],
)
def test_missing_or_bad_event(client: Client, message: str) -> None:
    assert client.request(message) == '{"error":"Could not parse Type: Invalid event"}'
    client.assert_alive()


@pytest.mark.parametrize("event", ["subscribe", "unsubscribe"])
def test_missing_streams(client: Client, event: str) -> None:
    assert client.request(f'{{"event":"{event}"}}') == '{"error":"No streams provided"}'
    client.assert_alive()


@pytest.mark.parametrize(
    "streams", ["null", "[1]", '"a.b"', '{"a":"b"}', '["a.b",null]', '[["a.b"]]', "true"]
)
@pytest.mark.parametrize("event", ["subscribe", "unsubscribe"])
def test_streams_not_an_array_of_strings(client: Client, event: str, streams: str) -> None:
    reply = client.request(f'{{"event":"{event}","streams":{streams}}}')
    assert reply == '{"error":"Streams must be an array of strings"}'
    client.assert_alive()


def test_empty_streams_list_replies_with_current(client: Client) -> None:
    stream = f"{unique()}.trades"
    assert client.subscribe(stream) == subscribed(stream)
    assert client.subscribe() == subscribed(stream)


def test_too_many_streams(client: Client) -> None:
    streams = [f"m{n}.trades" for n in range(MAX_STREAMS)]
    assert client.subscribe(*streams) == subscribed(*streams)
    assert client.subscribe("one.more") == '{"error":"Too many streams"}'
    client.assert_alive()
    # The refused subscribe changed nothing.
    assert client.unsubscribe("m0.trades") == json.dumps(
        {"success": {"message": "unsubscribed", "streams": streams[1:]}}, separators=(",", ":")
    )


def test_too_many_streams_in_one_message(client: Client) -> None:
    streams = [f"m{n}.trades" for n in range(MAX_STREAMS + 1)]
    assert client.subscribe(*streams) == '{"error":"Too many streams"}'
    assert client.subscribe("a.b") == subscribed("a.b")


def test_binary_frame_is_read_as_text(client: Client) -> None:
    stream = f"{unique()}.trades"
    reply = client.request(f'{{"event":"subscribe","streams":["{stream}"]}}'.encode())
    assert reply == subscribed(stream)
    assert client.request(b"ping") == "pong"


def test_message_at_the_limit_is_read(client: Client) -> None:
    message = " " * (MAX_MESSAGE_SIZE - 4) + "ping"
    assert len(message.encode()) == MAX_MESSAGE_SIZE
    assert client.request(message) == "pong"


def test_message_over_the_limit_closes_1009(client: Client) -> None:
    client.send(" " * (MAX_MESSAGE_SIZE - 3) + "ping")
    frames, closed = client.wait_closed()
    assert frames == []
    assert closed.code == 1009


def test_fragmented_message_over_the_limit_closes_1009(client: Client) -> None:
    half = "x" * (MAX_MESSAGE_SIZE // 2 + 1)
    # The server may close as soon as the second fragment crosses the limit, before the client
    # sends the final empty fragment of the message.
    with contextlib.suppress(ConnectionClosed):
        client.send([half, half])
    frames, closed = client.wait_closed()
    assert frames == []
    assert closed.code == 1009


def test_fragmented_message_under_the_limit_is_one_message(client: Client) -> None:
    stream = f"{unique()}.trades"
    parts = ['{"event":"subscribe",', '"streams":', f'["{stream}"]}}']
    client.send(parts)
    assert client.recv() == subscribed(stream)


def test_other_clients_unaffected_by_a_bad_one(server: Server, connect: Connect) -> None:
    market = unique()
    good = connect(server, f"/?stream={market}.trades")
    bad = connect(server, f"/?stream={market}.trades")
    assert good.recv() == subscribed(f"{market}.trades")
    assert bad.recv() == subscribed(f"{market}.trades")
    for message in (
        "null",
        '{"event":"subscribe","streams":null}',
        '{"event":"subscribe","streams":[1]}',
    ):
        assert bad.request(message).startswith('{"error":')
    server.publish(f"public.{market}.trades", '{"n":1}')
    assert good.recv() == f'{{"{market}.trades":{{"n":1}}}}'
    assert bad.recv() == f'{{"{market}.trades":{{"n":1}}}}'

"""Tests for ranger_py.protocol: stream kinds, request parsing, query streams, reply bytes."""

from __future__ import annotations

import json

import pytest

from ranger_py import errors, protocol
from ranger_py.protocol import (
    AUTHENTICATED,
    PONG,
    AuthRequest,
    Request,
    StreamKind,
    cannot_subscribe_reply,
    parse_request,
    stream_kind,
    streams_from_query,
    subscribed_reply,
    unsubscribed_reply,
)

# -- stream kinds (PROTOCOL §4) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("order", StreamKind.PRIVATE),
        ("trades", StreamKind.PRIVATE),
        ("eurusd.trades", StreamKind.PUBLIC),
        ("global.tickers", StreamKind.PUBLIC),
        ("admin.eurusd.sys", StreamKind.PREFIXED),
        ("a.b.c.d", StreamKind.PUBLIC),
        ("..", StreamKind.PREFIXED),
    ],
)
def test_stream_kind_by_dot_count(name: str, kind: StreamKind) -> None:
    assert stream_kind(name) is kind


def test_stream_kind_values_are_metric_labels() -> None:
    assert [kind.value for kind in StreamKind] == ["public", "private", "prefixed"]


# -- parse_request ---------------------------------------------------------------------------


def test_parse_subscribe() -> None:
    request = parse_request('{"event":"subscribe","streams":["eurusd.trades","order"]}')
    assert request == Request("subscribe", ("eurusd.trades", "order"))


def test_parse_unsubscribe_with_empty_list() -> None:
    assert parse_request('{"event":"unsubscribe","streams":[]}') == Request("unsubscribe", ())


def test_parse_skips_empty_names_and_collapses_duplicates_keeping_first_order() -> None:
    request = parse_request('{"event":"subscribe","streams":["b","","a","b","a"]}')
    assert isinstance(request, Request)
    assert request.streams == ("b", "a")


def test_parse_ignores_other_keys() -> None:
    text = '{"streams":["x.y"],"id":7,"event":"subscribe","jwt":"Bearer abc"}'
    assert parse_request(text) == Request("subscribe", ("x.y",))


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("hello", "Expecting value: line 1 column 1 (char 0)"),
        ('{"event":', "Expecting value: line 1 column 10 (char 9)"),
        ('{"event":"subscribe"} x', "Extra data: line 1 column 23 (char 22)"),
        ("null", "not a JSON object"),
        ("[]", "not a JSON object"),
        ('"subscribe"', "not a JSON object"),
        ("42", "not a JSON object"),
    ],
)
def test_unparsable(text: str, reason: str) -> None:
    with pytest.raises(errors.UnparsableMessage) as caught:
        parse_request(text)
    expected = {"error": f"Could not parse message: {reason}"}
    assert caught.value.reply == json.dumps(expected, separators=(",", ":")).encode()


@pytest.mark.parametrize("depth", [100_000, 1_000_000])
def test_deep_nesting_is_unparsable_not_a_crash(depth: int) -> None:
    with pytest.raises(errors.UnparsableMessage):
        parse_request("[" * depth + "]" * depth)
    with pytest.raises(errors.UnparsableMessage):
        parse_request('{"event":"subscribe","streams":' + "[" * depth)


def test_huge_integer_is_unparsable_not_a_crash() -> None:
    with pytest.raises(errors.UnparsableMessage):
        parse_request('{"event":"subscribe","streams":[],"n":' + "9" * 5000 + "}")


@pytest.mark.parametrize(
    "text",
    [
        '{"streams":["a.b"]}',
        '{"event":"sub","streams":["a.b"]}',
        '{"event":"Subscribe","streams":["a.b"]}',
        '{"event":null,"streams":["a.b"]}',
        '{"event":1,"streams":["a.b"]}',
        '{"event":["subscribe"],"streams":["a.b"]}',
        '{"event":{"subscribe":1},"streams":["a.b"]}',
        "{}",
    ],
)
def test_invalid_event(text: str) -> None:
    with pytest.raises(errors.InvalidEvent) as caught:
        parse_request(text)
    assert caught.value.reply == b'{"error":"Could not parse Type: Invalid event"}'


@pytest.mark.parametrize("event", ["subscribe", "unsubscribe"])
def test_no_streams(event: str) -> None:
    with pytest.raises(errors.NoStreams) as caught:
        parse_request(f'{{"event":"{event}"}}')
    assert caught.value.reply == b'{"error":"No streams provided"}'


@pytest.mark.parametrize(
    "streams",
    ["null", '"x"', "1", "{}", "true", "[1]", '["a",null]', '["a",["b"]]', '[{"a":1}]'],
)
def test_streams_not_strings(streams: str) -> None:
    with pytest.raises(errors.StreamsNotStrings) as caught:
        parse_request(f'{{"event":"subscribe","streams":{streams}}}')
    assert caught.value.reply == b'{"error":"Streams must be an array of strings"}'


def test_event_is_checked_before_streams() -> None:
    with pytest.raises(errors.InvalidEvent):
        parse_request('{"event":"nope"}')


# -- the auth event (PROTOCOL §3) ------------------------------------------------------------


def test_parse_auth() -> None:
    request = parse_request('{"event":"auth","token":"eyJ.abc.def","streams":["x.y"]}')
    assert request == AuthRequest("eyJ.abc.def")


def test_auth_request_never_shows_its_token() -> None:
    assert "secret" not in repr(AuthRequest("secret.token.value"))


@pytest.mark.parametrize(
    "text", ['{"event":"auth"}', '{"event":"auth","token":null}', '{"event":"auth","token":""}']
)
def test_auth_without_token(text: str) -> None:
    with pytest.raises(errors.NoToken) as caught:
        parse_request(text)
    assert caught.value.reply == b'{"error":"No token provided"}'


@pytest.mark.parametrize("token", ["1", "true", "[]", '["a.b.c"]', '{"token":"a.b.c"}'])
def test_auth_token_not_a_string(token: str) -> None:
    with pytest.raises(errors.TokenNotString) as caught:
        parse_request(f'{{"event":"auth","token":{token}}}')
    assert caught.value.reply == b'{"error":"Token must be a string"}'


@pytest.mark.parametrize("text", ['{"event":"Auth","token":"a.b.c"}', '{"token":"a.b.c"}'])
def test_auth_event_name_is_exact(text: str) -> None:
    with pytest.raises(errors.InvalidEvent):
        parse_request(text)


def test_authenticated_reply() -> None:
    assert AUTHENTICATED == b'{"success":{"message":"authenticated"}}'
    assert json.loads(AUTHENTICATED) == {"success": {"message": "authenticated"}}


def test_token_refused_reply_reads_like_the_401_body() -> None:
    refused = errors.TokenRefused("invalid signature")
    assert refused.reply == b'{"error":"Authorization failed: invalid signature"}'
    assert (
        refused.reply == errors.HandshakeError(401, "Authorization failed: invalid signature").body
    )


# -- streams_from_query (Rango TestParseStreamsFromURI, on the query string part) --------------


@pytest.mark.parametrize(
    ("query", "streams"),
    [
        ("", []),
        ("stream=aaa&stream=bbb", ["aaa", "bbb"]),
        ("stream=aaa,bbb", ["aaa", "bbb"]),
        ("stream=aaa,bbb&stream=ccc", ["aaa", "bbb", "ccc"]),
        ("stream=", []),
        ("stream=&stream=,a,,b,", ["a", "b"]),
        ("stream", []),
        ("foo=bar&stream=x.y&token=t", ["x.y"]),
        ("stream=b&stream=a&stream=b,a", ["b", "a"]),
        ("stream=eur%2Dusd.trades", ["eur-usd.trades"]),
        ("stream=a%2Cb", ["a", "b"]),
        ("stream=a+b", ["a b"]),
        ("%73tream=x.y", ["x.y"]),
        ("Stream=x.y&streams=z.w", []),
        (
            "stream=ethusdt.ob-inc&stream=ethusdt.trades&stream=global.tickers&stream=order"
            "&stream=trade",
            ["ethusdt.ob-inc", "ethusdt.trades", "global.tickers", "order", "trade"],
        ),
    ],
)
def test_streams_from_query(query: str, streams: list[str]) -> None:
    assert streams_from_query(query) == streams


# -- replies, byte-exact (PROTOCOL §4) -------------------------------------------------------


def test_subscribed_reply() -> None:
    assert (
        subscribed_reply(["a", "b"]) == b'{"success":{"message":"subscribed","streams":["a","b"]}}'
    )
    assert subscribed_reply([]) == b'{"success":{"message":"subscribed","streams":[]}}'


def test_unsubscribed_reply() -> None:
    assert unsubscribed_reply(()) == b'{"success":{"message":"unsubscribed","streams":[]}}'
    assert (
        unsubscribed_reply(("eurusd.trades",))
        == b'{"success":{"message":"unsubscribed","streams":["eurusd.trades"]}}'
    )


def test_cannot_subscribe_reply() -> None:
    assert (
        cannot_subscribe_reply("admin.x.y")
        == b'{"success":{"message":"cannot subscribe to admin.x.y"}}'
    )


def test_replies_escape_odd_stream_names() -> None:
    reply = subscribed_reply(['a"b', "c\\d", "e\nf", "é", "\ud800"])
    assert reply == (
        b'{"success":{"message":"subscribed","streams":'
        b'["a\\"b","c\\\\d","e\\nf","\\u00e9","\\ud800"]}}'
    )
    assert json.loads(reply)["success"]["streams"] == ['a"b', "c\\d", "e\nf", "é", "\ud800"]
    assert json.loads(cannot_subscribe_reply('x."y.z'))["success"]["message"] == (
        'cannot subscribe to x."y.z'
    )


def test_pong() -> None:
    assert PONG == b"pong"


def test_valid_stream_names_are_text_that_fits_a_routing_key() -> None:
    for name in ("order", "eurusd.trades", "admin.eurusd.sys", "ü" * 127, "a\nb", "é.\u2028"):
        assert protocol.valid_stream_name(name), name
    for name in ("\ud800", "x.\udfff.y", "ü" * 128, "z" * 256, "\ud800" * 100):
        assert not protocol.valid_stream_name(name), repr(name)

"""Property-based tests (hypothesis) over the pure core: ranger_py.protocol and ranger_py.router.

The example-based suites (test_protocol.py, test_router.py) pin the exact bytes of known cases;
these check that the same rules hold for *any* input: any client text, any stream name (lone
surrogates included), any routing key and body, and any sequence of subscribe / unsubscribe /
remove / route calls, against small models written from docs/wire-contract.md §4-§6.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, Literal, NamedTuple
from urllib.parse import urlencode

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from ranger_py import errors
from ranger_py.auth import Auth
from ranger_py.protocol import (
    Request,
    StreamKind,
    cannot_subscribe_reply,
    parse_request,
    stream_kind,
    streams_from_query,
    subscribed_reply,
    unsubscribed_reply,
)
from ranger_py.router import DROP_REASONS, RESYNC_REASONS, Delivery, Dropped, Resync, Router
from tests.router_view import cached_book, cached_books, subscribed_clients, subscription_counts

PUBLIC, PRIVATE, PREFIXED = StreamKind.PUBLIC, StreamKind.PRIVATE, StreamKind.PREFIXED


def fast(max_examples: int) -> settings:
    """Moderate example counts (the whole file runs in seconds), no deadline (CI machines vary)."""
    return settings(max_examples=max_examples, deadline=None)


# -- strategies -----------------------------------------------------------------------------

# Characters that stress JSON encoding and the dot rules; text() leaves surrogates out unless
# asked, so they are listed here as well as allowed by every_char.
TRICKY_CHARS = (
    "\ud800",
    "\udbff",
    "\udc00",
    "\udfff",
    "\x00",
    "\x1f",
    "\x7f",
    "\u2028",
    "\ufeff",
    "\uffff",
    "\U0010ffff",
    '"',
    "\\",
    ".",
    ",",
    "[",
    "]",
    "{",
    "}",
    ":",
    " ",
    "&",
    "=",
    "%",
    "+",
)
every_char = st.characters(exclude_categories=())  # every code point, lone surrogates too
chars = st.one_of(every_char, st.sampled_from(TRICKY_CHARS))
any_text = st.text(chars, max_size=24)
dotted_text = st.text(st.one_of(st.just("."), chars), max_size=24)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    any_text,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)

MISSING: Any = object()  # a key left out of a generated message


@st.composite
def dumped(draw: st.DrawFn, value: object) -> str:
    """``value`` as JSON text, escaped or raw, compact or spaced, with surrounding whitespace."""
    text = json.dumps(
        value,
        ensure_ascii=draw(st.booleans()),
        separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])),
    )
    pad = st.text(st.sampled_from(" \t\r\n"), max_size=3)
    return draw(pad) + text + draw(pad)


@st.composite
def messages(draw: st.DrawFn) -> dict[str, object]:
    """Objects shaped like client requests, right or wrong in every field."""
    message: dict[str, object] = draw(st.dictionaries(any_text, json_values, max_size=3))
    event = draw(
        st.one_of(
            st.sampled_from(["subscribe", "unsubscribe", "Subscribe", " subscribe", "", "ping"]),
            json_scalars,
            st.just(MISSING),
        )
    )
    streams = draw(
        st.one_of(
            st.lists(any_text, max_size=6),
            st.lists(st.sampled_from(["", "eurusd.trades", "order", "order"]), max_size=6),
            st.lists(json_scalars, max_size=4),
            json_values,
            st.just(MISSING),
        )
    )
    for key, value in (("event", event), ("streams", streams)):
        if value is MISSING:
            message.pop(key, None)
        else:
            message[key] = value
    return message


@st.composite
def deep_nesting(draw: st.DrawFn) -> str:
    """Brackets far past the recursion limit, or shallow enough to parse: never near it."""
    depth = draw(st.one_of(st.integers(1, 200), st.integers(5_000, 100_000)))
    opener, closer = draw(
        st.sampled_from(
            [("[", "]"), ('{"a":', "}"), ('{"event":"subscribe","streams":', "}"), ("[{}", "]")]
        )
    )
    inner = draw(st.sampled_from(["", "1", "null", '"\\ud800"', "[]"]))
    tail = closer * depth if draw(st.booleans()) else ""
    return opener * depth + inner + tail


big_numbers = st.integers(4_000, 20_000).map(lambda digits: "9" * digits)

client_texts = st.one_of(
    st.text(chars, max_size=200),
    json_values.flatmap(dumped),
    messages().flatmap(dumped),
    deep_nesting(),
    big_numbers,
    big_numbers.map(lambda number: '{"event":"subscribe","streams":[],"n":' + number + "}"),
    st.lists(st.sampled_from(['{"', "}", "[", "]", '"', ",", ":", "\\u", "d800", "event"])).map(
        "".join
    ),
)


# -- checks shared by several properties ----------------------------------------------------


def decode_frame(frame: bytes) -> Any:
    """A frame must be bytes holding UTF-8 JSON: return the value (json.loads of strict UTF-8)."""
    assert isinstance(frame, bytes)
    return json.loads(frame.decode("utf-8"))


def check_error_reply(exc: errors.ClientError) -> None:
    reply = decode_frame(exc.reply)
    assert type(reply) is dict
    assert list(reply) == ["error"]
    assert isinstance(reply["error"], str)
    assert reply["error"]


def kind_by_dots(name: str) -> StreamKind:
    """PROTOCOL §4: 0 dots private, exactly 2 prefixed, anything else public."""
    dots = sum(1 for char in name if char == ".")
    if dots == 0:
        return PRIVATE
    if dots == 2:
        return PREFIXED
    return PUBLIC


def first_order(names: Iterable[str]) -> list[str]:
    """Non-empty names without repeats, in first-seen order."""
    seen: list[str] = []
    for name in names:
        if name and name not in seen:
            seen.append(name)
    return seen


def listing(held: Mapping[str, StreamKind]) -> list[str]:
    """PROTOCOL §4 <all current>: public and prefixed first, then private, each as subscribed."""
    return [n for n, k in held.items() if k is not PRIVATE] + [
        n for n, k in held.items() if k is PRIVATE
    ]


# -- parse_request --------------------------------------------------------------------------


@fast(400)
@given(client_texts)
def test_parse_request_returns_a_request_or_raises_a_client_error(text: str) -> None:
    try:
        request = parse_request(text)
    except errors.ClientError as exc:  # anything else escaping is a bug (close 1011)
        check_error_reply(exc)
        return
    assert isinstance(request, Request)
    assert request.event in ("subscribe", "unsubscribe")
    assert isinstance(request.streams, tuple)
    assert all(type(name) is str and name for name in request.streams)
    assert len(set(request.streams)) == len(request.streams)


def expected_parse(message: dict[str, object]) -> Request | type[errors.ClientError]:
    """PROTOCOL §4 for an inbound object, checked in Rango's order: event, then streams."""
    event = message.get("event", MISSING)
    if not isinstance(event, str) or event not in ("subscribe", "unsubscribe"):
        return errors.InvalidEvent
    if "streams" not in message:
        return errors.NoStreams
    streams = message["streams"]
    if not isinstance(streams, list) or not all(isinstance(name, str) for name in streams):
        return errors.StreamsNotStrings
    kind: Literal["subscribe", "unsubscribe"] = (
        "subscribe" if event == "subscribe" else "unsubscribe"
    )
    return Request(kind, tuple(first_order(streams)))


@fast(300)
@given(st.data())
def test_parse_request_follows_the_protocol_for_objects(data: st.DataObject) -> None:
    message = data.draw(messages())
    text = data.draw(dumped(message))
    expected = expected_parse(message)
    if isinstance(expected, Request):
        assert parse_request(text) == expected
    else:
        with pytest.raises(expected) as caught:
            parse_request(text)
        assert type(caught.value) is expected
        check_error_reply(caught.value)


@fast(100)
@given(json_values.filter(lambda value: type(value) is not dict).flatmap(dumped))
def test_parse_request_refuses_every_non_object(text: str) -> None:
    with pytest.raises(errors.UnparsableMessage) as caught:
        parse_request(text)
    check_error_reply(caught.value)


# -- reply frames ---------------------------------------------------------------------------


@fast(200)
@given(st.lists(any_text, max_size=8), st.booleans())
def test_reply_frames_are_ascii_json_and_round_trip_the_names(
    names: list[str], as_tuple: bool
) -> None:
    streams = tuple(names) if as_tuple else names
    for build, message in ((subscribed_reply, "subscribed"), (unsubscribed_reply, "unsubscribed")):
        frame = build(streams)
        assert frame.isascii()  # protocol.py: ensure_ascii, so lone surrogates stay encodable
        assert decode_frame(frame) == {"success": {"message": message, "streams": names}}
    for name in names:
        frame = cannot_subscribe_reply(name)
        assert frame.isascii()
        assert decode_frame(frame) == {"success": {"message": f"cannot subscribe to {name}"}}


# -- stream_kind ----------------------------------------------------------------------------


@fast(300)
@given(dotted_text)
def test_stream_kind_is_total_and_follows_the_dot_count(name: str) -> None:
    kind = stream_kind(name)
    assert isinstance(kind, StreamKind)
    assert kind is kind_by_dots(name)


# -- streams_from_query ---------------------------------------------------------------------


@fast(200)
@given(st.text(chars, max_size=80))
def test_streams_from_query_never_raises(query: str) -> None:
    streams = streams_from_query(query)
    assert all(type(name) is str and name and "," not in name for name in streams)
    assert len(set(streams)) == len(streams)


@fast(200)
@given(
    st.lists(st.lists(st.text(max_size=8), max_size=3), max_size=4),
    st.lists(
        st.tuples(st.sampled_from(["a", "streams", "Stream", "stream[]", ""]), st.text(max_size=5)),
        max_size=3,
    ),
)
def test_streams_from_query_reads_encoded_and_comma_lists(
    groups: list[list[str]], others: list[tuple[str, str]]
) -> None:
    # Names without surrogates: a query string is percent-encoded UTF-8, which cannot hold one.
    values = [",".join(group) for group in groups]
    query = urlencode([("stream", value) for value in values] + others)
    expected = first_order(name for value in values for name in value.split(","))
    assert streams_from_query(query) == expected


# -- Router.route, one message at a time ----------------------------------------------------

ROUTING_WORDS = (
    "public",
    "global",
    "private",
    "admin",
    "broker",
    "",
    "eurusd",
    "U1",
    "trades",
    "ob-snap",
    "ob-inc",
    "-snap",
    "-inc",
    "\ud800",
    '"',
    "\\",
)
routing_keys = st.one_of(
    st.text(chars, max_size=20),
    st.lists(
        st.one_of(st.sampled_from(ROUTING_WORDS), st.text(chars, max_size=4)),
        min_size=1,
        max_size=5,
    ).map(".".join),
)

SPECIAL_BODIES = (
    b"",
    b" \t\r\n",
    b"NaN",
    b"[NaN]",
    b"Infinity",
    b'{"a":-Infinity}',
    b"1e400",
    b'"\\ud800"',
    b'"\xed\xa0\x80"',  # a surrogate encoded as UTF-8: not UTF-8
    b"\xef\xbb\xbf{}",  # BOM
    b"\xff",
    b"1 2",
    b"{}{}",
    b"\x0b{}\x0c",  # \v and \f are not JSON whitespace
    b'"a\x00"',
    b"9" * 5000,
)
bodies = st.one_of(
    st.binary(max_size=40),
    json_values.flatmap(dumped).map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.sampled_from(SPECIAL_BODIES),
    deep_nesting().map(str.encode),
)


def _refuse(name: str) -> object:
    raise ValueError(name)


def strict_json(body: bytes) -> Any:
    """The body's JSON value, or MISSING: strict UTF-8, and NaN/Infinity are not JSON (§5)."""
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_refuse)
    except (ValueError, RecursionError):
        return MISSING


class Route(NamedTuple):
    """Where PROTOCOL §5 sends a well-formed message."""

    scope: str  # "public" (public and global), "private" or "prefixed"
    uid: str  # the private recipient, else ""
    frame_key: str  # the key of the outbound frame
    stream: str  # the stream name subscribers hold


def expected_route(routing_key: str) -> Route | None:
    """PROTOCOL §5 routing keys; None for one that must be dropped as bad_routing_key."""
    words = routing_key.split(".")
    if len(words) == 3 and all(words):
        scope, middle, event = words
    elif len(words) == 2 and words[0] in ("public", "global") and words[1]:
        scope, middle, event = words[0], words[0], words[1]
    else:
        return None
    if scope in ("public", "global"):
        topic = f"{middle}.{event}"
        return Route("public", "", topic, topic)
    if event.endswith("-snap"):  # §6: private and prefixed books are not cached
        event = event.removesuffix("-snap") + "-inc"
    if scope == "private":
        return Route("private", middle, event, event)
    return Route("prefixed", "", f"{middle}.{event}", f"{scope}.{middle}.{event}")


def check_payload(payload: bytes, frame_key: str, value: Any) -> None:
    frame = decode_frame(payload)
    assert type(frame) is dict
    assert list(frame) == [frame_key]
    assert frame[frame_key] == value


def book_sequence(value: Any) -> int | None:
    """§6: the ``sequence`` an order-book body carries, if it is an integer (a bool is not)."""
    if not isinstance(value, dict):
        return None
    sequence = value.get("sequence")
    return sequence if isinstance(sequence, int) and not isinstance(sequence, bool) else None


class Books:
    """The §6 order-book cache as a model: inc topic -> frames (snapshot, then increments).

    A book whose snapshot has a sequence is followed in ``sequences``; one out of sequence is
    in ``broken`` (not cached) until its next snapshot.
    """

    def __init__(self, max_increments: int) -> None:
        self.max_increments = max_increments
        self.frames: dict[str, list[bytes]] = {}
        self.sequences: dict[str, int] = {}
        self.broken: set[str] = set()

    def check(self, topic: str, result: Delivery | Dropped, value: Any) -> bool | None:
        """Check a public message's outcome and update the cache.

        Returns None when it was dropped, else whether the current subscribers of ``topic``
        (of its -inc topic for a snapshot) are the recipients.
        """
        if topic.endswith("-snap"):
            inc_topic = topic.removesuffix("-snap") + "-inc"
            assert isinstance(result, Delivery)
            check_payload(result.payload, topic, value)
            fresh = inc_topic not in self.frames
            self.frames[inc_topic] = [result.payload]
            self.broken.discard(inc_topic)
            sequence = book_sequence(value)
            last = self.sequences.pop(inc_topic, None)
            reason = None
            if sequence is not None:
                self.sequences[inc_topic] = sequence
                if last is not None and sequence != last:
                    reason = "gap" if sequence > last else "restart"
            assert getattr(result, "reason", None) == reason
            # The first snapshot (or the first after an overflow or a break) goes out, and one
            # whose sequence is not the book's last.
            return fresh or reason is not None
        if topic.endswith("-inc"):
            book = self.frames.get(topic)
            if book is None:
                if topic in self.broken:  # forwarded to the subscribers, not cached
                    assert type(result) is Delivery
                    check_payload(result.payload, topic, value)
                    return True
                assert result == Dropped("no_snapshot")
                return None
            if len(book) - 1 >= self.max_increments:
                del self.frames[topic]
                self.sequences.pop(topic, None)
                assert result == Dropped("book_overflow")
                return None
            last = self.sequences.get(topic)
            if last is not None:
                sequence = book_sequence(value)
                if sequence == last:
                    assert result == Dropped("duplicate")
                    return None
                if sequence != last + 1:
                    if sequence is None:
                        reason = "no_sequence"
                    else:
                        reason = "gap" if sequence > last else "step_back"
                    assert isinstance(result, Resync)
                    assert result.reason == reason
                    check_payload(result.payload, topic, value)
                    del self.frames[topic]
                    del self.sequences[topic]
                    self.broken.add(topic)
                    return True
                self.sequences[topic] = sequence
            assert type(result) is Delivery
            check_payload(result.payload, topic, value)
            book.append(result.payload)
            return True
        assert type(result) is Delivery
        check_payload(result.payload, topic, value)
        return True


def check_replays_are_consecutive(frames: Iterable[bytes]) -> None:
    """No replay holds a sequence that does not follow on: after a snapshot with an integer
    ``sequence``, each increment of its book carries the previous one + 1 (§6)."""
    book: str | None = None
    last: int | None = None
    for frame in frames:
        decoded = decode_frame(frame)
        key = next(iter(decoded)) if type(decoded) is dict and len(decoded) == 1 else None
        if key is not None and key.endswith("-snap"):
            book, last = key.removesuffix("-snap") + "-inc", book_sequence(decoded[key])
        elif key is not None and key == book:
            if last is not None:
                sequence = book_sequence(decoded[key])
                assert sequence == last + 1, f"{key}: {sequence} replayed after {last}"
                last = sequence
        else:
            book, last = None, None


def check_route(
    router: Router, books: Books, routing_key: str, body: bytes, result: Delivery | Dropped
) -> tuple[Route, bool] | None:
    """Check ``result`` against §5/§6; return (route, whether subscribers receive it) or None."""
    assert isinstance(result, Delivery | Dropped)
    if isinstance(result, Dropped):
        assert result.reason in DROP_REASONS
    if isinstance(result, Resync):
        assert result.reason in RESYNC_REASONS
    route = expected_route(routing_key)
    if route is None:
        assert result == Dropped("bad_routing_key")
        return None
    value = strict_json(body)
    if value is MISSING:
        assert result == Dropped("bad_json")
        return None
    if route.scope == "public":
        reaches = books.check(route.frame_key, result, value)
        assert cached_books(router) == len(books.frames)
        return None if reaches is None else (route, reaches)
    assert isinstance(result, Delivery)
    check_payload(result.payload, route.frame_key, value)
    return route, True


@fast(300)
@given(st.lists(st.tuples(routing_keys, bodies), min_size=1, max_size=12))
def test_route_never_raises_and_frames_are_one_key_json(
    messages: list[tuple[str, bytes]],
) -> None:
    router = Router({"admin": frozenset({"admin"})}, max_increments=2)
    books = Books(max_increments=2)
    for routing_key, body in messages:
        result = router.route(routing_key, body)
        check_route(router, books, routing_key, body, result)
        if isinstance(result, Delivery):
            assert not result.recipients  # nobody subscribed


@fast(200)
@given(
    st.sampled_from(["public.eurusd.trades", "global.tickers", "private.U1.order", "admin.a.b"]),
    st.lists(st.sampled_from([b" ", b"\t", b"\r", b"\n", b"\x0b", b"\x0c", b"\xc2\xa0"])),
    json_values.flatmap(dumped).map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.lists(st.sampled_from([b" ", b"\t", b"\r", b"\n", b"\x0b", b"\x0c", b"\xc2\xa0"])),
)
def test_route_strips_only_json_whitespace(
    routing_key: str, before: list[bytes], body: bytes, after: list[bytes]
) -> None:
    padded = b"".join(before) + body + b"".join(after)
    router = Router({})
    check_route(router, Books(0), routing_key, padded, router.route(routing_key, padded))


@fast(200)
@given(
    st.sampled_from(["public.eurusd.ob", "global.eurusd.ob"]),
    st.lists(st.sampled_from(["-snap", "-inc"]), max_size=12),
    json_values.flatmap(dumped),
)
def test_route_order_book_cache(prefix: str, events: list[str], body: str) -> None:
    router = Router({}, max_increments=2)
    books = Books(max_increments=2)
    for event in events:
        result = router.route(prefix + event, body.encode("utf-8", "surrogatepass"))
        check_route(router, books, prefix + event, body.encode("utf-8", "surrogatepass"), result)
        assert cached_book(router, "eurusd.ob-inc") == books.frames.get("eurusd.ob-inc", [])


# Sequences as publishers send them: integers near each other, and the values that are none.
sequences = st.one_of(
    st.integers(0, 6),
    st.sampled_from([None, True, False, 2.0, "3", [1], MISSING]),
)


def book_body(sequence: object) -> bytes:
    body: dict[str, object] = {"asks": [["1.5", "2"]]}
    if sequence is not MISSING:
        body["sequence"] = sequence
    return json.dumps(body).encode()


@fast(300)
@given(
    st.lists(
        st.tuples(st.sampled_from(["-snap", "-inc", "-inc", "-inc", "join"]), sequences),
        max_size=20,
    )
)
def test_late_subscribers_never_get_a_replay_out_of_sequence(
    steps: list[tuple[str, object]],
) -> None:
    router = Router({}, max_increments=4)
    books = Books(max_increments=4)
    current = Client("current")
    router.subscribe(current, ["eurusd.ob-inc"])
    for number, (event, sequence) in enumerate(steps):
        if event == "join":
            late = Client(f"late{number}")
            frames = router.subscribe(late, ["eurusd.ob-inc"])
            assert frames[:-1] == books.frames.get("eurusd.ob-inc", [])
            check_replays_are_consecutive(frames)
            continue
        key, body = "public.eurusd.ob" + event, book_body(sequence)
        result = router.route(key, body)
        checked = check_route(router, books, key, body, result)
        if checked is not None:
            assert isinstance(result, Delivery)
            assert (current in result.recipients) is checked[1]
        check_replays_are_consecutive(cached_book(router, "eurusd.ob-inc"))


# -- Router subscriptions: a state machine against a model ----------------------------------


class Client:
    """A fake connection: only ``auth`` matters to the router; hashed by identity."""

    def __init__(self, label: str, uid: str = "", role: str = "") -> None:
        self.label = label
        self.auth = Auth(uid=uid, role=role)

    def __repr__(self) -> str:
        return self.label


RBAC = {"admin": frozenset({"admin", "superadmin"}), "broker": frozenset({"broker"})}
MAX_STREAMS = 6
MAX_INCREMENTS = 2

# Shared by every run: a client carries no state of its own, each run has a fresh Router.
POOL = (
    Client("anon1"),
    Client("anon2"),
    Client("anon_admin", role="admin"),  # a role but no uid: still anonymous for private streams
    Client("u1", uid="U1"),
    Client("u1_admin", uid="U1", role="admin"),  # a second connection of the same user
    Client("u2_broker", uid="U2", role="broker"),
    Client("odd_superadmin", uid="\ud800", role="superadmin"),
)

# Names some routing key below delivers to, then odd ones; the first are drawn more often.
COMMON_NAMES = (
    "eurusd.trades",
    "global.tickers",
    "public.trades",
    "eurusd.ob-inc",
    "eurusd.ob-snap",
    "btcusd.ob-inc",
    "order",
    "trade",
    "ob-inc",
    "admin.eurusd.sys",
    "admin.eurusd.ob-inc",
    "broker.eurusd.trades",
    "nobody.x.y",
)
ODD_NAMES = (
    "a.b.c.d",
    "",
    ".",
    "..",
    "\ud800",
    "x.\udfff",
    "admin.\ud800.z",
    '"',
    "m." + "z" * 253,  # 255 bytes: the longest name a routing key can carry
    "m." + "z" * 254,  # 256 bytes
    "\u00fc" * 128,  # 256 bytes of UTF-8 in 128 characters
)

# Names no routing key can carry (no UTF-8 form, or longer than an AMQP short string) are
# refused with InvalidStreamName, where ranger_py.errors defines it; else they are held.
INVALID_STREAM_NAME: type[errors.ClientError] | None = getattr(errors, "InvalidStreamName", None)


def routable(name: str) -> bool:
    try:
        return len(name.encode("utf-8")) <= 255
    except UnicodeEncodeError:
        return False


COMMON_KEYS = (
    "public.eurusd.trades",
    "global.tickers",
    "public.global.tickers",
    "public.trades",
    "public.eurusd.ob-snap",
    "public.eurusd.ob-inc",
    "global.btcusd.ob-snap",
    "public.btcusd.ob-inc",
    "public.x.\udfff",
    "private.U1.order",
    "private.U1.trade",
    "private.U2.order",
    "private.U1.ob-snap",
    "private.U1.ob-inc",
    "private.\ud800.\ud800",
    "private.\ud800.order",
    "admin.eurusd.sys",
    "admin.eurusd.ob-snap",
    "broker.eurusd.trades",
    "nobody.x.y",
)
ODD_KEYS = (
    "private..order",
    "private.U1",
    "admin.\ud800.z",
    "a.b.c.d",
    "public",
    "",
)

GOOD_BODIES = (b'{"p":1}', b" [1,2.50] ", b'"\\ud800"')
BAD_BODIES = (b"NaN", b"\xff", b"", b"{")

stream_lists = st.lists(st.sampled_from(COMMON_NAMES * 4 + ODD_NAMES), max_size=5)
routing_keys_in_use = st.sampled_from(COMMON_KEYS * 3 + ODD_KEYS)
bodies_in_use = st.sampled_from(GOOD_BODIES * 3 + BAD_BODIES)
SEQUENCED_MARKETS = ("public.eurusd.ob", "global.btcusd.ob")


class RouterMachine(RuleBasedStateMachine):
    """Random subscribe / unsubscribe / remove / route sequences, checked against a model."""

    def __init__(self) -> None:
        super().__init__()
        self.gauges: Counter[tuple[StreamKind, str]] = Counter()
        self.router = Router(
            RBAC, max_streams=MAX_STREAMS, max_increments=MAX_INCREMENTS, on_change=self.changed
        )
        self.held: dict[Client, dict[str, StreamKind]] = {client: {} for client in POOL}
        self.books = Books(MAX_INCREMENTS)
        self.published: dict[str, int] = {}  # market -> the sequence its publisher sent last

    def changed(self, kind: StreamKind, name: str, delta: int) -> None:
        assert delta in (1, -1)
        self.gauges[kind, name] += delta

    def tables(self) -> object:
        """A deep copy of everything the router holds, to show that a call changed nothing."""
        router = self.router
        return (
            {client: list(held.items()) for client, held in router._clients.items()},
            {name: set(members) for name, members in router._topics.items()},
            {key: set(members) for key, members in router._private.items()},
            {topic: cached_book(router, topic) for topic in self.books.frames},
            cached_books(router),
            +self.gauges,
        )

    def holders(self, stream: str, kind: StreamKind, uid: str | None = None) -> set[Client]:
        return {
            client
            for client, held in self.held.items()
            if held.get(stream) is kind and (uid is None or client.auth.uid == uid)
        }

    @rule(client=st.sampled_from(POOL), streams=stream_lists, as_tuple=st.booleans())
    def subscribe(self, client: Client, streams: list[str], as_tuple: bool) -> None:
        held = self.held[client]
        request = tuple(streams) if as_tuple else streams
        new_names = [name for name in first_order(streams) if name not in held]
        if INVALID_STREAM_NAME is not None and not all(map(routable, new_names)):
            self.refused(INVALID_STREAM_NAME, client, request)
            return

        expected: list[Any] = []  # replays as cached bytes, replies as decoded JSON
        added: dict[str, StreamKind] = {}
        for name in first_order(streams):
            if name in held or name in added:
                continue
            kind = kind_by_dots(name)
            if kind is PRIVATE and not client.auth.uid:
                continue  # §4: anonymous, silently not subscribed
            if kind is PREFIXED and client.auth.role not in RBAC.get(name.split(".")[0], ()):
                expected.append({"success": {"message": f"cannot subscribe to {name}"}})
                continue
            if kind is PUBLIC and name.endswith("-inc"):
                expected.extend(self.books.frames.get(name, []))
            added[name] = kind

        if len(held) + len(added) > MAX_STREAMS:
            self.refused(errors.TooManyStreams, client, request)
            return

        frames = self.router.subscribe(client, request)
        check_replays_are_consecutive(frames)
        held.update(added)
        expected.append({"success": {"message": "subscribed", "streams": listing(held)}})
        assert len(frames) == len(expected)
        for frame, want in zip(frames, expected, strict=True):
            decoded = decode_frame(frame)
            assert frame == want if isinstance(want, bytes) else decoded == want

    def refused(
        self, error: type[errors.ClientError], client: Client, streams: Iterable[str]
    ) -> None:
        """Subscribing must raise ``error`` (and nothing else) and change nothing at all."""
        before = self.tables()
        with pytest.raises(error) as caught:
            self.router.subscribe(client, streams)
        assert type(caught.value) is error
        check_error_reply(caught.value)
        assert self.tables() == before

    @rule(client=st.sampled_from(POOL), streams=stream_lists)
    def unsubscribe(self, client: Client, streams: list[str]) -> None:
        reply = self.router.unsubscribe(client, streams)
        held = self.held[client]
        for name in streams:
            held.pop(name, None)
        assert decode_frame(reply) == {
            "success": {"message": "unsubscribed", "streams": listing(held)}
        }

    @rule(client=st.sampled_from(POOL))
    def remove(self, client: Client) -> None:
        self.router.remove(client)
        self.held[client].clear()

    @rule(routing_key=routing_keys_in_use, body=bodies_in_use)
    def route(self, routing_key: str, body: bytes) -> None:
        self.route_and_check(routing_key, body)

    @rule(
        market=st.sampled_from(SEQUENCED_MARKETS),
        event=st.sampled_from(["-inc", "-inc", "-inc", "-snap"]),
        step=st.sampled_from([1, 1, 1, 1, 1, 0, 2, -1, -3]),
    )
    def route_sequenced(self, market: str, event: str, step: int) -> None:
        """A Peatio-like publisher: increments last + ``step``, snapshots last + ``step`` - 1
        (so ``step`` 1 is in sequence either way), and now and then no sequence at all."""
        last = self.published.get(market, 0)
        sequence = last + step if event == "-inc" else last + step - 1
        self.published[market] = sequence
        body = b'{"sequence":%d}' % sequence if step != -3 else b'{"sequence":null}'
        self.route_and_check(market + event, body)

    def route_and_check(self, routing_key: str, body: bytes) -> None:
        result = self.router.route(routing_key, body)
        checked = check_route(self.router, self.books, routing_key, body, result)
        if checked is None:
            return
        route, reaches = checked
        assert isinstance(result, Delivery)
        if not reaches:
            expected: set[Client] = set()
        elif route.scope == "public":
            stream = route.stream
            if stream.endswith("-snap"):  # a first snapshot goes to the -inc subscribers
                stream = stream.removesuffix("-snap") + "-inc"
            expected = self.holders(stream, PUBLIC)
        elif route.scope == "private":
            expected = self.holders(route.stream, PRIVATE, uid=route.uid)
        else:
            expected = self.holders(route.stream, PREFIXED)
        recipients = list(result.recipients)
        assert len(recipients) == len(set(recipients))
        assert set(recipients) == expected

    @rule()
    def remove_everyone(self) -> None:
        for client in POOL:
            self.router.remove(client)
            self.held[client].clear()
        self.check_empty()

    def check_empty(self) -> None:
        router = self.router
        assert router._clients == {}
        assert router._topics == {}
        assert router._private == {}
        assert subscribed_clients(router) == 0
        assert subscription_counts(router) == {}
        assert not +self.gauges and not -self.gauges  # every gauge back to zero

    @invariant()
    def tables_match_the_model(self) -> None:
        router = self.router
        # Only clients holding a stream are filed, with their streams in subscription order.
        assert all(router._clients.values())
        assert {c: list(h.items()) for c, h in router._clients.items()} == {
            c: list(h.items()) for c, h in self.held.items() if h
        }
        topics: dict[str, set[Client]] = {}
        private: dict[tuple[str, str], set[Client]] = {}
        for client, held in self.held.items():
            for name, kind in held.items():
                if kind is PRIVATE:
                    private.setdefault((client.auth.uid, name), set()).add(client)
                else:
                    topics.setdefault(name, set()).add(client)
        assert all(router._topics.values())
        assert all(router._private.values())
        assert router._topics == topics
        assert router._private == private
        assert subscribed_clients(router) == sum(1 for held in self.held.values() if held)

    @invariant()
    def listings_match_the_model(self) -> None:
        for client, held in self.held.items():
            streams = self.router.streams(client)
            assert streams == listing(held)
            if not client.auth.uid:
                assert all(kind_by_dots(name) is not PRIVATE for name in streams)

    @invariant()
    def gauges_match_the_counts(self) -> None:
        counts = Counter({(kind, name): 0 for kind, name in self.gauges})
        for held in self.held.values():
            for name, kind in held.items():
                counts[kind, name] += 1
        assert not -self.gauges  # never below zero
        assert +self.gauges == +counts
        assert subscription_counts(self.router) == dict(+counts)

    @invariant()
    def books_match_the_model(self) -> None:
        assert cached_books(self.router) == len(self.books.frames)
        for topic, frames in self.books.frames.items():
            assert cached_book(self.router, topic) == frames
            check_replays_are_consecutive(frames)

    def teardown(self) -> None:
        self.remove_everyone()


TestRouterMachine = RouterMachine.TestCase
TestRouterMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)

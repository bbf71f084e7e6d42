"""RFC 6455 framing: outbound encoders byte for byte, inbound parsing through wsproto."""

from __future__ import annotations

import struct

import pytest

from ranger_py.errors import CloseCode, CloseConnection
from ranger_py.frames import (
    PING,
    Close,
    FrameReader,
    Message,
    Ping,
    Pong,
    encode_binary,
    encode_close,
    encode_pong,
    encode_text,
)


def client_frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bytes = b"\x01\x02\x03\x04"
) -> bytes:
    """A masked client frame, built independently of the code under test."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        header = bytes((first, 0x80 | n))
    elif n < 65536:
        header = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + masked


@pytest.mark.parametrize(
    ("size", "header"),
    [
        (0, b"\x81\x00"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    ],
)
def test_text_frame_length_forms(size: int, header: bytes) -> None:
    payload = b"x" * size
    assert encode_text(payload) == header + payload


def test_other_server_frames() -> None:
    assert encode_binary(b"\x00\x01") == b"\x82\x02\x00\x01"
    assert encode_pong(b"hi") == b"\x8a\x02hi"
    assert PING == b"\x89\x00"
    assert encode_close(1008, "slow client") == b"\x88\x0d\x03\xf0slow client"


def test_close_reason_is_cut_on_a_character_boundary() -> None:
    frame = encode_close(1000, "é" * 100)  # 200 bytes of UTF-8
    payload = frame[2:]
    assert len(payload) <= 125
    payload[2:].decode("utf-8")  # still valid UTF-8


def test_reads_text_binary_ping_pong_close() -> None:
    reader = FrameReader(4096)
    data = (
        client_frame(0x1, b'{"event":"subscribe"}')
        + client_frame(0x2, b"\xff\x00")
        + client_frame(0x9, b"p")
        + client_frame(0xA, b"q")
        + client_frame(0x8, struct.pack("!H", 1000) + b"bye")
    )
    assert list(reader.feed(data)) == [
        Message('{"event":"subscribe"}'),
        Message(b"\xff\x00"),
        Ping(b"p"),
        Pong(b"q"),
        Close(1000, "bye"),
    ]


def test_reassembles_fragments_fed_byte_by_byte() -> None:
    reader = FrameReader(4096)
    data = client_frame(0x1, b"hel", fin=False) + client_frame(0x9, b"") + client_frame(0x0, b"lo")
    events = []
    for i in range(len(data)):
        events += list(reader.feed(data[i : i + 1]))
    assert events == [Ping(b""), Message("hello")]


def test_message_over_the_limit_is_1009_even_when_fragmented() -> None:
    reader = FrameReader(10)
    assert list(reader.feed(client_frame(0x1, b"0123456789"))) == [Message("0123456789")]
    with pytest.raises(CloseConnection) as info:
        list(reader.feed(client_frame(0x1, b"012345", fin=False) + client_frame(0x0, b"6789a")))
    assert info.value.code == CloseCode.MESSAGE_TOO_BIG


def test_huge_declared_length_is_refused_before_it_is_buffered() -> None:
    reader = FrameReader(4096)
    header = struct.pack("!BBQ", 0x81, 0x80 | 127, 1 << 30) + b"\x00\x00\x00\x00"
    with pytest.raises(CloseConnection) as info:
        list(reader.feed(header + b"a" * 8192))  # zero mask: plain ASCII
    assert info.value.code == CloseCode.MESSAGE_TOO_BIG


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (client_frame(0x1, b"\xff"), 1007),  # invalid UTF-8
        (b"\x81\x02hi", 1002),  # unmasked client frame (RFC 6455 §5.1)
        (client_frame(0x3, b""), 1002),  # reserved opcode
        (bytes((0xC1, 0x80)) + b"\x00" * 4, 1002),  # RSV1 without an extension
        (client_frame(0x0, b"x"), 1002),  # continuation with nothing to continue
        (client_frame(0x8, struct.pack("!H", 999)), 1002),  # invalid close code
        (client_frame(0x9, b"x", fin=False), 1002),  # fragmented control frame
    ],
)
def test_protocol_violations_carry_the_rfc_close_code(data: bytes, code: int) -> None:
    with pytest.raises(CloseConnection) as info:
        list(FrameReader(4096).feed(data))
    assert info.value.code == code


def test_idle_tracks_partial_frames_and_fragmented_messages() -> None:
    reader = FrameReader(4096)
    assert reader.idle
    frame = client_frame(0x1, b"hello")
    assert list(reader.feed(frame[:3])) == []
    assert not reader.idle  # header half read
    assert list(reader.feed(frame[3:])) == [Message("hello")]
    assert reader.idle
    assert list(reader.feed(client_frame(0x1, b"he", fin=False))) == []
    assert not reader.idle  # message half received
    assert list(reader.feed(client_frame(0x0, b"y"))) == [Message("hey")]
    assert reader.idle


def test_the_limit_counts_text_in_utf8_bytes() -> None:
    reader = FrameReader(12)
    euro = "€" * 4  # 12 bytes of UTF-8: at the limit
    assert list(reader.feed(client_frame(0x1, euro.encode()))) == [Message(euro)]
    with pytest.raises(CloseConnection) as info:
        list(reader.feed(client_frame(0x1, ("€" * 5).encode())))  # 5 characters, 15 bytes
    assert info.value.code == CloseCode.MESSAGE_TOO_BIG


@pytest.mark.parametrize(
    "violation", [client_frame(0x3, b"x"), client_frame(0x1, b"z" * 11)], ids=["opcode", "size"]
)
def test_after_a_violation_nothing_more_is_parsed_or_held(violation: bytes) -> None:
    reader = FrameReader(10)
    with pytest.raises(CloseConnection):
        list(reader.feed(violation))
    for _ in range(100):  # what a hostile peer sends after it: dropped, never buffered
        assert list(reader.feed(client_frame(0x1, b"hello") + b"\x00" * 10000)) == []
    assert len(reader._protocol._frame_decoder.buffer) == 0
    assert not reader.idle  # kept, so a fresh parser never starts mid-stream

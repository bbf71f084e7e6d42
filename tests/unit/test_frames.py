"""RFC 6455 framing: outbound encoders byte for byte, inbound parsing through wsproto.

With permessage-deflate (RFC 7692): compressed frames out, bounded inflation in.
"""

from __future__ import annotations

import struct
import tracemalloc
import zlib

import pytest

from ranger_py.errors import CloseCode, CloseConnection
from ranger_py.frames import (
    PING,
    Close,
    DeflatedFrames,
    FrameReader,
    Message,
    Ping,
    Pong,
    encode_binary,
    encode_binary_deflated,
    encode_close,
    encode_pong,
    encode_text,
    encode_text_deflated,
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


# -- permessage-deflate -----------------------------------------------------------------------


def deflated(payload: bytes, window_bits: int = 15) -> bytes:
    """A client's compressed message body (RFC 7692 §7.2.1), made with zlib directly."""
    compressor = zlib.compressobj(wbits=-window_bits)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert data.endswith(b"\x00\x00\xff\xff")
    return data[:-4]


def inflate(frame: bytes, window_bits: int = 15) -> tuple[int, bytes]:
    """The first byte of a short server frame, and its payload inflated as a client would."""
    first, second = frame[0], frame[1]
    assert second < 126 or second == 126
    body = frame[2:] if second < 126 else frame[4:]
    return first, zlib.decompressobj(-window_bits).decompress(body + b"\x00\x00\xff\xff")


def test_rfc7692_example_hello() -> None:
    # §7.2.3.1: "Hello" compressed without context takeover, in one frame with RSV1.
    assert encode_text_deflated(b"Hello") == b"\xc1\x07\xf2\x48\xcd\xc9\xc9\x07\x00"


@pytest.mark.parametrize("window_bits", [9, 12, 15])
def test_compressed_frames_inflate_back(window_bits: int) -> None:
    payload = b'{"btcusd.ob-snap":{"asks":' + b'["42001.0","1.5"],' * 400 + b"[]}}"
    frame = encode_text_deflated(payload, window_bits)
    first, body = inflate(frame, window_bits)
    assert first == 0xC1  # FIN | RSV1 | text
    assert body == payload
    assert len(frame) < len(payload) // 10
    first, body = inflate(encode_binary_deflated(payload, window_bits), window_bits)
    assert (first, body) == (0xC2, payload)


def test_compressed_frame_of_nothing_is_one_empty_block() -> None:
    assert encode_text_deflated(b"") == b"\xc1\x01\x00"  # §7.2.3.6


def test_compression_is_the_same_bytes_every_time() -> None:
    # No context takeover: what was compressed before changes nothing, so one frame serves all.
    payload = b"abc" * 500
    first = encode_text_deflated(payload)
    encode_text_deflated(b"something else entirely" * 50)
    assert encode_text_deflated(payload) == first


def test_reader_inflates_compressed_messages_only_when_negotiated() -> None:
    reader = FrameReader(4096, inflate=True)
    data = client_frame(0x41, deflated(b'{"event":"subscribe"}')) + client_frame(0x1, b"ping")
    assert list(reader.feed(data)) == [Message('{"event":"subscribe"}'), Message("ping")]
    assert list(reader.feed(client_frame(0x42, deflated(b"\x00\xff")))) == [Message(b"\x00\xff")]
    assert reader.idle


def test_reader_inflates_a_fragmented_message_with_a_ping_between() -> None:
    body = deflated("é".encode() * 300)
    reader = FrameReader(4096, inflate=True)
    data = (
        client_frame(0x41, body[:5], fin=False)  # RSV1 on the first frame only
        + client_frame(0x9, b"p")
        + client_frame(0x0, body[5:9], fin=False)
        + client_frame(0x0, body[9:])
    )
    events: list[object] = []
    for i in range(len(data)):  # byte by byte: the decompressor lives across feeds
        events += reader.feed(data[i : i + 1])
        if i < len(data) - 1:
            assert not reader.idle
    assert events == [Ping(b"p"), Message("é" * 300)]
    assert reader.idle


def test_a_deflate_bomb_is_1009_without_inflating_it() -> None:
    body = deflated(b"\x00" * 50_000_000)  # 50 MB in about 50 KB
    assert len(body) < 60_000
    data = client_frame(0x42, body)
    reader = FrameReader(4096, inflate=True)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        with pytest.raises(CloseConnection) as info:
            list(reader.feed(data))
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert info.value.code == CloseCode.MESSAGE_TOO_BIG
    assert info.value.reason == "message too big"
    # The frame's bytes (copied by the parser) and zlib's own state; never the 50 MB.
    assert peak < 3 * len(data) + 400_000


def test_the_limit_counts_inflated_bytes_across_fragments() -> None:
    body = deflated(b"a" * 4097)
    data = client_frame(0x41, body[:3], fin=False) + client_frame(0x0, body[3:])
    with pytest.raises(CloseConnection) as info:
        list(FrameReader(4096, inflate=True).feed(data))
    assert info.value.code == CloseCode.MESSAGE_TOO_BIG
    exactly = list(FrameReader(4096, inflate=True).feed(client_frame(0x41, deflated(b"a" * 4096))))
    assert exactly == [Message("a" * 4096)]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (client_frame(0x41, b"\xff\xff\xff\xff"), 1007),  # not deflate data
        (client_frame(0x41, deflated(b"\xff\xfe")), 1007),  # inflates to bad UTF-8
        (client_frame(0xC9, b""), 1002),  # RSV1 on a ping
        (client_frame(0xC8, struct.pack("!H", 1000)), 1002),  # RSV1 on a close
        (client_frame(0x41, b"\xf2", fin=False) + client_frame(0x40, b"\x00"), 1002),
        (client_frame(0x1, b"a", fin=False) + client_frame(0x40, b"b"), 1002),
    ],
    ids=["bad-deflate", "bad-utf8", "rsv1-ping", "rsv1-close", "rsv1-continuation", "rsv1-late"],
)
def test_compression_violations(data: bytes, code: int) -> None:
    with pytest.raises(CloseConnection) as info:
        list(FrameReader(4096, inflate=True).feed(data))
    assert info.value.code == code


def test_rsv1_without_negotiation_is_1002() -> None:
    with pytest.raises(CloseConnection) as info:
        list(FrameReader(4096).feed(client_frame(0x41, deflated(b"hello"))))
    assert info.value.code == CloseCode.PROTOCOL_ERROR


def test_deflated_frames_are_cached_by_content_within_a_budget() -> None:
    cache = DeflatedFrames(budget=10_000)
    snapshot = b"s" * 3000
    frame = cache.frame(snapshot, 15)
    assert frame == encode_text_deflated(snapshot)
    assert cache.frame(bytes(snapshot), 15) is frame  # an equal payload, another object
    assert cache.frame(snapshot, 9) is not frame  # per window size
    for i in range(5):
        cache.frame(bytes([i]) * 3000, 15)
    assert len(cache) <= 3  # oldest gone: payloads and frames stay within 10,000 bytes
    assert cache.frame(snapshot, 15) is not frame
    huge = b"h" * 20_000
    assert cache.frame(huge, 15) == encode_text_deflated(huge)  # over the budget: not kept

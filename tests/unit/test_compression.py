"""permessage-deflate negotiation (RFC 7692 §7.1): which offers are accepted, and the answer."""

from __future__ import annotations

import pytest

from ranger_py.compression import Deflate, negotiate, parse_offers

# Every answer keeps no context either way: one compressed frame serves every client, and each
# inbound message is inflated with a fresh decompressor.
PLAIN = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


@pytest.mark.parametrize(
    ("header", "window_bits", "response"),
    [
        ("permessage-deflate", 15, PLAIN),
        # Chromium and Firefox
        ("permessage-deflate; client_max_window_bits", 15, PLAIN),
        # the websockets library
        ("permessage-deflate; client_max_window_bits=12", 15, PLAIN),
        # Autobahn's default offer
        ("permessage-deflate; client_no_context_takeover; client_max_window_bits", 15, PLAIN),
        ("permessage-deflate; server_no_context_takeover", 15, PLAIN),
        (
            "permessage-deflate; server_max_window_bits=15",
            15,
            PLAIN + "; server_max_window_bits=15",
        ),
        ("permessage-deflate; server_max_window_bits=9", 9, PLAIN + "; server_max_window_bits=9"),
        (
            'permessage-deflate; server_max_window_bits="10"',
            10,
            PLAIN + "; server_max_window_bits=10",
        ),
        (
            "permessage-deflate;server_no_context_takeover;server_max_window_bits=12;"
            "client_no_context_takeover;client_max_window_bits=8",
            12,
            PLAIN + "; server_max_window_bits=12",
        ),
        # names are compared without case, whitespace around the separators is allowed
        ("  Permessage-Deflate ;  Client_Max_Window_Bits = 15 ", 15, PLAIN),
    ],
)
def test_accepted_offers(header: str, window_bits: int, response: str) -> None:
    assert negotiate(header) == Deflate(window_bits, response)


@pytest.mark.parametrize(
    "header",
    [
        "",
        "x-webkit-deflate-frame",
        "permessage-deflate; unknown_param",  # §7: not defined for an offer
        "permessage-deflate; client_max_window_bits; client_max_window_bits",  # repeated
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
        "permessage-deflate; server_no_context_takeover=1",  # takes no value
        "permessage-deflate; client_no_context_takeover=yes",
        "permessage-deflate; server_max_window_bits",  # needs a value
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; server_max_window_bits=7",
        "permessage-deflate; server_max_window_bits=09",  # no leading zeros
        "permessage-deflate; server_max_window_bits=8",  # zlib cannot compress with 8 bits
        "permessage-deflate; client_max_window_bits=16",
        "permessage-deflate; client_max_window_bits=abc",
        # bad syntax: never an error, only no compression
        "permessage-deflate; client_max_window_bits=",
        'permessage-deflate; server_max_window_bits="10',
        "permessage-deflate;; client_max_window_bits",
        "permessage deflate",
        "=; ;,",
        "permessage-deflate; a b",
        "\x00\xff",
    ],
)
def test_declined_offers(header: str) -> None:
    assert negotiate(header) is None


def test_no_header_means_no_compression() -> None:
    assert negotiate(None) is None


def test_the_first_acceptable_offer_wins() -> None:
    header = (
        "permessage-deflate; server_max_window_bits=8, "  # declined: 8 bits
        "permessage-deflate; server_max_window_bits=10, "
        "permessage-deflate"
    )
    assert negotiate(header) == Deflate(10, PLAIN + "; server_max_window_bits=10")


def test_several_headers_joined_and_other_extensions_skipped() -> None:
    # gunicorn joins repeated headers with a comma; a malformed element only drops itself.
    header = 'foo; bar="a,b;c", bad;;, permessage-deflate; client_max_window_bits'
    assert negotiate(header) == Deflate(15, PLAIN)


def test_parse_offers_keeps_order_and_unquotes() -> None:
    header = 'a; x="1\\0", , b , c;y=2;z'
    assert parse_offers(header) == [
        ("a", [("x", "10")]),
        ("b", []),
        ("c", [("y", "2"), ("z", None)]),
    ]


def test_a_comma_inside_quotes_does_not_split_the_list() -> None:
    assert parse_offers('a; x="1,2", b') == [("a", [("x", "1,2")]), ("b", [])]

"""The compression scenario's pure parts: bodies, the clients' reading of RFC 7692, verdicts."""

from __future__ import annotations

import asyncio
import json
import zlib
from typing import Any

import pytest

from bench import report
from bench.deflate import OFFER, inflate, judge_answer
from bench.publisher import BODIES, book_body
from bench.verdicts import compare, compression_summary, unfit_for


def _server_deflate(payload: bytes) -> bytes:
    """A message as a no-context-takeover server sends it (RFC 7692 §7.2.1)."""
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert data.endswith(b"\x00\x00\xff\xff")
    return data[:-4]


@pytest.mark.parametrize("size", [1024, 4096, 16384])
def test_book_body_is_an_ob_snap_of_about_its_size_with_ts_first(size: int) -> None:
    body = book_body(987_654_321, 42, b"btcusd", size)
    assert abs(len(body) - size) < size * 0.05
    assert body.startswith(b'{"ts":987654321,')
    book = json.loads(body)
    assert list(book) == ["ts", "sequence", "asks", "bids"]
    for side in (book["asks"], book["bids"]):
        assert side and all(
            isinstance(price, str) and isinstance(amount, str) and float(price) > 0
            for price, amount in side
        )
    asks = [float(price) for price, _ in book["asks"]]
    bids = [float(price) for price, _ in book["bids"]]
    assert asks == sorted(asks) and bids == sorted(bids, reverse=True) and bids[0] < asks[0]


def test_book_bodies_differ_only_in_their_head() -> None:
    first, second = book_body(1, 1, b"m", 4096), book_body(22, 2, b"m", 4096)
    assert first.split(b'"asks"', 1)[1] == second.split(b'"asks"', 1)[1]
    assert BODIES["book"] is book_body


def test_a_book_body_compresses_but_not_to_nothing() -> None:
    # Varied digits: the ratio is that of a real book, not of a repeated string.
    body = book_body(1, 1, b"m", 4096)
    assert 0.2 < len(_server_deflate(body)) / len(body) < 0.6


def test_inflate_reads_what_a_no_context_takeover_server_sends() -> None:
    bodies = [book_body(n, n, b"m", 4096) for n in range(3)]
    frames = [_server_deflate(b'{"btcusd.depth":' + body + b"}") for body in bodies]
    for body, frame in zip(bodies, frames, strict=True):
        text = inflate(frame)
        assert json.loads(text) == {"btcusd.depth": json.loads(body)}


def test_inflate_refuses_a_frame_that_needs_an_earlier_context() -> None:
    # With context takeover the second message refers back into the first: a fresh
    # decompressor cannot read it, which is why judge_answer insists on no takeover.
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    body = book_body(1, 1, b"m", 4096)
    compressor.compress(body)
    compressor.flush(zlib.Z_SYNC_FLUSH)
    second = compressor.compress(body) + compressor.flush(zlib.Z_SYNC_FLUSH)
    with pytest.raises(ValueError, match="raw deflate"):
        inflate(second[:-4])


@pytest.mark.parametrize(
    ("header", "verdict"),
    [
        ("permessage-deflate; server_no_context_takeover; client_no_context_takeover", "accepted"),
        (
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; "
            'server_max_window_bits="10"; client_max_window_bits=15',
            "accepted",
        ),
        (None, "declined"),
        ("  ", "declined"),
        ("permessage-deflate; client_no_context_takeover", "unusable: the server keeps"),
        ("permessage-deflate; server_no_context_takeover=1", "unusable: bad"),
        ("permessage-deflate; server_no_context_takeover; x=1", "unusable: bad x=1"),
        ("permessage-deflate; server_no_context_takeover; server_no_context_takeover", "unusable"),
    ],
)
def test_judge_answer(header: str | None, verdict: str) -> None:
    assert judge_answer(header).startswith(verdict)


def test_the_offer_is_the_one_the_server_is_built_for() -> None:
    assert OFFER == "permessage-deflate; client_max_window_bits"


def _connect(connected: int, **answers: int) -> dict[str, Any]:
    return {
        "connected": connected,
        "extensions": {k.replace("_", " "): n for k, n in answers.items()},
    }


def test_a_declined_offer_makes_the_run_unfit() -> None:
    assert unfit_for(True, _connect(10, accepted=10)) is None
    problem = unfit_for(True, _connect(10, accepted=7, declined=3))
    assert problem is not None and "3 of 10" in problem
    assert unfit_for(False, _connect(10, not_offered=10)) is None
    assert unfit_for(False, _connect(10, not_offered=9, answered_without_an_offer=1))


def _step(rate: int, sustained: bool, **extra: Any) -> dict[str, Any]:
    return {
        "rate": rate,
        "sustained": sustained,
        "delivered_per_s": rate * 1000,
        "frames": rate * 1000,
        "errors": {},
        "server_cpu_pct": rate / 10,
        "wire_bytes_per_delivery": 1500,
        "compressed_share": 1.0,
        **extra,
    }


def _run(*steps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    best = max((s for s in steps if s["sustained"]), key=lambda s: s["rate"], default=None)
    return {
        "connect": _connect(1000, accepted=1000),
        "steps": list(steps),
        "max_sustained_per_s": best["delivered_per_s"] if best else None,
        "last_passing_rate": best["rate"] if best else None,
        "first_failing_rate": None,
        "stopped": None,
        **extra,
    }


def test_summary_of_a_good_compressed_run() -> None:
    summary = compression_summary("deflate", _run(_step(50, True), _step(100, False)))
    assert summary["verdict"] is None and summary["failed_measurement"] is None
    assert summary["max_sustained_per_s"] == 50_000 and summary["server_cpu_pct"] == 5.0
    assert summary["declined"] == 0


def test_summary_verdicts() -> None:
    declined = _run(connect=_connect(1000, declined=1000), not_measured="not accepted")
    declined["steps"] = []
    assert compression_summary("deflate", declined)["verdict"] == "declined"
    assert compression_summary("deflate", declined)["declined"] == 1000
    plain = _run(_step(50, True, compressed_share=0.5))
    assert compression_summary("deflate", plain)["verdict"] == "not compressed"
    assert compression_summary("plain", _run(_step(50, True)))["verdict"] is None
    noisy = _run(_step(50, True, errors={"RSV1 frame without permessage-deflate": 3}))
    assert compression_summary("plain", noisy)["verdict"] == "client errors"


def _headline_row(plain: dict[str, Any], deflate: dict[str, Any]) -> dict[str, Any]:
    results = [{"scenario": "compression", "server": "x", "result": compare(plain, deflate)}]
    (row,) = [r for r in report.headline(results, "x") if r["what"].startswith("compressed")]
    return row


def test_compare_at_the_same_rate() -> None:
    compared = compare(
        _run(_step(50, True), _step(100, True), _step(150, False)),
        _run(_step(50, True, server_cpu_pct=9.0), _step(100, False)),
    )
    assert compared["capacity_ratio"] == 0.5
    assert compared["same_rate"] == {"rate": 50, "server_cpu_pct": {"plain": 5.0, "deflate": 9.0}}


def test_headline_row_met_within_20_percent() -> None:
    row = _headline_row(_run(_step(100, True)), _run(_step(85, True)))
    assert row["measured"] == "0.85x" and row["met"] is True
    row = _headline_row(_run(_step(100, True)), _run(_step(75, True)))
    assert row["met"] is False


def test_headline_row_says_declined_when_the_server_declined() -> None:
    declined = _run(connect=_connect(1000, declined=1000), not_measured="not accepted")
    declined["steps"] = []
    row = _headline_row(_run(_step(100, True)), declined)
    assert row["measured"] == "declined" and row["met"] is False


# The load generator's clients against a loopback picows server that plays the gateway.
_SUBSCRIBED = b'{"success":{"message":"subscribed","streams":["btcusd.depth"]}}'
_ACCEPT = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


def _frames_seen(answer: str | None, send_rsv1: bool, offer: str | None) -> dict[str, Any]:
    pytest.importorskip("picows")
    from bench import loadgen  # noqa: PLC0415 (needs picows)
    from tests.unit.playing_gateway import playing_gateway, wait_frames  # noqa: PLC0415

    body = b'{"btcusd.depth":' + book_body(loadgen._now_us(), 1, b"m", 4096) + b"}"
    payload = _server_deflate(body) if send_rsv1 else body
    offers: list[str | None] = []

    async def run() -> dict[str, Any]:
        frames = [(_SUBSCRIBED, False)] + [(payload, send_rsv1)] * 3
        async with playing_gateway(frames, answer=answer, offers=offers) as url:
            gen = loadgen.LoadGen()
            connect = await gen.connect(
                group="g",
                urls=[url] * 2,
                kind="wire",
                deflate_offer=offer,
                reply_timeout=5.0,
            )
            await wait_frames(gen, 6)  # the 6 data frames
            snapshot = (await gen.snapshot())["groups"]["g"]
            await gen.close(wait=2.0)
        latencies = sum(n for _, n in snapshot.pop("histogram"))
        return {
            "connect": connect,
            "offers": offers,
            "size": len(payload),
            "latencies": latencies,
            **snapshot,
        }

    return asyncio.run(run())


def test_clients_that_negotiated_inflate_as_probes_and_count_wire_bytes() -> None:
    seen = _frames_seen(_ACCEPT, send_rsv1=True, offer=OFFER)
    assert seen["offers"] == [OFFER, OFFER]
    assert seen["connect"]["extensions"] == {"accepted": 2}
    assert seen["frames"] == seen["compressed"] == 6 and not seen["errors"]
    assert seen["size"] < 2000 and seen["wire_bytes"] == 6 * (seen["size"] + 4)
    assert seen["latencies"] == 6  # every client probes here: each inflated its frames


def test_rsv1_without_negotiation_is_an_error() -> None:
    seen = _frames_seen(None, send_rsv1=True, offer=None)
    assert seen["offers"] == [None, None]
    assert seen["connect"]["extensions"] == {"not offered": 2}
    assert seen["errors"] == {"RSV1 frame without permessage-deflate": 6}
    assert seen["latencies"] == 0


def test_a_declined_offer_is_counted() -> None:
    seen = _frames_seen(None, send_rsv1=False, offer=OFFER)
    assert seen["connect"]["extensions"] == {"declined": 2}
    assert seen["frames"] == 6 and seen["compressed"] == 0 and not seen["errors"]
    assert seen["size"] > 4000 and seen["wire_bytes"] == 6 * (seen["size"] + 4)
    assert seen["latencies"] == 6

"""The benchmark scenarios, each on a fresh server: what is measured and how it is judged.

* ``idle``: N connections x 2 streams with RS256 tokens; connects/s, server RSS per connection
  (whole process tree), what is left after they close, growth when they connect again.
* ``fanout``: 1000 clients on one public stream, stepped msg/s up to the knee.
* ``private``: 1000 users, one recipient per message, stepped msg/s from 500.
* ``slow``: the same fan-out run twice at one rate, everyone reading, then with some clients
  stalled; the stalled ones must be closed with 1008, the others' p99 must stay within 2x.
* ``orderbook``: late subscribers join during a stream of increments; each must get the snapshot
  first, then every increment with no gap in the sequence numbers. A second phase loses one
  increment upstream: no replay may hold the gap, and every subscriber must be back in sequence
  from the next snapshot.
* ``multiworker``: fan-out capacity with ``WEB_CONCURRENCY=2`` against one worker.
* ``compression``: fan-out capacity for ~4 KB order-book bodies, clients not offering
  permessage-deflate, then every client offering it; bytes on the wire per delivery of each.
* ``exchange``: a whole exchange's public and private events (bench/exchange.py) to 5000 public
  clients and 1000 users, with 1 and 2 workers, broker routing ``subscribed`` and ``all``: per
  worker, what it received against the share its queue's bindings match.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import health, procs, report, stats, verdicts
from bench.deflate import OFFER
from bench.exchange import (
    PRIVATE_EVENTS,
    Feed,
    Profile,
    expected_frames,
    market_names,
    public_clients,
    rate_by_key,
    rates_by_category,
    schedule,
)
from bench.publisher import book_body
from bench.routing import Bindings, queue_worker
from bench.runner import Bench, OutOfTime, Settings, now_us
from bench.server import EXCHANGE, Server, ServerSpec
from bench.tokens import uid

__all__ = ["SCENARIOS", "Scenario"]

Scenario = Callable[[Bench, ServerSpec], dict[str, Any]]

_FANOUT_MARKET = "btcusd"
_FANOUT_STREAM = f"{_FANOUT_MARKET}.trades"
# Order-book bodies on a plain public stream: a real "-snap" topic is cached and goes live only
# to subscribers without a book (PROTOCOL §6), which is no fan-out.
_BOOK_STREAM = f"{_FANOUT_MARKET}.depth"
# A compressed run counts only if nearly every data frame came compressed.
_MARKETS = [f"mkt{i:02d}usd" for i in range(20)]
# A stalled client's kernel send queue counts as full once it has not grown for this long
# (and holds at least this much); then the server gets _GRACE_S to apply its own bound.
_FULL_AFTER_S = 1.0
_FULL_MIN_BYTES = 64 * 1024
_GRACE_S = 2.0


def _fanout_clients(
    bench: Bench,
    server: Server,
    group: str,
    count: int,
    stream: str = _FANOUT_STREAM,
    **options: Any,
) -> dict[str, Any]:
    url = server.url(f"/public?stream={stream}")
    return bench.lg.connect(
        group,
        [url] * count,
        concurrency=bench.settings.connect_concurrency,
        expect_streams=1,
        **options,
    )


def idle(bench: Bench, spec: ServerSpec) -> dict[str, Any]:
    settings = bench.settings
    n = settings.idle_connections
    tokens = bench.tokens(n)
    result: dict[str, Any] = {"connections": n}
    with bench.server(spec, result) as server:
        # Warm up the handshake path, then take the baseline.
        bench.lg.connect("warm", [server.url("/public?stream=warm.up")] * 20, concurrency=20)
        bench.lg.close(["warm"])
        time.sleep(1.0)
        base = server.sample()
        urls = [
            server.url(f"/private?stream={_MARKETS[i % len(_MARKETS)]}.trades&stream=order")
            for i in range(n)
        ]
        before = server.sample()
        connect = bench.lg.connect(
            "idle",
            urls,
            tokens,
            concurrency=settings.connect_concurrency,
            expect_streams=2,
        )
        after_connect = server.sample()
        time.sleep(settings.idle_settle_s)
        settled = server.sample()
        time.sleep(settings.idle_settle_s)
        full = server.sample(sockets=True)
        open_now = _open_clients(bench, "idle")
        closed = bench.lg.close(["idle"])
        time.sleep(1.5)
        after_close = server.sample()
        # A second round of the same connections: if RSS grows again by as much, memory of the
        # first round was not reused (a leak); if it stays flat, it was only kept for reuse.
        again = bench.lg.connect(
            "idle", urls, tokens, concurrency=settings.connect_concurrency, expect_streams=2
        )
        time.sleep(settings.idle_settle_s)
        second = server.sample()
        bench.lg.close(["idle"])
        connected = max(connect["connected"], 1)
        result.update(
            {
                "connected": connect["connected"],
                "failed": connect["failed"],
                "errors": connect["errors"],
                "subscribed_ok": connect["subscribed"] - connect["subscribed_wrong_streams"],
                "connect_s": round(connect["elapsed_s"], 3),
                "connects_per_s": round(connect["connected"] / max(connect["elapsed_s"], 1e-9)),
                "connect_client_cpu_pct": round(connect["client_cpu_pct"], 1),
                "connect_server_cpu_pct": after_connect.cpu_percent_since(before),
                "idle_server_cpu_pct": full.cpu_percent_since(settled),
                "open_after_settle": open_now,
                "rss_base_mb": round(base.rss_bytes / 2**20, 1),
                "rss_connected_mb": round(full.rss_bytes / 2**20, 1),
                "rss_per_conn_kb": round((full.rss_bytes - base.rss_bytes) / connected / 1024, 2),
                "rss_after_close_mb": round(after_close.rss_bytes / 2**20, 1),
                "retained_per_conn_kb": round(
                    (after_close.rss_bytes - base.rss_bytes) / connected / 1024, 2
                ),
                "second_round_connected": again["connected"],
                "rss_second_round_mb": round(second.rss_bytes / 2**20, 1),
                "second_round_growth_per_conn_kb": round(
                    (second.rss_bytes - full.rss_bytes) / max(again["connected"], 1) / 1024, 2
                ),
                "forced_closes": closed["forced"],
                "server_processes": len(full.pids),
                "server_sockets": sum(full.sockets.values()),
            }
        )
    return result


def _open_clients(bench: Bench, group: str) -> int:
    return int(bench.lg.outcomes(group)["outcomes"].get("open", 0))


def fanout(bench: Bench, spec: ServerSpec) -> dict[str, Any]:
    return _fanout_knee(bench, spec, workers=1, rates=bench.settings.fanout_rates)


def _fanout_knee(
    bench: Bench,
    spec: ServerSpec,
    *,
    workers: int,
    rates: list[int],
    stream: str = _FANOUT_STREAM,
    client_options: dict[str, Any] | None = None,
    unfit: Callable[[dict[str, Any]], str | None] | None = None,
    note: str | None = None,
    **step_options: Any,
) -> dict[str, Any]:
    """The fan-out capacity search: ``fanout_clients`` on ``stream``, then :meth:`Bench.knee`.

    ``client_options`` go to the load generator's ``connect``; ``unfit(connect)`` says why the
    connected clients cannot be measured (then no step runs: ``not_measured`` says why);
    ``step_options`` go to every step (``body``, ``tcp_bytes``).
    """
    settings = bench.settings
    result: dict[str, Any] = {"clients": settings.fanout_clients, "workers": workers}
    keys = [f"public.{stream}"]
    with bench.server(spec, result, workers=workers) as server:
        connect = _fanout_clients(
            bench,
            server,
            "fanout",
            settings.fanout_clients,
            stream=stream,
            probe_every=settings.probe_every,
            **(client_options or {}),
        )
        result["connect"] = connect
        if workers > 1:
            sockets = server.sample(sockets=True).sockets
            result["sockets_per_process"] = {str(pid): n for pid, n in sockets.items()}
        problem = unfit(connect) if unfit is not None else None
        if problem is not None:
            result["not_measured"] = problem
            return result
        bench.warm_up("fanout", keys, 50, body=step_options.get("body"))
        result.update(
            bench.knee(
                server,
                "fanout",
                keys,
                rates,
                recipients=connect["connected"],
                on_step=lambda step: report.progress("fanout", spec.label, step, note=note),
                **step_options,
            )
        )
    return result


def private(bench: Bench, spec: ServerSpec) -> dict[str, Any]:
    settings = bench.settings
    users = settings.private_users
    tokens = bench.tokens(users)
    result: dict[str, Any] = {"users": users}
    keys = [f"private.{uid(i)}.order" for i in range(users)]
    with bench.server(spec, result) as server:
        connect = bench.lg.connect(
            "private",
            [server.url("/private?stream=order")] * users,
            tokens,
            concurrency=settings.connect_concurrency,
            expect_streams=1,
        )
        result["connect"] = connect
        bench.warm_up("private", keys, 500)
        result.update(
            bench.knee(
                server,
                "private",
                keys,
                settings.private_rates,
                recipients=1,
                on_step=lambda step: report.progress("private", spec.label, step),
            )
        )
    return result


def _watch_stall(bench: Bench, server: Server, ports: set[int], end: float) -> dict[str, Any]:
    """While the slow clients are stalled: wait until the server's kernel send queues towards
    them stop growing (full), give the server a moment to hit its own bound, then read again.

    The server's queue bound (PROTOCOL §2) only comes into play once the kernel buffer is full;
    the client must read again before the server's write deadline drops the connection, or the
    close frame queued behind that buffer could never reach it.
    """
    settings = bench.settings
    start = time.monotonic()
    stop = min(end - 0.5, start + settings.slow_stall_max_s)
    peak: dict[int, int] = {}
    grew_at = start
    full_at = None
    while time.monotonic() < stop:
        queues = procs.send_queues(server.port, ports)
        if queues is None:  # no ss: stall for the longest time allowed
            time.sleep(max(0.0, stop - time.monotonic()))
            break
        now = time.monotonic()
        for port, size in queues.items():
            if size > peak.get(port, 0):
                peak[port] = size
                grew_at = now
        if peak and now - grew_at >= _FULL_AFTER_S and min(peak.values()) >= _FULL_MIN_BYTES:
            full_at = now
            time.sleep(max(0.0, min(_GRACE_S, stop - time.monotonic())))
            break
        time.sleep(0.2)
    resumed_at = time.monotonic()
    bench.lg.resume("slow")
    sizes = sorted(peak.values())
    return {
        "kernel_full_after_s": round(full_at - start, 2) if full_at else None,
        "stalled_s": round(resumed_at - start, 2),
        "send_queue_peak_kb_median": round(sizes[len(sizes) // 2] / 1024) if sizes else None,
        "send_queue_peak_kb_max": round(sizes[-1] / 1024) if sizes else None,
    }


def slow(bench: Bench, spec: ServerSpec) -> dict[str, Any]:
    settings = bench.settings
    n_slow = settings.slow_clients
    n_fast = settings.fanout_clients - n_slow
    keys = [f"public.{_FANOUT_STREAM}"]
    bulk_keys = [f"public.{_FANOUT_MARKET}.bulk"]
    result: dict[str, Any] = {
        "clients": settings.fanout_clients,
        "slow_clients": n_slow,
        "rate": settings.slow_rate,
        "bulk_rate": settings.slow_bulk_rate,
        "bulk_body_bytes": settings.slow_bulk_size,
        "slow_rcvbuf": settings.slow_rcvbuf,
    }
    bulk = bench.extra_publisher()
    with bench.server(spec, result) as server:
        fast = _fanout_clients(bench, server, "fast", n_fast, probe_every=settings.probe_every)
        slow_connect = bench.lg.connect(
            "slow",
            [server.url(f"/public?stream={_FANOUT_STREAM}&stream={_FANOUT_MARKET}.bulk")] * n_slow,
            concurrency=settings.connect_concurrency,
            expect_streams=2,
            rcvbuf=settings.slow_rcvbuf,
        )
        result["connect"] = {"fast": fast, "slow": slow_connect}
        bench.warm_up("fast", keys, 50)

        def with_bulk(**hooks: Any) -> dict[str, Any]:
            # The same bulk stream in both runs: the server's work differs only by the stall.
            bulk.send(
                "publish",
                exchange=EXCHANGE,
                keys=bulk_keys,
                rate=settings.slow_bulk_rate,
                duration=settings.slow_step_s,
                body_size=settings.slow_bulk_size,
            )
            try:
                return bench.step(
                    server,
                    ["fast"],
                    keys,
                    settings.slow_rate,
                    recipients=fast["connected"],
                    duration=settings.slow_step_s,
                    **hooks,
                )
            finally:
                bulk.recv(settings.slow_step_s * 3 + 30)

        # 1. Everyone reads: the reference for the fast clients' latency.
        baseline = with_bulk()
        report.progress("slow", spec.label, baseline, note="everyone reading")
        # 2. The slow clients stop reading when the step starts, and read again once the
        # server's kernel buffers towards them are full (see _watch_stall).
        ports = set(bench.lg.ports("slow"))
        stalled = with_bulk(
            before_publish=lambda: bench.lg.pause("slow"),
            while_publishing=lambda end: _watch_stall(bench, server, ports, end),
        )
        report.progress("slow", spec.label, stalled, note=f"{n_slow} stalled")
        deadline = time.monotonic() + 20.0
        slow_out = bench.lg.outcomes("slow")
        while slow_out["outcomes"].get("open") and time.monotonic() < deadline:
            time.sleep(0.2)
            slow_out = bench.lg.outcomes("slow")
        fast_out = bench.lg.outcomes("fast")
        base_p99, stall_p99 = baseline["p99_ms"], stalled["p99_ms"]
        ratio = stall_p99 / base_p99 if base_p99 and stall_p99 else None
        closed_1008 = slow_out["outcomes"].get("closed 1008", 0)
        result.update(
            {
                "baseline": baseline,
                "stalled": stalled,
                "stall": stalled.get("side"),
                "p99_ratio": round(ratio, 2) if ratio is not None else None,
                "slow_outcomes": slow_out["outcomes"],
                "fast_outcomes": fast_out["outcomes"],
                "slow_closed_1008": closed_1008,
                "passed": (
                    ratio is not None
                    and ratio <= 2.0
                    and closed_1008 == slow_connect["connected"]
                    and fast_out["outcomes"].get("open", 0) == fast["connected"]
                ),
            }
        )
    return result


def orderbook(bench: Bench, spec: ServerSpec) -> dict[str, Any]:
    settings = bench.settings
    per_wave = max(1, settings.book_subscribers // settings.book_waves)
    result: dict[str, Any] = {
        "rate": settings.book_rate,
        "duration_s": settings.book_s,
        "snapshot_every": settings.book_snapshot_every,
        "subscribers": per_wave * settings.book_waves,
    }
    with bench.server(spec, result) as server:
        result.update(_book_phase(bench, server, "ethusd", per_wave))
        # Second phase, on a book of its own: one increment lost upstream, shortly before the
        # middle wave joins, so that some subscribers hold the book when the gap comes and
        # others join while it is broken (PROTOCOL §6: nothing replayed until the snapshot).
        middle = settings.book_waves // 2
        gap_at = max(0.0, _wave_at(settings, middle) - 0.2)
        skip_at = int(gap_at * settings.book_rate)
        gap = _book_phase(bench, server, "ethbtc", per_wave, skip_at=skip_at)
        every = settings.book_snapshot_every
        gap["resync_due_s"] = round((skip_at // every + 1) * every / settings.book_rate, 2)
        gap["passed"] = (
            gap["passed"]
            and gap["replay_gaps"] == 0
            and gap["saw_gap_live"] > 0
            and gap["empty_replays"] > 0
        )
        result["gap"] = gap
        result["passed"] = result["passed"] and gap["passed"]
    return result


def _wave_at(settings: Settings, wave: int) -> float:
    """When a wave of book subscribers joins, in s from the stream's start: over its first 70 %."""
    return 0.3 + wave * (settings.book_s * 0.7) / settings.book_waves


def _book_phase(
    bench: Bench, server: Server, market: str, per_wave: int, *, skip_at: int | None = None
) -> dict[str, Any]:
    """One stream of a book, late subscribers joining in waves, then every one verified."""
    settings = bench.settings
    stream = f"{market}.ob-inc"
    groups: list[str] = []
    bench.pub.send(
        "orderbook",
        exchange=EXCHANGE,
        market=market,
        rate=settings.book_rate,
        duration=settings.book_s,
        snapshot_every=settings.book_snapshot_every,
        skip_at=skip_at,
    )
    start = time.monotonic()
    # Half of each wave subscribes in the URL, half with a subscribe message once connected
    # (PROTOCOL §6 covers both).
    for wave in range(settings.book_waves):
        time.sleep(max(0.0, start + _wave_at(settings, wave) - time.monotonic()))
        in_url, by_message = f"{market}-url-{wave}", f"{market}-msg-{wave}"
        bench.lg.connect(
            in_url,
            [server.url(f"/public?stream={stream}")] * (per_wave - per_wave // 2),
            kind="book",
            concurrency=settings.connect_concurrency,
        )
        bench.lg.connect(
            by_message,
            [server.url("/public")] * (per_wave // 2),
            kind="book",
            concurrency=settings.connect_concurrency,
        )
        bench.lg.send(by_message, f'{{"event":"subscribe","streams":["{stream}"]}}')
        groups += [in_url, by_message]
    published = bench.pub.recv(settings.book_s * 3 + 30)
    time.sleep(1.0)  # the last increments in flight
    skipped = published["skipped"]
    reports = [bench.lg.book_report(g, published["last_seq"], skipped) for g in groups]
    bench.lg.close(groups)
    problems: dict[str, int] = {}
    for part in reports:
        for text, n in part["problems"].items():
            problems[text] = problems.get(text, 0) + n
    counts = sum((r["counts"] for r in reports), start=stats.merge([]))
    p50, _, p99 = stats.percentiles_ms(counts)
    verified = sum(r["verified"] for r in reports)
    phase: dict[str, Any] = {
        "increments_published": published["published"],
        "snapshots_published": published["snapshots"],
        "last_seq": published["last_seq"],
        "verified": verified,
        "failed": sum(r["failed"] for r in reports),
        "problems": problems,
        "inc_p50_ms": p50,
        "inc_p99_ms": p99,
        "passed": verified == per_wave * settings.book_waves,
    }
    for key in (
        "increments_received",
        "replayed_increments",
        "replay_gaps",
        "empty_replays",
        "saw_gap_live",
        "resynced_live",
    ):
        phase[key] = sum(r[key] for r in reports)
    if skip_at is not None:
        phase["skipped_seq"] = skipped
        phase["skipped_at_s"] = round(skip_at / settings.book_rate, 2)
    return phase


def multiworker(bench: Bench, spec: ServerSpec) -> dict[str, Any]:
    rates = bench.settings.multiworker_rates
    result: dict[str, Any] = {}
    for workers in (1, 2):
        try:
            result[f"w{workers}"] = _fanout_knee(bench, spec, workers=workers, rates=rates)
        except OutOfTime as exc:
            result[f"w{workers}"] = {"stopped": str(exc)}
            break
    one = result.get("w1", {}).get("max_sustained_per_s")
    two = result.get("w2", {}).get("max_sustained_per_s")
    result["capacity_ratio"] = round(two / one, 2) if one and two else None
    return result


def compression(bench: Bench, spec: ServerSpec) -> dict[str, Any]:
    """Fan-out capacity for ~4 KB order-book bodies: clients that do not offer
    permessage-deflate, then clients that all offer it (the server's settings the same)."""
    settings = bench.settings
    body = {"body_kind": "book", "body_size": settings.compression_body_size}
    result: dict[str, Any] = {
        "clients": settings.fanout_clients,
        "stream": _BOOK_STREAM,
        "body_bytes": len(book_body(now_us(), 1, b"", settings.compression_body_size)),
        "offer": OFFER,
        "bytes_counted": "client: ws frame header + payload of each data frame; "
        "server: ss bytes_acked of its connections",
    }
    for name, offer in (("plain", None), ("deflate", OFFER)):
        try:
            result[name] = _fanout_knee(
                bench,
                spec,
                workers=1,
                rates=settings.compression_rates,
                stream=_BOOK_STREAM,
                client_options={"kind": "wire", "deflate_offer": offer},
                unfit=functools.partial(verdicts.unfit_for, offer is not None),
                note=name,
                body=body,
                tcp_bytes=True,
            )
        except OutOfTime as exc:
            result[name] = {"stopped": str(exc)}
            break
    result.update(verdicts.compare(result.get("plain", {}), result.get("deflate", {})))
    return result


# ranger-py's two ways to bind a worker's queue; another gateway runs with its own.
_ROUTINGS = ("subscribed", "all")
_PUBLIC, _PRIVATE = "pub", "prv"  # the exchange's load-generator groups, split by worker
_UNOWNED = "?"  # clients whose connection ss did not show (gone, or no ss)


@dataclass(frozen=True)
class _Exchange:
    """One exchange, the same for every run of the scenario."""

    profile: Profile
    feeds: list[Feed]
    clients: list[list[str]]  # each public client's streams
    uids: list[str]  # each private user's
    tokens: Path

    @property
    def markets(self) -> list[str]:
        return market_names(self.profile.markets)

    def wire(self) -> list[list[Any]]:
        return [[f.key, f.kind, f.rate, f.subject, f.phase] for f in self.feeds]

    def expected(self, group: str, indices: list[int], per_key: dict[str, Any]) -> float:
        """What the clients ``indices`` of a ``pub@`` or ``prv@`` group should receive."""
        if group.startswith(_PUBLIC + "@"):
            return sum(expected_frames(self.clients[i], per_key) for i in indices)
        return sum(expected_frames(PRIVATE_EVENTS, per_key, self.uids[i]) for i in indices)


def exchange(bench: Bench, spec: ServerSpec) -> dict[str, Any]:
    """The exchange's traffic, with 1 and 2 workers (ranger-py: each with broker routing
    ``subscribed`` and ``all``); per worker, received against subscribed share."""
    settings = bench.settings
    profile = Profile()
    uids = [uid(i) for i in range(settings.exchange_users)]
    model = _Exchange(
        profile=profile,
        feeds=schedule(profile, uids),
        clients=public_clients(profile, settings.exchange_clients),
        uids=uids,
        tokens=bench.tokens(len(uids)),
    )
    rates = rate_by_key(model.feeds)
    deliveries = sum(expected_frames(c, rates) for c in model.clients) + sum(
        expected_frames(PRIVATE_EVENTS, rates, u) for u in uids
    )
    result: dict[str, Any] = {
        "markets": profile.markets,
        "public_clients": len(model.clients),
        "private_users": len(uids),
        "duration_s": settings.exchange_s,
        "tolerance": settings.exchange_tolerance,
        "published_per_s": round(sum(rates.values()), 1),
        "rates_per_s": {name: round(r, 2) for name, r in rates_by_category(model.feeds).items()},
        "expected_deliveries_per_s": round(deliveries),
        "runs": {},
    }
    routings: tuple[str | None, ...] = _ROUTINGS if spec.builtin else (None,)
    for workers, routing in [(w, r) for w in (1, 2) for r in routings]:
        name = f"w{workers} {routing or 'own routing'}"
        try:
            run = _exchange_run(bench, spec, model, workers=workers, routing=routing)
        except OutOfTime as exc:
            result["runs"][name] = {"stopped": str(exc)}
            break
        result["runs"][name] = run
        report.progress("exchange", spec.label, run["step"], note=name)
    result["summary"] = verdicts.exchange_summary(result["runs"])
    return result


def _exchange_run(
    bench: Bench, spec: ServerSpec, model: _Exchange, *, workers: int, routing: str | None
) -> dict[str, Any]:
    settings = bench.settings
    run: dict[str, Any] = {"workers": workers, "routing": routing}
    env = {"RANGER_BROKER_ROUTING": routing} if routing else None
    with bench.server(spec, run, workers=workers, env=env) as server:
        public = bench.lg.connect(
            "exchange-public",
            [server.url("/public?" + "&".join(f"stream={s}" for s in c)) for c in model.clients],
            kind="exchange",
            concurrency=settings.connect_concurrency,
            probe_every=settings.probe_every,
        )
        private = bench.lg.connect(
            "exchange-private",
            [server.url("/private?" + "&".join(f"stream={e}" for e in PRIVATE_EVENTS))]
            * len(model.uids),
            model.tokens,
            kind="exchange",
            concurrency=settings.connect_concurrency,
            expect_streams=len(PRIVATE_EVENTS),
        )
        run["connect"] = {"public": public, "private": private}
        # Who serves whom: the server process holding each client's connection.
        owners = procs.socket_owners(server.url_port) or {}
        known = set(owners.values()) | (set(server.worker_pids()) if spec.builtin else set())
        groups = {
            **bench.lg.split("exchange-public", _PUBLIC, owners),
            **bench.lg.split("exchange-private", _PRIVATE, owners),
        }
        names = sorted(groups)
        # Every book opens with a snapshot, then a moment of traffic; its figures are dropped.
        bench.lg.begin(names)
        bench.pub.call(
            "exchange",
            settings.exchange_warmup_s * 3 + 30,
            exchange=EXCHANGE,
            feeds=model.wire(),
            markets=model.markets,
            duration=settings.exchange_warmup_s,
            open_books=True,
        )
        time.sleep(0.5)
        bench.lg.snapshot(names)
        queues = _worker_queues(bench, known)
        run["bindings"] = {str(w): len(b.keys) for w, b in queues.items()}

        def received() -> dict[int, int]:
            return health.collect(
                lambda: health.fetch(server.host, server.url_port),
                known,
                settings.health_tries,
            )

        before: dict[int, int] = {}
        published: dict[str, Any] = {}

        def expected(reply: dict[str, Any]) -> int:
            published.update(reply)
            return round(sum(model.expected(g, groups[g], reply["by_key"]) for g in names))

        def bundles(reply: dict[str, Any]) -> dict[str, tuple[list[str], int]]:
            per_key = reply["by_key"]
            labels = sorted({name.split("@", 1)[1] for name in names})
            picked = {label: [n for n in names if n.endswith("@" + label)] for label in labels}
            picked["public"] = [n for n in names if n.startswith(_PUBLIC + "@")]
            picked["private"] = [n for n in names if n.startswith(_PRIVATE + "@")]
            return {
                label: (chosen, round(sum(model.expected(g, groups[g], per_key) for g in chosen)))
                for label, chosen in picked.items()
            }

        duration = settings.exchange_s
        step = bench.measure(
            server,
            names,
            "exchange",
            {"feeds": model.wire(), "markets": model.markets, "duration": duration},
            rate=round(sum(f.rate for f in model.feeds), 1),
            duration=duration,
            expected=expected,
            before_publish=lambda: before.update(received()),
            bundles=bundles,
            pids=sorted(known),
        )
        # The drain ends with the last delivered frame; messages nobody gets may still be on
        # their way to a worker for a moment.
        time.sleep(0.5)
        after = received()
        run["step"] = step
        unowned = step.get("bundles", {}).get(_UNOWNED)
        if unowned:
            run["unowned_clients"] = unowned["clients"]
        run["stopped_early"] = published.get("stopped_early")
        run["health_answers"] = bool(before) and bool(after)
        rows = _worker_rows(
            step, queues=queues, before=before, after=after, published=published, duration=duration
        )
        run["verdict"] = verdicts.routing_verdict(
            rows, published.get("published", 0), settings.exchange_tolerance
        )
    return run


def _worker_queues(bench: Bench, workers: set[int]) -> dict[int | str, Bindings]:
    """Each worker's queue bindings, by its pid where the queue's name tells it (ranger-py's),
    else by the queue's name (the only queue goes to the only worker)."""
    bound = bench.broker.consumed_bindings(EXCHANGE)
    queues: dict[int | str, Bindings] = {}
    for name, keys in bound.items():
        pid = queue_worker(name)
        queues[pid if pid is not None else name] = Bindings(keys)
    if len(queues) == 1 and len(workers) == 1 and next(iter(queues)) not in workers:
        queues = {next(iter(workers)): next(iter(queues.values()))}
    return queues


def _worker_rows(
    step: dict[str, Any],
    *,
    queues: dict[int | str, Bindings],
    before: dict[int, int],
    after: dict[int, int],
    published: dict[str, Any],
    duration: float,
) -> list[dict[str, Any]]:
    """Per worker: its clients' delivery and latency, its CPU, what it received of the broker
    and what its bindings match of what was published."""
    per_key = published.get("by_key", {})
    bundles = step.get("bundles", {})
    labels = sorted(
        {label for label in bundles if label not in ("public", "private", _UNOWNED)}
        | {str(w) for w in queues}
        | {str(pid) for pid in before}
    )
    rows = []
    for label in labels:
        pid = int(label) if label.isdigit() else None
        key: int | str = pid if pid is not None else label
        got = after[pid] - before[pid] if pid in before and pid in after else None
        share = queues[key].share(per_key) if key in queues else None
        clients = bundles.get(label, {})
        rows.append(
            {
                "worker": key,
                "clients": clients.get("clients", 0),
                "received": got,
                "share": share,
                "received_per_s": round(got / duration, 1) if got is not None else None,
                "share_per_s": round(share / duration, 1) if share is not None else None,
                "cpu_pct": step.get("cpu_by_pid", {}).get(label),
                "delivered_per_s": clients.get("delivered_per_s"),
                "delivered_ratio": clients.get("delivered_ratio"),
                "p50_ms": clients.get("p50_ms"),
                "p99_ms": clients.get("p99_ms"),
            }
        )
    return rows


SCENARIOS: dict[str, Scenario] = {
    "idle": idle,
    "fanout": fanout,
    "private": private,
    "slow": slow,
    "orderbook": orderbook,
    "multiworker": multiworker,
    "compression": compression,
    "exchange": exchange,
}

"""The orchestrator's machinery: helper processes, servers, and one measured publish step.

A :class:`Bench` owns everything a run starts (the broker vhost, the publisher process, the
load-generator processes, each server) and tears all of it down, whatever happens. A *step* is
the unit of measurement: reset the clients' counters, publish at one rate for a fixed time, wait
(bounded) for the last frames, then collect latencies, delivery and the CPU of every party.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import procs, stats
from bench.rpc import Child
from bench.server import EXCHANGE, REPO, Broker, Server, ServerSpec
from bench.tokens import Signer

__all__ = ["Bench", "LoadGens", "OutOfTime", "Settings", "now_us"]

# A step passes ("sustained") when at least this share of the expected frames arrived and
# the 99th percentile stayed under the limit (the definition of max sustained).
MIN_DELIVERED = 0.99
P99_LIMIT_MS = 100.0


def now_us() -> int:
    return time.monotonic_ns() // 1000


class OutOfTime(Exception):
    """The run's time budget is spent; scenarios stop where they are."""


@dataclass
class Settings:
    """Every size, rate and duration of a run (``--quick`` or the full defaults)."""

    quick: bool = False
    step_s: float = 6.0
    drain_max_s: float = 5.0
    drain_idle_s: float = 1.0
    warmup_s: float = 1.0
    body_size: int = 200
    loadgen_procs: int = 1
    connect_concurrency: int = 200
    # Fan-out clients whose latency is recorded: one in this many (delivery counts them all).
    probe_every: int = 10
    fanout_clients: int = 1000
    fanout_rates: list[int] = field(
        default_factory=lambda: [50, 100, 200, 300, 400, 500, 600, 700, 800, 1000, 1200, 1500]
    )
    # Failed steps in a row that end a knee search.
    fail_limit: int = 2
    # Past the last rate with every step passing, go on by this factor, at most this many times.
    extend_factor: float = 1.3
    extend_steps: int = 6
    # Then bisect between the last passing and the first failing rate until they are this close.
    bisect_within: float = 0.05
    idle_connections: int = 5000
    idle_settle_s: float = 3.0
    private_users: int = 1000
    private_rates: list[int] = field(default_factory=lambda: [500, 1000, 2000, 4000, 8000])
    slow_clients: int = 50
    slow_rate: int = 200
    slow_step_s: float = 15.0
    slow_stall_max_s: float = 12.0
    slow_rcvbuf: int = 65536
    # A second stream only the slow clients read: large bodies, so that a stalled client fills
    # the kernel's send buffer (Linux autotunes it up to tcp_wmem's max, 4 MiB) in seconds.
    slow_bulk_rate: int = 100
    slow_bulk_size: int = 8192
    book_subscribers: int = 100
    book_waves: int = 5
    book_rate: int = 200
    book_s: float = 10.0
    book_snapshot_every: int = 500
    multiworker_rates: list[int] = field(
        default_factory=lambda: [100, 200, 300, 400, 500, 600, 700, 800, 1000, 1200, 1500]
    )
    # Fan-out of ~4 KB order-book bodies, without and with permessage-deflate.
    compression_body_size: int = 4096
    compression_rates: list[int] = field(
        default_factory=lambda: [25, 50, 100, 150, 200, 250, 300, 400, 500, 600]
    )
    # The exchange scenario (bench/exchange.py has its rates): clients, users, step length,
    # and how far a worker's received count may be from its subscribed share.
    exchange_clients: int = 5000
    exchange_users: int = 1000
    exchange_s: float = 15.0
    exchange_warmup_s: float = 2.0
    exchange_tolerance: float = 0.02
    # Health requests per sample, at most, until every worker has answered.
    health_tries: int = 200
    max_minutes: float = 45.0

    @classmethod
    def for_quick(cls) -> Settings:
        """Every scenario, briefly: a smoke check of a few minutes (the exchange scenario alone
        takes under one)."""
        return cls(
            quick=True,
            step_s=1.5,
            drain_max_s=2.0,
            drain_idle_s=0.4,
            warmup_s=0.5,
            fanout_rates=[50, 300],
            fail_limit=1,
            idle_connections=500,
            idle_settle_s=1.0,
            private_rates=[500],
            slow_clients=20,
            slow_bulk_rate=120,
            slow_step_s=10.0,
            slow_stall_max_s=9.0,
            book_subscribers=20,
            book_waves=2,
            book_s=3.0,
            multiworker_rates=[100, 300],
            compression_rates=[50, 150],
            exchange_clients=1000,
            exchange_users=200,
            exchange_s=3.0,
            exchange_warmup_s=1.0,
            max_minutes=4.0,
        )


class LoadGens:
    """The load-generator processes, driven as one: clients are split evenly between them."""

    def __init__(self, bench: Bench, count: int) -> None:
        self.children = [
            Child(
                f"loadgen-{i}",
                "bench.loadgen",
                log_path=bench.log_dir / f"loadgen-{i}.log",
                cwd=REPO,
            )
            for i in range(count)
        ]

    def _all(
        self,
        command: str,
        timeout: float,
        per_child: list[dict[str, Any]] | None = None,
        **args: Any,
    ) -> list[dict[str, Any]]:
        for i, child in enumerate(self.children):
            child.send(command, **args, **(per_child[i] if per_child else {}))
        return [child.recv(timeout) for child in self.children]

    def connect(
        self, group: str, urls: list[str], tokens_file: Path | None = None, **options: Any
    ) -> dict[str, Any]:
        n = len(self.children)
        bounds = [len(urls) * i // n for i in range(n + 1)]
        per_child = [
            {
                "urls": urls[bounds[i] : bounds[i + 1]],
                "token_offset": bounds[i],
                "tokens_file": str(tokens_file) if tokens_file else None,
            }
            for i in range(n)
        ]
        timeout = 60.0 + len(urls) / 50.0
        parts = self._all("connect", timeout, per_child, group=group, **options)
        errors: Counter[str] = Counter()
        for part in parts:
            errors.update(part["errors"])
        elapsed = max(p["elapsed_s"] for p in parts)
        extensions: Counter[str] = Counter()
        for part in parts:
            extensions.update(part["extensions"])
        return {
            "requested": len(urls),
            "connected": sum(p["connected"] for p in parts),
            "failed": sum(p["failed"] for p in parts),
            "errors": dict(errors.most_common(5)),
            "elapsed_s": elapsed,
            "client_cpu_pct": max(100.0 * p["connect_cpu_s"] / max(elapsed, 1e-9) for p in parts),
            "subscribed": sum(p["subscribed"] for p in parts),
            "subscribed_wrong_streams": sum(p["subscribed_wrong_streams"] for p in parts),
            "extensions": dict(extensions),
        }

    def begin(self, groups: list[str]) -> list[dict[str, Any]]:
        return self._all("begin", 10.0, step_start_us=now_us(), groups=groups)

    def count(self, groups: list[str] | None = None) -> list[dict[str, Any]]:
        return self._all("count", 10.0, groups=groups)

    def snapshot(self, groups: list[str]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
        """Per group, the figures of all processes merged; and each process's raw reply."""
        parts = self._all("snapshot", 30.0, groups=groups)
        merged: dict[str, dict[str, Any]] = {}
        for name in groups:
            rows = [p["groups"][name] for p in parts if name in p["groups"]]
            closes: Counter[str] = Counter()
            errors: Counter[str] = Counter()
            for row in rows:
                closes.update(row["closes"])
                errors.update(row["errors"])
            maxes = [r["max_us"] for r in rows if r["max_us"] is not None]
            merged[name] = {
                "clients": sum(r["clients"] for r in rows),
                "open": sum(r["open"] for r in rows),
                "frames": sum(r["frames"] for r in rows),
                "wire_bytes": sum(r["wire_bytes"] for r in rows),
                "compressed": sum(r["compressed"] for r in rows),
                "late": sum(r["late"] for r in rows),
                "counts": stats.merge(r["histogram"] for r in rows),
                "max_ms": max(maxes) / 1000.0 if maxes else None,
                "closes": dict(closes),
                "dropped": sum(r["dropped"] for r in rows),
                "errors": dict(errors.most_common(5)),
            }
        return merged, parts

    def pause(self, group: str, seconds: float | None = None) -> int:
        return sum(p["paused"] for p in self._all("pause", 10.0, group=group, seconds=seconds))

    def resume(self, group: str) -> int:
        return sum(p["resumed"] for p in self._all("resume", 10.0, group=group))

    def ports(self, group: str) -> list[int]:
        return [port for p in self._all("ports", 10.0, group=group) for port in p["ports"]]

    def split(self, group: str, into: str, owners: dict[int, int]) -> dict[str, list[int]]:
        """Move ``group``'s clients to ``<into>@<pid>`` by the server process that holds their
        connection (``owners``: client port -> pid; ``<into>@?`` for those not in it).
        Returns each new group's client indices (their place in the connect call's urls)."""
        by_port = {str(port): str(pid) for port, pid in owners.items()}
        merged: dict[str, list[int]] = {}
        for part in self._all("split", 30.0, group=group, into=into, owners=by_port):
            for name, indices in part["groups"].items():
                merged.setdefault(name, []).extend(indices)
        return merged

    def send(self, group: str, text: str) -> int:
        return sum(p["sent"] for p in self._all("send", 10.0, group=group, text=text))

    def outcomes(self, group: str) -> dict[str, Any]:
        tally: Counter[str] = Counter()
        frames: list[int] = []
        for part in self._all("outcomes", 10.0, group=group):
            tally.update(part["outcomes"])
            frames.extend(part["frames"])
        return {"outcomes": dict(tally), "frames": frames}

    def book_report(self, group: str, final_seq: int, skipped: int | None = None) -> dict[str, Any]:
        parts = self._all("book_report", 30.0, group=group, final_seq=final_seq, skipped=skipped)
        problems: Counter[str] = Counter()
        for part in parts:
            problems.update(part["problems"])
        keys = (
            "clients",
            "verified",
            "failed",
            "increments_received",
            "replayed_increments",
            "replay_gaps",
            "empty_replays",
            "saw_gap_live",
            "resynced_live",
        )
        merged: dict[str, Any] = {key: sum(p[key] for p in parts) for key in keys}
        merged["problems"] = dict(problems)
        merged["counts"] = stats.merge(p["histogram"] for p in parts)
        return merged

    def close(self, groups: list[str] | None = None) -> dict[str, int]:
        parts = self._all("close", 30.0, groups=groups, wait=10.0)
        return {
            "closed": sum(p["closed"] for p in parts),
            "forced": sum(p["forced"] for p in parts),
        }

    def shutdown(self) -> None:
        for child in self.children:
            child.close()


def _cpu_pct(
    before: list[dict[str, Any]], after: list[dict[str, Any]], *, total: bool = False
) -> float:
    """Load-generator CPU between two replies, in % of one core: the busiest process's, or
    all processes' together."""
    shares = []
    for b, a in zip(before, after, strict=True):
        wall = a["mono_s"] - b["mono_s"]
        if wall > 0:
            shares.append(100.0 * (a["cpu_s"] - b["cpu_s"]) / wall)
    if not shares:
        return 0.0
    return round(float(sum(shares) if total else max(shares)), 1)


class Bench:
    """Everything one run starts, and the measured step."""

    def __init__(self, settings: Settings, broker: Broker, log_dir: Path) -> None:
        self.settings = settings
        self.broker = broker
        self.log_dir = log_dir
        self.deadline = time.monotonic() + settings.max_minutes * 60.0
        self.signer = Signer()
        self.publisher: Child | None = None
        self._extra: Child | None = None
        self.loadgens: LoadGens | None = None
        self._servers = 0
        self._broker_pids = procs.broker_pids()

    # lifecycle

    def start(self) -> None:
        self.broker.setup()
        self._start_helpers()

    def _start_helpers(self) -> None:
        self.publisher = self._publisher("publisher")
        self.loadgens = LoadGens(self, self.settings.loadgen_procs)

    def _publisher(self, name: str) -> Child:
        child = Child(name, "bench.publisher", log_path=self.log_dir / f"{name}.log", cwd=REPO)
        child.call(
            "connect",
            15.0,
            host=self.broker.host,
            port=self.broker.port,
            user=self.broker.user,
            password=self.broker.password,
            vhost=self.broker.vhost,
            exchange=EXCHANGE,
        )
        return child

    def extra_publisher(self) -> Child:
        """A second publisher, for a stream that runs beside the measured one."""
        if self._extra is None:
            self._extra = self._publisher("publisher-2")
        return self._extra

    def _stop_helpers(self) -> None:
        if self._extra is not None:
            self._extra.close()
            self._extra = None
        if self.loadgens is not None:
            self.loadgens.shutdown()
            self.loadgens = None
        if self.publisher is not None:
            self.publisher.close()
            self.publisher = None

    def helper_pids(self) -> list[int]:
        children = [self.publisher, self._extra, *(self.loadgens.children if self.loadgens else [])]
        return [child.process.pid for child in children if child is not None]

    def restart_helpers(self) -> None:
        """After a helper failed: fresh publisher and load generators for the next scenario."""
        self._stop_helpers()
        self._start_helpers()

    def stop(self) -> None:
        try:
            self._stop_helpers()
        finally:
            # Signed with a throwaway key, but tokens have no business in kept results.
            (self.log_dir / "tokens.txt").unlink(missing_ok=True)
            self.broker.teardown()

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise OutOfTime(f"time budget of {self.settings.max_minutes:g} min spent")

    @property
    def lg(self) -> LoadGens:
        assert self.loadgens is not None
        return self.loadgens

    @property
    def pub(self) -> Child:
        assert self.publisher is not None
        return self.publisher

    @contextlib.contextmanager
    def server(
        self,
        spec: ServerSpec,
        notes: dict[str, Any],
        *,
        workers: int = 1,
        env: Mapping[str, str] | None = None,
    ) -> Iterator[Server]:
        """A fresh server for one scenario; its problems and shutdown end up in ``notes``.
        ``env``: variables of this server only, over the spec's."""
        self.check_time()
        self._servers += 1
        safe = "".join(ch if ch.isalnum() else "-" for ch in spec.label)
        server = Server(
            spec,
            self.broker,
            log_path=self.log_dir / f"server-{self._servers}-{safe}-w{workers}.log",
            jwt_public_key=self.signer.public_env,
            workers=workers,
            extra_env=env,
        )
        notes["server_log"] = server.log_path.name
        try:
            server.start()
            yield server
        finally:
            problems = server.problems()
            with contextlib.suppress(Exception):
                self.lg.close()
            notes["shutdown"] = server.stop_report()
            if notes["shutdown"].get("killed"):
                problems.append(f"did not stop within {notes['shutdown']['stop_s']} s: killed")
            elif notes["shutdown"].get("exit_code") not in (0, None):
                problems.append(f"exited with {notes['shutdown']['exit_code']} on SIGTERM")
            notes["problems"] = problems

    def tokens(self, count: int) -> Path:
        return self.signer.tokens_file(self.log_dir / "tokens.txt", count)

    # measuring

    def broker_sample(self) -> procs.Sample:
        return procs.sample(self._broker_pids)

    def _body(self, body: dict[str, Any] | None) -> dict[str, Any]:
        """The publisher's body options: the run's trade bodies unless ``body`` says otherwise
        (``body_kind``, ``body_size``)."""
        return {"body_size": self.settings.body_size, **(body or {})}

    def warm_up(
        self, group: str, keys: list[str], rate: int, *, body: dict[str, Any] | None = None
    ) -> None:
        """Publish briefly and throw the figures away (first-use costs on every side)."""
        self.lg.begin([group])
        self.pub.call(
            "publish",
            self.settings.warmup_s * 3 + 30,
            exchange=EXCHANGE,
            keys=keys,
            rate=rate,
            duration=self.settings.warmup_s,
            **self._body(body),
        )
        time.sleep(0.3)
        self.lg.snapshot([group])

    def step(
        self,
        server: Server,
        groups: list[str],
        keys: list[str],
        rate: float,
        *,
        recipients: int,
        duration: float | None = None,
        before_publish: Callable[[], None] | None = None,
        while_publishing: Callable[[float], dict[str, Any]] | None = None,
        body: dict[str, Any] | None = None,
        tcp_bytes: bool = False,
    ) -> dict[str, Any]:
        """Publish ``rate`` msg/s to ``keys`` and measure what ``groups`` receive.

        ``recipients`` is how many clients of ``groups`` should get each message.
        ``while_publishing(end)`` runs while the publisher works (``end`` is when it should be
        done, in ``time.monotonic()`` terms); what it returns is kept as the step's ``side``.
        ``body``: the publisher's body options (see :meth:`_body`). ``tcp_bytes``: also take
        the TCP bytes the server's connections sent (``ss``), before and after the step.
        """
        duration = duration or self.settings.step_s
        return self.measure(
            server,
            groups,
            "publish",
            {"keys": keys, "rate": rate, "duration": duration, **self._body(body)},
            rate=rate,
            duration=duration,
            expected=lambda published: int(published["published"]) * recipients,
            before_publish=before_publish,
            while_publishing=while_publishing,
            tcp_bytes=tcp_bytes,
        )

    def measure(
        self,
        server: Server,
        groups: list[str],
        command: str,
        args: dict[str, Any],
        *,
        rate: float,
        duration: float,
        expected: Callable[[dict[str, Any]], int],
        before_publish: Callable[[], None] | None = None,
        while_publishing: Callable[[float], dict[str, Any]] | None = None,
        tcp_bytes: bool = False,
        bundles: Callable[[dict[str, Any]], dict[str, tuple[list[str], int]]] | None = None,
        pids: list[int] | None = None,
    ) -> dict[str, Any]:
        """One step: the publisher's ``command`` (with ``args`` and the exchange) for
        ``duration`` s, and what ``groups`` receive (:meth:`step` says more).

        ``expected(published)``: the frames ``groups`` should receive, from the publisher's
        reply. ``bundles(published)``: label -> (some of ``groups``, the frames they should
        receive), each reported on its own under ``bundles``. ``pids``: processes whose CPU is
        reported one by one (``cpu_by_pid``), over the same window as the server's.
        """
        self.check_time()
        settings = self.settings
        acked0 = procs.tcp_bytes_acked(server.url_port) if tcp_bytes else None
        begun = self.lg.begin(groups)
        if before_publish is not None:
            before_publish()
        all0, sirq0 = procs.cpu_by_pid(), procs.softirq_s()
        srv0, brk0 = server.sample(), self.broker_sample()
        self.pub.send(command, exchange=EXCHANGE, **args)
        side = while_publishing(time.monotonic() + duration) if while_publishing else None
        published = self.pub.recv(duration * 3 + 30)
        srv1, brk1 = server.sample(), self.broker_sample()
        all1, sirq1 = procs.cpu_by_pid(), procs.softirq_s()
        counted = self.lg.count(groups)
        want = expected(published)
        # Wait for the last frames: until all arrived, or nothing more came for a while.
        received = sum(c["frames"] for c in counted)
        last_change = time.monotonic()
        drain_end = last_change + settings.drain_max_s
        while received < want and time.monotonic() < drain_end:
            time.sleep(0.05)
            now_received = sum(c["frames"] for c in self.lg.count(groups))
            if now_received != received:
                received, last_change = now_received, time.monotonic()
            elif time.monotonic() - last_change > settings.drain_idle_s:
                break
        merged, _ = self.lg.snapshot(groups)
        acked1 = procs.tcp_bytes_acked(server.url_port) if tcp_bytes else None
        figures = self._figures(
            rate=rate,
            published=published,
            expected=want,
            merged=merged,
            srv=(srv0, srv1),
            brk=(brk0, brk1),
            begun=begun,
            counted=counted,
        )
        # What else ran on the machine meanwhile. softirq is mostly loopback TCP: part of the
        # test's cost, charged to no process. "other" is every process that is not the server,
        # the broker or one of ours: if it is large, the step was not measured on a quiet box.
        wall = srv1.when - srv0.when
        if wall > 0:
            ours = set(srv1.pids) | set(brk1.pids) | set(self.helper_pids())
            other = sum(cpu - all0.get(pid, cpu) for pid, cpu in all1.items() if pid not in ours)
            figures["softirq_cpu_pct"] = round(100.0 * (sirq1 - sirq0) / wall, 1)
            figures["other_cpu_pct"] = round(100.0 * other / wall, 1)
            if pids is not None:
                figures["cpu_by_pid"] = {
                    str(pid): round(100.0 * (all1[pid] - all0[pid]) / wall, 1)
                    for pid in pids
                    if pid in all0 and pid in all1
                }
        if side is not None:
            figures["side"] = side
        if acked0 is not None and acked1 is not None and figures["frames"]:
            # Every byte the server sent its clients in the step, over the frames they counted.
            figures["server_tcp_bytes_per_delivery"] = round((acked1 - acked0) / figures["frames"])
        if bundles is not None:
            figures["bundles"] = {
                label: _bundle(merged, names, frames, published)
                for label, (names, frames) in bundles(published).items()
            }
        return figures

    def _figures(
        self,
        *,
        rate: float,
        published: dict[str, Any],
        expected: int,
        merged: dict[str, dict[str, Any]],
        srv: tuple[procs.Sample, procs.Sample],
        brk: tuple[procs.Sample, procs.Sample],
        begun: list[dict[str, Any]],
        counted: list[dict[str, Any]],
    ) -> dict[str, Any]:
        frames = sum(g["frames"] for g in merged.values())
        wire = sum(g["wire_bytes"] for g in merged.values())
        compressed = sum(g["compressed"] for g in merged.values())
        counts = sum((g["counts"] for g in merged.values()), start=stats.merge([]))
        p50, p90, p99 = stats.percentiles_ms(counts)
        maxes = [g["max_ms"] for g in merged.values() if g["max_ms"] is not None]
        duration = max(published["duration_s"], 1e-9)
        delivered = frames / expected if expected else None
        closes: Counter[str] = Counter()
        for g in merged.values():
            closes.update(g["closes"])
        passed = (
            delivered is not None
            and delivered >= MIN_DELIVERED
            and p99 is not None
            and p99 < P99_LIMIT_MS
        )
        figures: dict[str, Any] = {
            "rate": rate,
            "published": published["published"],
            "publish_rate": round(published["published"] / duration, 1),
            "publisher_behind_max_ms": round(published["behind_max_ms"], 1),
            "expected_frames": expected,
            "frames": frames,
            "delivered_ratio": round(delivered, 4) if delivered is not None else None,
            "delivered_per_s": round(frames / duration),
            "p50_ms": p50,
            "p90_ms": p90,
            "p99_ms": p99,
            "max_ms": max(maxes) if maxes else None,
            "late_frames": sum(g["late"] for g in merged.values()),
            "closed_by_server": dict(closes),
            "dropped_connections": sum(g["dropped"] for g in merged.values()),
            "errors": {k: v for g in merged.values() for k, v in g["errors"].items()},
            "server_cpu_pct": srv[1].cpu_percent_since(srv[0]),
            "server_rss_mb": round(srv[1].rss_bytes / 2**20, 1),
            "broker_cpu_pct": brk[1].cpu_percent_since(brk[0]),
            "client_cpu_pct": _cpu_pct(begun, counted),
            "client_cpu_total_pct": _cpu_pct(begun, counted, total=True),
            "client_procs": len(begun),
            "publisher_cpu_pct": round(100.0 * published["cpu_s"] / duration, 1),
            "sustained": passed,
        }
        if wire and frames:  # only WireClient counts bytes
            figures["wire_bytes_per_delivery"] = round(wire / frames)
            figures["compressed_share"] = round(compressed / frames, 4)
        return figures

    def knee(
        self,
        server: Server,
        group: str,
        keys: list[str],
        rates: list[int],
        *,
        recipients: int,
        on_step: Callable[[dict[str, Any]], None] | None = None,
        **step_options: Any,
    ) -> dict[str, Any]:
        """Steps at rising rates until ``fail_limit`` fail in a row, then a bisection.

        ``step_options`` go to every :meth:`step` (``body``, ``tcp_bytes``).

        When every given rate holds, the steps go on by ``extend_factor``. Once a step fails, the
        rates between the last passing step and the first failing one above it are bisected
        until they are within ``bisect_within`` of each other: the capacity is reported as that
        pair, never as a single figure. A failed step below the best passing one (noise on a
        shared machine) is flagged as ``non_monotonic``: the table shows every step.
        """
        steps: list[dict[str, Any]] = []
        stopped = None

        def run(rate: int) -> dict[str, Any] | None:
            nonlocal stopped
            if stopped is not None:
                return None
            try:
                step = self.step(server, [group], keys, rate, recipients=recipients, **step_options)
            except OutOfTime as exc:
                stopped = str(exc)
                return None
            steps.append(step)
            if on_step is not None:
                on_step(step)
            if not server.alive:
                stopped = "server exited"
            return step

        in_a_row = 0
        planned = list(rates)
        extended = 0
        while planned:
            step = run(planned.pop(0))
            if step is None:
                break
            in_a_row = 0 if step["sustained"] else in_a_row + 1
            if in_a_row >= self.settings.fail_limit:
                break
            if not planned and step["sustained"] and extended < self.settings.extend_steps:
                extended += 1
                planned.append(round(step["rate"] * self.settings.extend_factor))
        low, high = _bracket(steps)
        while (
            low is not None
            and high is not None
            and (high - low) / low > self.settings.bisect_within
            and stopped is None
        ):
            middle = (low + high) // 2
            step = run(middle)
            if step is None:
                break
            if step["sustained"]:
                low = middle
            else:
                high = middle
        passing = [s for s in steps if s["sustained"]]
        best = max(passing, key=lambda s: s["delivered_per_s"]) if passing else None
        low, high = _bracket(steps)
        return {
            "steps": steps,
            "max_sustained_per_s": best["delivered_per_s"] if best else None,
            "max_sustained_rate": best["rate"] if best else None,
            "last_passing_rate": low,
            "first_failing_rate": high,
            "knee_found": high is not None,
            "non_monotonic": bool(
                best and any(not s["sustained"] and s["rate"] < best["rate"] for s in steps)
            ),
            "stopped": stopped,
        }


def _bundle(
    merged: dict[str, dict[str, Any]], names: list[str], expected: int, published: dict[str, Any]
) -> dict[str, Any]:
    """Delivery and latency of some of a step's groups together."""
    rows = [merged[name] for name in names if name in merged]
    frames = sum(r["frames"] for r in rows)
    counts = sum((r["counts"] for r in rows), start=stats.merge([]))
    p50, p90, p99 = stats.percentiles_ms(counts)
    maxes = [r["max_ms"] for r in rows if r["max_ms"] is not None]
    duration = max(published["duration_s"], 1e-9)
    return {
        "clients": sum(r["clients"] for r in rows),
        "open": sum(r["open"] for r in rows),
        "expected_frames": expected,
        "frames": frames,
        "delivered_ratio": round(frames / expected, 4) if expected else None,
        "delivered_per_s": round(frames / duration),
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p99,
        "max_ms": max(maxes) if maxes else None,
        "latencies": int(counts.sum()),
    }


def _bracket(steps: list[dict[str, Any]]) -> tuple[int | None, int | None]:
    """The highest passing rate, and the lowest failing rate above it (None where there is none)."""
    passing = [s["rate"] for s in steps if s["sustained"]]
    low = max(passing) if passing else None
    failing = [s["rate"] for s in steps if not s["sustained"] and (low is None or s["rate"] > low)]
    return low, (min(failing) if failing else None)

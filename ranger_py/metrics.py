"""Every Prometheus metric ranger-py exports (PROTOCOL §7).

Together with its adapter (ranger_py.prometheus_adapter, which holds every use of the library's
internals) this is the only importer of prometheus_client.

A server is a gunicorn master and its workers, and one scrape must report all of it. This is
prometheus_client's multiprocess mode: every process writes its values to memory-mapped files in
``PROMETHEUS_MULTIPROC_DIR`` (set by gunicorn.conf.py before this module is imported) and the
metrics endpoint, a process of its own (ranger_py.metrics_server), sums them. Gauges sum over live
workers only (``livesum``), counters over every worker that ever ran. The endpoint adds what the
files cannot carry: ``process_*`` for the master and its workers, ``python_info``, and its own
``promhttp_*`` request counters. The gunicorn master writes no value: it forks workers, and a
value's lock held by another thread at a fork would stay held forever in the child.

The names Rango's dashboards use are kept (``rango_hub_*``, ``promhttp_*``, ``process_*``), and so
are Ruby Ranger's (``ranger_connections_*``, ``ranger_subscriptions_current``); ours also start with
``ranger_``. No metric has a per-user label. The hot path only bumps plain ints here;
``WorkerMetrics.flush`` pushes them to the shared files once a second.
"""

from __future__ import annotations

import gc
import glob
import os
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ranger_py import prometheus_adapter

__all__ = [
    "ProcessTreeCollector",
    "SafeLabels",
    "SettledFiles",
    "WorkerMetrics",
    "child_pids",
    "clear_directory",
    "endpoint_app",
    "mark_worker_dead",
    "safe_label",
]

# Fan-out time per message: from a few µs (one recipient) to tens of ms (thousands).
FANOUT_BUCKETS = (0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025)
# Client-chosen stream names become label values; past this many per worker they are counted
# under one label so a client cannot blow up the series count.
MAX_TOPIC_LABELS = 1000
OTHER_TOPIC = "_other"
# A label value that is not printable UTF-8 text of a sane length is shown as this instead: the
# text exposition must be able to encode every value, and a dashboard should show no junk.
INVALID_LABEL = "_invalid"
_MAX_LABEL_LENGTH = 255
# Ruby Ranger's values of the ``auth`` label: "private" for a connection with a uid.
AUTH_PRIVATE = "private"
AUTH_PUBLIC = "public"


def safe_label(value: str) -> str:
    """``value`` if it can go on a dashboard as it is, else ``INVALID_LABEL``."""
    if len(value) <= _MAX_LABEL_LENGTH and value.isprintable():
        return value  # printable excludes lone surrogates, so the value has a UTF-8 form
    return INVALID_LABEL


_GC_KEYS = ("collections", "collected", "uncollectable")


class WorkerMetrics:
    """One worker's metrics. Counters the hot path bumps are plain ints until ``flush``."""

    def __init__(
        self, drop_reasons: Iterable[str] = (), resync_reasons: Iterable[str] = ()
    ) -> None:
        """``drop_reasons``, ``resync_reasons``: every ``reason`` of dropped messages and of
        order-book resyncs, shown at 0 from the start."""
        self.clients = Gauge(
            "rango_hub_clients_count",
            "Number of clients currently connected",
            multiprocess_mode="livesum",
            registry=None,
        )
        self.subscriptions = Gauge(
            "rango_hub_subscriptions_count",
            "Number of user subscribed to a topic",
            ["type", "topic"],
            multiprocess_mode="livesum",
            registry=None,
        )
        # Ruby Ranger's series, for its dashboards: the same figures, its names and labels.
        self._connections_opened = Counter(
            "ranger_connections",  # exposed as ranger_connections_total
            "Connections opened since start, by auth (private: the client has a uid)",
            ["auth"],
            registry=None,
        )
        self._connections_current = Gauge(
            "ranger_connections_current",
            "Clients currently connected, by auth (private: the client has a uid)",
            ["auth"],
            multiprocess_mode="livesum",
            registry=None,
        )
        self.stream_subscriptions = Gauge(
            "ranger_subscriptions_current",
            "Current subscriptions per stream, as the client named it",
            ["stream"],
            multiprocess_mode="livesum",
            registry=None,
        )
        # The children are resolved once: labels() takes a lock and builds a key per call.
        self._by_auth = {
            authenticated: (
                self._connections_opened.labels(auth),
                self._connections_current.labels(auth),
            )
            for authenticated, auth in ((True, AUTH_PRIVATE), (False, AUTH_PUBLIC))
        }
        self._received = Counter(
            "ranger_messages_received", "Messages received from the broker", registry=None
        )
        self._delivered = Counter(
            "ranger_frames_delivered", "Frames queued to clients (one per recipient)", registry=None
        )
        self._dropped = Counter(
            "ranger_messages_dropped",
            "Broker messages delivered to nobody, by reason",
            ["reason"],
            registry=None,
        )
        for reason in drop_reasons:
            self._dropped.labels(reason)
        self._resyncs = Counter(
            "ranger_orderbook_resyncs",
            "Order books out of sequence, by reason: not replayed until their next snapshot,"
            " which their subscribers get live",
            ["reason"],
            registry=None,
        )
        for reason in resync_reasons:
            self._resyncs.labels(reason)
        self._slow_clients = Counter(
            "ranger_slow_client_disconnects",
            "Clients closed with 1008 because their send queue was full",
            registry=None,
        )
        self._expiry_closes = Counter(
            "ranger_token_expiry_closes",
            "Clients closed with 4001 because their token expired (RANGER_TOKEN_EXPIRY=close)",
            registry=None,
        )
        self._auth_failures = Counter(
            "ranger_auth_failures", "Refused bearer tokens, by reason", ["reason"], registry=None
        )
        self._reconnects = Counter(
            "ranger_broker_reconnects",
            "Broker connections re-established after a loss",
            registry=None,
        )
        self._redelivered = Counter(
            "ranger_broker_redelivered",
            "Broker messages pushed again after a lost connection (marked redelivered)",
            registry=None,
        )
        self._duplicates = Counter(
            "ranger_broker_duplicates_dropped",
            "Redelivered broker messages that had been fanned out already, dropped",
            registry=None,
        )
        self._connected = Gauge(
            "ranger_broker_connected",
            "Workers whose broker consumer is connected and consuming",
            multiprocess_mode="livesum",
            registry=None,
        )
        self._bindings = Gauge(
            "ranger_broker_bindings",
            "Bindings of the workers' broker queues, as the broker confirmed them",
            multiprocess_mode="livesum",
            registry=None,
        )
        self._fanout = Histogram(
            "ranger_fanout_seconds",
            "Time to queue one broker message's frame for all its recipients",
            buckets=FANOUT_BUCKETS,
            registry=None,
        )
        self._gc_collections = Counter(
            "python_gc_collections",
            "Garbage collections, by generation",
            ["generation"],
            registry=None,
        )
        self._gc_collected = Counter(
            "python_gc_objects_collected",
            "Objects collected by the GC",
            ["generation"],
            registry=None,
        )
        self._gc_uncollectable = Counter(
            "python_gc_objects_uncollectable",
            "Uncollectable objects found by the GC",
            ["generation"],
            registry=None,
        )
        # Hot-path accumulators, pushed by flush().
        self.received = 0
        self._received_flushed = 0  # what flush() has pushed of received so far
        self.delivered = 0
        self.dropped: dict[str, int] = {}
        self.resyncs: dict[str, int] = {}
        self.expiry_closes = 0
        self._fanout_counts = [0] * (len(FANOUT_BUCKETS) + 1)
        self._fanout_sum = 0.0
        self._reconnects_seen = 0
        self._redelivered_seen = 0
        self._duplicates_seen = 0
        self._gc_seen: list[dict[str, int]] = []
        # Per stream: its rango_hub_subscriptions_count and ranger_subscriptions_current children.
        self._topics: dict[tuple[str, str], tuple[Gauge, Gauge]] = {}
        self._other_topics: dict[str, tuple[Gauge, Gauge]] = {}

    @property
    def received_total(self) -> int:
        """Broker messages this worker received since it started, flushed or not: its own
        figure (``ranger_messages_received_total`` is every worker's, summed)."""
        return self._received_flushed + self.received

    def slow_client(self) -> None:
        """A client was closed with 1008 because its send queue was full."""
        self._slow_clients.inc()

    def token_expired(self) -> None:
        """A client is being closed with 4001: its token expired (counted in the sweep)."""
        self.expiry_closes += 1

    def auth_failure(self, reason: str) -> None:
        """A bearer token was refused for ``reason`` (ranger_py.auth's fixed texts)."""
        self._auth_failures.labels(reason).inc()

    def observe_fanout(self, seconds: float) -> None:
        self._fanout_counts[bisect_left(FANOUT_BUCKETS, seconds)] += 1
        self._fanout_sum += seconds

    def connection_opened(self, authenticated: bool) -> None:
        """A gateway client connected; ``authenticated``: it has a uid."""
        self.clients.inc()
        opened, current = self._by_auth[authenticated]
        opened.inc()
        current.inc()

    def connection_closed(self, authenticated: bool) -> None:
        """A client counted by ``connection_opened(authenticated)`` is gone."""
        self.clients.dec()
        self._by_auth[authenticated][1].dec()

    def subscription(self, kind: str, topic: str, delta: int) -> None:
        """Router hook: one membership of ``topic`` added (+1) or removed (-1)."""
        # labels() takes a lock and builds a key on every call: the children are kept per stream.
        children = self._topics.get((kind, topic))
        if children is None:
            if len(self._topics) < MAX_TOPIC_LABELS:
                label = safe_label(topic)
                children = self._topics[kind, topic] = (
                    self.subscriptions.labels(kind, label),
                    self.stream_subscriptions.labels(label),
                )
            else:
                # The table never shrinks, so a stream counted here on +1 is counted here on -1.
                children = self._other_topics.get(kind)
                if children is None:
                    children = self._other_topics[kind] = (
                        self.subscriptions.labels(kind, OTHER_TOPIC),
                        self.stream_subscriptions.labels(OTHER_TOPIC),
                    )
        rango, ranger = children
        rango.inc(delta)
        ranger.inc(delta)

    def flush(
        self,
        broker_connected: bool,
        broker_reconnects: int,
        broker_redelivered: int = 0,
        broker_duplicates: int = 0,
        broker_bindings: int = 0,
    ) -> None:
        """Push what the hot path counted since the last call; about once a second."""
        if self.received:
            self._received.inc(self.received)
            self._received_flushed += self.received
            self.received = 0
        if self.delivered:
            self._delivered.inc(self.delivered)
            self.delivered = 0
        if self.dropped:
            for reason, count in self.dropped.items():
                self._dropped.labels(reason).inc(count)
            self.dropped.clear()
        if self.resyncs:
            for reason, count in self.resyncs.items():
                self._resyncs.labels(reason).inc(count)
            self.resyncs.clear()
        if self.expiry_closes:
            self._expiry_closes.inc(self.expiry_closes)
            self.expiry_closes = 0
        if any(self._fanout_counts):
            # Histogram.observe costs ~5 µs in multiprocess mode: whole buckets at once instead.
            prometheus_adapter.add_observations(self._fanout, self._fanout_counts, self._fanout_sum)
            self._fanout_counts = [0] * len(self._fanout_counts)
            self._fanout_sum = 0.0
        self._connected.set(1 if broker_connected else 0)
        self._bindings.set(broker_bindings)
        if broker_reconnects > self._reconnects_seen:
            self._reconnects.inc(broker_reconnects - self._reconnects_seen)
            self._reconnects_seen = broker_reconnects
        # The consumer's own running totals, like its reconnects: only the growth is added.
        if broker_redelivered > self._redelivered_seen:
            self._redelivered.inc(broker_redelivered - self._redelivered_seen)
            self._redelivered_seen = broker_redelivered
        if broker_duplicates > self._duplicates_seen:
            self._duplicates.inc(broker_duplicates - self._duplicates_seen)
            self._duplicates_seen = broker_duplicates
        self._flush_gc()

    def _flush_gc(self) -> None:
        stats = gc.get_stats()
        if not self._gc_seen:
            self._gc_seen = [dict.fromkeys(_GC_KEYS, 0) for _ in stats]
        for generation, (now, seen) in enumerate(zip(stats, self._gc_seen, strict=True)):
            label = str(generation)
            for key, counter in (
                ("collections", self._gc_collections),
                ("collected", self._gc_collected),
                ("uncollectable", self._gc_uncollectable),
            ):
                if now[key] > seen[key]:
                    counter.labels(label).inc(now[key] - seen[key])
                    seen[key] = now[key]


# -- the endpoint's side ---------------------------------------------------------------------


def child_pids(pid: int) -> list[int]:
    """The children of process ``pid`` (none if it is gone), as Linux's /proc lists them.

    ``/proc/<pid>/task/<pid>/children`` lists the children of the main thread, which is the
    thread gunicorn's master forks from; a kernel built without that file is scanned instead.
    """
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as listing:
            return [int(child) for child in listing.read().split()]
    except FileNotFoundError:
        if not os.path.exists(f"/proc/{pid}"):
            return []
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            children.append(int(entry))
    return children


def _process_collector(pid: int) -> ProcessCollector:
    return ProcessCollector(pid=lambda: pid, registry=None)


class ProcessTreeCollector(Collector):
    """``process_*`` for the whole server: the master plus its children (the workers), summed.

    prometheus_client's ProcessCollector reads one pid; a dashboard built on Rango's single
    process expects the server's total, so memory, CPU and fds are added up over the tree. The
    children are read at every scrape, so a respawned worker counts from its first second.
    """

    _SUMMED = (
        "process_cpu_seconds",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
    )

    def __init__(self, master: int, children: Callable[[int], Iterable[int]] = child_pids) -> None:
        self._master = master
        self._children = children

    def collect(self) -> Iterator[Metric]:
        master = self._master
        totals: dict[str, float] = dict.fromkeys(self._SUMMED, 0.0)
        own: dict[str, float] = {}
        for pid in {master, *self._children(master)}:
            for family in _process_collector(pid).collect():
                for sample in family.samples:
                    if family.name in totals:
                        totals[family.name] += sample.value
                    elif pid == master:
                        own[family.name] = sample.value
        yield CounterMetricFamily(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            value=totals["process_cpu_seconds"],
        )
        for name, doc in (
            ("process_resident_memory_bytes", "Resident memory size in bytes."),
            ("process_virtual_memory_bytes", "Virtual memory size in bytes."),
            ("process_open_fds", "Number of open file descriptors."),
        ):
            yield GaugeMetricFamily(name, doc, value=totals[name])
        for name, doc in (
            ("process_max_fds", "Maximum number of open file descriptors."),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
            ),
        ):
            if name in own:
                yield GaugeMetricFamily(name, doc, value=own[name])


class SafeLabels(Collector):
    """Passes another collector's metrics on with every label value made ``safe_label``.

    Workers already label with safe values; this is the second line: a value that reached a
    worker's file anyway (an older version, a bug) must not make every scrape fail with a
    UnicodeEncodeError, as one lone surrogate does in the text exposition.
    """

    def __init__(self, inner: Collector) -> None:
        self._inner = inner

    def collect(self) -> Iterator[Metric]:
        for metric in self._inner.collect():
            for i, sample in enumerate(metric.samples):
                labels = sample.labels
                if any(safe_label(value) is not value for value in labels.values()):
                    safe = {key: safe_label(value) for key, value in labels.items()}
                    metric.samples[i] = sample._replace(labels=safe)
            yield metric


class SettledFiles(Collector):
    """prometheus_client's multiprocess sum, over the value files that have their header.

    A starting process creates its file empty and then sizes it; prometheus_client's collector
    fails the whole scrape (struct.error, a 500) on a file caught in between. Such a file holds
    no value yet, so it is left out; once sized, a file never shrinks.
    """

    def __init__(self, directory: str) -> None:
        self._directory = directory

    def collect(self) -> Iterable[Metric]:
        files = []
        for path in glob.glob(os.path.join(self._directory, "*.db")):
            try:
                if os.path.getsize(path) > 0:
                    files.append(path)
            except FileNotFoundError:
                pass  # a dead process's live gauges, removed since the glob
        return prometheus_adapter.merge_files(files)


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def endpoint_app(master: int, directory: str) -> WsgiApp:
    """The scrape answer for the server whose gunicorn master is ``master``: any path.

    ``directory`` is the server's ``PROMETHEUS_MULTIPROC_DIR``.

    Called in the metrics endpoint's own process (ranger_py.metrics_server), which never forks:
    its scrape counters are multiprocess values, and those may only be written from threads in
    a process that forks no more.
    """
    registry = CollectorRegistry()
    registry.register(SafeLabels(SettledFiles(directory)))
    registry.register(ProcessTreeCollector(master))
    PlatformCollector(registry=registry)  # python_info, in place of Go's go_info
    in_flight = Gauge(
        "promhttp_metric_handler_requests_in_flight",
        "Current number of scrapes being served.",
        multiprocess_mode="livesum",
        registry=None,
    )
    requests = Counter(
        "promhttp_metric_handler_requests",
        "Total number of scrapes by HTTP status code.",
        ["code"],
        registry=None,
    )
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        status = ["500"]

        def recording_start_response(code: str, *args: Any) -> Any:
            status[0] = code.split(" ", 1)[0]
            return start_response(code, *args)

        # Rango counts a scrape as in flight while it is produced, then by its status.
        in_flight.inc()
        try:
            return list(metrics_app(environ, recording_start_response))
        finally:
            in_flight.dec()
            requests.labels(status[0]).inc()

    return app


def clear_directory(path: str) -> None:
    """Remove the value files of an earlier run (the master calls this before workers start)."""
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.unlink(os.path.join(path, name))


def mark_worker_dead(pid: int) -> None:
    """Drop a dead process's live gauges (its counters keep counting in the totals).

    Only removes files: the gunicorn master calls it, and the master writes no value.
    """
    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]

"""Worker metrics batching and the process-tree collector (single-process prometheus mode)."""

from __future__ import annotations

import gc
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric

from ranger_py.auth import Auth
from ranger_py.fanout import Fanout
from ranger_py.metrics import (
    AUTH_PRIVATE,
    AUTH_PUBLIC,
    FANOUT_BUCKETS,
    INVALID_LABEL,
    MAX_TOPIC_LABELS,
    OTHER_TOPIC,
    ProcessTreeCollector,
    SafeLabels,
    SettledFiles,
    WorkerMetrics,
    child_pids,
    safe_label,
)
from ranger_py.router import DROP_REASONS, RESYNC_REASONS, Router


def exposition(*metrics: object) -> str:
    registry = CollectorRegistry()
    for metric in metrics:
        registry.register(metric)  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def sample(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_start} not in exposition:\n{text}")


def test_hot_counters_reach_prometheus_only_on_flush() -> None:
    m = WorkerMetrics()
    m.received += 3
    m.delivered += 3000
    m.dropped["bad_json"] = 2
    before = exposition(m._received, m._delivered, m._dropped)
    assert sample(before, "ranger_messages_received_total") == 0
    m.flush(broker_connected=True, broker_reconnects=0)
    after = exposition(m._received, m._delivered, m._dropped, m._connected)
    assert sample(after, "ranger_messages_received_total") == 3
    assert sample(after, "ranger_frames_delivered_total") == 3000
    assert sample(after, 'ranger_messages_dropped_total{reason="bad_json"}') == 2
    assert sample(after, "ranger_broker_connected") == 1
    assert m.received == 0 and m.delivered == 0 and m.dropped == {}


def test_received_total_counts_the_messages_before_and_after_each_flush() -> None:
    m = WorkerMetrics()
    assert m.received_total == 0
    m.received += 3
    assert m.received_total == 3
    m.flush(broker_connected=True, broker_reconnects=0)
    assert (m.received, m.received_total) == (0, 3)
    m.received += 2
    assert m.received_total == 5
    m.flush(broker_connected=True, broker_reconnects=0)
    m.flush(broker_connected=True, broker_reconnects=0)
    assert m.received_total == 5
    assert sample(exposition(m._received), "ranger_messages_received_total") == 5


def test_batched_fanout_histogram_matches_direct_observations() -> None:
    m = WorkerMetrics()
    reference = Histogram("reference", "r", buckets=FANOUT_BUCKETS, registry=None)
    values = [0.000001, 0.00001, 0.00002, 0.0003, 0.004, 0.5, 0.0099]
    for value in values:
        m.observe_fanout(value)
        reference.observe(value)
    m.flush(broker_connected=False, broker_reconnects=0)
    ours = exposition(m._fanout).replace("ranger_fanout_seconds", "X")
    theirs = exposition(reference).replace("reference", "X")

    def strip(text: str) -> list[str]:
        return [line for line in text.splitlines() if line[0] != "#" and "_created" not in line]

    assert strip(ours) == strip(theirs)


def test_reconnects_counted_as_deltas_of_the_consumer_total() -> None:
    m = WorkerMetrics()
    m.flush(True, 2)
    m.flush(True, 2)
    m.flush(False, 3)
    text = exposition(m._reconnects, m._connected)
    assert sample(text, "ranger_broker_reconnects_total") == 3
    assert sample(text, "ranger_broker_connected") == 0


def test_resyncs_by_reason_start_at_zero_and_reach_prometheus_only_on_flush() -> None:
    m = WorkerMetrics(resync_reasons=RESYNC_REASONS)
    text = exposition(m._resyncs)
    for reason in RESYNC_REASONS:
        assert sample(text, f'ranger_orderbook_resyncs_total{{reason="{reason}"}}') == 0
    m.resyncs["gap"] = 2
    assert sample(exposition(m._resyncs), 'ranger_orderbook_resyncs_total{reason="gap"}') == 0
    m.flush(broker_connected=True, broker_reconnects=0)
    text = exposition(m._resyncs)
    assert sample(text, 'ranger_orderbook_resyncs_total{reason="gap"}') == 2
    assert sample(text, 'ranger_orderbook_resyncs_total{reason="restart"}') == 0
    assert m.resyncs == {}


class _Socket:
    """What the fan-out needs of a connection: an auth for the router, a queue for frames."""

    def __init__(self) -> None:
        self.auth = Auth()
        self.frames: list[bytes] = []

    def queue(self, frame: bytes) -> None:
        self.frames.append(frame)


def test_fanout_counts_each_book_out_of_sequence_once_and_duplicates_as_drops() -> None:
    m = WorkerMetrics(drop_reasons=DROP_REASONS, resync_reasons=RESYNC_REASONS)
    router = Router({})
    fanout = Fanout(router, lambda: None, m, every=64, pause=lambda: None)
    socket = _Socket()
    router.subscribe(socket, ["m.ob-inc"])
    for key, sequence in [
        ("ob-snap", 1),  # the first snapshot: live
        ("ob-inc", 2),
        ("ob-inc", 2),  # duplicate: dropped
        ("ob-inc", 4),  # gap: delivered, the book broken
        ("ob-inc", 5),  # broken: delivered, not counted again
        ("ob-snap", 10),  # the resync: live
        ("ob-snap", 3),  # restart: live
    ]:
        fanout.on_broker_message(f"public.m.{key}", b'{"sequence":%d}' % sequence)
    assert m.resyncs == {"gap": 1, "restart": 1}
    assert m.dropped == {"duplicate": 1}
    assert m.received == 7
    assert m.delivered == len(socket.frames) == 6
    m.flush(broker_connected=True, broker_reconnects=0)
    text = exposition(m._resyncs, m._dropped)
    assert sample(text, 'ranger_orderbook_resyncs_total{reason="gap"}') == 1
    assert sample(text, 'ranger_orderbook_resyncs_total{reason="step_back"}') == 0
    assert sample(text, 'ranger_messages_dropped_total{reason="duplicate"}') == 1


def test_redeliveries_and_dropped_duplicates_counted_as_deltas_of_the_consumer_totals() -> None:
    m = WorkerMetrics()
    m.flush(True, 0, 5, 2)
    m.flush(True, 0, 5, 2)
    m.flush(True, 1, 9, 3)
    text = exposition(m._redelivered, m._duplicates)
    assert sample(text, "ranger_broker_redelivered_total") == 9
    assert sample(text, "ranger_broker_duplicates_dropped_total") == 3


def test_subscription_gauge_goes_back_to_zero_and_labels_are_capped() -> None:
    m = WorkerMetrics()
    m.subscription("public", "eurusd.trades", 1)
    m.subscription("public", "eurusd.trades", 1)
    m.subscription("prefixed", "admin.eurusd.sys", 1)
    text = exposition(m.subscriptions)
    assert sample(text, 'rango_hub_subscriptions_count{topic="eurusd.trades",type="public"}') == 2
    assert (
        sample(text, 'rango_hub_subscriptions_count{topic="admin.eurusd.sys",type="prefixed"}') == 1
    )
    for _ in range(2):
        m.subscription("public", "eurusd.trades", -1)
    m.subscription("prefixed", "admin.eurusd.sys", -1)
    text = exposition(m.subscriptions)
    assert sample(text, 'rango_hub_subscriptions_count{topic="eurusd.trades",type="public"}') == 0
    for i in range(MAX_TOPIC_LABELS + 5):
        m.subscription("public", f"junk{i}.x", 1)
    text = exposition(m.subscriptions)
    series = [
        line for line in text.splitlines() if line.startswith("rango_hub_subscriptions_count{")
    ]
    assert len(series) == MAX_TOPIC_LABELS + 1  # the cap, plus the one label past it
    other = f'rango_hub_subscriptions_count{{topic="{OTHER_TOPIC}",type="public"}}'
    # Two labels were taken before; the seven names past the cap are folded together.
    assert sample(text, other) == 7
    assert sum(float(line.rsplit(" ", 1)[1]) for line in series) == MAX_TOPIC_LABELS + 5


def test_ruby_rangers_connection_series_count_by_auth() -> None:
    m = WorkerMetrics()
    # Both label values exist from the start, at 0, as Ruby Ranger shows them.
    text = exposition(m._connections_opened, m._connections_current)
    for auth in (AUTH_PRIVATE, AUTH_PUBLIC):
        assert sample(text, f'ranger_connections_total{{auth="{auth}"}}') == 0
        assert sample(text, f'ranger_connections_current{{auth="{auth}"}}') == 0
    for authenticated in (True, True, False, False, False):
        m.connection_opened(authenticated)
    m.connection_closed(True)
    m.connection_closed(False)
    text = exposition(m._connections_opened, m._connections_current, m.clients)
    assert (AUTH_PRIVATE, AUTH_PUBLIC) == ("private", "public")  # Ruby Ranger's values
    assert sample(text, 'ranger_connections_total{auth="private"}') == 2
    assert sample(text, 'ranger_connections_total{auth="public"}') == 3
    assert sample(text, 'ranger_connections_current{auth="private"}') == 1
    assert sample(text, 'ranger_connections_current{auth="public"}') == 2
    assert sample(text, "rango_hub_clients_count") == 3  # Rango's gauge moves with them
    assert "# TYPE ranger_connections_total counter" in text


def test_ruby_rangers_stream_gauge_follows_the_subscription_hook() -> None:
    m = WorkerMetrics()
    m.subscription("public", "eurusd.trades", 1)
    m.subscription("public", "eurusd.trades", 1)
    m.subscription("private", "order", 1)
    m.subscription("prefixed", "admin.eurusd.sys", 1)
    text = exposition(m.stream_subscriptions)
    assert sample(text, 'ranger_subscriptions_current{stream="eurusd.trades"}') == 2
    assert sample(text, 'ranger_subscriptions_current{stream="order"}') == 1
    assert sample(text, 'ranger_subscriptions_current{stream="admin.eurusd.sys"}') == 1
    m.subscription("public", "eurusd.trades", -1)
    m.subscription("private", "order", -1)
    text = exposition(m.stream_subscriptions)
    assert sample(text, 'ranger_subscriptions_current{stream="eurusd.trades"}') == 1
    assert sample(text, 'ranger_subscriptions_current{stream="order"}') == 0


def test_ruby_rangers_stream_labels_share_the_topic_cap() -> None:
    m = WorkerMetrics()
    for i in range(MAX_TOPIC_LABELS + 5):
        m.subscription("public", f"junk{i}.x", 1)
    m.subscription("private", "order", 1)  # past the cap too, whatever its kind
    text = exposition(m.stream_subscriptions)
    series = [
        line for line in text.splitlines() if line.startswith("ranger_subscriptions_current{")
    ]
    assert len(series) == MAX_TOPIC_LABELS + 1
    other = f'ranger_subscriptions_current{{stream="{OTHER_TOPIC}"}}'
    assert sample(text, other) == 6
    for i in range(MAX_TOPIC_LABELS, MAX_TOPIC_LABELS + 5):
        m.subscription("public", f"junk{i}.x", -1)
    m.subscription("private", "order", -1)
    assert sample(exposition(m.stream_subscriptions), other) == 0


def test_gc_counters_follow_the_interpreter() -> None:
    m = WorkerMetrics()
    m.flush(True, 0)
    gc.collect()
    m.flush(True, 0)
    text = exposition(m._gc_collections)
    assert sample(text, 'python_gc_collections_total{generation="2"}') >= 1


def test_process_tree_sums_memory_over_master_and_workers() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; b = bytearray(64 << 20); sys.stdin.read()"],
        stdin=subprocess.PIPE,
    )
    try:
        master = os.getpid()
        alone = exposition(ProcessTreeCollector(master, lambda pid: []))
        deadline = time.monotonic() + 10
        while True:
            both = exposition(ProcessTreeCollector(master, child_pids))
            extra = sample(both, "process_resident_memory_bytes") - sample(
                alone, "process_resident_memory_bytes"
            )
            if extra > 60 << 20 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert extra > 60 << 20
        assert sample(both, "process_open_fds") > sample(alone, "process_open_fds")
        # The start time is the master's own, whatever its children: pid 1 (which started long
        # before this test) as a child must not change it.
        with_init = exposition(ProcessTreeCollector(master, lambda pid: [1]))
        assert sample(both, "process_start_time_seconds") == sample(
            alone, "process_start_time_seconds"
        )
        assert sample(with_init, "process_start_time_seconds") == sample(
            alone, "process_start_time_seconds"
        )
    finally:
        child.communicate(b"")


def test_child_pids_lists_the_children_of_a_process() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        assert child.pid in child_pids(os.getpid())
        assert child_pids(child.pid) == []
    finally:
        child.communicate(b"")
    assert child.pid not in child_pids(os.getpid())
    assert child_pids(2**22 + 1) == []  # above pid_max: no such process


HOSTILE_NAMES = ["\ud800.x", "a\nb.trades", "\x00.x", "z" * 256, "zero\u200bwidth.x"]


def test_safe_label_keeps_dashboard_text_and_replaces_the_rest() -> None:
    for name in ("eurusd.trades", "global.tickers", "admin.eurusd.sys", "ünï.cödé", "z" * 255):
        assert safe_label(name) == name
    for name in HOSTILE_NAMES:
        assert safe_label(name) == INVALID_LABEL, repr(name)


def test_a_hostile_stream_name_never_reaches_a_label() -> None:
    m = WorkerMetrics()
    for name in HOSTILE_NAMES:
        m.subscription("public", name, 1)
    text = exposition(m.subscriptions)  # would raise UnicodeEncodeError on a lone surrogate
    invalid = f'rango_hub_subscriptions_count{{topic="{INVALID_LABEL}",type="public"}}'
    assert sample(text, invalid) == 5
    ruby = exposition(m.stream_subscriptions)
    ruby_invalid = f'ranger_subscriptions_current{{stream="{INVALID_LABEL}"}}'
    assert sample(ruby, ruby_invalid) == 5
    assert len([line for line in ruby.splitlines() if line[0] != "#"]) == 1
    for name in HOSTILE_NAMES:
        m.subscription("public", name, -1)
    text = exposition(m.subscriptions)
    assert sample(text, invalid) == 0
    assert sample(exposition(m.stream_subscriptions), ruby_invalid) == 0


class _Hostile:
    """A collector that yields a label value the text exposition cannot encode."""

    def collect(self) -> list[Metric]:
        family = GaugeMetricFamily("g", "a gauge", labels=["topic"])
        family.add_metric(["\ud800.x"], 1)
        family.add_metric(["fine.x"], 2)
        return [family]


def test_the_exposition_survives_a_label_value_that_has_no_utf8_form() -> None:
    text = exposition(SafeLabels(_Hostile()))
    assert sample(text, f'g{{topic="{INVALID_LABEL}"}}') == 1
    assert sample(text, 'g{topic="fine.x"}') == 2


def test_a_value_file_not_sized_yet_does_not_fail_the_scrape(tmp_path: Path) -> None:
    # What a starting worker leaves for an instant: its file created, still empty.
    (tmp_path / "counter_12345.db").write_bytes(b"")
    with pytest.raises(struct.error):
        exposition(multiprocess.MultiProcessCollector(None, path=str(tmp_path)))
    assert exposition(SettledFiles(str(tmp_path))) == ""

"""The Prometheus endpoint of a real 2-worker server, scraped while real clients come and go (§7).

One scrape reports the whole server: gauges and counters summed over both workers, ``process_*``
over the whole process tree. The server is this module's own, so its figures move only with what
these tests do; each test compares against a scrape taken before it acts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from websockets.exceptions import InvalidStatus

from .harness import Connect, Server, ServerPool, unique
from .scrape import Scrape, key, wait_for_figures
from .tokens import SigningKey, rsa_key
from .wsclient import Client, http_request, subscribed, unsubscribed

CLIENTS = "rango_hub_clients_count"
SUBSCRIPTIONS = "rango_hub_subscriptions_count"
RECEIVED = "ranger_messages_received_total"
DELIVERED = "ranger_frames_delivered_total"
DROPPED = "ranger_messages_dropped_total"
AUTH_FAILURES = "ranger_auth_failures_total"
SCRAPES = "promhttp_metric_handler_requests_total"
SCRAPES_IN_FLIGHT = "promhttp_metric_handler_requests_in_flight"
FANOUT = "ranger_fanout_seconds"
# Ruby Ranger's series (peatio-core's router), kept for its dashboards.
RUBY_OPENED = "ranger_connections_total"
RUBY_CURRENT = "ranger_connections_current"
RUBY_STREAMS = "ranger_subscriptions_current"
WORKERS = 2

_OPEN_LINE = re.compile(r"\[(\d+)\] \w+ ranger_py\.connection: connection \d+ open ")


@pytest.fixture(scope="module")
def metered(pool: ServerPool, rsa: SigningKey) -> Iterator[Server]:
    server = pool.new(
        {
            "WEB_CONCURRENCY": str(WORKERS),
            # Every worker receives every message, as with Ranger and Rango: the counts below
            # are of messages nobody subscribed to, too.
            "RANGER_BROKER_ROUTING": "all",
            "JWT_PUBLIC_KEY": rsa.public_env,
            "RANGO_RBAC_ADMIN": "admin",
            "LOG_LEVEL": "info",
        },
        name="metrics",
    ).start()
    yield server
    server.stop()


def _auth(key: SigningKey, uid: str, role: str = "member") -> dict[str, str]:
    return {"Authorization": key.bearer(uid, role)}


def _workers_holding_connections(server: Server, offset: int) -> set[int]:
    """Pids of the workers that logged a connection opening since ``offset``."""
    return {int(pid) for pid in _OPEN_LINE.findall(server.log_text(offset))}


def _assert_no_uid_in_labels(scrape: Scrape, *uids: str) -> None:
    # PROTOCOL §7: no per-user label anywhere (cardinality).
    offenders = [
        (name, label, value)
        for name, label, value in scrape.labels()
        if label in {"uid", "user"} or any(uid in value for uid in uids)
    ]
    assert offenders == []


def _cannot_subscribe(stream: str) -> str:
    return f'{{"success":{{"message":"cannot subscribe to {stream}"}}}}'


def test_clients_and_subscriptions_are_summed_over_both_workers(
    metered: Server, connect: Connect, rsa: SigningKey
) -> None:
    server = metered
    wait_for_figures(server.scrape, {key(CLIENTS): 0})  # the previous test's clients are gone
    market = unique()
    public, private, prefixed = f"{market}.trades", unique("ev"), f"admin.{market}.sys"

    offset = server.log_size()
    viewers: list[Client] = []
    # The kernel decides which worker accepts: connect until both hold clients.
    while len(viewers) < 4 or len(_workers_holding_connections(server, offset)) < WORKERS:
        assert len(viewers) < 100, "every connection landed on the same worker"
        viewer = connect(server, f"/public?stream={public}")
        assert viewer.recv() == subscribed(public)
        viewers.append(viewer)
    alice, bob = unique("ID"), unique("ID")
    traders = [
        connect(server, f"/private?stream={private}", headers=_auth(rsa, uid))
        for uid in (alice, alice, bob)
    ]
    for trader in traders:
        assert trader.recv() == subscribed(private)
    admin_uids = [unique("ID"), unique("ID")]
    admins = [connect(server, "/private", headers=_auth(rsa, uid, "admin")) for uid in admin_uids]
    for admin in admins:
        assert admin.recv() == subscribed()
        assert admin.subscribe(prefixed, public) == subscribed(prefixed, public)
    member = connect(server, "/", headers=_auth(rsa, unique("ID")))
    assert member.recv() == subscribed()
    assert member.subscribe(prefixed) == _cannot_subscribe(prefixed)

    viewers_count = len(viewers)
    public_key = key(SUBSCRIPTIONS, type="public", topic=public)
    private_key = key(SUBSCRIPTIONS, type="private", topic=private)
    # The full name, as the client named it (Rango labels the add and the remove differently).
    prefixed_key = key(SUBSCRIPTIONS, type="prefixed", topic=prefixed)
    scrape = wait_for_figures(
        server.scrape,
        {
            key(CLIENTS): viewers_count + len(traders) + len(admins) + 1,
            public_key: viewers_count + len(admins),
            private_key: len(traders),
            prefixed_key: len(admins),
        },
    )
    ours = {
        labels
        for labels in scrape.series(SUBSCRIPTIONS)
        if any(
            label == "topic" and (market in value or value == private) for label, value in labels
        )
    }
    assert ours == {public_key[1], private_key[1], prefixed_key[1]}
    _assert_no_uid_in_labels(scrape, alice, bob, *admin_uids)

    # Leaving, step by step: each removal takes back what its add counted, under the same labels.
    assert viewers[0].unsubscribe(public) == unsubscribed()
    assert admins[0].unsubscribe(prefixed) == unsubscribed(public)
    traders[0].close()
    member.close()
    wait_for_figures(
        server.scrape,
        {
            key(CLIENTS): viewers_count + len(traders) + len(admins) - 1,
            public_key: viewers_count + len(admins) - 1,
            private_key: len(traders) - 1,
            prefixed_key: len(admins) - 1,
        },
    )

    for client in [*viewers, *traders[1:], *admins]:
        client.close()
    scrape = wait_for_figures(
        server.scrape, {key(CLIENTS): 0, public_key: 0, private_key: 0, prefixed_key: 0}
    )
    negative = {
        labels: value for labels, value in scrape.series(SUBSCRIPTIONS).items() if value < 0
    }
    assert negative == {}


def test_ruby_rangers_series_count_connections_by_auth_and_subscriptions_by_stream(
    metered: Server, connect: Connect, rsa: SigningKey
) -> None:
    server = metered
    wait_for_figures(server.scrape, {key(CLIENTS): 0})  # the previous test's clients are gone
    before = server.scrape()
    market = unique()
    public, private, hostile = f"{market}.trades", unique("ev"), f"{market}\u200b.x"

    offset = server.log_size()
    anonymous: list[Client] = []
    # Both workers must hold clients: one scrape has to report them all.
    while len(anonymous) < 2 or len(_workers_holding_connections(server, offset)) < WORKERS:
        assert len(anonymous) < 100, "every connection landed on the same worker"
        viewer = connect(server, f"/public?stream={public}")
        assert viewer.recv() == subscribed(public)
        anonymous.append(viewer)
    # A refused optional token and a valid token without a uid both leave the client public.
    for headers in ({"Authorization": "Bearer garbage"}, {"Authorization": rsa.bearer(None)}):
        viewer = connect(server, f"/?stream={public}", headers=headers)
        assert viewer.recv() == subscribed(public)
        anonymous.append(viewer)
    alice, bob = unique("ID"), unique("ID")
    authenticated = [
        connect(server, f"/private?stream={private}", headers=_auth(rsa, alice)),
        connect(server, f"/private?stream={private}", headers=_auth(rsa, bob)),
        connect(server, f"/?stream={public}", headers=_auth(rsa, bob)),  # a uid on a public path
    ]
    for client, stream in zip(authenticated, (private, private, public), strict=True):
        assert client.recv() == subscribed(stream)
    assert anonymous[0].subscribe(hostile) == subscribed(public, hostile)

    opened_public = before.value(RUBY_OPENED, auth="public") + len(anonymous)
    opened_private = before.value(RUBY_OPENED, auth="private") + len(authenticated)
    public_key = key(RUBY_STREAMS, stream=public)
    private_key = key(RUBY_STREAMS, stream=private)
    # Client text that is not printable goes under the same safe label as Rango's topic.
    invalid_key = key(RUBY_STREAMS, stream="_invalid")
    invalid_before = before.value(RUBY_STREAMS, stream="_invalid")
    scrape = wait_for_figures(
        server.scrape,
        {
            key(RUBY_OPENED, auth="public"): opened_public,
            key(RUBY_OPENED, auth="private"): opened_private,
            key(RUBY_CURRENT, auth="public"): len(anonymous),
            key(RUBY_CURRENT, auth="private"): len(authenticated),
            key(CLIENTS): len(anonymous) + len(authenticated),
            public_key: len(anonymous) + 1,
            private_key: 2,
            invalid_key: invalid_before + 1,
        },
    )
    assert "# TYPE ranger_connections_total counter" in scrape.text
    assert "# TYPE ranger_connections_current gauge" in scrape.text
    assert "# TYPE ranger_subscriptions_current gauge" in scrape.text
    assert {value for _, label, value in scrape.labels() if label == "auth"} <= {
        "public",
        "private",
    }
    ours = {
        value
        for name, label, value in scrape.labels()
        if name == RUBY_STREAMS and (market in value or value == private)
    }
    assert ours == {public, private}
    _assert_no_uid_in_labels(scrape, alice, bob)

    assert anonymous[0].unsubscribe(public, hostile) == unsubscribed()
    authenticated[0].close()
    anonymous[1].close()
    wait_for_figures(
        server.scrape,
        {
            key(RUBY_CURRENT, auth="public"): len(anonymous) - 1,
            key(RUBY_CURRENT, auth="private"): len(authenticated) - 1,
            public_key: len(anonymous) - 1,
            private_key: 1,
            invalid_key: invalid_before,
        },
    )

    for client in [*anonymous, *authenticated]:
        client.close()
    scrape = wait_for_figures(
        server.scrape,
        {
            key(RUBY_CURRENT, auth="public"): 0,
            key(RUBY_CURRENT, auth="private"): 0,
            key(CLIENTS): 0,
            public_key: 0,
            private_key: 0,
        },
    )
    # Totals count connections opened: closing takes nothing back.
    assert scrape.value(RUBY_OPENED, auth="public") == opened_public
    assert scrape.value(RUBY_OPENED, auth="private") == opened_private


def test_broker_messages_are_counted_per_worker_and_per_recipient(
    metered: Server, connect: Connect, rsa: SigningKey
) -> None:
    server = metered
    market = unique()
    stream, private, prefixed = f"{market}.trades", unique("ev"), f"admin.{market}.sys"
    alice, bob, admin_uid = unique("ID"), unique("ID"), unique("ID")
    watchers = [connect(server, f"/?stream={stream}") for _ in range(3)]
    for watcher in watchers:
        assert watcher.recv() == subscribed(stream)
    alices = [
        connect(server, f"/private?stream={private}", headers=_auth(rsa, alice)) for _ in range(2)
    ]
    bobs = [connect(server, f"/private?stream={private}", headers=_auth(rsa, bob))]
    for trader in (*alices, *bobs):
        assert trader.recv() == subscribed(private)
    admin = connect(server, "/private", headers=_auth(rsa, admin_uid, "admin"))
    assert admin.recv() == subscribed()
    assert admin.subscribe(prefixed) == subscribed(prefixed)

    before = server.scrape()
    published = 0

    def publish(routing_key: str, body: str) -> None:
        nonlocal published
        server.publish(routing_key, body)
        published += 1

    for n in range(4):
        publish(f"public.{stream}", f'{{"n":{n}}}')  # 3 recipients each
    for n in range(2):
        publish(f"private.{alice}.{private}", f'{{"n":{n}}}')  # 2 recipients each
    publish(f"private.{bob}.{private}", '{"n":9}')  # 1 recipient
    publish(prefixed, '{"admin":true}')  # 1 recipient
    publish(f"public.{market}.nobody", '{"n":0}')  # nobody subscribed
    publish(f"public.{stream}", "not json")
    publish(f"public.{stream}", '{"n":')
    publish("nonsense", "{}")
    publish("a.b.c.d", "{}")
    publish(f"public.{market}.book-inc", "{}")  # an increment before any snapshot (§6)

    for watcher in watchers:
        assert watcher.recv_many(4) == [f'{{"{stream}":{{"n":{n}}}}}' for n in range(4)]
    for trader in alices:
        assert trader.recv_many(2) == [f'{{"{private}":{{"n":{n}}}}}' for n in range(2)]
    assert bobs[0].recv() == f'{{"{private}":{{"n":9}}}}'
    assert admin.recv() == f'{{"{market}.sys":{{"admin":true}}}}'

    # Every worker consumes every broker message; a frame is counted once per recipient.
    after = wait_for_figures(
        server.scrape,
        {
            key(RECEIVED): before.value(RECEIVED) + WORKERS * published,
            key(DELIVERED): before.value(DELIVERED) + 4 * 3 + 2 * 2 + 1 + 1,
            key(DROPPED, reason="bad_json"): before.value(DROPPED, reason="bad_json") + 2 * WORKERS,
            key(DROPPED, reason="bad_routing_key"): (
                before.value(DROPPED, reason="bad_routing_key") + 2 * WORKERS
            ),
            key(DROPPED, reason="no_snapshot"): (
                before.value(DROPPED, reason="no_snapshot") + WORKERS
            ),
        },
    )
    # One fan-out per message and worker holding recipients: 8 messages had some.
    fanouts = after.value(f"{FANOUT}_count") - before.value(f"{FANOUT}_count")
    assert 8 <= fanouts <= 8 * WORKERS
    everything = after.value(f"{FANOUT}_bucket", le="+Inf") - before.value(
        f"{FANOUT}_bucket", le="+Inf"
    )
    assert everything == fanouts
    assert after.value(f"{FANOUT}_sum") > before.value(f"{FANOUT}_sum")
    _assert_no_uid_in_labels(after, alice, bob, admin_uid)


def test_refused_tokens_are_counted_by_reason(metered: Server, rsa: SigningKey) -> None:
    server = metered
    now = 1_000_000_000
    refused = {
        "malformed token": "Bearer garbage",
        "invalid signature": rsa_key().bearer(),
        "token expired": rsa.bearer(exp=now, iat=now - 60),
        "missing bearer token": None,
    }
    before = server.scrape()
    for authorization in refused.values():
        headers = {} if authorization is None else {"Authorization": authorization}
        with pytest.raises(InvalidStatus) as refusal:
            Client(server.url("/private"), headers=headers)
        assert refusal.value.response.status_code == 401
    wait_for_figures(
        server.scrape,
        {
            key(AUTH_FAILURES, reason=reason): before.value(AUTH_FAILURES, reason=reason) + 1
            for reason in refused
        },
    )


def test_any_path_serves_metrics_and_scrapes_are_counted(metered: Server) -> None:
    previous: float | None = None
    for path in ("/metrics", "/", "/any/other/path?x=1", "/metrics"):
        response = http_request(metered.metrics_port, path)
        assert response.status == 200, path
        assert response.headers["content-type"].startswith("text/plain")
        scrape = Scrape.parse(response.body.decode())
        assert scrape.has(CLIENTS)
        assert scrape.value(SCRAPES_IN_FLIGHT) == 1  # this very scrape
        # A scrape is counted once it is served: the next one sees it.
        count = scrape.value(SCRAPES, code="200")
        if previous is not None:
            assert count == previous + 1, path
        previous = count


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def test_process_metrics_cover_the_whole_process_tree(metered: Server) -> None:
    server = metered
    assert server.process is not None
    workers = server.worker_pids()
    assert len(workers) == WORKERS
    rss = [_rss_bytes(pid) for pid in (server.process.pid, *workers)]
    scrape = server.scrape()
    total = scrape.value("process_resident_memory_bytes")
    # Summed over the master and both workers, not one process as prometheus-client would report.
    assert total > max(rss)
    assert total == pytest.approx(sum(rss), rel=0.2)
    assert scrape.value("process_cpu_seconds_total") > 0
    assert scrape.value("process_open_fds") > 0
    assert scrape.value("process_max_fds") > 0
    # Python's runtime in place of Go's go_*.
    assert [labels for labels, value in scrape.series("python_info").items() if value == 1]
    assert scrape.value("python_gc_collections_total", generation="0") > 0

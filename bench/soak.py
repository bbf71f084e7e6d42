"""``python -m bench.soak``: a long run under steady load, client churn and broker cuts.

A program, not a test (see bench/README.md, "Soak"). It starts ranger-py as users do
(``gunicorn -c gunicorn.conf.py``), with its RabbitMQ connection going through a proxy of ours
(:mod:`bench.amqproxy`) so that it can be cut, connects thousands of public and private websocket
clients (:mod:`bench.soakgen`), publishes sequence-numbered messages at a steady rate
(:mod:`bench.soakpub`) and, for the whole run, churns clients, cuts the broker connection twice
and samples the server's memory. At the end every client's received sequence numbers are checked
against what was published while it was subscribed and the broker connection was up.

Exit status: 0 when no private message was lost while the broker was up and the server's RSS
grew less than ``--rss-threshold`` MB/min after warm-up (and the run itself was sound: see
:func:`verdict`); 1 otherwise; 130 when interrupted. Everything it starts (server, helpers, the
``ranger-soak-*`` vhost) is gone when it returns, also after Ctrl-C or a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import resource
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from bench import procs, soakreport
from bench.cli import _machine, _require_loopback, check_dependencies, raise_interrupt
from bench.rpc import Child, ChildError
from bench.server import EXCHANGE, REPO, Broker, BrokerUnavailable, Server, ServerFailed, ServerSpec
from bench.tokens import Signer, uid

__all__ = ["SoakSettings", "main", "verdict"]

_PUBLIC_EVENT = "trades"
_PRIVATE_EVENT = "order"
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an HTTP proxy
_PROBE_TIMEOUT = 2.0
_TICK_S = 0.1
_HEALTH_EVERY_S = 1.0
_SETUP_BUDGET_S = 900  # connect, verify and teardown, on top of the run: the watchdog's margin


def _mono_us() -> int:
    return time.monotonic_ns() // 1000


def _shown(path: Path) -> str:
    """A path as the result file records it: relative to the repository, no machine's layout."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return path.name


class _Watchdog(BaseException):
    """The run overran its time budget by far: stop everything now."""


@dataclass
class SoakSettings:
    """Every size, rate and duration of a soak run (each one is a command-line option)."""

    clients: int = 2000
    duration: float = 600.0
    public_streams: int = 4
    streams_per_client: int = 2
    public_rate: float = 100.0
    private_rate: float = 20.0
    uid_group: int = 2
    churn_interval: float = 10.0
    churn_percent: float = 2.0
    cuts: int = 2
    cut_seconds: float = 20.0
    cut_guard: float = 1.0
    end_grace: float = 1.0
    sample_seconds: float = 10.0
    warmup: float | None = None
    rss_threshold: float = 1.0
    workers: int = 1
    loadgen_procs: int = 1
    concurrency: int = 200
    body_size: int = 160
    drain: float = 5.0
    reconnect_timeout: float = 90.0
    seed: int = 1
    server_env: dict[str, str] = field(default_factory=dict)

    @property
    def warmup_s(self) -> float:
        return self.warmup if self.warmup is not None else min(120.0, self.duration / 3)

    @property
    def public_clients(self) -> int:
        return self.clients // 2

    @property
    def private_clients(self) -> int:
        return self.clients - self.public_clients

    @property
    def users(self) -> int:
        return max(1, math.ceil(self.private_clients / self.uid_group))

    def cut_times(self) -> list[float]:
        return [self.duration * k / (self.cuts + 1) for k in range(1, self.cuts + 1)]

    def check(self) -> None:
        problems = []
        if self.clients < 2:
            problems.append("--clients must be at least 2 (half public, half private)")
        if self.duration < 30:
            problems.append("--duration must be at least 30 s")
        if not 1 <= self.streams_per_client <= self.public_streams:
            problems.append("--streams-per-client must be between 1 and --public-streams")
        if self.public_rate <= 0 or self.private_rate <= 0:
            problems.append("--public-rate and --private-rate must be positive")
        if self.uid_group < 1 or self.workers < 1 or self.loadgen_procs < 1:
            problems.append("--uid-group, --workers and --loadgen-procs must be at least 1")
        if self.cuts:
            gap = self.duration / (self.cuts + 1)
            if self.cut_seconds + self.cut_guard + 5 > gap:
                problems.append(
                    f"--cut-seconds {self.cut_seconds:g} does not fit between cuts "
                    f"{gap:.0f} s apart: lengthen --duration or shorten the cuts"
                )
        if not 0 <= self.warmup_s < self.duration - 2 * self.sample_seconds:
            problems.append("--warmup must leave at least three RSS samples before the end")
        if problems:
            raise SystemExit("; ".join(problems))


# -- the plan: who subscribes to what, who publishes what ------------------------------------


def public_topics(settings: SoakSettings) -> list[str]:
    return [f"soak{i}.{_PUBLIC_EVENT}" for i in range(settings.public_streams)]


def private_keys(settings: SoakSettings) -> list[str]:
    return [f"private.{uid(user)}.{_PRIVATE_EVENT}" for user in range(settings.users)]


def client_specs(settings: SoakSettings) -> list[dict[str, Any]]:
    """Half public clients (``streams_per_client`` of the public streams each, in turn), half
    private (``/private`` with the token of user ``j // uid_group``); every second client of
    each half subscribes with a subscribe message instead of ``?stream=``."""
    topics = public_topics(settings)
    specs = []
    for j in range(settings.public_clients):
        mine = [topics[(j + k) % len(topics)] for k in range(settings.streams_per_client)]
        by_message = j % 2 == 1
        query = "&".join(f"stream={t}" for t in mine)
        specs.append(
            {
                "id": j,
                "kind": "public",
                "path": "/public" if by_message else f"/public?{query}",
                "by_message": by_message,
                "topics": mine,
                "keys": {t: f"public.{t}" for t in mine},
            }
        )
    for j in range(settings.private_clients):
        user = j // settings.uid_group
        by_message = j % 2 == 1
        specs.append(
            {
                "id": settings.public_clients + j,
                "kind": "private",
                "uid": uid(user),
                "token": user,
                "path": "/private" if by_message else f"/private?stream={_PRIVATE_EVENT}",
                "by_message": by_message,
                "topics": [_PRIVATE_EVENT],
                "keys": {_PRIVATE_EVENT: f"private.{uid(user)}.{_PRIVATE_EVENT}"},
            }
        )
    return specs


# -- results -----------------------------------------------------------------------------------


def rss_fit(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    """Least-squares line through the RSS samples taken at or after ``warmup_s``."""
    points = [(s["t_s"], s["rss_mb"]) for s in samples if s["t_s"] >= warmup_s - 1e-6]
    fit: dict[str, Any] = {"warmup_s": warmup_s, "samples": len(points), "slope_mb_per_min": None}
    if len(points) < 3:
        return fit
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_r = sum(r for _, r in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var <= 0:
        return fit
    slope = sum((t - mean_t) * (r - mean_r) for t, r in points) / var
    fit.update(
        slope_mb_per_min=round(slope * 60, 3),
        first_mb=points[0][1],
        last_mb=points[-1][1],
        min_mb=min(r for _, r in points),
        max_mb=max(r for _, r in points),
    )
    return fit


def verdict(document: dict[str, Any], settings: SoakSettings) -> dict[str, Any]:
    """Pass: no message lost or repeated, in a cut window or outside, RSS growth after warm-up under
    the threshold, and a sound run (it finished, something private was expected, every cut was
    followed by the server consuming again, no outage we did not cause, the server lived)."""
    reasons = []
    if document.get("interrupted"):
        reasons.append("interrupted")
    if document.get("failure"):
        reasons.append(f"run failed: {document['failure']}")
    delivery = document.get("delivery", {})
    private = delivery.get("private")
    if private is None:
        reasons.append("no delivery figures (the run did not get to the check)")
    elif not private.get("expected_up"):
        reasons.append("no private message was expected: nothing was measured")
    # The worker's queue outlives a cut: nothing may be lost or repeated, in a cut or outside.
    for kind in ("public", "private"):
        tally = delivery.get(kind) or {}
        for key, what in (
            ("lost_up", "lost while the broker was up"),
            ("lost_cut", "lost in the cut windows"),
            ("duplicated_up", "delivered twice"),
        ):
            if tally.get(key, 0):
                reasons.append(f"{tally[key]} {kind} messages {what}")
    fit = document.get("rss", {}).get("fit", {})
    slope = fit.get("slope_mb_per_min")
    if slope is None:
        reasons.append(f"too few RSS samples after warm-up ({fit.get('samples', 0)})")
    elif slope >= settings.rss_threshold:
        reasons.append(
            f"RSS grew {slope:.2f} MB/min after warm-up (threshold {settings.rss_threshold:g})"
        )
    for cut in document.get("cuts", []):
        if cut.get("consuming_after_s") is None:
            reasons.append(f"cut {cut['n']}: the server did not consume again")
    if document.get("outages"):
        reasons.append(f"{len(document['outages'])} broker outage(s) the soak did not cause")
    if document.get("server_exited"):
        reasons.append("the server exited during the run")
    return {"passed": not reasons, "reasons": reasons}


# -- the run -----------------------------------------------------------------------------------


class SoakBroker(Broker):
    """A ``ranger-soak-<random>`` vhost of our own on the shared broker."""

    def __init__(self, host: str, port: int, user: str, password: str) -> None:
        super().__init__(host, port, user, password, vhost=f"ranger-soak-{secrets.token_hex(4)}")
        self.own = True


class Soak:
    """Everything one soak run starts, the run itself, and the collected figures."""

    def __init__(self, settings: SoakSettings, broker: Broker, log_dir: Path) -> None:
        self.settings = settings
        self.broker = broker
        self.log_dir = log_dir
        self.signer = Signer()
        self.doc: dict[str, Any] = {}
        self.proxy: Child | None = None
        self.publishers: dict[str, Child] = {}
        self.loadgens: list[Child] = []
        self.server: Server | None = None
        self.t0 = 0.0
        self.t0_us = 0
        self.windows: list[list[int]] = []  # [from_us, to_us] publishes excluded from "up"
        self.cut: dict[str, Any] | None = None
        self.outage: dict[str, Any] | None = None
        self.last_up_us = 0
        self.samples: list[dict[str, Any]] = []
        self.probe_errors = 0
        self._last_server: procs.Sample | None = None
        self._last_broker: procs.Sample | None = None
        self._last_gen: list[dict[str, Any]] = []
        self._broker_pids = procs.broker_pids()
        self._published_file = log_dir / "published.json"

    # helpers

    def _child(self, name: str, module: str) -> Child:
        return Child(name, module, log_path=self.log_dir / f"{name}.log", cwd=REPO)

    def _all(
        self,
        command: str,
        timeout: float,
        per_child: list[dict[str, Any]] | None = None,
        **args: Any,
    ) -> list[dict[str, Any]]:
        for i, child in enumerate(self.loadgens):
            child.send(command, **args, **(per_child[i] if per_child else {}))
        return [child.recv(timeout) for child in self.loadgens]

    def rel(self) -> float:
        return time.monotonic() - self.t0

    def _log(self, text: str) -> None:
        print(f"[{self.rel():7.1f} s] {text}" if self.t0 else text, flush=True)

    # broker state as the server sees it

    def _readyz(self) -> bool | None:
        assert self.server is not None
        try:
            url = f"http://{self.server.host}:{self.server.url_port}/readyz"
            with _HTTP.open(url, timeout=_PROBE_TIMEOUT) as answer:
                return bool(answer.status == 200)
        except urllib.error.HTTPError as exc:
            return False if exc.code == 503 else None
        except (OSError, TimeoutError):
            return None

    def _connected_workers(self) -> int | None:
        assert self.server is not None
        try:
            url = f"http://127.0.0.1:{self.server.metrics_port}/metrics"
            with _HTTP.open(url, timeout=_PROBE_TIMEOUT) as answer:
                text = answer.read().decode("utf-8", "replace")
        except (OSError, TimeoutError):
            return None
        for line in text.splitlines():
            if line.startswith("ranger_broker_connected "):
                return int(float(line.split()[1]))
        return None

    def consuming(self) -> bool | None:
        """Whether the server consumes from the broker: ``/readyz`` (immediate), and with
        several workers also ``ranger_broker_connected`` (every worker; flushed each second)."""
        ready = self._readyz()
        if ready is None:
            self.probe_errors += 1
            return None
        if ready and self.settings.workers > 1:
            connected = self._connected_workers()
            if connected is None:
                self.probe_errors += 1
                return None
            return connected >= self.settings.workers
        return ready

    # lifecycle

    def start(self) -> None:
        s = self.settings
        self.broker.setup()
        self._log(f"vhost {self.broker.vhost} on {self.broker.host}:{self.broker.port}")
        self.proxy = self._child("amqproxy", "bench.amqproxy")
        proxy_port = self.proxy.call(
            "listen", 15.0, upstream_host=self.broker.host, upstream_port=self.broker.port
        )["port"]
        self.server = Server(
            ServerSpec("ranger-py", env=s.server_env),
            self.broker,
            log_path=self.log_dir / "server.log",
            jwt_public_key=self.signer.public_env,
            workers=s.workers,
            extra_env={"RABBITMQ_PORT": str(proxy_port)},
        )
        self.doc["server"] = {
            "command": "gunicorn -c gunicorn.conf.py",
            "workers": s.workers,
            "port": self.server.port,
            "metrics_port": self.server.metrics_port,
            "amqp_proxy_port": proxy_port,
            "log": _shown(self.server.log_path),
        }
        self._log(f"starting the server (gunicorn -c gunicorn.conf.py, AMQP via :{proxy_port})")
        self.server.start()
        for name in ("public", "private"):
            child = self._child(f"publisher-{name}", "bench.soakpub")
            self.publishers[name] = child
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
        self._connect_clients()

    def _connect_clients(self) -> None:
        s = self.settings
        tokens = self.signer.tokens_file(self.log_dir / "tokens.txt", s.users)
        specs = client_specs(s)
        self.loadgens = [
            self._child(f"soakgen-{i}", "bench.soakgen") for i in range(s.loadgen_procs)
        ]
        n = len(self.loadgens)
        assert self.server is not None
        self._all(
            "setup",
            60.0,
            per_child=[{"clients": specs[i::n], "seed": s.seed * 1000 + i} for i in range(n)],
            base_url=self.server.base_url,
            tokens_file=str(tokens),
        )
        self._log(
            f"connecting {s.clients} clients ({s.public_clients} public, "
            f"{s.private_clients} private as {s.users} users)"
        )
        parts = self._all("connect", 120.0 + s.clients / 20, concurrency=s.concurrency)
        errors: dict[str, int] = {}
        for part in parts:
            for key, value in part["errors"].items():
                errors[key] = errors.get(key, 0) + value
        connect = {
            "clients": sum(p["clients"] for p in parts),
            "subscribed": sum(p["subscribed"] for p in parts),
            "elapsed_s": max(p["elapsed_s"] for p in parts),
            "errors": errors,
        }
        self.doc["connect"] = connect
        self._log(
            f"{connect['subscribed']} of {connect['clients']} clients subscribed in "
            f"{connect['elapsed_s']} s" + (f"; errors {errors}" if errors else "")
        )
        if connect["subscribed"] < connect["clients"]:
            raise ServerFailed(f"only {connect['subscribed']} of {connect['clients']} subscribed")

    def _schedule(self) -> tuple[list[float], list[float]]:
        """When (s after the start of publishing) to sample RSS, and to churn."""
        s = self.settings
        samples_at = [
            k * s.sample_seconds for k in range(1, int(s.duration / s.sample_seconds) + 1)
        ]
        if not samples_at or samples_at[-1] < s.duration - 1e-6:
            samples_at.append(s.duration)
        churn_at = []
        if s.churn_percent > 0:
            for k in range(1, int(s.duration / s.churn_interval) + 1):
                if k * s.churn_interval < s.duration - s.churn_interval / 2:
                    churn_at.append(k * s.churn_interval)
        return samples_at, churn_at

    def run(self) -> None:
        """Publish for ``duration`` s with churn, cuts and samples; then collect and check."""
        s = self.settings
        samples_at, churn_at = self._schedule()
        cuts_at = s.cut_times()
        churn_count = round(s.clients * s.churn_percent / 100)
        self.t0 = time.monotonic()
        self.t0_us = _mono_us()
        self.last_up_us = self.t0_us
        self._sample()  # t = 0: clients connected, nothing published yet
        self._log(
            f"publishing {s.public_rate:g} msg/s public, {s.private_rate:g} msg/s private for "
            f"{s.duration:g} s; churn {churn_count} clients every {s.churn_interval:g} s; "
            f"broker cuts of {s.cut_seconds:g} s at "
            + (", ".join(f"{t:.0f}" for t in cuts_at) or "-")
            + " s"
        )
        self._publish_start()
        next_health = _HEALTH_EVERY_S
        while (now := self.rel()) < s.duration:
            self._check_alive()
            if samples_at and now >= samples_at[0]:
                samples_at.pop(0)
                self._sample()
            if churn_at and now >= churn_at[0]:
                churn_at.pop(0)
                self._churn(churn_count)
            if cuts_at and now >= cuts_at[0] and self.cut is None:
                cuts_at.pop(0)
                self._cut_begin(s.cuts - len(cuts_at))
            if self.cut is not None:
                self._cut_step()
            elif now >= next_health:
                next_health = now + _HEALTH_EVERY_S
                self._health()
            upcoming = [t for t in (samples_at[:1] + churn_at[:1] + [s.duration]) if t > now]
            time.sleep(max(0.0, min(_TICK_S, min(upcoming) - now)))
        self._wrap_up(final_sample=bool(samples_at))

    def _wrap_up(self, *, final_sample: bool) -> None:
        """After publishing: close a cut still open, collect, drain, end the sessions, check."""
        s = self.settings
        deadline = time.monotonic() + s.cut_seconds + s.reconnect_timeout + 10
        while self.cut is not None and time.monotonic() < deadline:
            self._cut_step()
            time.sleep(_TICK_S)
        self._publish_collect()
        if final_sample:
            self._sample()
        if self.outage is not None:
            self._outage_end(_mono_us(), still_down=True)
        self.doc["readiness_probe_errors"] = self.probe_errors
        self._log(f"publishing done; {s.drain:g} s for the last frames, then closing the clients")
        time.sleep(s.drain)
        self._all("finish", 90.0)
        if self.server is not None:
            after = self.server.sample()
            self.doc["rss_after_clients_closed_mb"] = round(after.rss_bytes / 2**20, 1)
        self._verify()

    def _publish_start(self) -> None:
        s = self.settings
        plan = {
            "public": ([f"public.{t}" for t in public_topics(s)], s.public_rate),
            "private": (private_keys(s), s.private_rate),
        }
        for name, (keys, rate) in plan.items():
            self.publishers[name].send(
                "stream",
                exchange=EXCHANGE,
                keys=keys,
                rate=rate,
                duration=s.duration,
                body_size=s.body_size,
            )

    def _publish_collect(self) -> None:
        published: dict[str, list[int]] = {}
        summary = {}
        for name, child in self.publishers.items():
            result = child.recv(self.settings.duration * 3 + 60)
            keys, sent = result["keys"], result["sent_us"]
            for i, key in enumerate(keys):
                published[key] = sent[i :: len(keys)]
            summary[name] = {
                "published": result["published"],
                "target": result["target"],
                "rate": round(result["published"] / max(result["duration_s"], 1e-9), 2),
                "behind_max_ms": round(result["behind_max_ms"], 1),
                "keys": len(keys),
                "cpu_s": round(result["cpu_s"], 1),
            }
        self.doc["publish"] = summary
        path = self.log_dir / "published.json"
        path.write_text(json.dumps(published, separators=(",", ":")), encoding="utf-8")
        self._published_file = path

    def _check_alive(self) -> None:
        assert self.server is not None
        if not self.server.alive:
            self.doc["server_exited"] = True
            raise ServerFailed(f"the server exited; log:\n{self.server.log_tail()}")
        for child in [*self.publishers.values(), *self.loadgens]:
            if child.process.poll() is not None:
                raise ChildError(f"{child.name} exited; log:\n{child.log_tail()}")

    # samples

    def _sample(self) -> None:
        assert self.server is not None
        server = self.server.sample()
        broker = procs.sample(self._broker_pids)
        gens = self._all("status", 20.0)
        row: dict[str, Any] = {
            "t_s": round(self.rel(), 1),
            "rss_mb": round(server.rss_bytes / 2**20, 2),
            "processes": len(server.pids),
            "live_clients": sum(g["live"] for g in gens),
            "frames": sum(g["frames"] for g in gens),
            "client_errors": sum(g["errors"] for g in gens),
            "broker": self._broker_label(),
        }
        if self._last_server is not None and self._last_broker is not None:
            row["server_cpu_pct"] = server.cpu_percent_since(self._last_server)
            row["broker_cpu_pct"] = broker.cpu_percent_since(self._last_broker)
            shares = [
                100.0 * (g["cpu_s"] - p["cpu_s"]) / (g["mono_s"] - p["mono_s"])
                for g, p in zip(gens, self._last_gen, strict=True)
                if g["mono_s"] > p["mono_s"]
            ]
            row["client_cpu_pct"] = round(max(shares), 1) if shares else None
            frames_before = self.samples[-1]["frames"] if self.samples else 0
            wall = gens[0]["mono_s"] - self._last_gen[0]["mono_s"]
            row["frames_per_s"] = round((row["frames"] - frames_before) / wall) if wall else None
        self._last_server, self._last_broker, self._last_gen = server, broker, gens
        self.samples.append(row)
        self.doc.setdefault("rss", {})["samples"] = self.samples
        if row["t_s"] > 0:
            soakreport.progress(row)

    def _broker_label(self) -> str:
        if self.cut is not None:
            return f"cut {self.cut['n']}"
        return "down" if self.outage is not None else "up"

    # churn

    def _churn(self, count: int) -> None:
        n = len(self.loadgens)
        shares = [count * (i + 1) // n - count * i // n for i in range(n)]
        self._all("churn", 20.0, per_child=[{"count": c} for c in shares])

    # broker cuts and outages

    def _health(self) -> None:
        up = self.consuming()
        now_us = _mono_us()
        if up is True:
            if self.outage is not None:
                self._outage_end(now_us)
            self.last_up_us = now_us
        elif up is False and self.outage is None:
            # Down since some moment after the last probe that saw it up.
            self.outage = {
                "from_s": round((self.last_up_us - self.t0_us) / 1e6, 2),
                "from_us": self.last_up_us,
            }
            self._log("the server reports its broker connection down, and no cut is running")

    def _outage_end(self, now_us: int, *, still_down: bool = False) -> None:
        assert self.outage is not None
        outage = self.outage
        self.outage = None
        start = outage.pop("from_us") - int(self.settings.cut_guard * 1e6)
        self.windows.append([start, now_us])
        outage["until_s"] = round((now_us - self.t0_us) / 1e6, 2)
        outage["still_down_at_end"] = still_down
        self.doc.setdefault("outages", []).append(outage)

    def _cut_begin(self, n: int) -> None:
        assert self.proxy is not None
        if self.outage is not None:
            self._outage_end(_mono_us())
        cut_us = _mono_us()
        answer = self.proxy.call("cut", 10.0)
        self.cut = {
            "n": n,
            "at_s": round((cut_us - self.t0_us) / 1e6, 2),
            "cut_us": cut_us,
            "connections_aborted": answer["aborted"],
            "phase": "noticing",
            "noticed_after_s": None,
            "restored_after_s": None,
            "consuming_after_s": None,
        }
        self._log(
            f"cut {n}: AMQP connection aborted ({answer['aborted']} via the proxy), "
            f"refusing for {self.settings.cut_seconds:g} s"
        )

    def _cut_step(self) -> None:
        assert self.cut is not None and self.proxy is not None
        cut = self.cut
        s = self.settings
        now_us = _mono_us()
        since = (now_us - cut["cut_us"]) / 1e6
        if cut["phase"] == "noticing" and self.consuming() is False:
            cut["noticed_after_s"] = round(since, 2)
            cut["phase"] = "refusing"
        if cut["phase"] in ("noticing", "refusing") and since >= s.cut_seconds:
            self.proxy.call("restore", 15.0)
            cut["restored_after_s"] = round(since, 2)
            cut["phase"] = "reconnecting"
            self._log(f"cut {cut['n']}: proxy accepting again")
            return
        if cut["phase"] == "reconnecting":
            if self.consuming():
                now_us = _mono_us()
                cut["consuming_after_s"] = round((now_us - cut["cut_us"]) / 1e6, 2)
                self._cut_end(now_us)
            elif since - cut["restored_after_s"] > s.reconnect_timeout:
                self._log(
                    f"cut {cut['n']}: the server did not consume again within "
                    f"{s.reconnect_timeout:g} s"
                )
                self._cut_end(None)

    def _cut_end(self, up_us: int | None) -> None:
        assert self.cut is not None
        cut = self.cut
        self.cut = None
        start = cut.pop("cut_us") - int(self.settings.cut_guard * 1e6)
        end = up_us if up_us is not None else 2**62
        self.windows.append([start, end])
        cut.pop("phase")
        cut["excluded_s"] = [
            round((start - self.t0_us) / 1e6, 2),
            round((end - self.t0_us) / 1e6, 2) if up_us is not None else None,
        ]
        self.doc.setdefault("cuts", []).append(cut)
        self.last_up_us = up_us or self.last_up_us
        if up_us is not None:
            self._log(
                f"cut {cut['n']}: consuming again {cut['consuming_after_s']:.2f} s after the cut "
                f"(noticed after {cut['noticed_after_s']} s); publishes from "
                f"{cut['excluded_s'][0]:.1f} to {cut['excluded_s'][1]:.1f} s excluded"
            )

    # the check

    def _verify(self) -> None:
        s = self.settings
        self._log("checking every client's sequence numbers")
        parts = self._all(
            "verify",
            600.0,
            per_child=[
                {"dump_file": str(self.log_dir / f"clients-{i}.jsonl")}
                for i in range(len(self.loadgens))
            ],
            published_file=str(self._published_file),
            windows=self.windows,
            grace_us=int(s.end_grace * 1e6),
            t0_us=self.t0_us,
            bucket_s=s.sample_seconds,
        )
        delivery: dict[str, dict[str, int]] = {}
        buckets: dict[str, dict[str, int]] = {}
        worst: dict[str, list[dict[str, Any]]] = {}
        errors: dict[str, int] = {}
        samples: dict[str, list[str]] = {}
        churn: dict[str, int] = {}
        for part in parts:
            for kind, tally in part["totals"].items():
                into = delivery.setdefault(kind, {})
                for key, value in tally.items():
                    into[key] = into.get(key, 0) + value
            for name, counts in part["lost_by_bucket"].items():
                into = buckets.setdefault(name, {})
                for key, value in counts.items():
                    into[key] = into.get(key, 0) + value
            for kind, records in part["worst"].items():
                worst.setdefault(kind, []).extend(records)
            for key, value in part["errors"].items():
                errors[key] = errors.get(key, 0) + value
            for key, texts in part["error_samples"].items():
                samples.setdefault(key, []).extend(texts[: 3 - len(samples.get(key, []))])
            for key, value in part["churn"].items():
                churn[key] = churn.get(key, 0) + value
        for records in worst.values():
            records.sort(key=lambda r: -r["lost_up"])
            del records[10:]
        for tally in delivery.values():
            for key in (
                "expected_up",
                "delivered_up",
                "lost_up",
                "duplicated_up",
                "expected_cut",
                "delivered_cut",
                "lost_cut",
            ):
                tally.setdefault(key, 0)
        self.doc["delivery"] = delivery
        self.doc["lost_by_time"] = {
            "bucket_s": s.sample_seconds,
            **{
                name: dict(sorted(c.items(), key=lambda kv: int(kv[0])))
                for name, c in buckets.items()
            },
        }
        self.doc["clients_with_most_loss"] = worst
        self.doc["client_errors"] = errors
        self.doc["client_error_samples"] = samples
        self.doc["churn"] = churn
        self.doc["client_records"] = [f"clients-{i}.jsonl" for i in range(len(self.loadgens))]

    def stop(self) -> list[str]:
        """Stop everything this run started, whatever state it is in; what went wrong."""
        problems: list[str] = []

        def attempt(what: str, action: Any) -> None:
            try:
                action()
            except (BrokerUnavailable, ChildError, OSError, subprocess.SubprocessError) as exc:
                problems.append(f"cleanup ({what}): {exc}")

        # A helper busy with a command (a publisher mid-run) reads "quit" only when done:
        # after a failure or an interrupt, it gets a moment and is then killed.
        timeout = 10.0 if "delivery" in self.doc else 2.0
        for child in [*self.loadgens, *self.publishers.values()]:
            attempt(child.name, lambda child=child: child.close(timeout))
        if self.server is not None:
            server = self.server
            attempt("server", lambda: self.doc.__setitem__("server_stop", server.stop_report()))
            self.doc["server_problems"] = server.problems()
        if self.proxy is not None:
            proxy = self.proxy
            with contextlib.suppress(ChildError, OSError):
                self.doc["proxy"] = proxy.call("stats", 5.0)
            attempt("proxy", proxy.close)
        attempt("vhost", self.broker.teardown)
        (self.log_dir / "tokens.txt").unlink(missing_ok=True)
        return problems


# -- command line ------------------------------------------------------------------------------


# (setting, type, help): each becomes --setting-name, its default from SoakSettings.
_OPTIONS: tuple[tuple[str, type, str], ...] = (
    ("clients", int, "websocket clients, half public and half private"),
    ("duration", float, "publishing time, s"),
    ("public_streams", int, "public streams"),
    ("streams_per_client", int, "public streams each public client subscribes to"),
    ("public_rate", float, "public msg/s, over all public streams"),
    ("private_rate", float, "private msg/s, over all users"),
    ("uid_group", int, "private clients per user (uid)"),
    ("churn_interval", float, "s between two churns"),
    ("churn_percent", float, "%% of the clients closed and reconnected at each churn"),
    ("cuts", int, "broker cuts, evenly spread over the run"),
    ("cut_seconds", float, "how long the proxy refuses the server's AMQP connection per cut"),
    ("cut_guard", float, "s before each cut whose publishes count with the cut (in flight)"),
    ("end_grace", float, "publishes this close (s) to a client's own disconnect: not expected"),
    ("sample_seconds", float, "RSS sample interval, s"),
    ("warmup", float, "s left out of the RSS fit; when not given, min(120, duration/3)"),
    ("rss_threshold", float, "RSS growth after warm-up that fails the run, MB/min"),
    ("workers", int, "WEB_CONCURRENCY of the server"),
    ("loadgen_procs", int, "client processes"),
    ("concurrency", int, "websocket handshakes in flight while connecting"),
    ("body_size", int, "bytes per message body (at least 130)"),
    ("drain", float, "s for the last frames after publishing ends"),
    ("reconnect_timeout", float, "s after a cut ends within which the server must consume"),
    ("seed", int, "which clients churn"),
)


def _parser() -> argparse.ArgumentParser:
    defaults = SoakSettings()
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description=(
            "ranger-py soak: thousands of clients for minutes, steady publishing, client churn "
            "and broker cuts; checks delivery per client and the server's memory over time."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for name, kind, text in _OPTIONS:
        option = "--" + name.replace("_", "-")
        parser.add_argument(option, type=kind, default=getattr(defaults, name), help=text)
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the server (repeatable)",
    )
    parser.add_argument("--broker", default="127.0.0.1:5672", help="RabbitMQ host:port (loopback)")
    parser.add_argument("--broker-user", default="guest")
    parser.add_argument("--broker-password", default="guest")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "docs" / "bench",
        help="directory of the JSON result (soak-<timestamp>.json)",
    )
    parser.add_argument(
        "--logs",
        type=Path,
        default=REPO / "bench" / "results",
        help="directory of the run's logs (soak-<timestamp>-logs/)",
    )
    return parser


def _settings(args: argparse.Namespace) -> SoakSettings:
    env = {}
    for item in args.server_env:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--server-env wants NAME=VALUE, not {item!r}")
        env[name] = value
    settings = SoakSettings(
        **{name: getattr(args, name) for name, _, _ in _OPTIONS}, server_env=env
    )
    settings.check()
    return settings


def _raise_watchdog(signum: int, frame: FrameType | None) -> None:
    raise _Watchdog


def _execute(soak: Soak) -> int:
    """Start, run, and always stop: the status so far (0, or 130 when interrupted)."""
    doc = soak.doc
    try:
        doc["machine"] = _machine(soak.broker)
        print(
            f"ranger-py soak: {soak.settings.clients} clients, {soak.settings.duration:g} s, "
            f"{doc['machine']['cpus']} CPUs, ranger_py source "
            f"{doc['machine']['ranger_py_source_sha256']}; logs in {soak.log_dir}",
            flush=True,
        )
        soak.start()
        soak.run()
    except KeyboardInterrupt:
        doc["interrupted"] = True
        return 130
    except _Watchdog:
        doc["failure"] = "watchdog: the run overran its time budget"
    except (BrokerUnavailable, ChildError, ServerFailed, OSError) as exc:
        doc["failure"] = str(exc)
    finally:
        signal.alarm(0)
        # A second Ctrl-C must not leave the vhost or the server behind.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        doc["cleanup_problems"] = soak.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    check_dependencies(("picows", "uvloop", "websockets", "amqp", "jwt"))
    settings = _settings(args)
    host, _, port = args.broker.rpartition(":")
    host = host or "127.0.0.1"
    _require_loopback(host, "--broker")
    broker = SoakBroker(host, int(port), args.broker_user, args.broker_password)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    log_dir: Path = args.logs / f"soak-{stamp}-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the server inherits it
    # Explicit, since a shell may start a background job with SIGINT ignored.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, raise_interrupt)
    signal.signal(signal.SIGALRM, _raise_watchdog)
    signal.alarm(int(settings.duration + _SETUP_BUDGET_S))

    soak = Soak(settings, broker, log_dir)
    doc = soak.doc
    doc.update(
        kind="soak",
        started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        command=" ".join(["python -m bench.soak", *(argv if argv is not None else sys.argv[1:])]),
        settings={**asdict(settings), "warmup_s": settings.warmup_s, "users": settings.users},
        vhost=broker.vhost,
        logs=_shown(log_dir),
    )
    started = time.monotonic()
    status = _execute(soak)
    doc["seconds"] = round(time.monotonic() - started, 1)
    doc.setdefault("rss", {})["samples"] = soak.samples
    doc["rss"]["fit"] = rss_fit(soak.samples, settings.warmup_s)
    doc["rss"]["threshold_mb_per_min"] = settings.rss_threshold
    doc["verdict"] = verdict(doc, settings)
    path = out_dir / f"soak-{stamp}.json"
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")
    soakreport.print_report(doc)
    print(f"\nwrote {path}")
    if status:
        return status
    return 0 if doc["verdict"]["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

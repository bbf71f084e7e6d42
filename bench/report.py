"""What a run prints and writes: progress lines, tables, the JSON file and the PNG plot.

The headline table sets each measured figure beside the project's target and the Rango/Ranger
reference figures quoted with it (measured on the same class of machine: 2 cores, broker and load
generator on the box). A target counts as met only when it was measured in this run.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["headline", "plot", "print_tables", "progress", "write_json"]

_STEP_COLUMNS = (
    ("msg/s", "rate", "{:>7g}"),
    ("deliv/s", "delivered_per_s", "{:>9,}"),
    ("ratio", "delivered_ratio", "{:>7.4f}"),
    ("p50 ms", "p50_ms", "{:>8.2f}"),
    ("p90 ms", "p90_ms", "{:>8.2f}"),
    ("p99 ms", "p99_ms", "{:>8.2f}"),
    ("max ms", "max_ms", "{:>8.1f}"),
    ("srv CPU%", "server_cpu_pct", "{:>8.1f}"),
    ("cli CPU%", "client_cpu_pct", "{:>8.1f}"),
    ("brk CPU%", "broker_cpu_pct", "{:>8.1f}"),
    ("sirq CPU%", "softirq_cpu_pct", "{:>9.1f}"),
    ("oth CPU%", "other_cpu_pct", "{:>8.1f}"),
    ("ok", "sustained", "{!s:>5}"),
)
# Steps whose clients counted bytes (the compression scenario) show these too.
_WIRE_COLUMNS = (
    ("B/deliv", "wire_bytes_per_delivery", "{:>8,}"),
    ("tcp B/deliv", "server_tcp_bytes_per_delivery", "{:>11,}"),
    ("RSV1", "compressed_share", "{:>6.1%}"),
)


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _cell(fmt: str, value: Any) -> str:
    width = int("".join(ch for ch in fmt if ch.isdigit()) or 0)
    if value is None:
        return "-".rjust(width)
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value).rjust(width)


def _columns(step: dict[str, Any]) -> tuple[tuple[str, str, str], ...]:
    return _STEP_COLUMNS + (_WIRE_COLUMNS if "wire_bytes_per_delivery" in step else ())


def _step_header(step: dict[str, Any]) -> str:
    columns = _columns(step)
    widths = [len(_cell(fmt, 0)) for _, _, fmt in columns]
    return " ".join(title.rjust(w) for (title, _, _), w in zip(columns, widths, strict=True))


def _step_row(step: dict[str, Any]) -> str:
    return " ".join(_cell(fmt, step.get(key)) for _, key, fmt in _columns(step))


def progress(scenario: str, label: str, step: dict[str, Any], note: str | None = None) -> None:
    extra = f"  ({note})" if note else ""
    closes = step.get("closed_by_server") or {}
    if closes or step.get("dropped_connections"):
        extra += f"  closed={closes} dropped={step.get('dropped_connections')}"
    _out(f"  [{label} {scenario}] {_step_row(step)}{extra}")


def _steps_table(steps: Iterable[dict[str, Any]]) -> None:
    rows = list(steps)
    _out("  " + _step_header(rows[0] if rows else {}))
    for step in rows:
        _out("  " + _step_row(step))


def _knee_line(data: dict[str, Any]) -> str:
    """Max sustained deliveries/s and the pair of steps that brackets it."""
    best = data.get("max_sustained_per_s")
    low, high = data.get("last_passing_rate"), data.get("first_failing_rate")
    if high is not None and low is not None:
        knee = f"last passing step {low:,} msg/s, first failing {high:,} msg/s"
    elif high is not None:
        knee = f"the first step ({high:,} msg/s) failed"
    else:
        knee = "no failing step within the rates tried"
    if data.get("non_monotonic"):
        knee += "; a lower rate failed: noisy machine?"
    return (
        f"max sustained: {best:,} deliveries/s ({knee})"
        if best
        else f"max sustained: none ({knee})"
    )


def _kv(pairs: Iterable[tuple[str, Any]]) -> None:
    for key, value in pairs:
        _out(f"  {key:<34} {value}")


def print_tables(result: dict[str, Any]) -> None:
    """One scenario's result, as a reader wants it."""
    name, label, data = result["scenario"], result["server"], result["result"]
    _out()
    _out(f"== {name} · {label} ==")
    if "error" in data:
        _out(f"  FAILED: {data['error']}")
    if name == "idle" and "connected" in data:
        _kv(
            [
                ("connections (2 streams, RS256)", f"{data['connected']} of {data['connections']}"),
                ("failed connects", f"{data['failed']} {data['errors'] or ''}"),
                ("subscribed reply with 2 streams", data["subscribed_ok"]),
                ("connects/s", f"{data['connects_per_s']:,}  ({data['connect_s']} s)"),
                ("client CPU% while connecting", data["connect_client_cpu_pct"]),
                ("server CPU% while connecting", data["connect_server_cpu_pct"]),
                ("server CPU% idle", data["idle_server_cpu_pct"]),
                ("still open after settling", data["open_after_settle"]),
                ("sockets the server holds", data["server_sockets"]),
                (
                    "server RSS before / connected",
                    f"{data['rss_base_mb']} / {data['rss_connected_mb']} MB",
                ),
                ("RSS per idle connection", f"{data['rss_per_conn_kb']} KB"),
                (
                    "RSS after close (retained/conn)",
                    f"{data['rss_after_close_mb']} MB ({data['retained_per_conn_kb']} KB)",
                ),
                (
                    "RSS with the same N again (growth)",
                    f"{data['rss_second_round_mb']} MB "
                    f"({data['second_round_growth_per_conn_kb']} KB/conn)",
                ),
            ]
        )
    elif name in ("fanout", "private") and "steps" in data:
        _steps_table(data["steps"])
        _out("  " + _knee_line(data))
    elif name == "slow" and "stalled" in data:
        _steps_table([data["baseline"], data["stalled"]])
        _kv(
            [
                ("fast clients' p99: all reading", f"{data['baseline']['p99_ms']} ms"),
                (
                    f"fast clients' p99: {data['slow_clients']} stalled",
                    f"{data['stalled']['p99_ms']} ms",
                ),
                ("ratio (limit 2.0)", data["p99_ratio"]),
                ("stalled clients' outcome", data["slow_outcomes"]),
                ("stall (s from stop to read again)", (data["stall"] or {}).get("stalled_s")),
                (
                    "kernel send queue full after (s)",
                    (data["stall"] or {}).get("kernel_full_after_s"),
                ),
                (
                    "server send queue/client (KB)",
                    (data["stall"] or {}).get("send_queue_peak_kb_median"),
                ),
                ("fast clients' outcome", data["fast_outcomes"]),
                ("passed", data["passed"]),
            ]
        )
    elif name == "orderbook" and "verified" in data:
        _kv(
            [
                ("late subscribers verified", f"{data['verified']} of {data['subscribers']}"),
                ("problems", data["problems"] or "none"),
                (
                    "increments published / received",
                    f"{data['increments_published']} / {data['increments_received']}",
                ),
                ("snapshots published", data["snapshots_published"]),
                ("cached increments replayed", data["replayed_increments"]),
                ("increment latency p50 / p99", f"{data['inc_p50_ms']} / {data['inc_p99_ms']} ms"),
            ]
        )
        gap = data.get("gap")
        if gap:
            _out(
                f"  with increment {gap.get('skipped_seq')} lost at {gap.get('skipped_at_s')} s"
                f" (next snapshot due at {gap.get('resync_due_s')} s):"
            )
            _kv(
                [
                    ("late subscribers verified", f"{gap['verified']} of {data['subscribers']}"),
                    ("problems", gap["problems"] or "none"),
                    ("replays holding a gap", gap["replay_gaps"]),
                    ("saw the gap live (held the book)", gap["saw_gap_live"]),
                    ("joined while broken (empty replay)", gap["empty_replays"]),
                    ("got a snapshot live (resynced)", gap["resynced_live"]),
                    ("passed", gap["passed"]),
                ]
            )
    elif name == "multiworker":
        for key in ("w1", "w2"):
            run = data.get(key, {})
            if "steps" in run:
                _out(f"  WEB_CONCURRENCY={key[1]}")
                _steps_table(run["steps"])
                best = run.get("max_sustained_per_s")
                _out(f"  max sustained: {best:,} deliveries/s" if best else "  max sustained: none")
                if "sockets_per_process" in run:
                    _out(f"  sockets per server process: {run['sockets_per_process']}")
        _out(f"  capacity ratio 2 workers / 1: {data.get('capacity_ratio')}")
    elif name == "compression" and "summary" in data:
        _compression_tables(data)
    elif name == "exchange" and "runs" in data:
        _exchange_tables(data)
    runs = [data.get(key, {}) for key in ("w1", "w2", "plain", "deflate")]
    runs += list(data.get("runs", {}).values()) if name == "exchange" else []
    for text in data.get("problems", []) + [p for run in runs for p in run.get("problems", [])]:
        _out(f"  SERVER PROBLEM: {text}")


_WORKER_COLUMNS = (
    ("worker", "worker", "{!s:>8}"),
    ("clients", "clients", "{:>7,}"),
    ("recv msg/s", "received_per_s", "{:>10,.1f}"),
    ("share msg/s", "share_per_s", "{:>11,.1f}"),
    ("share/total", "share_of_total", "{:>11.3f}"),
    ("recv/share", "received_over_share", "{:>10.4f}"),
    ("CPU%", "cpu_pct", "{:>6.1f}"),
    ("deliv/s", "delivered_per_s", "{:>8,}"),
    ("ratio", "delivered_ratio", "{:>7.4f}"),
    ("p50 ms", "p50_ms", "{:>7.2f}"),
    ("p99 ms", "p99_ms", "{:>7.2f}"),
    ("ok", "within", "{!s:>5}"),
)


def _exchange_tables(data: dict[str, Any]) -> None:
    rates = ", ".join(f"{name} {rate:g}" for name, rate in data["rates_per_s"].items())
    _out(
        f"  {data['markets']} markets, {data['public_clients']:,} public clients, "
        f"{data['private_users']:,} users; {data['duration_s']:g} s per run"
    )
    _out(f"  published {data['published_per_s']:,} msg/s: {rates}")
    _out(f"  deliveries expected: {data['expected_deliveries_per_s']:,}/s")
    for name, run in data["runs"].items():
        _out(f"  -- {name}")
        if "step" not in run:
            _out(f"  FAILED: {run.get('stopped') or run.get('error')}")
            continue
        _steps_table([run["step"]])
        verdict = run["verdict"]
        widths = [len(_cell(fmt, 0)) for _, _, fmt in _WORKER_COLUMNS]
        titles = zip(_WORKER_COLUMNS, widths, strict=True)
        _out("  " + " ".join(title.rjust(w) for (title, _, _), w in titles))
        for row in verdict["workers"]:
            _out("  " + " ".join(_cell(fmt, row.get(key)) for _, key, fmt in _WORKER_COLUMNS))
        connect = run.get("connect", {})
        pairs: list[tuple[str, Any]] = [
            *(
                (
                    f"{side} clients connected",
                    f"{part['connected']:,} of {part['requested']:,}, "
                    f"{part['subscribed']:,} subscribed {part['errors'] or ''}",
                )
                for side, part in connect.items()
            ),
            ("bindings per worker queue", run.get("bindings")),
            (
                "each worker received its share",
                verdict["passed"]
                if verdict["passed"] is not None
                else f"not measured: {verdict['not_measured']}",
            ),
            ("shares below the exchange total", verdict["distinct"]),
        ]
        if run.get("unowned_clients"):
            pairs.append(("clients on no known worker", run["unowned_clients"]))
        if run.get("stopped_early"):
            pairs.append(("PUBLISHER FELL BEHIND", "stopped early: counts are short"))
        _kv(pairs)
    summary = data.get("summary") or {}
    passed = summary.get("passed")
    _out(
        "  verdict (routing=subscribed): "
        + ("not measured" if passed is None else "PASS" if passed else "FAIL")
        + "".join(f"\n    {text}" for text in summary.get("failures", []))
    )


def _compression_tables(data: dict[str, Any]) -> None:
    _out(
        f"  {data['clients']} clients on {data['stream']}, order-book bodies of "
        f"{data['body_bytes']:,} bytes; offer: {data['offer']}"
    )
    for key, title in (("plain", "not offering compression"), ("deflate", "offering it")):
        run, summary = data.get(key, {}), data["summary"][key]
        _out(f"  clients {title}: handshake answers {(run.get('connect') or {}).get('extensions')}")
        if run.get("steps"):
            _steps_table(run["steps"])
            _out("  " + _knee_line(run))
        pairs: list[tuple[str, Any]] = [
            ("server CPU% at the best step", summary["server_cpu_pct"]),
            ("bytes/delivery, client-counted", summary["wire_bytes_per_delivery"]),
            ("bytes/delivery, server TCP (ss)", summary["server_tcp_bytes_per_delivery"]),
        ]
        if key == "deflate":
            pairs.append(("offers not accepted", summary["declined"]))
        if summary["failed_measurement"]:
            pairs.append(("FAILED MEASUREMENT", summary["failed_measurement"]))
        _kv(pairs)
    same = data.get("same_rate")
    _kv(
        [
            ("capacity compressed / plain", data.get("capacity_ratio")),
            ("bytes/delivery compressed / plain", data.get("bytes_ratio")),
            (
                "server CPU% at the same rate",
                f"{same['server_cpu_pct']} at {same['rate']} msg/s" if same else None,
            ),
        ]
    )


def _find(results: list[dict[str, Any]], scenario: str, label: str) -> dict[str, Any]:
    for result in results:
        if result["scenario"] == scenario and result["server"] == label:
            data: dict[str, Any] = result["result"]
            return data
    return {}


def _step_at(data: dict[str, Any], rate: int) -> dict[str, Any]:
    for step in data.get("steps", []):
        if step["rate"] == rate:
            found: dict[str, Any] = step
            return found
    return {}


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "not measured"
    if isinstance(value, float):
        return f"{value:,.2f}{unit}"
    if isinstance(value, int):
        return f"{value:,}{unit}"
    return f"{value}{unit}"


def headline(results: list[dict[str, Any]], label: str) -> list[dict[str, Any]]:
    """The targets with this run's figures (and whether each is met)."""
    fan = _find(results, "fanout", label)
    at50, at300 = _step_at(fan, 50), _step_at(fan, 300)
    priv500 = _step_at(_find(results, "private", label), 500)
    idle = _find(results, "idle", label)
    slow = _find(results, "slow", label)
    book = _find(results, "orderbook", label)
    multi = _find(results, "multiworker", label)
    squeeze = _find(results, "compression", label)
    market = _find(results, "exchange", label)
    market_summary = market.get("summary") or {}
    two = market_summary.get("share_of_total", {}).get("w2 subscribed")
    # A compression run that is no measurement shows as why (e.g. "declined"), never as a ratio.
    squeeze_failed = [
        run["verdict"] for run in (squeeze.get("summary") or {}).values() if run["verdict"]
    ]

    def row(
        what: str, value: Any, target: str, met: bool | None, ref: str, *, unit: str = ""
    ) -> dict[str, Any]:
        return {
            "what": what,
            "measured": _fmt(value, unit),
            "target": target,
            "met": None if value is None else met,
            "reference": ref,
        }

    def le(value: Any, limit: float) -> bool | None:
        return None if value is None else value <= limit

    def ge(value: Any, limit: float) -> bool | None:
        return None if value is None else value >= limit

    return [
        row(
            "fan-out max sustained deliveries/s",
            fan.get("max_sustained_per_s"),
            ">= 450,000",
            ge(fan.get("max_sustained_per_s"), 450_000),
            "Rango ~150k, Ranger ~300k",
        ),
        row(
            "fan-out p99 at 300 msg/s x 1000",
            at300.get("p99_ms"),
            "<= 25 ms",
            le(at300.get("p99_ms"), 25),
            "-",
            unit=" ms",
        ),
        row(
            "fan-out p50 at 50 msg/s x 1000",
            at50.get("p50_ms"),
            "<= 5 ms",
            le(at50.get("p50_ms"), 5),
            "Rango 6.9, Ranger 7.5",
            unit=" ms",
        ),
        row(
            "fan-out p99 at 50 msg/s x 1000",
            at50.get("p99_ms"),
            "<= 15 ms",
            le(at50.get("p99_ms"), 15),
            "Rango 15.4, Ranger 14.2",
            unit=" ms",
        ),
        row(
            "server CPU at 50 msg/s x 1000",
            at50.get("server_cpu_pct"),
            "<= 25 %",
            le(at50.get("server_cpu_pct"), 25),
            "Rango 40 %",
            unit=" %",
        ),
        row(
            "private p50 at 500 msg/s",
            priv500.get("p50_ms"),
            "-",
            None,
            "Rango 0.26, Ranger 0.67",
            unit=" ms",
        ),
        row(
            "private p99 at 500 msg/s",
            priv500.get("p99_ms"),
            "<= 1 ms",
            le(priv500.get("p99_ms"), 1),
            "Rango 0.48, Ranger 1.12",
            unit=" ms",
        ),
        row(
            "RSS per idle connection",
            idle.get("rss_per_conn_kb"),
            "<= 3 KB (stretch 2)",
            le(idle.get("rss_per_conn_kb"), 3),
            "Rango 23.5, Ranger 3.1",
            unit=" KB",
        ),
        row(
            "connects/s (RS256)",
            idle.get("connects_per_s"),
            ">= 4,000",
            ge(idle.get("connects_per_s"), 4000),
            "Rango ~4,800, Ranger ~4,200",
        ),
        row(
            "slow readers closed with 1008",
            slow.get("slow_closed_1008"),
            f"all {slow.get('slow_clients', '')}",
            None if not slow else slow.get("slow_closed_1008") == slow.get("slow_clients"),
            "-",
        ),
        row(
            "others' p99 with/without slow readers",
            slow.get("p99_ratio"),
            "<= 2.0x",
            le(slow.get("p99_ratio"), 2.0),
            "-",
            unit="x",
        ),
        row(
            "order book late subscribers verified",
            book.get("verified"),
            f"all {book.get('subscribers', '')}",
            None if not book else book.get("verified") == book.get("subscribers"),
            "-",
        ),
        row(
            "order book, one increment lost: verified",
            (book.get("gap") or {}).get("verified"),
            f"all {book.get('subscribers', '')}, no gap replayed",
            (book.get("gap") or {}).get("passed"),
            "Rango and Ranger replay the gap",
        ),
        row(
            "2 workers / 1 worker fan-out capacity",
            multi.get("capacity_ratio"),
            ">= 1.6x",
            ge(multi.get("capacity_ratio"), 1.6),
            "-",
            unit="x",
        ),
        row(
            "compressed fan-out capacity within 20 % of uncompressed",
            ", ".join(squeeze_failed) if squeeze_failed else squeeze.get("capacity_ratio"),
            ">= 0.80x",
            False if squeeze_failed else ge(squeeze.get("capacity_ratio"), 0.8),
            "-",
            unit="" if squeeze_failed else "x",
        ),
        row(
            "exchange: each worker receives its bindings' share",
            None
            if market_summary.get("passed") is None
            else "yes"
            if market_summary["passed"]
            else "no",
            f"within {market.get('tolerance', 0):.0%}",
            market_summary.get("passed"),
            "Ranger, Rango: every worker gets all",
        ),
        row(
            "exchange, 2 workers: received / total",
            ", ".join(f"{share:.2f}" for share in two if share is not None) if two else None,
            "-",
            None,
            "1.00 with routing=all",
        ),
    ]


def print_headline(rows: list[dict[str, Any]], label: str) -> None:
    _out()
    _out(f"== targets · {label} ==")
    width = max([40, *(len(r["what"]) for r in rows)])
    _out(f"  {'figure':<{width}} {'measured':>16} {'target':>20} {'met':>5}  reference")
    for r in rows:
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        _out(
            f"  {r['what']:<{width}} {r['measured']:>16} {r['target']:>20} {met:>5}"
            f"  {r['reference']}"
        )


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=1, default=str) + "\n", encoding="utf-8")


_PERCENTILE_STYLE = (
    ("p50_ms", "p50", "tab:blue"),
    ("p90_ms", "p90", "tab:green"),
    ("p99_ms", "p99", "tab:orange"),
    ("max_ms", "max", "tab:red"),
)
_SERIES_STYLE = ("-", "--", ":", "-.")


def _panels(results: list[dict[str, Any]]) -> dict[str, list[tuple[str, list[dict[str, Any]]]]]:
    panels: dict[str, list[tuple[str, list[dict[str, Any]]]]] = {}
    for result in results:
        data, label = result["result"], result["server"]
        if result["scenario"] in ("fanout", "private") and data.get("steps"):
            panels.setdefault(result["scenario"], []).append((label, data["steps"]))
        elif result["scenario"] == "multiworker":
            for key in ("w1", "w2"):
                if data.get(key, {}).get("steps"):
                    name = f"{label} WEB_CONCURRENCY={key[1]}"
                    panels.setdefault("multiworker", []).append((name, data[key]["steps"]))
        elif result["scenario"] == "compression":
            for key in ("plain", "deflate"):
                if data.get(key, {}).get("steps"):
                    name = f"{label} {key}"
                    panels.setdefault("compression", []).append((name, data[key]["steps"]))
    return panels


def plot(path: Path, results: list[dict[str, Any]], title: str) -> bool:
    """Latency percentiles against delivered frames/s, one panel per stepped scenario."""
    panels = _panels(results)
    if not panels:
        return False
    import matplotlib  # noqa: PLC0415 (only when plotting)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.0), squeeze=False)
    for ax, (scenario, series) in zip(axes[0], panels.items(), strict=True):
        for index, (name, steps) in enumerate(series):
            style = _SERIES_STYLE[index % len(_SERIES_STYLE)]
            xs = [s["delivered_per_s"] for s in steps]
            for key, short, color in _PERCENTILE_STYLE:
                ys = [s.get(key) for s in steps]
                points = [(x, y) for x, y in zip(xs, ys, strict=True) if y]
                if not points:
                    continue
                ax.plot(
                    [p[0] for p in points],
                    [p[1] for p in points],
                    style,
                    color=color,
                    marker="o",
                    markersize=3,
                    label=f"{short} · {name}",
                )
            for step in steps:
                if not step["sustained"] and step.get("p99_ms"):
                    ax.plot(step["delivered_per_s"], step["p99_ms"], "kx", markersize=8)
        ax.axhline(100.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_title(scenario)
        ax.set_xlabel("delivered frames/s")
        ax.set_ylabel("publish → client latency (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:g}k"))
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}  (x: step failed; dashed: 100 ms)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

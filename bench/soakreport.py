"""What a soak run prints: a progress row per RSS sample, then the report (bench.soak)."""

from __future__ import annotations

import re
import sys
from typing import Any

__all__ = ["print_report", "progress"]

_COLUMNS = (
    ("t s", "t_s", "{:>7.1f}"),
    ("RSS MB", "rss_mb", "{:>8.2f}"),
    ("srv CPU%", "server_cpu_pct", "{:>8.1f}"),
    ("cli CPU%", "client_cpu_pct", "{:>8.1f}"),
    ("brk CPU%", "broker_cpu_pct", "{:>8.1f}"),
    ("frames/s", "frames_per_s", "{:>9,}"),
    ("clients", "live_clients", "{:>7,}"),
    ("cli errs", "client_errors", "{:>8,}"),
    ("broker", "broker", "{:>7}"),
)
_header_printed = [False]


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _cell(fmt: str, value: Any) -> str:
    found = re.search(r":\D*(\d+)", fmt)
    width = int(found.group(1)) if found else 0
    if value is None:
        return "-".rjust(width)
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value).rjust(width)


def _header(extra: str = "") -> str:
    titles = [title.rjust(len(_cell(fmt, 0))) for title, _, fmt in _COLUMNS]
    return "  " + " ".join(titles) + extra


def _row(sample: dict[str, Any], extra: str = "") -> str:
    return "  " + " ".join(_cell(fmt, sample.get(key)) for _, key, fmt in _COLUMNS) + extra


def progress(sample: dict[str, Any]) -> None:
    if not _header_printed[0]:
        _header_printed[0] = True
        _out(_header())
    _out(_row(sample))


def _n(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "-"


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.3f} %" if whole else "-"


def _rss(doc: dict[str, Any]) -> None:
    rss = doc.get("rss", {})
    samples = rss.get("samples") or []
    fit = rss.get("fit") or {}
    warmup = fit.get("warmup_s", 0.0)
    _out("\n== Server RSS (gunicorn master + workers, VmRSS summed from /proc)")
    if not samples:
        _out("  no samples")
        return
    base = next((s["rss_mb"] for s in samples if s["t_s"] >= warmup - 1e-6), None)
    _out(_header("   Δ MB"))
    for sample in samples:
        delta = (
            f"{sample['rss_mb'] - base:>+7.2f}"
            if base is not None and sample["t_s"] >= warmup - 1e-6
            else "  (warm)"
        )
        _out(_row(sample, " " + delta))
    slope = fit.get("slope_mb_per_min")
    threshold = rss.get("threshold_mb_per_min")
    if slope is None:
        _out(f"  RSS growth after warm-up: not enough samples ({fit.get('samples', 0)})")
    else:
        verdict = "ok" if threshold is None or slope < threshold else "TOO HIGH"
        _out(
            f"  RSS growth after warm-up (t >= {warmup:g} s, {fit['samples']} samples, linear "
            f"fit): {slope:+.3f} MB/min (threshold {threshold:g}): {verdict}; "
            f"range {fit['min_mb']:.1f}-{fit['max_mb']:.1f} MB"
        )
    if doc.get("rss_after_clients_closed_mb") is not None:
        _out(f"  RSS after every client closed: {doc['rss_after_clients_closed_mb']} MB")


def _delivery(doc: dict[str, Any]) -> None:
    delivery = doc.get("delivery")
    if not delivery:
        return
    _out("\n== Delivery while the broker was up (publishes in cut windows are counted apart)")
    _out(
        f"  {'':<8} {'expected':>12} {'delivered':>12} {'lost':>9} {'lost %':>9} "
        f"{'duplicated':>11} {'clients w/ loss':>16}"
    )
    for kind in ("public", "private"):
        t = delivery.get(kind)
        if t is None:
            continue
        _out(
            f"  {kind:<8} {_n(t['expected_up']):>12} {_n(t['delivered_up']):>12} "
            f"{_n(t['lost_up']):>9} {_pct(t['lost_up'], t['expected_up']):>9} "
            f"{_n(t['duplicated_up']):>11} {_n(t.get('clients_with_loss', 0)):>16}"
        )
    for kind in ("public", "private"):
        t = delivery.get(kind)
        if t is None:
            continue
        _out(
            f"  {kind}: {_n(t.get('clients'))} clients, {_n(t.get('sessions'))} sessions; "
            f"{_n(t.get('received'))} frames counted, "
            f"{_n(t.get('received_outside_sessions', 0))} of them outside the expected windows "
            f"(before a subscribe reply, near a disconnect); duplicates anywhere "
            f"{_n(t.get('duplicates_total', 0))}; unknown sequence numbers "
            f"{_n(t.get('unknown_sequence_numbers', 0))}"
        )
    for kind, records in (doc.get("clients_with_most_loss") or {}).items():
        for record in records[:3]:
            lost = {k: v["lost_up"] for k, v in record["streams"].items() if v["lost_up"]}
            _out(f"  {kind} client {record['id']} lost {record['lost_up']} while up: {lost}")
    timeline = doc.get("lost_by_time") or {}
    for name in ("public_up", "private_up"):
        if timeline.get(name):
            step = timeline["bucket_s"]
            spots = ", ".join(
                f"{int(k) * step:g}-{(int(k) + 1) * step:g} s: {v}"
                for k, v in list(timeline[name].items())[:12]
            )
            _out(f"  {name.replace('_', ' lost while ')} by publish time: {spots}")


def _cuts(doc: dict[str, Any]) -> None:
    cuts = doc.get("cuts") or []
    outages = doc.get("outages") or []
    if not cuts and not outages:
        return
    _out("\n== Broker cuts (times in s from the start of publishing; after = since the cut)")
    _out(
        f"  {'#':>2} {'at':>7} {'aborted':>8} {'noticed':>8} {'restored':>9} {'consuming':>10}"
        "  excluded publishes"
    )
    for cut in cuts:
        window = cut.get("excluded_s") or [None, None]
        until = f"{window[1]:.1f}" if window[1] is not None else "end"
        _out(
            f"  {cut['n']:>2} {cut['at_s']:>7.1f} {cut['connections_aborted']:>8} "
            f"{_cell('{:>8.2f}', cut['noticed_after_s'])} "
            f"{_cell('{:>9.2f}', cut['restored_after_s'])} "
            f"{_cell('{:>10.2f}', cut['consuming_after_s'])}  {window[0]:.1f} - {until}"
        )
    for outage in outages:
        still = " (still down at the end)" if outage["still_down_at_end"] else ""
        _out(
            f"  OUTAGE not caused by the soak: from about {outage['from_s']} s "
            f"to {outage['until_s']} s{still}"
        )
    delivery = doc.get("delivery") or {}
    parts = []
    for kind in ("public", "private"):
        t = delivery.get(kind)
        if t is not None:
            parts.append(
                f"{kind} {_n(t['lost_cut'])} of {_n(t['expected_cut'])} "
                f"({_n(t['delivered_cut'])} delivered)"
            )
    if parts:
        _out("  lost in the cut windows: " + "; ".join(parts))


def _other(doc: dict[str, Any]) -> None:
    _out("\n== Load")
    connect = doc.get("connect") or {}
    if connect:
        _out(
            f"  connect: {connect['subscribed']} of {connect['clients']} subscribed in "
            f"{connect['elapsed_s']} s"
        )
    for name, p in (doc.get("publish") or {}).items():
        _out(
            f"  publish {name}: {p['published']:,} of {p['target']:,} messages at "
            f"{p['rate']} msg/s over {p['keys']} routing keys; at most "
            f"{p['behind_max_ms']} ms behind schedule"
        )
    churn = doc.get("churn")
    if churn:
        _out("  churn: " + ", ".join(f"{key} {value:,}" for key, value in sorted(churn.items())))
    errors = doc.get("client_errors") or {}
    samples = doc.get("client_error_samples") or {}
    _out("\n== Client errors" + ("" if errors else ": none"))
    for what, count in sorted(errors.items(), key=lambda kv: -kv[1]):
        example = samples.get(what) or []
        _out(f"  {count:>7,}  {what}" + (f"  e.g. {example[0]!r}" if example else ""))
    problems = doc.get("server_problems") or []
    _out("\n== Server log and process problems" + ("" if problems else ": none"))
    for problem in problems:
        _out(f"  {problem}")
    stop = doc.get("server_stop")
    if stop:
        _out(f"  server stop: {stop}")
    for problem in doc.get("cleanup_problems") or []:
        _out(f"  {problem}")


def print_report(doc: dict[str, Any]) -> None:
    _rss(doc)
    _delivery(doc)
    _cuts(doc)
    _other(doc)
    verdict = doc.get("verdict") or {}
    if verdict.get("passed"):
        _out("\nPASS: no private message lost while the broker was up; RSS growth under threshold")
    else:
        _out("\nFAIL: " + "; ".join(verdict.get("reasons") or ["unknown"]))
    public = (doc.get("delivery") or {}).get("public") or {}
    if public.get("lost_up"):
        _out(f"note: {public['lost_up']:,} public messages were lost while the broker was up")

"""The scenarios' verdicts: the compression runs (whether each is a measurement, and the two
side by side) and the exchange runs (whether each worker received its subscribed share).

Pure functions of the runs' JSON, kept apart from the scenarios so the unit tests can import them
with the dev requirements alone (the load generator's numpy is not among them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["compare", "compression_summary", "exchange_summary", "routing_verdict", "unfit_for"]

# Below this share of compressed frames a "deflate" run measured something else (the threshold?).
_MIN_COMPRESSED_SHARE = 0.99


def unfit_for(offered: bool, connect: dict[str, Any]) -> str | None:
    """Why a compression run's clients cannot be measured: an offer not accepted by every
    client (a compressed run must not pass for an uncompressed one), or an extension answered
    to clients that offered none."""
    answers: dict[str, int] = connect["extensions"]
    connected = connect["connected"]
    wanted = "accepted" if offered else "not offered"
    others = {answer: n for answer, n in answers.items() if answer != wanted}
    if not others:
        return None
    if offered:
        declined = connected - answers.get("accepted", 0)
        return f"permessage-deflate not accepted for {declined} of {connected} clients: {others}"
    return f"the server answered an extension nobody offered: {others}"


def _best_step(run: dict[str, Any]) -> dict[str, Any]:
    """The sustained step with the most deliveries/s (empty when none passed)."""
    passing = [s for s in run.get("steps", []) if s["sustained"]]
    return max(passing, key=lambda s: s["delivered_per_s"]) if passing else {}


def _client_errors(run: dict[str, Any]) -> dict[str, int]:
    errors: dict[str, int] = {}
    for step in run.get("steps", []):
        for text, n in step["errors"].items():
            errors[text] = errors.get(text, 0) + n
    return errors


def compression_summary(name: str, run: dict[str, Any]) -> dict[str, Any]:
    """One run's figures for the report, and why it is no measurement, if it is not."""
    best = _best_step(run)
    steps = [s for s in run.get("steps", []) if s["frames"]]
    shares = [s.get("compressed_share", 0.0) for s in steps]
    errors = _client_errors(run)
    # (verdict, why): the first reason this run is no measurement.
    failures = [
        ("declined" if name == "deflate" else "extension", run.get("not_measured")),
        ("stopped", run.get("stopped")),
        ("no frames", None if steps else "no frames delivered"),
        ("client errors", f"client errors: {errors}" if errors else None),
        (
            "not compressed",
            f"only {min(shares):.1%} of the frames came compressed (threshold?)"
            if name == "deflate" and steps and min(shares) < _MIN_COMPRESSED_SHARE
            else None,
        ),
    ]
    verdict, problem = next(((v, why) for v, why in failures if why), (None, None))
    answers = (run.get("connect") or {}).get("extensions", {})
    connected = (run.get("connect") or {}).get("connected", 0)
    return {
        "max_sustained_per_s": run.get("max_sustained_per_s"),
        "last_passing_rate": run.get("last_passing_rate"),
        "first_failing_rate": run.get("first_failing_rate"),
        "server_cpu_pct": best.get("server_cpu_pct"),
        "wire_bytes_per_delivery": best.get("wire_bytes_per_delivery"),
        "server_tcp_bytes_per_delivery": best.get("server_tcp_bytes_per_delivery"),
        "compressed_share": best.get("compressed_share"),
        "declined": connected - answers.get("accepted", 0) if name == "deflate" else None,
        "client_errors": errors,
        "verdict": verdict,
        "failed_measurement": problem,
    }


def _ratio(top: Any, bottom: Any) -> float | None:
    return round(top / bottom, 3) if top and bottom else None


def compare(plain_run: dict[str, Any], deflate_run: dict[str, Any]) -> dict[str, Any]:
    """The two runs side by side; no ratio unless both are measurements."""
    plain = compression_summary("plain", plain_run)
    deflate = compression_summary("deflate", deflate_run)
    compared: dict[str, Any] = {
        "summary": {"plain": plain, "deflate": deflate},
        "capacity_ratio": None,
        "bytes_ratio": None,
    }
    if plain["verdict"] is not None or deflate["verdict"] is not None:
        return compared
    compared["capacity_ratio"] = _ratio(
        deflate["max_sustained_per_s"], plain["max_sustained_per_s"]
    )
    compared["bytes_ratio"] = _ratio(
        deflate["wire_bytes_per_delivery"], plain["wire_bytes_per_delivery"]
    )
    # The server's cost of compressing, at the highest rate both runs sustained.
    cpu: dict[int, dict[str, Any]] = {}
    for name, run in (("plain", plain_run), ("deflate", deflate_run)):
        for step in run.get("steps", []):
            if step["sustained"]:
                cpu.setdefault(step["rate"], {})[name] = step["server_cpu_pct"]
    both = [rate for rate, pair in cpu.items() if len(pair) == 2]
    if both:
        rate = max(both)
        compared["same_rate"] = {"rate": rate, "server_cpu_pct": cpu[rate]}
    return compared


def routing_verdict(
    workers: Sequence[dict[str, Any]], published: int, tolerance: float
) -> dict[str, Any]:
    """Whether each worker received its subscribed share of one exchange step.

    ``workers``: one row per worker, ``received`` (broker messages it counted in the step, None
    when its health answer has no count) and ``share`` (the step's messages whose routing keys
    its queue's bindings match, None when its queue was not found), over the same messages
    (``published``). A worker passes when ``|received - share| <= tolerance x share`` (at
    least one message). ``distinct``: every share is below the total by more than the
    tolerance, so that a pass says the worker received its share and not simply everything.
    """
    rows = []
    for worker in workers:
        received, share = worker.get("received"), worker.get("share")
        within = (
            abs(received - share) <= max(tolerance * share, 1.0)
            if received is not None and share is not None
            else None
        )
        rows.append(
            {
                **worker,
                "received_over_share": round(received / share, 4)
                if received is not None and share
                else None,
                "share_of_total": round(share / published, 4)
                if share is not None and published
                else None,
                "within": within,
            }
        )
    missing = [str(r.get("worker")) for r in rows if r["within"] is None]
    why = None
    if not rows:
        why = "no worker found"
    elif missing:
        why = f"no received count or no queue for worker(s) {', '.join(missing)}"
    passed = None if why else all(r["within"] for r in rows)
    shares = [r["share"] for r in rows if r.get("share") is not None]
    distinct = (
        bool(shares)
        and len(shares) == len(rows)
        and all(share < published * (1.0 - tolerance) for share in shares)
    )
    return {
        "workers": rows,
        "published": published,
        "tolerance": tolerance,
        "passed": passed,
        "not_measured": why,
        "distinct": distinct,
    }


def exchange_summary(runs: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """The exchange scenario's verdict: every ``routing=subscribed`` run passed, each worker's
    share being below the total (``distinct``); ``share_of_total`` per run and worker.

    ``passed`` is None when no such run was measured (another gateway, or none finished).
    """
    shares: dict[str, list[float | None]] = {}
    failures: list[str] = []
    measured = 0
    for name, run in runs.items():
        verdict = run.get("verdict")
        if verdict is None:
            continue
        shares[name] = [row["share_of_total"] for row in verdict["workers"]]
        if run.get("routing") != "subscribed":
            continue
        if verdict["passed"] is None:
            failures.append(f"{name}: not measured ({verdict['not_measured']})")
            continue
        measured += 1
        if not verdict["passed"]:
            off = [
                f"{row['worker']} received {row['received_over_share']}x its share"
                for row in verdict["workers"]
                if not row["within"]
            ]
            failures.append(f"{name}: {'; '.join(off)}")
        elif not verdict["distinct"]:
            failures.append(f"{name}: a worker's share is the whole exchange, nothing to tell")
    passed = None if not measured else not failures
    if not measured and not failures:
        failures.append("no run with RANGER_BROKER_ROUTING=subscribed (another gateway's routing?)")
    return {"passed": passed, "failures": failures, "share_of_total": shares}

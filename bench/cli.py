"""``python -m bench``: run the scenarios, print the tables, write the JSON and the plot.

Run from the repository root (``bench/run`` does that). The default target is ranger-py started
as users start it; ``--server LABEL URL CMD`` adds any other gateway (several may be given, they
run one after the other with the same load). Nothing is left behind: every server, helper
process and the RabbitMQ vhost are gone when it returns, also after Ctrl-C or a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib.metadata
import ipaddress
import os
import platform
import resource
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from types import FrameType
from typing import Any

from bench import report
from bench.rpc import ChildError
from bench.runner import Bench, OutOfTime, Settings
from bench.scenarios import SCENARIOS
from bench.server import REPO, Broker, BrokerUnavailable, ServerFailed, ServerSpec

__all__ = ["main"]

_PACKAGES = (
    "gevent", "greenlet", "gunicorn", "kombu", "amqp", "wsproto",
    "picows", "uvloop", "numpy", "matplotlib",
)  # fmt: skip
_EPILOG = """\
examples:
  bench/run --quick                         every scenario briefly (a few min), a smoke check
  bench/run                                 the full run (about 5-15 min on 2 cores)
  bench/run --scenarios fanout,idle         only these
  bench/run --server ranger-py --server rango 'ws://127.0.0.1:{port}' \\
      'exec ./rango -amqp-addr {amqp_url}'  ranger-py and another gateway, side by side

The other gateway's command runs under sh from the repository root, with RANGER_HOST, RANGER_PORT,
PORT, METRICS_PORT, RABBITMQ_HOST/PORT/USER/PASSWORD/VHOST, JWT_PUBLIC_KEY (RS256) and
WEB_CONCURRENCY set; {port}, {metrics_port}, {amqp_url} and {vhost} are filled in the command
and the URL. It must publish Peatio's exchange (peatio.events.ranger) of that vhost to /public
and /private websockets.
"""


class Watchdog(BaseException):
    """The run overran its time budget by far: stop everything now."""


def _rates(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "ranger-py benchmark: fan-out, private, idle, slow readers, order books, compression,"
            " a whole exchange."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="every scenario briefly")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma list of {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument(
        "--server",
        nargs="+",
        action="append",
        metavar="ARG",
        help="'LABEL' for ranger-py, or 'LABEL URL CMD' for another gateway (repeatable)",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for every server (repeatable), e.g. LOG_LEVEL=warning",
    )
    parser.add_argument("--rates", type=_rates, help="fan-out msg/s steps, e.g. 50,100,300")
    parser.add_argument("--private-rates", type=_rates, help="private msg/s steps")
    parser.add_argument("--multiworker-rates", type=_rates, help="multi-worker msg/s steps")
    parser.add_argument(
        "--compression-rates", type=_rates, help="msg/s steps of the compression scenario"
    )
    parser.add_argument("--step-seconds", type=float, help="publish time of each step")
    parser.add_argument("--clients", type=int, help="fan-out clients (default 1000)")
    parser.add_argument("--idle-connections", type=int, help="idle connections (default 5000)")
    parser.add_argument("--private-users", type=int, help="private users (default 1000)")
    parser.add_argument(
        "--exchange-clients", type=int, help="public clients of the exchange scenario (5000)"
    )
    parser.add_argument(
        "--exchange-users", type=int, help="private users of the exchange scenario (1000)"
    )
    parser.add_argument(
        "--exchange-seconds", type=float, help="publish time of each exchange run (15)"
    )
    parser.add_argument("--slow-clients", type=int, help="stalled clients of the slow scenario")
    parser.add_argument("--slow-rate", type=int, help="msg/s of the slow scenario")
    parser.add_argument(
        "--probe-every", type=int, help="fan-out latency from one client in N (default 10)"
    )
    parser.add_argument("--fail-limit", type=int, help="failed steps before a knee search stops")
    parser.add_argument("--loadgen-procs", type=int, help="client processes (default 1)")
    parser.add_argument("--concurrency", type=int, help="handshakes in flight per process")
    parser.add_argument("--max-minutes", type=float, help="time budget of the whole run")
    parser.add_argument("--broker", default="127.0.0.1:5672", help="RabbitMQ host:port")
    parser.add_argument("--broker-user", default="guest")
    parser.add_argument("--broker-password", default="guest")
    parser.add_argument(
        "--vhost", help="use this existing vhost instead of creating (and deleting) one"
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results", help="results directory"
    )
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings.for_quick() if args.quick else Settings()
    overrides = {
        "fanout_rates": args.rates,
        "private_rates": args.private_rates,
        "multiworker_rates": args.multiworker_rates,
        "compression_rates": args.compression_rates,
        "step_s": args.step_seconds,
        "fanout_clients": args.clients,
        "idle_connections": args.idle_connections,
        "private_users": args.private_users,
        "exchange_clients": args.exchange_clients,
        "exchange_users": args.exchange_users,
        "exchange_s": args.exchange_seconds,
        "slow_clients": args.slow_clients,
        "slow_rate": args.slow_rate,
        "probe_every": args.probe_every,
        "fail_limit": args.fail_limit,
        "loadgen_procs": args.loadgen_procs,
        "connect_concurrency": args.concurrency,
        "max_minutes": args.max_minutes,
    }
    for name, value in overrides.items():
        if value is not None:
            setattr(settings, name, value)
    return settings


def _specs(args: argparse.Namespace) -> list[ServerSpec]:
    env = {}
    for item in args.server_env:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--server-env wants NAME=VALUE, not {item!r}")
        env[name] = value
    specs = []
    for entry in args.server or [["ranger-py"]]:
        if len(entry) == 1:
            specs.append(ServerSpec(entry[0], env=env))
        elif len(entry) == 3:
            host = urllib.parse.urlsplit(entry[1].replace("{port}", "1")).hostname or ""
            _require_loopback(host, f"the URL of --server {entry[0]}")
            specs.append(ServerSpec(entry[0], url=entry[1], command=entry[2], env=env))
        else:
            raise SystemExit(f"--server wants LABEL or LABEL URL CMD, not {entry}")
    if len({s.label for s in specs}) != len(specs):
        raise SystemExit("--server labels must differ")
    return specs


def _git(*args: str) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10, check=False
        )
        if done.returncode == 0:
            return done.stdout.strip()
    return None


def _source_digest() -> str:
    """A digest of the server's code as it is on disk: runs of an uncommitted work tree can
    still be told apart (git_commit alone would call them the same)."""
    digest = hashlib.sha256()
    paths = [*sorted((REPO / "ranger_py").rglob("*.py")), REPO / "gunicorn.conf.py"]
    for path in paths:
        with contextlib.suppress(OSError):
            digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _machine(broker: Broker) -> dict[str, Any]:
    model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for name in _PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "rabbitmq": broker.version(),
        "packages": versions,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(dirty) if dirty is not None else None,
        "ranger_py_source_sha256": _source_digest(),
    }


def check_dependencies(
    modules: tuple[str, ...] = (
        "picows",
        "uvloop",
        "numpy",
        "matplotlib",
        "websockets",
        "amqp",
        "jwt",
    ),
) -> None:
    """Stop with the install command when a module the benchmark programs need is missing."""
    missing = []
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise SystemExit(
            f"missing {', '.join(missing)}: pip install -r requirements-dev.txt "
            "-r bench/requirements.txt (bench/run does it)"
        )


def _raise_watchdog(signum: int, frame: FrameType | None) -> None:
    raise Watchdog


def raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _scenario_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    return names


def _run(
    bench: Bench,
    specs: list[ServerSpec],
    names: list[str],
    results: list[dict[str, Any]],
    failures: list[str],
) -> None:
    """Every scenario on every server, appending as it goes (so an interrupt keeps them)."""
    for spec in specs:
        for name in names:
            print(f"\n-- {name} on {spec.label} ({spec.describe()})", flush=True)
            started = time.monotonic()
            try:
                data = SCENARIOS[name](bench, spec)
            except OutOfTime as exc:
                failures.append(f"{name} on {spec.label}: {exc}")
                results.append(
                    {"scenario": name, "server": spec.label, "result": {"error": str(exc)}}
                )
                return
            except (ServerFailed, ChildError, BrokerUnavailable, OSError) as exc:
                failures.append(f"{name} on {spec.label}: {exc}")
                data = {"error": str(exc)}
                if isinstance(exc, ChildError):
                    bench.restart_helpers()
            results.append(
                {
                    "scenario": name,
                    "server": spec.label,
                    "seconds": round(time.monotonic() - started, 1),
                    "result": data,
                }
            )
            report.print_tables(results[-1])


def _require_loopback(host: str, what: str) -> None:
    """Load goes to this machine only: a benchmark aimed elsewhere is a mistake (or worse)."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"{what} must be a loopback address (127.0.0.0/8, ::1), not {host!r}")


def _broker(args: argparse.Namespace) -> Broker:
    host, _, port = args.broker.rpartition(":")
    host = host or "127.0.0.1"
    _require_loopback(host, "--broker")
    return Broker(host, int(port), args.broker_user, args.broker_password, args.vhost)


def _guard(settings: Settings) -> None:
    """Limits and signals for the whole run: Ctrl-C and SIGTERM clean up, a watchdog too."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the servers inherit it
    signal.signal(signal.SIGTERM, raise_interrupt)
    signal.signal(signal.SIGALRM, _raise_watchdog)
    signal.alarm(int(settings.max_minutes * 60 + 300))


def _write(document: dict[str, Any], out_dir: Path, stamp: str, specs: list[ServerSpec]) -> None:
    results = document["results"]
    document["targets"] = {s.label: report.headline(results, s.label) for s in specs}
    json_path = out_dir / f"{stamp}.json"
    png_path = out_dir / f"{stamp}.png"
    title = f"ranger-py bench {stamp} ({document['mode']}, {os.cpu_count()} CPUs)"
    if report.plot(png_path, results, title):
        document["plot"] = png_path.name
    report.write_json(json_path, document)
    for spec in specs:
        report.print_headline(document["targets"][spec.label], spec.label)
    print(f"\nwrote {json_path}" + (f" and {png_path}" if "plot" in document else ""))
    print(f"took {document['seconds']} s")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    check_dependencies()
    settings = _settings(args)
    specs = _specs(args)
    names = _scenario_names(args.scenarios)
    broker = _broker(args)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir: Path = args.out
    log_dir = out_dir / f"{stamp}-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    _guard(settings)
    document: dict[str, Any] = {
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
        "mode": "quick" if settings.quick else "full",
        "settings": vars(settings),
        "servers": [{"label": s.label, "command": s.describe(), "url": s.url} for s in specs],
        "logs": log_dir.name,
    }
    bench = Bench(settings, broker, log_dir)
    results: list[dict[str, Any]] = []
    failures: list[str] = []
    status = 0
    started = time.monotonic()
    try:
        document["machine"] = _machine(broker)
        machine = document["machine"]
        print(
            f"ranger-py bench ({document['mode']}): {', '.join(names)}; {machine['cpus']} CPUs; "
            f"ranger_py source {machine['ranger_py_source_sha256']}"
            f"{' (uncommitted changes)' if machine['git_dirty'] else ''}; logs in {log_dir}",
            flush=True,
        )
        bench.start()
        _run(bench, specs, names, results, failures)
    except KeyboardInterrupt:
        failures.append("interrupted")
        status = 130
    except Watchdog:
        failures.append("watchdog: the run overran its time budget")
    except (BrokerUnavailable, ChildError, OSError) as exc:
        failures.append(str(exc))
    finally:
        signal.alarm(0)
        try:
            bench.stop()
        except (BrokerUnavailable, ChildError, OSError, subprocess.SubprocessError) as exc:
            failures.append(f"cleanup: {exc}")
    document.update(
        seconds=round(time.monotonic() - started, 1), results=results, failures=failures
    )
    _write(document, out_dir, stamp, specs)
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return status or (1 if failures else 0)

"""What the kernel says about a process tree: CPU time, resident memory, open sockets.

Linux only (``/proc``). The server is measured as a whole tree (gunicorn master and every
worker), since that is what an operator pays for; a worker that dies between two samples takes
its CPU ticks with it, which the report notes as a server problem anyway.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Sample",
    "broker_pids",
    "cpu_by_pid",
    "parse_owners",
    "sample",
    "send_queues",
    "socket_owners",
    "softirq_s",
    "tcp_bytes_acked",
    "tree",
]

_TICK = os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")
_BYTES_ACKED = re.compile(r"\bbytes_acked:(\d+)")
_PID = re.compile(r"\bpid=(\d+)")


def _stat(pid: int) -> list[str] | None:
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may itself contain spaces or parentheses.
    return text[text.rindex(")") + 2 :].split()


def tree(root: int) -> list[int]:
    """``root`` and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    if _stat(root) is None:
        return []
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def broker_pids() -> list[int]:
    """RabbitMQ's Erlang VM (shared: its CPU includes anything else using the broker)."""
    pids = []
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "beam.smp":
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@dataclass(frozen=True)
class Sample:
    """CPU seconds and RSS summed over some processes, at one moment."""

    when: float
    cpu_s: float
    rss_bytes: int
    pids: tuple[int, ...]
    sockets: dict[int, int]  # pid -> open socket descriptors

    def cpu_percent_since(self, earlier: Sample) -> float | None:
        """CPU used between the two samples, in % of one core."""
        wall = self.when - earlier.when
        if wall <= 0:
            return None
        return round(100.0 * (self.cpu_s - earlier.cpu_s) / wall, 1)


def _rss(pid: int) -> int:
    try:
        for line in (_PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _sockets(pid: int) -> int:
    count = 0
    try:
        for fd in (_PROC / str(pid) / "fd").iterdir():
            try:
                if os.readlink(fd).startswith("socket:"):
                    count += 1
            except OSError:
                continue
    except OSError:
        pass
    return count


def sample(pids: list[int], *, sockets: bool = False) -> Sample:
    cpu = 0.0
    rss = 0
    counts: dict[int, int] = {}
    for pid in pids:
        fields = _stat(pid)
        if fields is None:
            continue
        # utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
        cpu += (int(fields[11]) + int(fields[12])) / _TICK
        rss += _rss(pid)
        if sockets:
            counts[pid] = _sockets(pid)
    return Sample(time.monotonic(), cpu, rss, tuple(pids), counts)


def cpu_by_pid() -> dict[int, float]:
    """CPU seconds of every process on the machine (the same clock as :func:`sample`)."""
    result = {}
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None:
                result[int(entry.name)] = (int(fields[11]) + int(fields[12])) / _TICK
    return result


def softirq_s() -> float:
    """CPU seconds spent in softirq since boot (all cores): where loopback TCP does much of
    its work, charged to no process."""
    fields = (_PROC / "stat").read_text().split("\n", 1)[0].split()
    return int(fields[7]) / _TICK


def _established(server_port: int, options: str) -> str | None:
    """``ss <options>`` over the established connections from ``server_port``; None without
    ``ss`` (iproute2)."""
    ss = shutil.which("ss")
    if ss is None:
        return None
    return subprocess.run(
        [ss, options, "state", "established", f"( sport = :{server_port} )"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout


def send_queues(server_port: int, peer_ports: set[int]) -> dict[int, int] | None:
    """Bytes waiting in the server's kernel send queue, per client port (``ss``); None when
    ``ss`` (iproute2) is missing. A client that is gone from the list is not in the result."""
    out = _established(server_port, "-tnH")
    if out is None:
        return None
    queues = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            peer = int(fields[3].rsplit(":", 1)[1])
            if peer in peer_ports:
                queues[peer] = int(fields[1])
    return queues


def socket_owners(server_port: int) -> dict[int, int] | None:
    """The process holding each established connection of ``server_port``, by the client's
    port (``ss -p``); None without ``ss``. A connection held by several processes (a shared
    descriptor) goes to the first that ``ss`` names."""
    out = _established(server_port, "-tnpH")
    return None if out is None else parse_owners(out)


def parse_owners(out: str) -> dict[int, int]:
    """``ss -tnpH state established`` lines: client port -> the first pid named.

    >>> parse_owners('0 0 127.0.0.1:8080 127.0.0.1:41234 users:(("gunicorn",pid=77,fd=9))')
    {41234: 77}
    """
    owners = {}
    for line in out.splitlines():
        fields = line.split()
        found = _PID.search(line)
        if len(fields) >= 4 and found:
            owners[int(fields[3].rsplit(":", 1)[1])] = int(found.group(1))
    return owners


def tcp_bytes_acked(server_port: int) -> int | None:
    """TCP payload bytes the peers acknowledged, summed over the established connections from
    ``server_port`` (``ss -ti``'s ``bytes_acked``): what crossed the sockets, frame headers
    included, retransmissions not; a connection that closes takes its count with it. None
    without ``ss``. ``/proc/<pid>/io``'s ``wchar`` would not do: it does not count ``send(2)``,
    which is how servers write to sockets.
    """
    out = _established(server_port, "-tinH")
    if out is None:
        return None
    return sum(int(found) for found in _BYTES_ACKED.findall(out))

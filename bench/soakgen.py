"""The soak load generator: long-lived websocket clients that record every sequence number.

Run by :mod:`bench.soak` as ``python -m bench.soakgen`` (uvloop + picows, like
:mod:`bench.loadgen`) and driven over :mod:`bench.rpc`. A *client* is a lasting identity (public
or private, its streams, its token); each websocket connection it opens is a *session*, which
starts when the server's ``subscribed`` reply listing all of the client's streams arrives and
ends when the client starts closing (churn, end of run) or the connection is lost.

Every data frame ``{"<stream>":{"seq":N,...}}`` is counted into a per-client, per-stream byte
array indexed by ``N`` (how many times that message arrived, up to 255): a gap is a lost message,
a count above one a duplicate. At the end (``verify``) the orchestrator hands over what was
published and when, and the broker cut windows; each client's sessions then say which messages it
should have received, and the arrays say which it did.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import random
import re
import resource
import struct
import time
from bisect import bisect_left, bisect_right
from collections import Counter
from pathlib import Path
from typing import Any

import uvloop
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from bench import rpc

__all__ = ["Client", "Conn", "SoakGen", "main"]

_TEXT = WSMsgType.TEXT
_CLOSE = WSMsgType.CLOSE
_CONTROL_MAX = 125  # control frames are never longer; data frames always are (soakpub)
_SEQ = b'"seq":'
_REPLY_PREFIXES = (b'{"success"', b'{"error"')
_HANDSHAKE_TIMEOUT = 10.0
_REPLY_TIMEOUT = 10.0
_CLOSE_TIMEOUT = 5.0
# One data frame in this many is also parsed in full with json.loads.
_FULL_PARSE_EVERY = 97
_ERROR_SAMPLES = 3
_LOSS_LIST_MAX = 8  # lost-sequence ranges kept per client and stream in the report
_BUCKET_LIMIT = 2_000_000  # lost messages placed on the timeline, at most (per process)
_ZEROS = re.compile(rb"\x00+")
_RECEIVED = re.compile(rb"[^\x00]+")


def _now_us() -> int:
    return time.monotonic_ns() // 1000


def _describe(exc: BaseException) -> str:
    text = str(exc).split("\n", 1)[0][:100]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Client:
    """One lasting client identity, across its connections."""

    def __init__(self, spec: dict[str, Any], token: str | None) -> None:
        self.id: int = spec["id"]
        self.kind: str = spec["kind"]
        self.uid: str | None = spec.get("uid")
        self.path: str = spec["path"]
        self.by_message: bool = spec["by_message"]
        self.topics: list[str] = spec["topics"]
        self.keys: dict[str, str] = spec["keys"]  # topic -> routing key
        self.headers = {"Authorization": f"Bearer {token}"} if token else None
        self.seen: dict[bytes, bytearray] = {t.encode(): bytearray() for t in self.topics}
        self.target = (self.uid or "").encode()
        self.sessions: list[list[int]] = []  # [start_us, end_us]; end 0 while open
        self.conn: Conn | None = None
        self.frames = 0
        self.connects = 0
        self.broken = False  # lost its connection (or never got one): reopen at the next churn

    def end_session(self, when_us: int) -> None:
        if self.sessions and self.sessions[-1][1] == 0:
            self.sessions[-1][1] = when_us


class Conn(WSListener):
    """One websocket connection of a :class:`Client`."""

    def __init__(self, client: Client, gen: SoakGen) -> None:
        super().__init__()
        self.client = client
        self.gen = gen
        self.seen = client.seen
        self.transport: WSTransport | None = None
        self.stage = 0  # 0: waiting for the connect reply, 1: for the subscribe reply, 2: live
        self.closing = False
        self.close_code: int | None = None
        self.gone = False
        self.ready: asyncio.Future[bool] = gen.loop.create_future()

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        # Hot path. frame.msg_type builds an Enum; a long frame can only be text (or binary).
        if frame.payload_size > _CONTROL_MAX:
            self.on_text(frame.get_payload_as_bytes())
            return
        kind = frame.msg_type
        if kind is _TEXT:
            self.on_text(frame.get_payload_as_bytes())
        elif kind is _CLOSE:
            self.on_close(transport, frame.get_payload_as_bytes())

    def on_text(self, data: bytes) -> None:
        if data.startswith(_REPLY_PREFIXES):
            self.on_reply(data)
            return
        gen = self.gen
        end = data.find(b'"', 2)
        seen = self.seen.get(data[2:end]) if data.startswith(b'{"') and end > 2 else None
        if seen is None:
            gen.error("frame for a stream the client never subscribed", data)
            return
        i = data.find(_SEQ, end)
        j = data.find(b",", i)
        try:
            seq = int(data[i + 6 : j]) if i > 0 and j > i else -1
        except ValueError:
            seq = -1
        if seq < 0:
            gen.error("data frame without a sequence number", data)
            return
        client = self.client
        if client.target and b'"to":"' + client.target + b'"' not in data:
            gen.error("private message for another user", data)
            return
        if seq >= len(seen):
            seen.extend(bytes(max(seq + 1 - len(seen), len(seen))))
        count = seen[seq]
        if count < 255:
            seen[seq] = count + 1
        client.frames += 1
        gen.frames += 1
        if gen.frames % _FULL_PARSE_EVERY == 0:
            gen.full_parse(data)

    def on_reply(self, data: bytes) -> None:
        gen = self.gen
        try:
            reply = json.loads(data)
        except ValueError:
            gen.error("unparsable reply", data)
            return
        success = reply.get("success") if isinstance(reply, dict) else None
        if not isinstance(success, dict) or success.get("message") != "subscribed":
            gen.error("unexpected reply", data)
            return
        streams = success.get("streams")
        client = self.client
        if self.stage == 0 and client.by_message:
            if streams != []:
                gen.error("connect reply lists streams", data)
            self.stage = 1
            if self.transport is not None:
                message = {"event": "subscribe", "streams": client.topics}
                self.transport.send(_TEXT, json.dumps(message).encode())
            return
        if self.stage == 2:
            gen.error("extra subscribed reply", data)
            return
        if not isinstance(streams, list) or sorted(streams) != sorted(client.topics):
            gen.error("subscribed reply lists other streams", data)
        self.stage = 2
        client.sessions.append([_now_us(), 0])
        if not self.ready.done():
            self.ready.set_result(True)

    def on_close(self, transport: WSTransport, payload: bytes) -> None:
        code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
        if self.close_code is None:
            self.close_code = code
            if not self.closing:
                self.client.end_session(_now_us())
                self.gen.error(f"closed by the server with {code}", payload[2:])
                transport.send_close(WSCloseCode.OK)
        transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.gone = True
        client = self.client
        if not self.closing:
            client.end_session(_now_us())
            client.broken = True
            if self.close_code is None:
                self.gen.error("connection dropped without a close frame", b"")
        if client.conn is self:
            client.conn = None
        if not self.ready.done():
            self.ready.set_result(False)


class SoakGen:
    """This process's clients, and the commands that the orchestrator sends."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.base_url = ""
        self.clients: list[Client] = []
        self.frames = 0
        self.errors: Counter[str] = Counter()
        self.error_samples: dict[str, list[str]] = {}
        self.rng = random.Random(0)
        self.churn_task: asyncio.Task[None] | None = None
        self.churn = Counter[str]()
        self.finished = False

    @staticmethod
    def _clock() -> dict[str, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "cpu_s": time.process_time(),
            "mono_s": time.monotonic(),
            "max_rss_mb": usage.ru_maxrss / 1024,
        }

    def error(self, what: str, data: bytes) -> None:
        self.errors[what] += 1
        samples = self.error_samples.setdefault(what, [])
        if len(samples) < _ERROR_SAMPLES and data:
            samples.append(data[:120].decode("utf-8", "replace"))

    def full_parse(self, data: bytes) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            self.error("data frame is not JSON", data)
            return
        body = next(iter(message.values()), None) if isinstance(message, dict) else None
        if len(message) != 1 or not isinstance(body, dict) or not isinstance(body.get("seq"), int):
            self.error("data frame is not {stream: {seq: ...}}", data)

    # commands

    async def setup(
        self, *, base_url: str, clients: list[dict[str, Any]], tokens_file: str | None, seed: int
    ) -> dict[str, Any]:
        tokens = Path(tokens_file).read_text(encoding="ascii").split() if tokens_file else []
        self.base_url = base_url
        self.rng = random.Random(seed)
        self.clients = [
            Client(spec, tokens[spec["token"]] if spec.get("token") is not None else None)
            for spec in clients
        ]
        return {"clients": len(self.clients), **self._clock()}

    async def _open(self, client: Client, gate: asyncio.Semaphore | None = None) -> bool:
        """Connect and wait for the reply that starts the session; False if that failed."""
        client.connects += 1
        try:
            async with gate or contextlib.nullcontext():
                _, conn = await ws_connect(
                    lambda: Conn(client, self),
                    self.base_url + client.path,
                    extra_headers=client.headers,
                    websocket_handshake_timeout=_HANDSHAKE_TIMEOUT,
                    read_buffer_init_size=4096,
                    max_redirects=0,
                )
        except Exception as exc:
            self.error(f"connect failed: {_describe(exc)}", b"")
            client.broken = True
            return False
        assert isinstance(conn, Conn)
        client.conn = conn
        client.broken = False
        try:
            ok = await asyncio.wait_for(asyncio.shield(conn.ready), _REPLY_TIMEOUT)
        except TimeoutError:
            ok = False
            self.error("no subscribed reply within 10 s", b"")
            conn.closing = True
            if conn.transport is not None:
                conn.transport.disconnect(graceful=False)
            client.conn = None
            client.broken = True
        return ok

    async def connect(self, *, concurrency: int = 200) -> dict[str, Any]:
        """Open every client, at most ``concurrency`` handshakes in flight."""
        gate = asyncio.Semaphore(concurrency)
        cpu0, start = time.process_time(), time.monotonic()
        results = await asyncio.gather(*(self._open(c, gate) for c in self.clients))
        elapsed = time.monotonic() - start
        gc.collect()
        gc.freeze()  # the clients live to the end: keep them out of later collections
        return {
            "clients": len(self.clients),
            "subscribed": sum(1 for ok in results if ok),
            "elapsed_s": round(elapsed, 2),
            "connect_cpu_s": round(time.process_time() - cpu0, 2),
            "errors": dict(self.errors),
            **self._clock(),
        }

    async def churn_start(self, *, count: int) -> dict[str, Any]:
        """Close ``count`` random live clients and reconnect them (and reopen broken ones),
        in the background; a churn still running makes this one a no-op."""
        if self.finished:
            return {"started": False, **self._clock()}
        if self.churn_task is not None and not self.churn_task.done():
            self.churn["skipped (previous churn still running)"] += 1
            return {"started": False, **self._clock()}
        live = [c for c in self.clients if c.conn is not None and c.conn.stage == 2]
        chosen = self.rng.sample(live, min(count, len(live)))
        broken = [c for c in self.clients if c.broken and c.conn is None]
        self.churn_task = asyncio.create_task(self._churn(chosen, broken))
        return {"started": True, "chosen": len(chosen), "reopening": len(broken), **self._clock()}

    async def _churn(self, chosen: list[Client], broken: list[Client]) -> None:
        results = await asyncio.gather(
            *(self._cycle(c) for c in chosen), *(self._open(c) for c in broken)
        )
        self.churn["rounds"] += 1
        self.churn["cycled"] += len(chosen)
        self.churn["reopened"] += len(broken)
        self.churn["failed"] += sum(1 for ok in results if not ok)

    async def _close(self, conn: Conn) -> None:
        conn.closing = True
        conn.client.end_session(_now_us())
        transport = conn.transport
        if transport is None or conn.gone:
            return
        transport.send_close(WSCloseCode.OK)
        try:
            await asyncio.wait_for(transport.wait_disconnected(), _CLOSE_TIMEOUT)
        except TimeoutError:
            self.error("server did not complete the close handshake within 5 s", b"")
            transport.disconnect(graceful=False)

    async def _cycle(self, client: Client) -> bool:
        conn = client.conn
        if conn is None:
            return await self._open(client)
        await self._close(conn)
        client.conn = None
        if self.finished:
            return True
        return await self._open(client)

    async def status(self) -> dict[str, Any]:
        return {
            "clients": len(self.clients),
            "live": sum(1 for c in self.clients if c.conn is not None and c.conn.stage == 2),
            "frames": self.frames,
            "errors": sum(self.errors.values()),
            **self._clock(),
        }

    async def finish(self) -> dict[str, Any]:
        """End every session: wait (bounded) for a running churn, then close every client."""
        self.finished = True
        if self.churn_task is not None and not self.churn_task.done():
            try:
                await asyncio.wait_for(self.churn_task, 30.0)
            except TimeoutError:
                self.churn["cancelled at the end"] += 1
        conns = [c.conn for c in self.clients if c.conn is not None]
        await asyncio.gather(*(self._close(conn) for conn in conns))
        for client in self.clients:
            client.conn = None
        return {"closed": len(conns), **self._clock()}

    async def verify(
        self,
        *,
        published_file: str,
        windows: list[list[int]],
        grace_us: int,
        t0_us: int,
        bucket_s: float,
        dump_file: str | None = None,
    ) -> dict[str, Any]:
        """Delivered against expected for every client (see :func:`_verify_client`)."""
        published: dict[str, list[int]] = json.loads(Path(published_file).read_text())
        cut_ranges = {
            key: _index_ranges(sent, windows) for key, sent in published.items()
        }  # fmt: skip
        totals: dict[str, Counter[str]] = {}
        buckets: dict[str, Counter[int]] = {}
        worst: dict[str, list[dict[str, Any]]] = {}
        dump = []
        budget = [_BUCKET_LIMIT]
        for client in self.clients:
            tally = totals.setdefault(client.kind, Counter())
            record = _verify_client(
                client,
                published,
                cut_ranges,
                grace_us=grace_us,
                t0_us=t0_us,
                bucket_s=bucket_s,
                tally=tally,
                buckets=buckets,
                budget=budget,
            )
            tally["clients"] += 1
            tally["sessions"] += len(client.sessions)
            if record["lost_up"]:
                tally["clients_with_loss"] += 1
                worst.setdefault(client.kind, []).append(record)
            dump.append(record)
        if dump_file is not None:
            with open(dump_file, "w", encoding="utf-8") as out:
                for record in dump:
                    out.write(json.dumps(record, separators=(",", ":")) + "\n")
        for records in worst.values():
            records.sort(key=lambda r: -r["lost_up"])
            del records[10:]
        return {
            "totals": {kind: dict(tally) for kind, tally in totals.items()},
            "lost_by_bucket": {
                name: {str(k): v for k, v in sorted(counts.items())}
                for name, counts in buckets.items()
            },
            "worst": worst,
            "errors": dict(self.errors),
            "error_samples": self.error_samples,
            "churn": dict(self.churn),
            "bucket_budget_left": budget[0],
            **self._clock(),
        }


def _index_ranges(sent: list[int], windows: list[list[int]]) -> list[tuple[int, int]]:
    """The index ranges [lo, hi) of ``sent`` (sorted send times) that fall in ``windows``."""
    ranges: list[tuple[int, int]] = []
    for start, end in sorted(windows):
        lo, hi = bisect_left(sent, start), bisect_right(sent, end)
        if hi <= lo:
            continue
        if ranges and lo <= ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], max(hi, ranges[-1][1]))
        else:
            ranges.append((lo, hi))
    return ranges


def _split(lo: int, hi: int, cuts: list[tuple[int, int]]) -> list[tuple[int, int, bool]]:
    """[lo, hi) in pieces, each flagged True when inside one of ``cuts``."""
    pieces = []
    at = lo
    for cut_lo, cut_hi in cuts:
        if cut_hi <= at:
            continue
        if cut_lo >= hi:
            break
        if cut_lo > at:
            pieces.append((at, cut_lo, False))
        pieces.append((max(at, cut_lo), min(hi, cut_hi), True))
        at = min(hi, cut_hi)
    if at < hi:
        pieces.append((at, hi, False))
    return pieces


def _zero_runs(seen: bytearray, lo: int, hi: int) -> list[tuple[int, int]]:
    """The runs [a, b) of zero counts in seen[lo:hi]."""
    return [match.span() for match in _ZEROS.finditer(seen, lo, hi)]


def _ranges_text(runs: list[tuple[int, int]], limit: int) -> list[str]:
    text = [f"{a}" if b == a + 1 else f"{a}-{b - 1}" for a, b in runs[:limit]]
    if len(runs) > limit:
        text.append(f"... {len(runs) - limit} more")
    return text


def _verify_client(
    client: Client,
    published: dict[str, list[int]],
    cut_ranges: dict[str, list[tuple[int, int]]],
    *,
    grace_us: int,
    t0_us: int,
    bucket_s: float,
    tally: Counter[str],
    buckets: dict[str, Counter[int]],
    budget: list[int],
) -> dict[str, Any]:
    """A message is *expected* by a client when it was published (``ts``) after one of the
    client's sessions began and more than ``grace_us`` before that session ended. Expected
    messages published inside a cut window (``cut_ranges``) are counted apart."""
    record: dict[str, Any] = {
        "id": client.id,
        "kind": client.kind,
        "uid": client.uid,
        "sessions": [
            [round((s - t0_us) / 1e6, 3), round((e - t0_us) / 1e6, 3) if e else None]
            for s, e in client.sessions
        ],
        "lost_up": 0,
        "streams": {},
    }
    for topic, seen in client.seen.items():
        key = client.keys[topic.decode()]
        sent = published.get(key, [])
        total = len(sent)
        if len(seen) > total:
            beyond = len(seen) - total - seen.count(0, total)
            if beyond:
                tally["unknown_sequence_numbers"] += beyond
            del seen[total:]
        elif len(seen) < total:
            seen.extend(bytes(total - len(seen)))
        received = total - seen.count(0)
        tally["received"] += received
        tally["duplicates_total"] += sum(seen) - received
        in_sessions = 0
        lost_runs: list[tuple[int, int]] = []
        stream_lost_up = 0
        for start, end in client.sessions:
            if end == 0:
                continue  # never ended: the run stopped before finish (interrupted)
            lo, hi = bisect_right(sent, start), bisect_left(sent, end - grace_us)
            if hi <= lo:
                continue
            for a, b, in_cut in _split(lo, hi, cut_ranges.get(key, [])):
                got = (b - a) - seen.count(0, a, b)
                dup = sum(seen[a:b]) - got
                where = "cut" if in_cut else "up"
                tally[f"expected_{where}"] += b - a
                tally[f"delivered_{where}"] += got
                tally[f"lost_{where}"] += b - a - got
                tally[f"duplicated_{where}"] += dup
                in_sessions += got
                if got < b - a:
                    runs = _zero_runs(seen, a, b)
                    counts = buckets.setdefault(f"{client.kind}_{where}", Counter())
                    for run_lo, run_hi in runs:
                        for index in range(run_lo, min(run_hi, run_lo + budget[0])):
                            counts[int((sent[index] - t0_us) / 1e6 // bucket_s)] += 1
                        budget[0] = max(0, budget[0] - (run_hi - run_lo))
                    if not in_cut:
                        stream_lost_up += b - a - got
                        lost_runs.extend(runs)
        tally["received_outside_sessions"] += received - in_sessions
        received_runs = _nonzero_runs(seen)
        record["streams"][topic.decode()] = {
            "received": _ranges_text(received_runs, 64),
            "lost_up": _ranges_text(lost_runs, _LOSS_LIST_MAX),
            "duplicates": sum(seen) - received,
        }
        record["lost_up"] += stream_lost_up
    return record


def _nonzero_runs(seen: bytearray) -> list[tuple[int, int]]:
    """The runs [a, b) of received (non-zero) counts."""
    return [match.span() for match in _RECEIVED.finditer(seen)]


async def _main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    gen = SoakGen()
    await rpc.serve_async(
        {
            "setup": gen.setup,
            "connect": gen.connect,
            "churn": gen.churn_start,
            "status": gen.status,
            "finish": gen.finish,
            "verify": gen.verify,
        }
    )


def main() -> None:
    uvloop.run(_main())


if __name__ == "__main__":
    main()

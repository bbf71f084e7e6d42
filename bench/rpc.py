"""The control channel between the benchmark and its child processes: JSON lines over pipes.

The orchestrator starts each helper (load generator, publisher) as ``python -m bench.<module>``
and drives it with one JSON object per line on its stdin; the child answers each command with
one line on its original stdout. The child's file descriptor 1 is pointed at its stderr (a log
file), so a library that prints cannot corrupt the channel. Every wait has a deadline: a child
that hangs or dies fails the call with its log tail, it never hangs the benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import IO, Any

__all__ = [
    "AsyncHandler",
    "Child",
    "ChildError",
    "Handler",
    "reply_channel",
    "serve",
    "serve_async",
]

Handler = Callable[..., dict[str, Any]]
AsyncHandler = Callable[..., Awaitable[dict[str, Any]]]

_LOG_TAIL_BYTES = 4000


class ChildError(Exception):
    """A helper process failed a command, timed out or exited; the message says which."""


class Child:
    """One helper process, seen from the orchestrator."""

    def __init__(
        self,
        name: str,
        module: str,
        *,
        log_path: Path,
        cwd: Path,
        env: Mapping[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            start_new_session=True,  # Ctrl-C reaches the orchestrator only; it stops us.
        )
        self._buffer = b""

    def send(self, command: str, **args: Any) -> None:
        stdin = self.process.stdin
        if stdin is None or self.process.poll() is not None:
            raise ChildError(f"{self.name} is not running; log:\n{self.log_tail()}")
        try:
            stdin.write(json.dumps({"cmd": command, **args}).encode() + b"\n")
            stdin.flush()
        except OSError as exc:
            raise ChildError(f"{self.name}: cannot send {command!r}: {exc}") from exc

    def recv(self, timeout: float) -> dict[str, Any]:
        """The next reply; raises :class:`ChildError` on an error reply, exit or timeout."""
        stdout = self.process.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildError(f"{self.name}: no reply within {timeout:.0f} s")
            readable, _, _ = select.select([stdout], [], [], min(left, 1.0))
            if readable:
                chunk = os.read(stdout.fileno(), 1 << 20)
                if not chunk:
                    code = self.process.wait(timeout=5)
                    raise ChildError(f"{self.name} exited with {code}; log:\n{self.log_tail()}")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise ChildError(f"{self.name}: {reply.get('error')}")
        result: dict[str, Any] = reply["result"]
        return result

    def call(self, command: str, timeout: float, **args: Any) -> dict[str, Any]:
        self.send(command, **args)
        return self.recv(timeout)

    def close(self, timeout: float = 10.0) -> int | None:
        """Ask the child to quit; kill its process group if it does not within ``timeout``."""
        if self.process.poll() is None:
            with contextlib.suppress(ChildError, OSError):
                self.send("quit")
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, 9)
                self.process.wait(timeout=timeout)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self._log.close()
        return self.process.returncode

    def log_tail(self) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - _LOG_TAIL_BYTES))
                return log.read().decode("utf-8", "replace")
        except OSError:
            return ""


def reply_channel() -> IO[bytes]:
    """In a child: keep the real stdout for replies and send fd 1 to stderr from now on."""
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def _reply(out: IO[bytes], ok: bool, payload: Any) -> None:
    key = "result" if ok else "error"
    out.write(json.dumps({"ok": ok, key: payload}, separators=(",", ":")).encode() + b"\n")


def _error(command: str, exc: BaseException) -> str:
    traceback.print_exc()
    return f"{command} failed: {type(exc).__name__}: {exc}"


def serve(handlers: Mapping[str, Handler]) -> None:
    """In a child: answer commands from stdin until ``quit`` or end of input."""
    out = reply_channel()
    for raw in sys.stdin.buffer:
        message = json.loads(raw)
        command = message.pop("cmd")
        if command == "quit":
            _reply(out, True, {})
            return
        try:
            _reply(out, True, handlers[command](**message))
        except Exception as exc:
            _reply(out, False, _error(command, exc))


async def serve_async(handlers: Mapping[str, AsyncHandler]) -> None:
    """In an asyncio child: the same, with coroutine handlers run one at a time."""
    out = reply_channel()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26, loop=loop)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader, loop=loop), sys.stdin.buffer
    )
    while raw := await reader.readline():
        message = json.loads(raw)
        command = message.pop("cmd")
        if command == "quit":
            _reply(out, True, {})
            return
        try:
            _reply(out, True, await handlers[command](**message))
        except Exception as exc:
            _reply(out, False, _error(command, exc))

"""A small driver of headless Chromium over the DevTools protocol (CDP), for the browser test.

Chromium runs with a fresh profile and every background service off, so it only talks to the
pages it is sent to (the tests only ever send it to http://127.0.0.1 pages). The driver reads the
DevTools port Chromium picked from ``<profile>/DevToolsActivePort``, finds a page target through
``/json/list`` and drives it over that target's websocket with ``websockets.sync.client``: each
command carries an id and the driver reads until the answer with that id, skipping events. Every
wait has a deadline. :meth:`Browser.close` kills Chromium's whole process group and removes the
profile.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from testbed.waiting import TimedOut, wait_until

__all__ = ["CHROMIUM", "Browser", "BrowserError"]

CHROMIUM = Path("/usr/bin/chromium")
START_TIMEOUT = 30.0
COMMAND_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
LOG_TAIL_CHARS = 4000

# No sandbox (the tests run as root), no GPU, no QUIC, and nothing that phones home: no first-run
# or default-browser checks, no background networking, component updates, sync or default apps.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--no-default-browser-check",
    # Defence in depth: no proxy from the environment, and no host name resolves except the
    # loopback addresses the tests use, so nothing can leave the machine by name.
    "--no-proxy-server",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
)


class BrowserError(Exception):
    """Chromium did not start, a command failed, or a wait ran out of time."""


class Browser:
    """One headless Chromium with one page, driven over CDP; use as a context manager."""

    def __init__(self, executable: Path = CHROMIUM) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="ranger-chromium-"))
        # The log lives beside the profile, not in it, so it survives until close() for errors.
        log_fd, log_name = tempfile.mkstemp(prefix="ranger-chromium-", suffix=".log")
        os.close(log_fd)
        self._log_path = Path(log_name)
        self._ids = itertools.count(1)
        self._ws: ClientConnection | None = None
        self.process: subprocess.Popen[bytes] | None = None
        try:
            with self._log_path.open("wb") as log:
                self.process = subprocess.Popen(
                    [
                        str(executable),
                        *FLAGS,
                        f"--user-data-dir={self.profile}",
                        "--remote-debugging-port=0",
                        "about:blank",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    # Its own process group: close() kills the renderers and helpers with it.
                    start_new_session=True,
                )
            port = self._devtools_port()
            self._ws = connect(
                self._page_websocket_url(port),
                open_timeout=COMMAND_TIMEOUT,
                close_timeout=2,
                compression=None,
                proxy=None,
                ping_interval=None,
                max_size=None,
                legacy=True,
            )
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # starting

    def log_tail(self) -> str:
        try:
            return self._log_path.read_text("utf-8", "replace")[-LOG_TAIL_CHARS:]
        except FileNotFoundError:
            return ""

    def _fail(self, message: str) -> BrowserError:
        return BrowserError(f"{message}; chromium's output:\n{self.log_tail()}")

    def _check_alive(self) -> None:
        assert self.process is not None
        code = self.process.poll()
        if code is not None:
            raise self._fail(f"chromium exited with {code}")

    def _devtools_port(self) -> int:
        """The port Chromium chose, from the first line of ``DevToolsActivePort``."""
        path = self.profile / "DevToolsActivePort"

        def port() -> int | None:
            self._check_alive()
            try:
                lines = path.read_text().splitlines()
            except FileNotFoundError:
                lines = []
            # Chromium may be caught writing it: wait for the second line (the browser's path).
            return int(lines[0]) if len(lines) >= 2 and lines[0].isdigit() else None

        try:
            return wait_until(port, timeout=START_TIMEOUT, what=str(path))
        except TimedOut as exc:
            raise self._fail(str(exc)) from None

    def _http_json(self, port: int, method: str, path: str) -> Any:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=COMMAND_TIMEOUT)
        try:
            connection.request(method, path)
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        if response.status != 200:
            raise self._fail(f"{method} {path} on the DevTools port answered {response.status}")
        return json.loads(body)

    def _page_websocket_url(self, port: int) -> str:
        # The about:blank page of the command line shows up at once; if not, open one.
        deadline = time.monotonic() + 5.0
        while True:
            self._check_alive()
            targets = self._http_json(port, "GET", "/json/list")
            for target in targets:
                if target.get("type") == "page" and target.get("webSocketDebuggerUrl"):
                    url: str = target["webSocketDebuggerUrl"]
                    return url
            if time.monotonic() > deadline:
                # No page came up with the browser: open one (PUT, as current Chromium requires).
                target = self._http_json(port, "PUT", "/json/new?about:blank")
                url = target["webSocketDebuggerUrl"]
                return url
            time.sleep(0.05)

    # driving

    def command(
        self, method: str, params: dict[str, Any] | None = None, timeout: float = COMMAND_TIMEOUT
    ) -> Any:
        """Send one CDP command and return its ``result``; events read meanwhile are skipped."""
        if self._ws is None:
            raise BrowserError("the browser is closed")
        command_id = next(self._ids)
        self._ws.send(json.dumps({"id": command_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._fail(f"no answer to {method} within {timeout} s")
            try:
                frame = self._ws.recv(timeout=remaining)
            except TimeoutError:
                continue  # the deadline check above fails the wait
            except ConnectionClosed as closed:
                raise self._fail(
                    f"the DevTools connection closed during {method}: {closed}"
                ) from None
            message = json.loads(frame)
            if message.get("id") != command_id:
                continue  # an event (no id), or the late answer to an earlier command
            if "error" in message:
                raise BrowserError(f"{method} failed: {message['error']}")
            return message.get("result", {})

    def evaluate(self, expression: str, timeout: float = COMMAND_TIMEOUT) -> Any:
        """The value of a JavaScript expression in the page (awaited if it is a promise)."""
        params = {"expression": expression, "returnByValue": True, "awaitPromise": True}
        result = self.command("Runtime.evaluate", params, timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"{expression!r} raised: {text}")
        return result["result"].get("value")

    def wait_for(self, expression: str, *, timeout: float, what: str) -> Any:
        """Poll a JavaScript expression until it is truthy; fail after ``timeout`` seconds."""
        try:
            return wait_until(lambda: self.evaluate(expression), timeout=timeout, what=what)
        except TimedOut as exc:
            raise BrowserError(str(exc)) from None

    def navigate(self, url: str, timeout: float = COMMAND_TIMEOUT) -> None:
        """Load ``url`` in the page and wait until its document has loaded."""
        result = self.command("Page.navigate", {"url": url}, timeout)
        if result.get("errorText"):
            raise BrowserError(f"navigating to {url} failed: {result['errorText']}")
        self.wait_for(
            f"location.href === {json.dumps(url)} && document.readyState === 'complete'",
            timeout=timeout,
            what=f"{url} to load",
        )

    # stopping

    def close(self) -> None:
        """Kill Chromium with all its processes and remove its profile; safe to call twice."""
        if self._ws is not None:
            self._ws.close()
            self._ws = None
        if self.process is not None:
            # The group of the process we started: the browser, its renderers and helpers (also
            # if the browser itself already exited, leaving helpers behind).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise BrowserError(f"chromium (pid {self.process.pid}) did not die") from None
            self.process = None
        shutil.rmtree(self.profile, ignore_errors=True)
        self._log_path.unlink(missing_ok=True)

"""A real browser end to end: headless Chromium's own WebSocket receives a trade (PROTOCOL §1, §4).

The page comes from a local HTTP server on another port, so the browser sends
``Origin: http://127.0.0.1:<page port>`` while ``Host`` is the ranger server's: the server must
allow that origin through ``API_CORS_ORIGINS``. Chromium is installed by scripts/install-chromium
(scripts/test runs it); without it this test skips, and only then.
"""

from __future__ import annotations

import html
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from .browser import CHROMIUM, Browser, BrowserError
from .harness import StartServer, unique
from .wsclient import subscribed

MESSAGE_TIMEOUT = 10.0

# The page's script keeps every message it receives in ``window.received`` and shows each in the
# list; ``window.events`` tells what happened to the socket, for the failure messages.
_PAGE = """<!doctype html>
<html>
<head>
<meta charset="utf-8">
<title>ranger-py in a browser</title>
<link rel="icon" href="data:,">
</head>
<body>
<h1>{title}</h1>
<ul id="messages"></ul>
<script>
window.received = [];
window.events = [];
window.ws = new WebSocket({url});
window.ws.onopen = () => window.events.push("open");
window.ws.onerror = () => window.events.push("error");
window.ws.onclose = (event) => window.events.push(`close ${{event.code}} ${{event.reason}}`);
window.ws.onmessage = (event) => {{
  window.received.push(event.data);
  const item = document.createElement("li");
  item.textContent = event.data;
  document.getElementById("messages").appendChild(item);
}};
</script>
</body>
</html>
"""


class PageServer:
    """Serves one HTML page at ``/`` from a thread, on a free port of 127.0.0.1."""

    def __init__(self) -> None:
        self.page = b""
        pages = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                found = self.path == "/"
                body = pages.page if found else b"not found\n"
                self.send_response(200 if found else 404)
                self.send_header(
                    "Content-Type", "text/html; charset=utf-8" if found else "text/plain"
                )
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # quiet: a failing test shows the page's own story

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port: int = self._httpd.server_address[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.origin}/"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def page_server() -> Iterator[PageServer]:
    server = PageServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(
            f"chromium not installed ({CHROMIUM} is missing): scripts/install-chromium could not"
            " install it (it needs root and apt-get)"
        )
    with Browser() as browser:
        yield browser


def _wait_received(browser: Browser, count: int, what: str) -> list[str]:
    """The page's messages once there are at least ``count``; fails with the socket's story."""
    try:
        received: list[str] = browser.wait_for(
            f"window.received.length >= {count} && window.received",
            timeout=MESSAGE_TIMEOUT,
            what=what,
        )
    except BrowserError as exc:
        state = browser.evaluate(
            "JSON.stringify({events: window.events, received: window.received})"
        )
        raise AssertionError(f"{exc}; in the page: {state}") from None
    return received


def test_browser_websocket_receives_a_trade(
    start_server: StartServer, page_server: PageServer, browser: Browser
) -> None:
    market = unique()
    stream = f"{market}.trades"
    server = start_server({"API_CORS_ORIGINS": page_server.origin})
    url = server.url(f"/public?stream={stream}")
    page_server.page = _PAGE.format(title=html.escape(stream), url=json.dumps(url)).encode()

    browser.navigate(page_server.url)
    assert _wait_received(browser, 1, "the subscribed reply") == [subscribed(stream)]
    # Chromium offers "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits" on
    # its own; the server accepts it without context takeover (PROTOCOL §2).
    assert browser.evaluate("window.ws.extensions") == (
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    )
    assert browser.evaluate("window.ws.protocol") == ""

    body = '{"trades":[{"tid":7,"taker_type":"sell","date":1700000000,"price":"2.5","amount":"4"}]}'
    server.publish(f"public.{stream}", body)
    server.sync()  # the worker has routed the trade: anything else would have come with it
    trade = f'{{"{stream}":{body}}}'
    assert _wait_received(browser, 2, "the trade") == [subscribed(stream), trade]

    shown = browser.evaluate(
        "Array.from(document.querySelectorAll('#messages li'), (item) => item.textContent)"
    )
    assert shown == [subscribed(stream), trade]
    assert trade in browser.evaluate("document.body.innerText")

    # Over RANGER_COMPRESSION_THRESHOLD: sent compressed, inflated by the browser.
    big = '{"trades":[' + ",".join(f'{{"tid":{i},"price":"2.5"}}' for i in range(100)) + "]}"
    server.publish(f"public.{stream}", big)
    big_trade = f'{{"{stream}":{big}}}'
    assert len(big_trade) > 1024
    assert _wait_received(browser, 3, "the large trade")[2] == big_trade
    assert browser.evaluate("window.events") == ["open"]

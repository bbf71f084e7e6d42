"""A loopback picows server that plays the gateway, for the load generator's unit tests.

Import it only inside a test, after ``pytest.importorskip("picows")``: picows is the benchmark's
requirement, not the project's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from picows import (
    WSListener,
    WSMsgType,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

__all__ = ["playing_gateway", "wait_frames"]


@contextlib.asynccontextmanager
async def playing_gateway(
    frames: Sequence[tuple[bytes, bool]],
    *,
    answer: str | None = None,
    offers: list[str | None] | None = None,
) -> AsyncIterator[str]:
    """A server on a free loopback port (the URL is yielded) that sends each client ``frames``
    (payload, RSV1) as text frames once connected, answers ``Sec-WebSocket-Extensions`` with
    ``answer``, notes each client's offer in ``offers``, and answers a close."""

    # Where picows is not installed, WSListener is Any: subclassing it is then flagged.
    class Gateway(WSListener):  # type: ignore[misc, unused-ignore]
        def on_ws_connected(self, transport: Any) -> None:
            for payload, rsv1 in frames:
                transport.send(WSMsgType.TEXT, payload, rsv1=rsv1)

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            if frame.msg_type is WSMsgType.CLOSE:
                transport.send_close(frame.get_close_code())
                transport.disconnect()

    def upgrade(request: Any) -> Any:
        if offers is not None:
            offers.append(request.headers.get("Sec-WebSocket-Extensions"))
        headers = {"Sec-WebSocket-Extensions": answer} if answer else None
        response = WSUpgradeResponse.create_101_response(extra_headers=headers)
        return WSUpgradeResponseWithListener(response, Gateway())

    server = await ws_create_server(upgrade, "127.0.0.1", 0)
    try:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    finally:
        server.close()


async def wait_frames(gen: Any, count: int, seconds: float = 2.0) -> None:
    """Until ``gen`` (a ``bench.loadgen.LoadGen``) has counted ``count`` data frames, at most
    ``seconds``."""
    for _ in range(int(seconds * 100)):
        if (await gen.count())["frames"] >= count:
            return
        await asyncio.sleep(0.01)

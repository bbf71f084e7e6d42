"""ranger-py's benchmark: a program (``python -m bench``), not a test.

It starts the server as users do, drives it with websocket clients on uvloop + picows and a
RabbitMQ publisher, each in a process of its own, and reports latency, delivery, CPU and memory
for its scenarios. See bench/README.md.
"""

from __future__ import annotations

__all__: list[str] = []

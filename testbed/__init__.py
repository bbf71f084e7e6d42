"""What the benchmark and the integration tests share: a ranger-py server in a subprocess, a
vhost on the shared RabbitMQ, and waiting for a condition.

A top-level package of its own because neither side should import the other: ``bench`` is a
program with its own requirements (picows, numpy, ...), ``tests`` a suite that imports pytest.
Both run from the repository root (``python -m bench``; pytest's ``pythonpath = ["."]``), where
this package is importable as ``testbed``. It uses the standard library only, so it needs no
requirement of either side, and it stays out of the wheel and the image like ``bench`` and
``tests`` (pyproject.toml's ``packages``, .dockerignore).
"""

from __future__ import annotations

__all__: list[str] = []

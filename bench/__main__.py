"""Entry point: ``python -m bench`` (from the repository root)."""

from __future__ import annotations

from bench.cli import main

__all__: list[str] = []

raise SystemExit(main())

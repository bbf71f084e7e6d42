"""RFC 6455 and RFC 7692 conformance (PROTOCOL §2): kosoku's CATEGORIES against the echo app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conformance import CATEGORIES, echo_server, run_kosoku
from .harness import ServerPool


@pytest.mark.timeout(900)
def test_rfc6455_conformance(pool: ServerPool, tmp_path: Path) -> None:
    server = echo_server(pool).start()
    try:
        outcomes = run_kosoku(server.url("/echo"), tmp_path)
    finally:
        server.stop()
    assert {outcome.case.split(".")[0] for outcome in outcomes} == set(CATEGORIES)
    failed = []
    for outcome in outcomes:
        if outcome.passed:
            continue
        reports = list(tmp_path.glob(f"*_case_{outcome.case.replace('.', '_')}.json"))
        detail = json.loads(reports[0].read_text()) if reports else {}
        failed.append(
            f"{outcome.case} {outcome.behavior}/{outcome.behavior_close} "
            f"close={outcome.remote_close_code}: {detail.get('description', '')} "
            f"-> {detail.get('result', '')} {detail.get('resultClose', '')}"
        )
    assert not failed, f"{len(failed)} of {len(outcomes)} cases failed:\n" + "\n".join(failed)

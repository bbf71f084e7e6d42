"""A broker that refuses the server's login (PROTOCOL §5): a warning, never the password.

The real broker is asked with a wrong ``RABBITMQ_PASSWORD``: the server keeps serving HTTP,
``/readyz`` answers 503 naming the refused login, and the log says what to check. The
once-a-minute repetition of the warning is timed with a fake clock in
tests/unit/test_consumer_login.py.
"""

from __future__ import annotations

import json
import re
import secrets

from .broker import Broker
from .harness import ServerPool, wait_until

LOGIN_TIMEOUT = 20.0


def test_a_refused_login_is_a_warning_and_readyz_says_why(pool: ServerPool, broker: Broker) -> None:
    password = f"wrong-{secrets.token_hex(8)}"
    # Not start_server: that waits for /readyz 200, which this server must never answer.
    server = pool.new({"RABBITMQ_PASSWORD": password, "LOG_LEVEL": "debug"}, name="refused")
    server.start(wait=False)
    try:
        login = f"user {broker.user} at {broker.host}:{broker.port}/{broker.vhost}"
        warning = re.compile(
            r"\[\d+\] WARNING ranger_py\.consumer: broker refused the login for "
            + re.escape(login)
            + re.escape(" (check RABBITMQ_USER/RABBITMQ_PASSWORD or RABBITMQ_URL): ")
            + r".*ACCESS_REFUSED.*; retrying$",
            re.MULTILINE,
        )
        wait_until(
            lambda: warning.search(server.log_text()),
            timeout=LOGIN_TIMEOUT,
            what="the refused-login warning",
        )
        # The consumer goes on trying; the attempts between two warnings are debug lines only.
        wait_until(
            lambda: "broker still refuses the login for " + login in server.log_text(),
            timeout=LOGIN_TIMEOUT,
            what="a second refused attempt",
        )
        response = server.readyz()
        assert response is not None
        assert response.status == 503
        assert json.loads(response.body) == {
            "status": "unavailable",
            "reason": f"broker refused the login for {login}",
            "worker": server.worker_pids()[0],
        }
        assert server.http("/healthz").status == 200  # alive, only not ready
        log = server.log_text()
        assert len(warning.findall(log)) == 1
        assert "broker connection lost" not in log and "reconnecting" not in log
        assert password not in log
    finally:
        server.stop()
    assert password not in server.log_text()

"""Tests for ranger_py.cli: argument parsing, exit statuses, and what each command does offline.

Nothing here opens a socket or starts a server: ``serve`` is stopped at its ``execv``, ``publish``
at its JSON check, ``tail`` at its arguments. tests/integration/test_cli.py runs the installed
command against a real server and broker.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from ranger_py import __version__, cli
from ranger_py.config import config_errors
from ranger_py.keys import load_verify_key

REPO = Path(__file__).resolve().parents[2]
COMMANDS = ("serve", "config", "publish", "keygen", "token", "tail", "demo")
_CONFIG_PREFIXES = ("RANGER_", "RABBITMQ_", "JWT_", "RANGO_RBAC_", "METRICS_", "API_CORS_", "LOG_")
_CONFIG_NAMES = ("PORT", "WEB_CONCURRENCY", "CLOUDAMQP_URL", "AMQP_URL")


@pytest.fixture(autouse=True)
def environ(tmp_path: Path) -> Iterator[None]:
    """No configuration variable from outside, HOME in a temporary directory; restored after."""
    saved = dict(os.environ)
    for name in list(os.environ):
        if name.startswith(_CONFIG_PREFIXES) or name in _CONFIG_NAMES:
            del os.environ[name]
    os.environ["HOME"] = str(tmp_path / "home")
    yield
    os.environ.clear()
    os.environ.update(saved)


def run(*argv: str) -> int:
    return cli.main(list(argv))


def usage_error(*argv: str) -> int:
    with pytest.raises(SystemExit) as stopped:
        cli.main(list(argv))
    code = stopped.value.code
    assert isinstance(code, int)
    return code


# the parser


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert usage_error(command, "--help") == 0
    assert f"usage: ranger-py {command}" in capsys.readouterr().out


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert usage_error("--help") == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert f"    {command} " in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert usage_error("--version") == 0
    assert capsys.readouterr().out.strip() == f"ranger-py {__version__}"


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param([], id="no command"),
        pytest.param(["launch"], id="unknown command"),
        pytest.param(["config", "extra"], id="extra argument"),
        pytest.param(["serve", "--port", "0"], id="port 0"),
        pytest.param(["serve", "--port", "65536"], id="port too high"),
        pytest.param(["serve", "--port", "http"], id="port not a number"),
        pytest.param(["serve", "--workers", "0"], id="no workers"),
        pytest.param(["publish"], id="publish without routing key"),
        pytest.param(["publish", "a", "{}", "more"], id="publish with two bodies"),
        pytest.param(["token"], id="token without uid"),
        pytest.param(["token", "--uid", "ID1", "--ttl", "1y"], id="ttl unit"),
        pytest.param(["token", "--uid", "ID1", "--alg", "HS256"], id="token alg"),
        pytest.param(["keygen", "--alg", "RS512"], id="keygen alg"),
        pytest.param(["tail"], id="tail without streams"),
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert usage_error(*argv) == 2
    assert "usage: ranger-py" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("3600", 3600),
        ("90s", 90),
        ("15m", 900),
        ("1h", 3600),
        ("7d", 604800),
        ("-1h", -3600),
        ("+2m", 120),
        (" 5s ", 5),
    ],
)
def test_duration(text: str, seconds: int) -> None:
    assert cli.duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "1.5h", "1 h", "1y", "--1h", "1hh"])
def test_duration_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        cli.duration(text)


def test_module_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ranger_py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ranger-py")


# serve


class Exec(Exception):
    """Raised in place of os.execv, carrying what would have been run."""


@pytest.fixture
def execv(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    calls: list[list[str]] = []

    def fake(path: str, argv: list[str]) -> None:
        calls.append([path, *argv])
        raise Exec

    monkeypatch.setattr(os, "execv", fake)
    return calls


def test_serve_runs_gunicorn_with_the_package_config(execv: list[list[str]]) -> None:
    with pytest.raises(Exec):
        run("serve")
    conf = REPO / "ranger_py" / "gunicorn_conf.py"
    assert execv == [[sys.executable, sys.executable, "-m", "gunicorn", "-c", str(conf)]]
    for variable in ("RANGER_HOST", "RANGER_PORT", "WEB_CONCURRENCY", "RANGER_DEMO"):
        assert variable not in os.environ  # the environment's own values stand


def test_serve_flags_override_the_environment(execv: list[list[str]]) -> None:
    os.environ.update(RANGER_HOST="0.0.0.0", RANGER_PORT="8080", WEB_CONCURRENCY="1")
    with pytest.raises(Exec):
        run("serve", "--host", "127.0.0.1", "--port", "9000", "--workers", "3")
    assert os.environ["RANGER_HOST"] == "127.0.0.1"
    assert os.environ["RANGER_PORT"] == "9000"
    assert os.environ["WEB_CONCURRENCY"] == "3"


def test_serve_port_flag_wins_over_heroku_port(execv: list[list[str]]) -> None:
    os.environ["PORT"] = "5000"
    with pytest.raises(Exec):
        run("serve", "--port", "9000")
    assert os.environ["RANGER_PORT"] == "9000"


@pytest.mark.parametrize("workers", [None, "1"])
def test_serve_demo_forces_one_worker(execv: list[list[str]], workers: str | None) -> None:
    os.environ["WEB_CONCURRENCY"] = "4"
    with pytest.raises(Exec):
        run("serve", "--demo", *(["--workers", workers] if workers else []))
    assert os.environ["RANGER_DEMO"] == "on"
    assert os.environ["WEB_CONCURRENCY"] == "1"


def test_serve_demo_with_more_workers_is_a_usage_error(
    execv: list[list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("serve", "--demo", "--workers", "2") == 2
    assert "--demo runs a single worker" in capsys.readouterr().err
    assert execv == []
    assert "RANGER_DEMO" not in os.environ


# config


def test_config_prints_the_effective_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    os.environ.update(RABBITMQ_PASSWORD="s3cret", RANGER_PORT="9000")
    assert run("config") == 0
    out = capsys.readouterr().out
    assert out.startswith("# ranger-py effective configuration (secrets masked)")
    assert "RANGER_PORT" in out and "9000" in out
    assert "s3cret" not in out


def test_config_names_every_invalid_variable(capsys: pytest.CaptureFixture[str]) -> None:
    os.environ.update(
        RANGER_PORT="abc",
        LOG_LEVEL="loud",
        RABBITMQ_URL="http://user:s3cret@broker.example/",
        JWT_PUBLIC_KEY="not base64!",
    )
    assert run("config") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    named = [line.split(": ")[2] for line in lines]
    assert named == ["RANGER_PORT", "RABBITMQ_URL", "LOG_LEVEL", "JWT_PUBLIC_KEY"], lines
    assert all(line.startswith("ranger-py: invalid configuration: ") for line in lines)
    assert "s3cret" not in captured.err


def test_config_errors_lists_nothing_for_a_valid_environment() -> None:
    assert config_errors({"RANGER_PORT": "9000", "RANGO_RBAC_ADMIN": "admin"}) == []


def test_config_errors_checks_only_the_variable_in_use() -> None:
    # RANGER_PORT wins, so PORT is never read (as startup does).
    assert config_errors({"RANGER_PORT": "9000", "PORT": "abc"}) == []
    assert [error.variable for error in config_errors({"PORT": "abc"})] == ["PORT"]


def test_config_errors_names_every_bad_rbac_variable() -> None:
    errors = config_errors(
        {"RANGO_RBAC_": "admin", "RANGO_RBAC_A.B": "admin", "RANGO_RBAC_OK": "x"}
    )
    assert [error.variable for error in errors] == ["RANGO_RBAC_", "RANGO_RBAC_A.B"]


def test_config_errors_finds_rbac_prefix_clashes() -> None:
    errors = config_errors({"RANGO_RBAC_ADMIN": "a", "RANGO_RBAC_admin": "b"})
    assert [error.variable for error in errors] == ["RANGO_RBAC_admin"]


def test_config_errors_reads_the_key_as_startup_does() -> None:
    private_pem = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    errors = config_errors({"JWT_PUBLIC_KEY": base64.b64encode(private_pem).decode()})
    assert [error.variable for error in errors] == ["JWT_PUBLIC_KEY"]
    assert "public key" in str(errors[0])


def test_config_errors_key_and_algorithm_mismatch() -> None:
    public = keygen("EdDSA")
    errors = config_errors({"JWT_PUBLIC_KEY": public, "JWT_ALGORITHM": "RS256"})
    assert [error.variable for error in errors] == ["JWT_ALGORITHM"]


def test_config_errors_includes_checks_across_settings() -> None:
    errors = config_errors({"RANGER_DEMO": "on", "WEB_CONCURRENCY": "2"})
    assert [error.variable for error in errors] == ["RANGER_DEMO"]


# publish


def test_publish_refuses_a_body_that_is_not_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("publish", "public.btcusd.trades", "{bad") == 2
    err = capsys.readouterr().err
    assert "usage: ranger-py publish" in err
    assert "the body is not valid JSON" in err


@pytest.mark.parametrize("argv", [["public.btcusd.trades"], ["public.btcusd.trades", "-"]])
def test_publish_reads_the_body_from_stdin(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"not json\n")))
    assert run("publish", *argv) == 2
    assert "the body is not valid JSON" in capsys.readouterr().err


def test_publish_with_invalid_configuration_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    os.environ["RABBITMQ_PORT"] = "amqp"
    assert run("publish", "public.btcusd.trades", '{"n":1}') == 1
    assert "invalid configuration: RABBITMQ_PORT" in capsys.readouterr().err


# keygen and token


def keygen(algorithm: str, *extra: str) -> str:
    """Run keygen; return the JWT_PUBLIC_KEY value it prints."""
    stdout = io.StringIO()
    old, sys.stdout = sys.stdout, stdout
    try:
        assert cli.main(["keygen", "--alg", algorithm, *extra]) == 0
    finally:
        sys.stdout = old
    line = stdout.getvalue().strip()
    assert line.startswith("export JWT_PUBLIC_KEY=")
    return line.removeprefix("export JWT_PUBLIC_KEY=")


def token(*argv: str) -> str:
    stdout = io.StringIO()
    old, sys.stdout = sys.stdout, stdout
    try:
        assert cli.main(["token", *argv]) == 0
    finally:
        sys.stdout = old
    return stdout.getvalue().strip()


def verify(public_env: str, token_text: str, **options: Any) -> dict[str, Any]:
    loaded = load_verify_key(public_env)
    assert loaded is not None
    key, algorithm = loaded
    claims: dict[str, Any] = jwt.decode(
        token_text, key, algorithms=[algorithm], audience="peatio", issuer="barong", **options
    )
    return claims


@pytest.mark.parametrize("algorithm", cli.ALGORITHMS)
def test_keygen_key_signs_tokens_the_server_accepts(algorithm: str) -> None:
    public = keygen(algorithm)
    key_file = cli.default_key_dir() / f"jwt-{algorithm.lower()}.pem"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert key_file.parent.stat().st_mode & 0o777 == 0o700
    assert key_file.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    claims = verify(public, token("--uid", "IDABC0000001", "--alg", algorithm))
    assert claims["uid"] == "IDABC0000001"


def test_token_has_barongs_claims() -> None:
    public = keygen("RS256")
    text = token("--uid", "IDABC0000001", "--role", "admin", "--ttl", "15m", "--level", "2")
    assert jwt.get_unverified_header(text)["alg"] == "RS256"
    claims = verify(public, text)
    assert set(claims) == {
        "iat",
        "exp",
        "sub",
        "iss",
        "aud",
        "jti",
        "uid",
        "email",
        "role",
        "level",
        "state",
    }
    assert claims["exp"] - claims["iat"] == 900
    assert claims["sub"] == "session"
    assert claims["iss"] == "barong"
    assert claims["aud"] == ["peatio", "barong"]
    assert claims["role"] == "admin"
    assert claims["level"] == 2
    assert claims["state"] == "active"
    assert claims["email"] == "idabc0000001@example.com"
    assert claims["jti"] != verify(public, token("--uid", "IDABC0000001"))["jti"]


def test_token_with_negative_ttl_is_expired() -> None:
    public = keygen("EdDSA")
    text = token("--uid", "IDABC0000001", "--ttl=-1h")
    with pytest.raises(jwt.ExpiredSignatureError):
        verify(public, text)
    claims = verify(public, text, options={"verify_exp": False})
    assert claims["exp"] - claims["iat"] == -3600


def test_token_uses_the_key_given(tmp_path: Path) -> None:
    public = keygen("ES256", "--out", str(tmp_path / "keys"))
    assert not cli.default_key_dir().exists()
    text = token("--uid", "ID1", "--key", str(tmp_path / "keys" / "jwt-es256.pem"))
    assert jwt.get_unverified_header(text)["alg"] == "ES256"
    assert verify(public, text)["uid"] == "ID1"


def test_token_without_alg_takes_the_key_keygen_made() -> None:
    public = keygen("EdDSA")
    text = token("--uid", "ID1")
    assert jwt.get_unverified_header(text)["alg"] == "EdDSA"
    verify(public, text)


def test_keygen_keeps_an_existing_key_unless_forced() -> None:
    first = keygen("RS256")
    assert keygen("RS256") == first
    assert keygen("RS256", "--force") != first


def test_token_without_a_key_says_how_to_make_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("token", "--uid", "ID1") == 1
    err = capsys.readouterr().err
    assert "ranger-py keygen" in err
    assert "--key" in err


def test_token_with_an_unreadable_key_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("token", "--uid", "ID1", "--key", str(tmp_path / "missing.pem")) == 1
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    assert run("token", "--uid", "ID1", "--key", str(junk)) == 1
    err = capsys.readouterr().err
    assert "cannot read the key" in err
    assert "not an unencrypted PEM private key" in err


def test_token_alg_must_fit_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    keygen("EdDSA")
    key = cli.default_key_dir() / "jwt-eddsa.pem"
    assert run("token", "--uid", "ID1", "--key", str(key), "--alg", "RS256") == 2
    assert "does not fit" in capsys.readouterr().err


# tail


def test_tail_private_needs_a_token(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("tail", "--private", "order") == 2
    assert "--private needs --token" in capsys.readouterr().err


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "127.0.0.1:8080", "ws://", "ws://h:x"])
def test_tail_refuses_a_url_that_is_not_a_websocket(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("tail", "--url", url, "btcusd.trades") == 2
    assert "--url" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["btcusd.trades", "global.tickers"],
            (
                "127.0.0.1:8080",
                "127.0.0.1",
                8080,
                False,
                "/public?stream=btcusd.trades&stream=global.tickers",
            ),
        ),
        (
            ["--private", "--token", "t", "order"],
            ("127.0.0.1:8080", "127.0.0.1", 8080, False, "/private?stream=order"),
        ),
        (
            ["--url", "wss://exchange.example/ranger/", "a.b"],
            ("exchange.example", "exchange.example", 443, True, "/ranger/public?stream=a.b"),
        ),
        (
            ["--url", "ws://[::1]:9000", "a&b"],
            ("[::1]:9000", "::1", 9000, False, "/public?stream=a%26b"),
        ),
    ],
)
def test_tail_request(argv: list[str], expected: tuple[str, str, int, bool, str]) -> None:
    args = cli.build_parser().parse_args(["tail", *argv])
    assert cli._tail_target(args) == expected


# demo


def fake_demo(monkeypatch: pytest.MonkeyPatch) -> list[argparse.Namespace]:
    calls: list[argparse.Namespace] = []
    module = types.ModuleType("ranger_py.demo")

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--rate", type=float, default=20.0)

    def run_demo(args: argparse.Namespace) -> int:
        calls.append(args)
        return 3

    module.add_arguments = add_arguments  # type: ignore[attr-defined]
    module.run = run_demo  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ranger_py.demo", module)
    return calls


def test_demo_is_wired_to_the_demo_module(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_demo(monkeypatch)
    assert run("demo", "--rate", "5") == 3
    assert [args.rate for args in calls] == [5.0]


def test_demo_module_is_imported_only_for_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "ranger_py.demo", raising=False)
    cli.build_parser()
    assert "ranger_py.demo" not in sys.modules


def test_demo_without_its_module_fails_clearly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ranger_py.demo", None)  # import raises ModuleNotFoundError
    assert run("demo", "--rate", "5") == 1
    assert "no module ranger_py.demo" in capsys.readouterr().err

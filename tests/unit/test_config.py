"""Tests for ranger_py.config: defaults, validation, precedence, masking and the printer."""

from __future__ import annotations

import base64
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from ranger_py.config import Config, env_table_markdown, main, mask_url, settings
from ranger_py.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

DEFAULTS: dict[str, object] = {
    "host": "0.0.0.0",
    "port": 8080,
    "workers": 1,
    "rabbitmq_host": "localhost",
    "rabbitmq_port": 5672,
    "rabbitmq_user": "guest",
    "rabbitmq_password": "guest",
    "rabbitmq_vhost": "/",
    "rabbitmq_url": None,
    "exchange": "peatio.events.ranger",
    "jwt_public_key": None,
    "jwt_algorithm": None,
    "jwt_issuer": None,
    "jwt_audience": (),
    "jwt_default_leeway": 0,
    "jwt_issued_at_leeway": None,
    "jwt_expiration_leeway": None,
    "jwt_not_before_leeway": None,
    "token_expiry": "ignore",
    "cors_origins": None,
    "rbac": {},
    "log_level": "INFO",
    "log_format": "text",
    "graceful_timeout": 30,
    "metrics_host": "0.0.0.0",
    "metrics_port": 4242,
    "max_message_size": 4096,
    "send_queue_size": 256,
    "send_queue_bytes": 4194304,
    "client_rate": 10.0,
    "client_burst": 100,
    "send_buffer": 262144,
    "ping_interval": 54.0,
    "pong_timeout": 60.0,
    "write_timeout": 10.0,
    "max_streams": 100,
    "orderbook_max_increments": 10000,
    "max_connections": 10000,
    "max_handshakes": 10000,
    "handshake_timeout": 5,
    "broker_heartbeat": 4,
    "queue_max_length": 100000,
    "queue_expires": 60,
    "broker_routing": "all",
    "broker_books": ("ob",),
    "broker_unbind_delay": 30,
    "broker_prefetch": 1000,
    "compression": True,
    "compression_threshold": 1024,
    "demo": False,
}


def error(environ: dict[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        Config.from_env(environ)
    return info.value


def run_printer(environ: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    # A clean environment: only what the test sets (cwd puts ranger_py on sys.path for -m).
    return subprocess.run(
        [sys.executable, "-m", "ranger_py.config", *args],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# Defaults and the declarations


def test_fields_are_exactly_the_spec() -> None:
    assert [f.name for f in dataclasses.fields(Config)] == list(DEFAULTS)


@pytest.mark.parametrize(("attribute", "expected"), DEFAULTS.items())
def test_default(attribute: str, expected: object) -> None:
    assert getattr(Config.from_env({}), attribute) == expected
    assert getattr(Config(), attribute) == expected


def test_every_field_declares_a_setting() -> None:
    declared = settings()
    assert [name for name, _ in declared] == list(DEFAULTS)
    for _, setting in declared:
        assert setting.env
        assert setting.doc
        assert "\n" not in setting.doc


def test_config_is_frozen() -> None:
    config = Config.from_env({"RANGO_RBAC_ADMIN": "admin"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.rbac["admin"] = frozenset({"anyone"})  # type: ignore[index]


def test_unrelated_variables_are_ignored() -> None:
    assert Config.from_env({"HOME": "/root", "RANGO_RBACX": "a", "PORTS": "x"}) == Config()


# Values that are accepted

ACCEPTED = [
    ("RANGER_HOST", "127.0.0.1", "host", "127.0.0.1"),
    ("RANGER_PORT", "9000", "port", 9000),
    ("RANGER_PORT", " 9000 ", "port", 9000),
    ("RANGER_PORT", "65535", "port", 65535),
    ("WEB_CONCURRENCY", "4", "workers", 4),
    ("RABBITMQ_HOST", "rabbit", "rabbitmq_host", "rabbit"),
    ("RABBITMQ_PORT", "5673", "rabbitmq_port", 5673),
    ("RABBITMQ_USER", "peatio", "rabbitmq_user", "peatio"),
    ("RABBITMQ_PASSWORD", "s3cret", "rabbitmq_password", "s3cret"),
    ("RABBITMQ_VHOST", "test", "rabbitmq_vhost", "test"),
    ("RABBITMQ_URL", "amqps://u:p@h:5671/v", "rabbitmq_url", "amqps://u:p@h:5671/v"),
    ("RANGER_EXCHANGE", "other.exchange", "exchange", "other.exchange"),
    ("JWT_PUBLIC_KEY", "LS0tLS1CRUdJTg==", "jwt_public_key", "LS0tLS1CRUdJTg=="),
    ("JWT_ALGORITHM", "RS256", "jwt_algorithm", "RS256"),
    ("JWT_ALGORITHM", "eddsa", "jwt_algorithm", "EdDSA"),
    ("JWT_ISSUER", "barong", "jwt_issuer", "barong"),
    ("JWT_AUDIENCE", " peatio, ,barong ,", "jwt_audience", ("peatio", "barong")),
    ("JWT_DEFAULT_LEEWAY", "0", "jwt_default_leeway", 0),
    ("JWT_DEFAULT_LEEWAY", "30", "jwt_default_leeway", 30),
    ("JWT_ISSUED_AT_LEEWAY", "5", "jwt_issued_at_leeway", 5),
    ("JWT_EXPIRATION_LEEWAY", "6", "jwt_expiration_leeway", 6),
    ("JWT_NOT_BEFORE_LEEWAY", "7", "jwt_not_before_leeway", 7),
    ("JWT_NOT_BEFORE_LEEWAY", "0", "jwt_not_before_leeway", 0),
    ("RANGER_TOKEN_EXPIRY", "close", "token_expiry", "close"),
    ("RANGER_TOKEN_EXPIRY", " Close ", "token_expiry", "close"),
    ("RANGER_TOKEN_EXPIRY", "ignore", "token_expiry", "ignore"),
    ("METRICS_HOST", "127.0.0.1", "metrics_host", "127.0.0.1"),
    ("METRICS_PORT", "9100", "metrics_port", 9100),
    ("RANGER_MAX_MESSAGE_SIZE", "128", "max_message_size", 128),
    ("RANGER_SEND_QUEUE_SIZE", "1", "send_queue_size", 1),
    ("RANGER_PING_INTERVAL", "0.5", "ping_interval", 0.5),
    ("RANGER_PONG_TIMEOUT", "2", "pong_timeout", 2.0),
    ("RANGER_WRITE_TIMEOUT", "1e1", "write_timeout", 10.0),
    ("RANGER_MAX_STREAMS", "3", "max_streams", 3),
    ("RANGER_ORDERBOOK_MAX_INCREMENTS", "50", "orderbook_max_increments", 50),
    ("RANGER_MAX_CONNECTIONS", "2", "max_connections", 2),
    ("RANGER_QUEUE_MAX_LENGTH", "10", "queue_max_length", 10),
    ("RANGER_QUEUE_MAX_LENGTH", "1", "queue_max_length", 1),
    ("RANGER_QUEUE_EXPIRES", "1", "queue_expires", 1),
    ("RANGER_QUEUE_EXPIRES", "86400", "queue_expires", 86400),
    ("RANGER_BROKER_ROUTING", "all", "broker_routing", "all"),
    ("RANGER_BROKER_ROUTING", "subscribed", "broker_routing", "subscribed"),
    ("RANGER_BROKER_ROUTING", " Subscribed ", "broker_routing", "subscribed"),
    ("RANGER_BROKER_UNBIND_DELAY", "0", "broker_unbind_delay", 0),
    ("RANGER_BROKER_BOOKS", "ob, object", "broker_books", ("ob", "object")),
    ("RANGER_BROKER_PREFETCH", "1", "broker_prefetch", 1),
    ("RANGER_COMPRESSION", "off", "compression", False),
    ("RANGER_COMPRESSION_THRESHOLD", "0", "compression_threshold", 0),
    ("RANGER_BROKER_HEARTBEAT", "3", "broker_heartbeat", 3),
    ("RANGER_BROKER_HEARTBEAT", "600", "broker_heartbeat", 600),
]


@pytest.mark.parametrize(("variable", "raw", "attribute", "expected"), ACCEPTED)
def test_accepted_value(variable: str, raw: str, attribute: str, expected: object) -> None:
    value = getattr(Config.from_env({variable: raw}), attribute)
    assert value == expected
    assert type(value) is type(expected)


# Values that are refused: each error names the variable and says what is accepted

REJECTED = [
    ("RANGER_HOST", "   ", "is not a non-blank text"),
    ("RANGER_PORT", "abc", '"abc" is not an integer between 1 and 65535'),
    ("RANGER_PORT", "0", '"0" is not an integer between 1 and 65535'),
    ("RANGER_PORT", "65536", "between 1 and 65535"),
    ("RANGER_PORT", "80.0", "between 1 and 65535"),
    ("RANGER_PORT", "1_000", "between 1 and 65535"),
    ("PORT", "http", '"http" is not an integer between 1 and 65535'),
    ("WEB_CONCURRENCY", "0", '"0" is not an integer >= 1'),
    ("RABBITMQ_HOST", " ", "non-blank"),
    ("RABBITMQ_PORT", "-1", "between 1 and 65535"),
    ("RABBITMQ_URL", "http://rabbit:5672", "is not an AMQP URL"),
    ("RABBITMQ_URL", "amqp://rabbit:port/", "is not an AMQP URL"),
    ("CLOUDAMQP_URL", "rabbit", "is not an AMQP URL"),
    ("AMQP_URL", "redis://x", "is not an AMQP URL"),
    ("RANGER_EXCHANGE", "  ", "non-blank"),
    (
        "JWT_ALGORITHM",
        "HS256",
        '"HS256" is not one of RS256, RS384, RS512, ES256, ES384, ES512 or EdDSA',
    ),
    ("JWT_ALGORITHM", "none", "is not one of"),
    ("JWT_DEFAULT_LEEWAY", "-1", '"-1" is not an integer >= 0'),
    ("JWT_ISSUED_AT_LEEWAY", "soon", "is not an integer >= 0"),
    ("JWT_EXPIRATION_LEEWAY", "1.5", "is not an integer >= 0"),
    ("JWT_NOT_BEFORE_LEEWAY", "-3", "is not an integer >= 0"),
    ("JWT_ISSUED_AT_LEEWAY", "-1", '"-1" is not an integer >= 0'),
    ("JWT_EXPIRATION_LEEWAY", "-1", '"-1" is not an integer >= 0'),
    ("JWT_DEFAULT_LEEWAY", "inf", "is not an integer >= 0"),
    ("JWT_NOT_BEFORE_LEEWAY", "nan", "is not an integer >= 0"),
    ("RANGER_TOKEN_EXPIRY", "kill", '"kill" is not one of ignore or close'),
    ("RANGER_BROKER_ROUTING", "some", '"some" is not one of subscribed or all'),
    ("RANGER_BROKER_BOOKS", "ob,x.y", "without '.', '*', '#' or spaces"),
    ("RANGER_BROKER_BOOKS", "*", "without '.', '*', '#' or spaces"),
    ("RANGER_BROKER_UNBIND_DELAY", "-1", '"-1" is not an integer between 0 and 86400'),
    ("API_CORS_ORIGINS", "https://ex ample.org", '"https://ex ample.org" is not an origin'),
    ("API_CORS_ORIGINS", "https://ex:ample.org", '"https://ex:ample.org" is not an origin'),
    ("API_CORS_ORIGINS", "example.org,https://", '"https://" is not an origin'),
    ("API_CORS_ORIGINS", "ftp://x", '"ftp://x": only http and https origins can be allowed'),
    ("API_CORS_ORIGINS", "ws://x.org", "only http and https origins"),
    ("API_CORS_ORIGINS", "example.org/app", '"example.org/app" is not an origin'),
    ("API_CORS_ORIGINS", " , ,", "lists no origin"),
    ("RANGER_SEND_QUEUE_BYTES", "1000", "an integer >= 65536"),
    ("RANGER_CLIENT_RATE", "0", '"0" is not a number > 0'),
    ("RANGER_CLIENT_RATE", "nan", "is not a number > 0"),
    ("RANGER_CLIENT_BURST", "0", "an integer >= 1"),
    ("RANGER_MAX_HANDSHAKES", "0", "an integer >= 1"),
    ("RANGER_HANDSHAKE_TIMEOUT", "0.5", "an integer between 1 and 300"),
    ("RANGER_BROKER_HEARTBEAT", "2", "an integer between 3 and 600"),
    ("RANGER_BROKER_HEARTBEAT", "601", "an integer between 3 and 600"),
    ("RANGER_BROKER_HEARTBEAT", "2.5", "an integer between 3 and 600"),
    ("LOG_LEVEL", "verbose", '"verbose" is not one of trace, debug, info, warn, warning'),
    ("LOG_FORMAT", "yaml", '"yaml" is not one of text or json'),
    ("RANGER_GRACEFUL_TIMEOUT", "0", "is not an integer >= 1"),
    ("METRICS_HOST", "  ", "non-blank"),
    ("METRICS_PORT", "70000", "between 1 and 65535"),
    ("RANGER_MAX_MESSAGE_SIZE", "127", '"127" is not an integer >= 128'),
    ("RANGER_SEND_QUEUE_SIZE", "0", "is not an integer >= 1"),
    ("RANGER_SEND_BUFFER", "-1", '"-1" is not an integer >= 0'),
    ("RANGER_PING_INTERVAL", "0", '"0" is not a number of seconds > 0'),
    ("RANGER_PING_INTERVAL", "fast", "is not a number of seconds > 0"),
    ("RANGER_PONG_TIMEOUT", "-5", "is not a number of seconds > 0"),
    ("RANGER_WRITE_TIMEOUT", "inf", "is not a number of seconds > 0"),
    ("RANGER_WRITE_TIMEOUT", "nan", "is not a number of seconds > 0"),
    ("RANGER_MAX_STREAMS", "none", "is not an integer >= 1"),
    ("RANGER_ORDERBOOK_MAX_INCREMENTS", "0", "is not an integer >= 1"),
    ("RANGER_MAX_CONNECTIONS", "many", "is not an integer >= 1"),
    ("RANGER_QUEUE_MAX_LENGTH", "-10", "is not an integer >= 1"),
    ("RANGER_QUEUE_EXPIRES", "0", '"0" is not an integer between 1 and 86400'),
    ("RANGER_QUEUE_EXPIRES", "90000", "between 1 and 86400"),
    ("RANGER_BROKER_PREFETCH", "0", '"0" is not an integer between 1 and 65535'),
    ("RANGER_BROKER_PREFETCH", "65536", "between 1 and 65535"),
    ("RANGER_QUEUE_MAX_LENGTH", "0", '"0" is not an integer >= 1'),
    ("RANGER_DEMO", "yes", '"yes" is not one of on, off, true, false, 1 or 0'),
    ("RANGER_COMPRESSION", "deflate", '"deflate" is not one of on, off, true, false, 1 or 0'),
    ("RANGER_COMPRESSION_THRESHOLD", "-1", '"-1" is not an integer >= 0'),
]


@pytest.mark.parametrize(("variable", "raw", "problem"), REJECTED)
def test_rejected_value_names_the_variable(variable: str, raw: str, problem: str) -> None:
    exc = error({variable: raw})
    assert exc.variable == variable
    assert problem in exc.problem
    assert str(exc).startswith(f"{variable}: ")


def test_every_validating_setting_has_a_rejection_case() -> None:
    anything_goes = {
        "RABBITMQ_USER",
        "RABBITMQ_PASSWORD",
        "RABBITMQ_VHOST",
        "JWT_PUBLIC_KEY",
        "JWT_ISSUER",
        "JWT_AUDIENCE",
        "RANGO_RBAC_",
    }
    tested = {variable for variable, _, _ in REJECTED}
    for _, setting in settings():
        if setting.env[0] not in anything_goes:
            assert tested.intersection(setting.env), setting.env


# Empty values count as unset (Rango's getEnv)


@pytest.mark.parametrize(
    "variable", [env for _, setting in settings() if not setting.family for env in setting.env]
)
def test_empty_value_is_unset(variable: str) -> None:
    assert Config.from_env({variable: ""}) == Config()


def test_empty_rbac_variable_is_unset() -> None:
    # Rango turned it into the role "", which let anonymous clients in.
    assert Config.from_env({"RANGO_RBAC_ADMIN": ""}).rbac == {}


# Fallback variables


def test_port_falls_back_to_heroku_port() -> None:
    assert Config.from_env({"PORT": "5000"}).port == 5000


def test_ranger_port_wins_over_port() -> None:
    assert Config.from_env({"RANGER_PORT": "6000", "PORT": "5000"}).port == 6000


def test_empty_ranger_port_falls_back_to_port() -> None:
    assert Config.from_env({"RANGER_PORT": "", "PORT": "5000"}).port == 5000


def test_unused_fallback_is_not_validated() -> None:
    assert Config.from_env({"RANGER_PORT": "6000", "PORT": "x"}).port == 6000


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"AMQP_URL": "amqp://c"}, "amqp://c"),
        ({"CLOUDAMQP_URL": "amqp://b", "AMQP_URL": "amqp://c"}, "amqp://b"),
        (
            {"RABBITMQ_URL": "amqp://a", "CLOUDAMQP_URL": "amqp://b", "AMQP_URL": "amqp://c"},
            "amqp://a",
        ),
        ({"RABBITMQ_URL": "", "CLOUDAMQP_URL": "amqp://b"}, "amqp://b"),
    ],
)
def test_rabbitmq_url_precedence(environ: dict[str, str], expected: str) -> None:
    config = Config.from_env({**environ, "RABBITMQ_HOST": "ignored"})
    assert config.rabbitmq_url == expected
    assert config.amqp_url == expected


# The AMQP URL


def test_amqp_url_default() -> None:
    assert Config().amqp_url == "amqp://guest:guest@localhost:5672/%2F"


@pytest.mark.parametrize(("vhost", "path"), [("/", "%2F"), ("test", "test")])
def test_amqp_url_escapes_user_password_and_vhost(vhost: str, path: str) -> None:
    config = Config.from_env(
        {
            "RABBITMQ_USER": "a@b",
            "RABBITMQ_PASSWORD": "p:w/d",
            "RABBITMQ_HOST": "rabbit",
            "RABBITMQ_PORT": "5673",
            "RABBITMQ_VHOST": vhost,
        }
    )
    assert config.amqp_url == f"amqp://a%40b:p%3Aw%2Fd@rabbit:5673/{path}"


# API_CORS_ORIGINS (Rango's TestCheckSameOriginDomainsSetup / BadConfiguration)


@pytest.mark.parametrize(
    "raw",
    [
        "example.org,example.com",
        "example.org, example.com",
        " example.org ,  example.com ",
        "https://example.org,https://example.com",
        "https://example.org, https://example.com",
        "example.org, https://example.com",
        "http://Example.org/,HTTPS://EXAMPLE.COM",
    ],
)
def test_cors_origins_hosts(raw: str) -> None:
    assert Config.from_env({"API_CORS_ORIGINS": raw}).cors_origins == (
        "example.org",
        "example.com",
    )


def test_cors_origins_keep_port_drop_userinfo_and_path() -> None:
    raw = "https://user:pw@example.org:8443/app?x=1, http://[::1]:8080"
    assert Config.from_env({"API_CORS_ORIGINS": raw}).cors_origins == (
        "example.org:8443",
        "[::1]:8080",
    )


def test_cors_origins_ignore_empty_entries() -> None:
    # Rango kept an empty entry, which "Origin: null" (a sandboxed page) matched: a trailing
    # comma let every such page in. Empty entries are ignored; hosts stay, lowercased.
    raw = "Example.ORG:8080,null,, "
    assert Config.from_env({"API_CORS_ORIGINS": raw}).cors_origins == ("example.org:8080", "null")


def test_cors_origins_star_means_any_and_warns() -> None:
    config = Config.from_env({"API_CORS_ORIGINS": "*"})
    assert config.cors_origins == ("*",)
    assert config.warnings() == [
        "API_CORS_ORIGINS=*: web pages of every origin may open websockets here;"
        " list the exchange's own origins instead"
    ]
    assert Config.from_env({"API_CORS_ORIGINS": "example.org"}).warnings() == []


# RANGO_RBAC_<PREFIX> (Rango's TestRango_envToMatrix)


def test_rbac_matrix() -> None:
    config = Config.from_env(
        {
            "RANGO_RBAC_HELLO": "world",
            "RANGO_RBAC_ONE": "TWO,three,four",
            "RANGO_RBAC_FOO": "bar",
            "OTHER_ONE": "x",
        }
    )
    assert dict(config.rbac) == {
        "hello": frozenset({"world"}),
        "one": frozenset({"TWO", "three", "four"}),
        "foo": frozenset({"bar"}),
    }


def test_rbac_roles_are_trimmed_and_empties_dropped() -> None:
    config = Config.from_env({"RANGO_RBAC_Admin": " admin , superadmin,, "})
    assert dict(config.rbac) == {"admin": frozenset({"admin", "superadmin"})}


@pytest.mark.parametrize(
    ("environ", "variable", "problem"),
    [
        ({"RANGO_RBAC_": "admin"}, "RANGO_RBAC_", "stream prefix"),
        ({"RANGO_RBAC_A.B": "admin"}, "RANGO_RBAC_A.B", "stream prefix"),
        (
            {"RANGO_RBAC_ADMIN": "admin", "RANGO_RBAC_admin": "x"},
            "RANGO_RBAC_admin",
            "same stream prefix as RANGO_RBAC_ADMIN",
        ),
    ],
)
def test_rbac_rejections(environ: dict[str, str], variable: str, problem: str) -> None:
    exc = error(environ)
    assert exc.variable == variable
    assert problem in exc.problem


# LOG_LEVEL


@pytest.mark.parametrize(
    ("raw", "level"),
    [
        ("trace", "DEBUG"),
        ("debug", "DEBUG"),
        ("info", "INFO"),
        ("INFO", "INFO"),
        ("warn", "WARNING"),
        ("Warning", "WARNING"),
        ("error", "ERROR"),
        ("fatal", "CRITICAL"),
        ("critical", "CRITICAL"),
        ("panic", "CRITICAL"),
        (" debug ", "DEBUG"),
    ],
)
def test_log_level_mapping(raw: str, level: str) -> None:
    assert Config.from_env({"LOG_LEVEL": raw}).log_level == level


@pytest.mark.parametrize("raw", ["verbose", "notice", "10", "disabled"])
def test_log_level_rejection(raw: str) -> None:
    exc = error({"LOG_LEVEL": raw})
    assert exc.variable == "LOG_LEVEL"
    assert exc.problem.endswith("warn, warning, error, fatal, critical or panic")


# Masking


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("amqp://user:pw@host:5672/v", "amqp://user:***@host:5672/v"),
        ("amqps://user:p%40w@host/%2F?heartbeat=10", "amqps://user:***@host/%2F?heartbeat=10"),
        ("amqp://user:p@w@host", "amqp://user:***@host"),
        ("amqp://user@host", "amqp://user@host"),
        ("amqp://host:5672", "amqp://host:5672"),
        ("amqp://user:p/w?x#y@host/vh", "amqp://user:***@host/vh"),
        ("amqp://host/a:b@c", "amqp://host/a:***@c"),
        ("not a url", "not a url"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def described(config: Config) -> dict[str, str]:
    return {variable: value for variable, value, _ in config.describe()}


def test_describe_masks_the_password() -> None:
    rows = described(Config.from_env({"RABBITMQ_PASSWORD": "hunter2", "RABBITMQ_USER": "bob"}))
    assert rows["RABBITMQ_PASSWORD"] == "***"
    assert rows["RABBITMQ_USER"] == "bob"
    assert "hunter2" not in repr(rows)


def test_describe_masks_the_url_password() -> None:
    config = Config.from_env({"CLOUDAMQP_URL": "amqps://bob:hunter2@rabbit/vh"})
    assert described(config)["RABBITMQ_URL"] == "amqps://bob:***@rabbit/vh"
    assert "hunter2" not in repr(config.describe())


def test_describe_never_shows_the_key_even_a_private_one() -> None:
    pasted = "LS0tLS1CRUdJTiBQUklWQVRFIEtFWS0tLS0tCk1JSUV2Z0lCQURBTkJna3Foa2lHOXcwQkFRRUZBQVND"
    rows = described(Config.from_env({"JWT_PUBLIC_KEY": pasted}))
    shown = rows["JWT_PUBLIC_KEY"]
    assert shown.startswith(f"*** ({len(pasted)} characters, sha256 ")
    assert pasted[:8] not in shown
    again = described(Config.from_env({"JWT_PUBLIC_KEY": pasted}))["JWT_PUBLIC_KEY"]
    assert again == shown  # the same key always shows the same fingerprint


def test_describe_lists_every_setting_with_its_doc() -> None:
    rows = Config().describe()
    assert [variable for variable, _, _ in rows] == [setting.name for _, setting in settings()]
    assert all(doc for _, _, doc in rows)
    values = dict((variable, value) for variable, value, _ in rows)
    assert values["RANGER_PORT"] == "8080"
    assert values["JWT_PUBLIC_KEY"] == "unset"
    assert values["RANGO_RBAC_<PREFIX>"] == "none"


def test_describe_gives_one_row_per_rbac_prefix() -> None:
    rows = described(Config.from_env({"RANGO_RBAC_ADMIN": "b,a", "RANGO_RBAC_OPS": "ops"}))
    assert rows["RANGO_RBAC_ADMIN"] == "a,b"
    assert rows["RANGO_RBAC_OPS"] == "ops"
    assert "RANGO_RBAC_<PREFIX>" not in rows


def test_bad_url_error_does_not_show_the_password() -> None:
    exc = error({"RABBITMQ_URL": "http://bob:hunter2@rabbit"})
    assert "hunter2" not in str(exc)
    assert '"http://bob:***@rabbit" is not an AMQP URL' in exc.problem


# The README table


def test_env_table_markdown() -> None:
    lines = env_table_markdown().splitlines()
    assert lines[0] == "| Variable | Default | Accepted | Description |"
    rows = lines[2:]
    assert len(rows) == len(settings())
    assert all(row.count(" | ") == 3 for row in rows)
    port = next(row for row in rows if row.startswith("| `RANGER_PORT`"))
    assert port.startswith("| `RANGER_PORT`, else `PORT` | `8080` | an integer between 1 and 65535")
    password = next(row for row in rows if row.startswith("| `RABBITMQ_PASSWORD`"))
    assert "| `guest` |" in password
    rbac = next(row for row in rows if row.startswith("| `RANGO_RBAC_<PREFIX>`"))
    assert "\\<prefix\\>" in rbac


# The printer


def test_main_prints_masked_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    environ = {"RABBITMQ_PASSWORD": "hunter2", "RANGER_PORT": "9999"}
    assert main(environ) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "hunter2" not in out
    assert "RABBITMQ_PASSWORD" in out
    assert "amqp://guest:***@localhost:5672/%2F" in out
    assert any(line.split()[:2] == ["RANGER_PORT", "9999"] for line in out.splitlines())


def test_main_reports_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main({"RANGER_PORT": "abc"}) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        'ranger-py: invalid configuration: RANGER_PORT: "abc" is not an integer '
        "between 1 and 65535\n"
    )


def test_module_printer_subprocess() -> None:
    result = run_printer(
        {"RABBITMQ_PASSWORD": "hunter2", "AMQP_URL": "amqp://bob:s3cr3t@rabbit:5672/vh"}
    )
    assert result.returncode == 0, result.stderr
    assert "RABBITMQ_PASSWORD" in result.stdout
    assert "amqp://bob:***@rabbit:5672/vh" in result.stdout
    assert "hunter2" not in result.stdout
    assert "s3cr3t" not in result.stdout


def test_printer_checks_the_key_as_startup_does(capsys: pytest.CaptureFixture[str]) -> None:
    private_pem = base64.b64encode(b"-----BEGIN PRIVATE KEY-----\nAA\n-----END PRIVATE KEY-----\n")
    assert main({"JWT_PUBLIC_KEY": private_pem.decode()}) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "ranger-py: invalid configuration: JWT_PUBLIC_KEY: holds a PRIVATE KEY;"
        " it must be the public key\n"
    )
    assert main({"JWT_PUBLIC_KEY": "not base64!"}) == 2
    assert "JWT_PUBLIC_KEY: is not valid base64" in capsys.readouterr().err


def test_module_check_prints_only_errors() -> None:
    assert run_printer({"RANGER_PORT": "9999"}, "--check").stdout == ""
    assert run_printer({"RANGER_PORT": "9999"}, "--check").returncode == 0
    bad = run_printer({"JWT_PUBLIC_KEY": "not base64!"}, "--check")
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr == "ranger-py: invalid configuration: JWT_PUBLIC_KEY: is not valid base64\n"


def test_module_printer_subprocess_bad_value() -> None:
    result = run_printer({"METRICS_PORT": "0"})
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("ranger-py: invalid configuration: METRICS_PORT: ")


def test_readme_table_is_the_declared_settings() -> None:
    # The README's configuration table is generated from the declarations; keep it in step.
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert env_table_markdown() in readme

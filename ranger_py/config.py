"""The configuration: one frozen :class:`Config` built from the environment.

This module is the only reader of ``os.environ``. Every setting is declared once, on its
:class:`Config` field, as a :class:`Setting`: the variable(s) it is read from, what it accepts (the
parser that checks it), its default (the field default) and a one-line doc. :meth:`Config.from_env`,
:meth:`Config.describe`, :func:`env_table_markdown` (the README table) and the printer all walk
those declarations, so they cannot drift apart.

Rules shared by every variable (PROTOCOL §1):

* an empty value counts as unset, as in Rango's ``getEnv``;
* an invalid value raises :class:`~ranger_py.errors.ConfigError` naming the variable and saying
  what is accepted; nothing is silently replaced by a default.

``python -m ranger_py.config`` prints the effective configuration with secrets masked, or the
error and exit status 2; with ``--check`` it prints only the error.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

from ranger_py.errors import ConfigError
from ranger_py.jwt_algorithms import JWT_ALGORITHMS

__all__ = [
    "ANY_ORIGIN",
    "Config",
    "Parser",
    "Setting",
    "env_table_markdown",
    "main",
    "mask_url",
    "settings",
]

_T = TypeVar("_T")

MASK = "***"
_META_KEY = "ranger_py.setting"


# The lowest RANGER_BROKER_HEARTBEAT. The consumer's loop wakes up when a drain of its connection
# times out (consumer.Timings.safety_interval, 1 s), and every frame restarts py-amqp's drain
# timeout: the broker sends a heartbeat every heartbeat/2 s, so below this the loop could go on
# draining heartbeats without ever waking up.
MIN_BROKER_HEARTBEAT = 3

# LOG_LEVEL takes Rango's zerolog names and Python's; values are the logging level names.
LOG_LEVELS = {
    "trace": "DEBUG",  # zerolog's level below debug; logging has none
    "debug": "DEBUG",
    "info": "INFO",
    "warn": "WARNING",
    "warning": "WARNING",
    "error": "ERROR",
    "fatal": "CRITICAL",
    "critical": "CRITICAL",
    "panic": "CRITICAL",
}


def _hide(text: str) -> str:
    return MASK


def _fingerprint(text: str) -> str:
    """Say that a key is set and which one, without a single character of it.

    A private key pasted by mistake must not end up in the log; the hash lets two deployments'
    settings be compared.
    """
    if text == "unset":
        return text
    digest = hashlib.sha256(text.strip().encode()).hexdigest()[:16]
    return f"{MASK} ({len(text)} characters, sha256 {digest})"


def _quoted(raw: str) -> str:
    return json.dumps(raw, ensure_ascii=False)


def mask_url(url: str) -> str:
    """Return ``url`` with the password of its userinfo replaced by ``***``.

    Anything that is not a URL with a password comes back unchanged.
    """
    scheme, sep, rest = url.partition("://")
    # Split at the last "@" anywhere, not only in the authority: a password with an unescaped
    # "/", "?", "#" or "@" is still hidden. At worst more than the password is masked.
    userinfo, at, hostpart = rest.rpartition("@")
    user, colon, _password = userinfo.partition(":")
    if not sep or not at or not colon:
        return url
    return f"{scheme}://{user}:{MASK}@{hostpart}"


# Parsers: each checks one raw (non-empty) value and returns the typed value. ``accepts`` finishes
# the sentence '"<raw>" is not ...' of the error, and fills the README's "Accepted" column.


class Parser:
    """Base of the value checkers; as it is, it accepts any text and keeps it."""

    accepts: str = "any text"

    def __call__(self, variable: str, raw: str) -> Any:
        return raw

    def reject(self, variable: str, raw: str) -> ConfigError:
        return ConfigError(variable, f"{_quoted(raw)} is not {self.accepts}")


class _Text(Parser):
    """Any non-blank text, kept as written."""

    accepts = "a non-blank text"

    def __call__(self, variable: str, raw: str) -> str:
        if not raw.strip():
            raise self.reject(variable, raw)
        return raw


class _Integer(Parser):
    def __init__(self, low: int, high: int | None = None) -> None:
        self.low = low
        self.high = high
        if high is None:
            self.accepts = f"an integer >= {low}"
        else:
            self.accepts = f"an integer between {low} and {high}"

    def __call__(self, variable: str, raw: str) -> int:
        text = raw.strip()
        # int() would also take "1_000" and non-ASCII digits; an env value should be plain.
        if not re.fullmatch(r"[+-]?[0-9]+", text):
            raise self.reject(variable, raw)
        value = int(text)
        if value < self.low or (self.high is not None and value > self.high):
            raise self.reject(variable, raw)
        return value


class _Seconds(Parser):
    accepts = "a number of seconds > 0"

    def __call__(self, variable: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise self.reject(variable, raw) from None
        if not math.isfinite(value) or value <= 0:
            raise self.reject(variable, raw)
        return value


class _Rate(_Seconds):
    accepts = "a number > 0"


class _Choice(Parser):
    """One of a fixed set of words, matched case-insensitively, stored as ``choices`` maps it."""

    def __init__(self, choices: Mapping[str, str]) -> None:
        self.choices = {word.lower(): value for word, value in choices.items()}
        words = list(choices)
        self.accepts = f"one of {', '.join(words[:-1])} or {words[-1]}"

    def __call__(self, variable: str, raw: str) -> str:
        try:
            return self.choices[raw.strip().lower()]
        except KeyError:
            raise self.reject(variable, raw) from None


class _AmqpUrl(Parser):
    accepts = "an AMQP URL (amqp://user:password@host:port/vhost or amqps://...)"

    def __call__(self, variable: str, raw: str) -> str:
        url = raw.strip()
        if not url.lower().startswith(("amqp://", "amqps://")):
            raise self.reject(variable, raw)
        try:
            urlsplit(url).port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise self.reject(variable, raw) from None
        return url

    def reject(self, variable: str, raw: str) -> ConfigError:
        # The error is printed and logged: never show the password it may contain.
        return super().reject(variable, mask_url(raw))


def _items(raw: str) -> tuple[str, ...]:
    return tuple(item for item in (part.strip() for part in raw.split(",")) if item)


class _CommaList(Parser):
    """A comma list; items trimmed, empty items dropped."""

    accepts = "a comma-separated list"

    def __call__(self, variable: str, raw: str) -> tuple[str, ...]:
        return _items(raw)


class _Words(Parser):
    """A comma list of routing-key words: no dots, no wildcard, no space."""

    accepts = "a comma-separated list of words without '.', '*', '#' or spaces"

    def __call__(self, variable: str, raw: str) -> tuple[str, ...]:
        words = _items(raw)
        for word in words:
            if any(char in word for char in ".*#") or any(char.isspace() for char in word):
                raise self.reject(variable, raw)
        return words


class _Roles(Parser):
    accepts = "a comma-separated list of roles"

    def __call__(self, variable: str, raw: str) -> frozenset[str]:
        # Rango does not trim, so "admin, trader" allowed the role " trader"; we trim (PROTOCOL §1).
        return frozenset(_items(raw))


# The host part of an origin as Go's url.Parse accepts it: a bracketed IPv6 address or the
# characters Go allows in a host name, then an optional ":port" (Go also takes an empty port).
_ORIGIN_HOST = re.compile(
    r"(?:\[[0-9a-f:.%]+\]|[a-z0-9\-._~!$&'()*+,;=%\x80-\U0010ffff]+)(?::[0-9]*)?"
)


ANY_ORIGIN = "*"


class _CorsOrigins(Parser):
    accepts = "a comma-separated list of hosts or http(s)://host[:port] origins, or *"

    def __call__(self, variable: str, raw: str) -> tuple[str, ...]:
        # Rango's checkSameOrigin: split on ",", trim, keep the host of http(s) entries and other
        # entries as hosts; all compared lowercased. Where we differ (PROTOCOL §1): an empty entry
        # is ignored (Rango matched it against "Origin: null", so a trailing comma let any sandboxed
        # page in), "*" allows every origin, another scheme or a malformed entry stops startup
        # (Rango panics on some and silently never matches others). The scheme may be any case.
        entries = []
        for part in raw.split(","):
            entry = part.strip()
            if entry == ANY_ORIGIN:
                entries.append(ANY_ORIGIN)
            elif entry:
                entries.append(self._entry(variable, entry))
        if not entries:
            raise ConfigError(variable, f"{_quoted(raw)} lists no origin")
        return tuple(dict.fromkeys(entries))

    def _entry(self, variable: str, entry: str) -> str:
        lowered = entry.lower()
        scheme, sep, _ = lowered.partition("://")
        if sep and scheme not in ("http", "https"):
            problem = f"{_quoted(entry)}: only http and https origins can be allowed"
            raise ConfigError(variable, problem)
        host = lowered
        if sep:
            try:
                host = urlsplit(lowered).netloc.rpartition("@")[2]
            except ValueError:
                host = ""
        if not _ORIGIN_HOST.fullmatch(host):
            problem = (
                f"{_quoted(entry)} is not an origin: use host, host:port or http(s)://host[:port]"
            )
            raise ConfigError(variable, problem)
        return host


class _Switch(Parser):
    """A yes/no setting."""

    words: Mapping[str, bool] = MappingProxyType(
        {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}
    )
    accepts = "one of on, off, true, false, 1 or 0"

    def __call__(self, variable: str, raw: str) -> bool:
        try:
            return self.words[raw.strip().lower()]
        except KeyError:
            raise self.reject(variable, raw) from None


_LOG_LEVEL = _Choice(LOG_LEVELS)
_PORT = _Integer(1, 65535)
_COUNT = _Integer(1)
_LEEWAY = _Integer(0)
_ANY = Parser()


def _show(value: object) -> str:
    """Render a typed value as an operator would write it in the environment."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(str(item) for item in value) if value else "none"
    if isinstance(value, frozenset):
        return ",".join(sorted(value))
    if isinstance(value, Mapping):
        return " ".join(f"{key}={_show(item)}" for key, item in sorted(value.items())) or "none"
    return str(value)


@dataclass(frozen=True)
class Setting:
    """How one :class:`Config` field is read from the environment.

    Attributes:
        env: The variables read, first non-empty one wins. For a family (``family=True``) the one
            entry is a prefix, and every variable starting with it is read.
        parse: Checks a raw value and returns the typed one; raises ConfigError.
        doc: One line for the README and the printer.
        mask: For a secret, turns the shown value into one safe to print.
        family: ``env[0]`` is a prefix; the field maps each lowercased suffix to its parsed value.
    """

    env: tuple[str, ...]
    parse: Parser
    doc: str
    mask: Callable[[str], str] | None = None
    family: bool = False

    @property
    def name(self) -> str:
        """The variable as documentation writes it."""
        return f"{self.env[0]}<PREFIX>" if self.family else self.env[0]

    def show(self, value: object) -> str:
        """Render ``value`` of this setting for the printer, masked if it is a secret."""
        text = _show(value)
        return self.mask(text) if self.mask is not None else text


def _setting(
    env: str | tuple[str, ...],
    default: _T,
    parse: Parser,
    doc: str,
    *,
    mask: Callable[[str], str] | None = None,
    family: bool = False,
) -> _T:
    names = (env,) if isinstance(env, str) else env
    meta = {_META_KEY: Setting(names, parse, doc, mask=mask, family=family)}
    if isinstance(default, Mapping):
        # A dataclass default must be immutable; a mapping is given through a factory.
        frozen = MappingProxyType(dict(default))
        return field(default_factory=lambda: frozen, metadata=meta)  # type: ignore[return-value]
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Config:
    """The effective configuration of ranger-py; build it with :meth:`from_env`.

    ``Config()`` is the configuration of an empty environment (every default).
    """

    host: str = _setting(
        "RANGER_HOST", "0.0.0.0", _Text(), "listen address of the websocket server"
    )
    # Heroku gives the port to bind in PORT (PROTOCOL §1).
    port: int = _setting(
        ("RANGER_PORT", "PORT"), 8080, _PORT, "listen port; PORT (Heroku) when RANGER_PORT is unset"
    )
    workers: int = _setting("WEB_CONCURRENCY", 1, _COUNT, "gunicorn worker processes")
    rabbitmq_host: str = _setting("RABBITMQ_HOST", "localhost", _Text(), "RabbitMQ host")
    rabbitmq_port: int = _setting("RABBITMQ_PORT", 5672, _PORT, "RabbitMQ port")
    rabbitmq_user: str = _setting("RABBITMQ_USER", "guest", _ANY, "RabbitMQ user")
    rabbitmq_password: str = _setting(
        "RABBITMQ_PASSWORD", "guest", _ANY, "RabbitMQ password", mask=_hide
    )
    rabbitmq_vhost: str = _setting("RABBITMQ_VHOST", "/", _ANY, "RabbitMQ virtual host")
    rabbitmq_url: str | None = _setting(
        ("RABBITMQ_URL", "CLOUDAMQP_URL", "AMQP_URL"),
        None,
        _AmqpUrl(),
        "full broker URL (else CLOUDAMQP_URL, AMQP_URL); replaces the RABBITMQ_* values",
        mask=mask_url,
    )
    exchange: str = _setting(
        "RANGER_EXCHANGE", "peatio.events.ranger", _Text(), "topic exchange Peatio publishes to"
    )
    jwt_public_key: str | None = _setting(
        "JWT_PUBLIC_KEY",
        None,
        _ANY,
        "base64 of the PEM public key checking tokens (never shown: a fingerprint is)",
        mask=_fingerprint,
    )
    jwt_algorithm: str | None = _setting(
        "JWT_ALGORITHM",
        None,
        _Choice({name: name for name in JWT_ALGORITHMS}),
        "the only JWT algorithm accepted; unset: the one the key type implies",
    )
    jwt_issuer: str | None = _setting("JWT_ISSUER", None, _ANY, "required iss claim")
    jwt_audience: tuple[str, ...] = _setting(
        "JWT_AUDIENCE", (), _CommaList(), "accepted aud values; unset: aud is not checked"
    )
    jwt_default_leeway: int = _setting(
        "JWT_DEFAULT_LEEWAY", 0, _LEEWAY, "seconds of clock skew allowed on exp, nbf and iat"
    )
    jwt_issued_at_leeway: int | None = _setting(
        "JWT_ISSUED_AT_LEEWAY", None, _LEEWAY, "leeway on iat; unset: JWT_DEFAULT_LEEWAY"
    )
    jwt_expiration_leeway: int | None = _setting(
        "JWT_EXPIRATION_LEEWAY", None, _LEEWAY, "leeway on exp; unset: JWT_DEFAULT_LEEWAY"
    )
    jwt_not_before_leeway: int | None = _setting(
        "JWT_NOT_BEFORE_LEEWAY", None, _LEEWAY, "leeway on nbf; unset: JWT_DEFAULT_LEEWAY"
    )
    # "ignore" is Ranger's and Rango's behaviour (a token is checked at connect only), so a
    # drop-in changes nothing until the operator asks for it (PROTOCOL §3).
    token_expiry: str = _setting(
        "RANGER_TOKEN_EXPIRY",
        "ignore",
        _Choice({"ignore": "ignore", "close": "close"}),
        "close: a connection is closed with 4001 once its token's exp plus the exp leeway has"
        " passed, unless an auth event renewed it; ignore: it stays open (as Ranger and Rango)",
    )
    cors_origins: tuple[str, ...] | None = _setting(
        "API_CORS_ORIGINS",
        None,
        _CorsOrigins(),
        "allowed Origin hosts, * for any; unset: the Origin host must equal the Host header",
    )
    rbac: Mapping[str, frozenset[str]] = _setting(
        "RANGO_RBAC_",
        MappingProxyType({}),
        _Roles(),
        "roles allowed on the prefixed streams <prefix>.<market>.<event>",
        family=True,
    )
    log_level: str = _setting(
        "LOG_LEVEL", "INFO", _LOG_LEVEL, "logging level (Rango's trace, fatal, panic also work)"
    )
    log_format: str = _setting(
        "LOG_FORMAT",
        "text",
        _Choice({"text": "text", "json": "json"}),
        "log lines as plain text, or one JSON object per line for log shippers",
    )
    graceful_timeout: int = _setting(
        "RANGER_GRACEFUL_TIMEOUT",
        30,
        _Integer(1),
        "seconds a stopping worker has to close its clients with 1001 before it is killed",
    )
    metrics_host: str = _setting(
        "METRICS_HOST", "0.0.0.0", _Text(), "listen address of the Prometheus endpoint"
    )
    metrics_port: int = _setting(
        "METRICS_PORT", 4242, _PORT, "listen port of the Prometheus endpoint"
    )
    max_message_size: int = _setting(
        "RANGER_MAX_MESSAGE_SIZE", 4096, _Integer(128), "bytes; a longer client message closes 1009"
    )
    send_queue_size: int = _setting(
        "RANGER_SEND_QUEUE_SIZE", 256, _COUNT, "frames queued per client; past it, close 1008"
    )
    send_queue_bytes: int = _setting(
        "RANGER_SEND_QUEUE_BYTES",
        4 * 1024 * 1024,
        _Integer(65536),
        "bytes queued per client (broadcasts, replies, pongs, order-book replays); past it,"
        " close 1008",
    )
    client_rate: float = _setting(
        "RANGER_CLIENT_RATE",
        10.0,
        _Rate(),
        "frames per second a client may send on average (messages, pings); past the burst,"
        " close 1008",
    )
    client_burst: int = _setting(
        "RANGER_CLIENT_BURST", 100, _COUNT, "frames a client may send at once above its rate"
    )
    send_buffer: int = _setting(
        "RANGER_SEND_BUFFER",
        262144,
        _Integer(0),
        "bytes of kernel send buffer per client (SO_SNDBUF; 0: the kernel's autotuning, up to"
        " ~4 MB a client before the send queue bound even starts counting)",
    )
    ping_interval: float = _setting(
        "RANGER_PING_INTERVAL", 54.0, _Seconds(), "seconds between server pings"
    )
    pong_timeout: float = _setting(
        "RANGER_PONG_TIMEOUT",
        60.0,
        _Seconds(),
        "seconds without any frame from a client before close",
    )
    write_timeout: float = _setting(
        "RANGER_WRITE_TIMEOUT", 10.0, _Seconds(), "seconds allowed for one write to a client"
    )
    max_streams: int = _setting(
        "RANGER_MAX_STREAMS", 100, _COUNT, "streams one connection may subscribe to"
    )
    orderbook_max_increments: int = _setting(
        "RANGER_ORDERBOOK_MAX_INCREMENTS",
        10000,
        _COUNT,
        "order-book increments cached after a snapshot",
    )
    max_connections: int = _setting(
        "RANGER_MAX_CONNECTIONS", 10000, _COUNT, "websockets per worker; past it, HTTP 503"
    )
    max_handshakes: int = _setting(
        "RANGER_MAX_HANDSHAKES",
        10000,
        _COUNT,
        "handshakes in progress per worker (gunicorn's worker_connections); more wait to be"
        " accepted",
    )
    handshake_timeout: int = _setting(
        "RANGER_HANDSHAKE_TIMEOUT",
        5,
        _Integer(1, 300),
        "seconds a client has to send its whole upgrade request; then the socket is closed",
    )
    broker_heartbeat: int = _setting(
        "RANGER_BROKER_HEARTBEAT",
        4,
        _Integer(MIN_BROKER_HEARTBEAT, 600),
        "AMQP heartbeat in seconds; a broker connection silent for twice this is replaced",
    )
    queue_max_length: int = _setting(
        "RANGER_QUEUE_MAX_LENGTH", 100000, _COUNT, "x-max-length of each worker's broker queue"
    )
    queue_expires: int = _setting(
        "RANGER_QUEUE_EXPIRES",
        60,
        _Integer(1, 86400),
        "seconds a worker's broker queue outlives its consumer (x-expires): a broker connection"
        " back within it loses no message",
    )
    # "subscribed" changes nothing a client or publisher sees: only the queues' bindings, which
    # an operator sees on the RabbitMQ dashboard (README, Broker-side routing). Not the default
    # yet: a subscribe that needs a new binding waits for the consumer's next wake-up (up to
    # 50 ms), which costs connects/s when every client brings a binding of its own.
    broker_routing: str = _setting(
        "RANGER_BROKER_ROUTING",
        "all",
        _Choice({"subscribed": "subscribed", "all": "all"}),
        "subscribed: each worker's queue is bound only to the routing keys its clients' streams"
        " need (and the order books'); all: bound to # and every worker receives everything"
        " (as Ranger and Rango)",
    )
    broker_books: tuple[str, ...] = _setting(
        "RANGER_BROKER_BOOKS",
        ("ob",),
        _Words(),
        "with RANGER_BROKER_ROUTING=subscribed: the order books (<event>-snap/<event>-inc) kept"
        " bound for every market, so a new subscriber gets the cached snapshot at once; another"
        " pair is cached only while a client of the worker holds it",
    )
    broker_unbind_delay: int = _setting(
        "RANGER_BROKER_UNBIND_DELAY",
        30,
        _Integer(0, 86400),
        "seconds a binding stays after the last local subscriber of its stream left, so that"
        " clients coming and going do not make a worker bind and unbind all the time",
    )
    broker_prefetch: int = _setting(
        "RANGER_BROKER_PREFETCH",
        1000,
        _Integer(1, 65535),
        "broker messages a worker holds unacknowledged (acknowledged in batches after fan-out)",
    )
    compression: bool = _setting(
        "RANGER_COMPRESSION",
        True,
        _Switch(),
        "answer a client's permessage-deflate offer (RFC 7692), without context takeover: each"
        " message is compressed once, whatever the number of recipients",
    )
    compression_threshold: int = _setting(
        "RANGER_COMPRESSION_THRESHOLD",
        1024,
        _Integer(0),
        "bytes; a message shorter than this goes out uncompressed even to a client that"
        " negotiated compression",
    )
    demo: bool = _setting(
        "RANGER_DEMO",
        False,
        _Switch(),
        "demo mode, no broker: serve a synthetic Peatio feed (btcusd, ethusd, private events of"
        " IDDEMO000001) from memory; the RABBITMQ_* settings are ignored; needs WEB_CONCURRENCY=1",
    )

    def __post_init__(self) -> None:
        # Each worker would run a feed of its own: clients of different workers would see
        # different books and prices.
        if self.demo and self.workers > 1:
            problem = f"demo mode needs WEB_CONCURRENCY=1, not {self.workers}"
            raise ConfigError("RANGER_DEMO", problem)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Config:
        """Build the configuration from ``environ`` (``os.environ`` in production).

        Raises:
            ConfigError: a variable has a value that is not accepted; it names the variable.
        """
        values: dict[str, Any] = {}
        for name, setting in settings():
            if setting.family:
                values[name] = _read_family(setting, environ)
                continue
            for variable in setting.env:
                raw = environ.get(variable, "")
                if raw != "":
                    values[name] = setting.parse(variable, raw)
                    break
        return cls(**values)

    @classmethod
    def load(cls) -> Config:
        """The configuration of this process, from ``os.environ``."""
        return cls.from_env(os.environ)

    @property
    def amqp_url(self) -> str:
        """The broker URL: ``rabbitmq_url`` if set, else one built from the RABBITMQ_* values.

        User, password and vhost are percent-escaped (Rango does not escape them, so a password
        with "@" or "/" broke its URL); the default vhost "/" becomes "%2F".
        """
        if self.rabbitmq_url is not None:
            return self.rabbitmq_url
        user, password, vhost = (
            quote(part, safe="")
            for part in (self.rabbitmq_user, self.rabbitmq_password, self.rabbitmq_vhost)
        )
        return f"amqp://{user}:{password}@{self.rabbitmq_host}:{self.rabbitmq_port}/{vhost}"

    def describe(self) -> list[tuple[str, str, str]]:
        """Return ``(variable, effective value, doc)`` for every setting, secrets masked.

        A family (RANGO_RBAC_<PREFIX>) gives one row per variable found, or one "none" row.
        """
        rows = []
        for name, setting in settings():
            value = getattr(self, name)
            if setting.family and value:
                for key in sorted(value):
                    variable = f"{setting.env[0]}{key.upper()}"
                    rows.append((variable, setting.show(value[key]), setting.doc))
            else:
                rows.append((setting.name, setting.show(value), setting.doc))
        return rows

    def warnings(self) -> list[str]:
        """Settings that are valid but risky, for the startup log."""
        found = []
        if self.cors_origins is not None and ANY_ORIGIN in self.cors_origins:
            found.append(
                "API_CORS_ORIGINS=*: web pages of every origin may open websockets here;"
                " list the exchange's own origins instead"
            )
        return found


def settings() -> list[tuple[str, Setting]]:
    """Return ``(attribute, Setting)`` for every :class:`Config` field, in declaration order."""
    return [(f.name, f.metadata[_META_KEY]) for f in fields(Config)]


def _read_family(setting: Setting, environ: Mapping[str, str]) -> Mapping[str, Any]:
    """Read every ``<prefix><SUFFIX>`` variable into ``{suffix.lower(): parsed}``.

    Rango's envToMatrix lowercases the suffix; an empty value counts as unset here too (Rango
    turned it into the role "", which matched anonymous clients).
    """
    prefix = setting.env[0]
    found: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for variable in sorted(environ):
        raw = environ[variable]
        if not variable.startswith(prefix) or raw == "":
            continue
        key = variable[len(prefix) :].lower()
        if not key or "." in key:
            problem = f'the stream prefix after {prefix} must be non-empty, without "."'
            raise ConfigError(variable, problem)
        if key in seen:
            raise ConfigError(variable, f"names the same stream prefix as {seen[key]}")
        seen[key] = variable
        found[key] = setting.parse(variable, raw)
    return MappingProxyType(found)


def env_table_markdown() -> str:
    """Render every variable as a Markdown table (the README's configuration section)."""

    def cell(text: str) -> str:
        # Keep "|" from ending the cell and "<prefix>" from being read as an HTML tag.
        return re.sub(r"([|<>*])", r"\\\1", text)

    defaults = Config()
    lines = [
        "| Variable | Default | Accepted | Description |",
        "|---|---|---|---|",
    ]
    for name, setting in settings():
        variable = ", else ".join(f"`{env}`" for env in setting.env)
        if setting.family:
            variable = f"`{setting.name}`"
        default = _show(getattr(defaults, name))
        if default not in ("unset", "none"):
            default = f"`{default}`"
        cells = (variable, default, cell(setting.parse.accepts), cell(setting.doc))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _format(config: Config) -> str:
    rows = config.describe()
    name_width = max(len(row[0]) for row in rows)
    value_width = max(len(row[1]) for row in rows)
    lines = ["# ranger-py effective configuration (secrets masked)"]
    lines += [
        f"{name:<{name_width}}  {value:<{value_width}}  # {doc}".rstrip()
        for name, value, doc in rows
    ]
    lines.append(f"# broker URL in use: {mask_url(config.amqp_url)}")
    return "\n".join(lines) + "\n"


def main(environ: Mapping[str, str] | None = None, *, quiet: bool = False) -> int:
    """Print the effective configuration; return the exit status (2 on a ConfigError).

    ``quiet`` (``--check``) prints only errors: the check gunicorn.conf.py runs before listening.
    """
    # Checked as startup checks it: the key is read too. Imported here, in the entry point only,
    # so that importing the configuration does not import cryptography.
    from ranger_py.keys import load_verify_key  # noqa: PLC0415

    try:
        config = Config.from_env(os.environ if environ is None else environ)
        load_verify_key(config.jwt_public_key, config.jwt_algorithm)
    except ConfigError as exc:
        print(f"ranger-py: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if quiet:
        return 0
    sys.stdout.write(_format(config))
    for warning in config.warnings():
        print(f"ranger-py: warning: {warning}", file=sys.stderr)
    return 0


def config_errors(environ: Mapping[str, str] | None = None) -> list[ConfigError]:
    """Every invalid variable of ``environ`` (``os.environ`` if None), not only the first.

    :meth:`Config.from_env` stops at the first error; ``ranger-py config`` and a refused startup
    name them all. Each variable is checked as ``from_env`` reads it (only the first non-empty
    variable of a setting counts); ``JWT_PUBLIC_KEY`` is read as startup reads it. The checks that
    involve several settings run once every single value is valid. An empty list: startup accepts
    this environment.
    """
    from ranger_py.keys import load_verify_key  # noqa: PLC0415 (cryptography only when asked)

    environ = os.environ if environ is None else environ
    errors: list[ConfigError] = []
    values: dict[str, Any] = {}
    for name, setting in settings():
        if setting.family:
            prefix = setting.env[0]
            members = [variable for variable in sorted(environ) if variable.startswith(prefix)]
            failed = len(errors)
            for variable in members:
                try:
                    _read_family(setting, {variable: environ[variable]})
                except ConfigError as exc:
                    errors.append(exc)
            if len(errors) == failed:  # each one is valid alone: now the clashes between them
                try:
                    _read_family(setting, {variable: environ[variable] for variable in members})
                except ConfigError as exc:
                    errors.append(exc)
            continue
        chosen = next((env for env in setting.env if environ.get(env, "") != ""), None)
        if chosen is None:
            continue
        try:
            values[name] = setting.parse(chosen, environ[chosen])
        except ConfigError as exc:
            errors.append(exc)
    try:
        load_verify_key(values.get("jwt_public_key"), values.get("jwt_algorithm"))
    except ConfigError as exc:
        if all(exc.variable != error.variable for error in errors):
            errors.append(exc)
    if not errors:
        try:
            Config.from_env(environ)
        except ConfigError as exc:
            errors.append(exc)
    return errors


if __name__ == "__main__":
    sys.exit(main(quiet=sys.argv[1:] == ["--check"]))

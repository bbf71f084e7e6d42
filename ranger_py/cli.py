"""The ``ranger-py`` command: the server, its configuration, and the tools to try it by hand.

::

    ranger-py serve    the server: gunicorn with ranger_py/gunicorn_conf.py (the Procfile's server)
    ranger-py config   the effective configuration, secrets masked; exit 1 naming every bad variable
    ranger-py publish  one event to the exchange, as Peatio publishes it
    ranger-py keygen   a signing key, and the JWT_PUBLIC_KEY value that verifies its tokens
    ranger-py token    a JWT with Barong's claims, signed with keygen's key or another
    ranger-py tail     a websocket client printing every frame it receives
    ranger-py demo     a synthetic Peatio feed published to the broker (ranger_py.demo)

Exit status: 0 done, 1 the command failed (a message on stderr says why), 2 a usage error.
kombu, cryptography and PyJWT are imported by the handlers that use them, so each command starts
quickly; ``serve`` replaces this process with gunicorn (``execv``), whose master then imports only
what ranger_py/gunicorn_conf.py does.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib
import json
import os
import re
import secrets
import socket
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlencode, urlsplit

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

from ranger_py import __version__
from ranger_py.config import Config, config_errors, mask_url
from ranger_py.config import main as print_config
from ranger_py.errors import ConfigError, RangerError

__all__ = ["ALGORITHMS", "CommandFailed", "UsageError", "build_parser", "default_key_dir", "main"]

PROG = "ranger-py"
# What keygen makes and token signs with; the server verifies all three (README, Configuration).
ALGORITHMS = ("RS256", "EdDSA", "ES256")
DEFAULT_URL = "ws://127.0.0.1:8080"
_DURATION = re.compile(r"([+-]?[0-9]+)([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_CONNECT_TIMEOUT = 10.0

Handler = Callable[[argparse.Namespace], int]


class CommandFailed(RangerError):
    """The command could not do its work; ``ranger-py`` prints the message and exits 1."""

    status = 1


class UsageError(CommandFailed):
    """The arguments cannot work together or the input is malformed: exit 2, as argparse does."""

    status = 2


# Argument types: each raises ArgumentTypeError, which argparse turns into a usage error.


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _port(text: str) -> int:
    if not _digits(text) or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1-65535)")
    return int(text)


def _positive(text: str) -> int:
    if not _digits(text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return int(text)


def duration(text: str) -> int:
    """Seconds in ``text``: ``90``, ``90s``, ``15m``, ``1h``, ``7d``; negative for the past."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (like 3600, 90s, 15m, 1h, 7d; -1h for an expired token)"
        )
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def default_key_dir() -> Path:
    """Where keygen writes keys and token looks for one when no --key is given."""
    return Path.home() / ".config" / "ranger-py"


def _key_file(directory: Path, algorithm: str) -> Path:
    return directory / f"jwt-{algorithm.lower()}.pem"


# serve


def _serve(args: argparse.Namespace) -> int:
    if args.demo and args.workers not in (None, 1):
        raise UsageError("--demo runs a single worker: leave out --workers")
    overrides = {
        "RANGER_HOST": args.host,
        "RANGER_PORT": None if args.port is None else str(args.port),
        "WEB_CONCURRENCY": None if args.workers is None else str(args.workers),
    }
    if args.demo:
        # One feed for every client: the demo's synthetic market lives in its worker.
        overrides.update(RANGER_DEMO="on", WEB_CONCURRENCY="1")
    for variable, value in overrides.items():
        if value is not None:
            os.environ[variable] = value  # read by ranger_py.config in gunicorn's master
    # gunicorn runs the package's config file itself, as it runs gunicorn.conf.py for the Procfile:
    # a HUP reload re-reads it, and this process becomes the master, so signals reach it directly.
    conf = Path(__file__).with_name("gunicorn_conf.py")
    command = [sys.executable, "-m", "gunicorn", "-c", str(conf)]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)
    raise AssertionError("unreachable: execv does not return")  # pragma: no cover


# config


def _config(args: argparse.Namespace) -> int:
    errors = config_errors()
    if errors:
        for error in errors:
            print(f"{PROG}: invalid configuration: {error}", file=sys.stderr)
        return 1
    return 0 if print_config() == 0 else 1  # the table, and any warning on stderr


# publish


def _read_body(text: str | None) -> bytes:
    if text is None or text == "-":
        # JSON ignores the whitespace around a value; a shell's `echo` adds a newline.
        return sys.stdin.buffer.read().strip()
    return text.encode()


def _publish(args: argparse.Namespace) -> int:
    body = _read_body(args.body)
    try:
        json.loads(body)
    except ValueError as exc:  # UnicodeDecodeError is a ValueError too
        raise UsageError(f"the body is not valid JSON ({exc}); the server would drop it") from None
    from kombu.connection import Connection  # noqa: PLC0415
    from kombu.entity import Exchange  # noqa: PLC0415
    from kombu.exceptions import KombuError  # noqa: PLC0415

    config = Config.load()
    # Peatio's declaration: a non-durable topic exchange (kombu's default durable=True gets a 406
    # from a broker where Peatio or the server declared it first).
    exchange = Exchange(  # type: ignore[no-untyped-call]
        config.exchange, type="topic", durable=False, auto_delete=False
    )
    # Confirms: the command returns once the broker has taken the message, not before.
    connection = Connection(  # type: ignore[no-untyped-call]
        config.amqp_url, connect_timeout=5, transport_options={"confirm_publish": True}
    )
    try:
        with connection:
            connection.connect()  # type: ignore[no-untyped-call]  # once, not kombu's retries
            producer = connection.Producer()  # type: ignore[no-untyped-call]
            producer.publish(
                body, exchange=exchange, routing_key=args.routing_key, declare=[exchange]
            )
    except (
        OSError,
        KombuError,
        *connection.connection_errors,
        *connection.channel_errors,
    ) as exc:
        where = mask_url(config.amqp_url)
        raise CommandFailed(f"cannot publish to {config.exchange} at {where}: {exc}") from None
    print(f"published {args.routing_key} to {config.exchange}")
    return 0


# keygen and token


def _generate(algorithm: str) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa  # noqa: PLC0415

    if algorithm == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def _public_env(private_key: Any) -> str:
    """The JWT_PUBLIC_KEY value verifying ``private_key``'s tokens: base64 of its SPKI PEM."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(pem).decode("ascii")


def _load_private_key(path: Path) -> Any:
    from cryptography.exceptions import UnsupportedAlgorithm  # noqa: PLC0415
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CommandFailed(f"cannot read the key {path}: {exc.strerror}") from None
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CommandFailed(f"{path} is not an unencrypted PEM private key ({exc})") from None


def _algorithm_of(private_key: Any) -> str | None:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa  # noqa: PLC0415

    if isinstance(private_key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    if isinstance(private_key, ec.EllipticCurvePrivateKey) and private_key.curve.name == (
        "secp256r1"
    ):
        return "ES256"
    return None


def _keygen(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    directory = Path(args.out).expanduser() if args.out else default_key_dir()
    path = _key_file(directory, args.alg)
    if path.exists() and not args.force:
        # Kept, not replaced: tokens already given out stay valid. --force makes a new key.
        private_key = _load_private_key(path)
        if _algorithm_of(private_key) != args.alg:
            raise CommandFailed(f"{path} holds no {args.alg} key: move it away, or use --force")
        print(
            f"{PROG} keygen: kept the existing {args.alg} key {path} (--force replaces it)",
            file=sys.stderr,
        )
    else:
        private_key = _generate(args.alg)
        pem = private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Written readable by its owner only, from the first byte.
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(descriptor, 0o600)  # --force over a file that had other permissions
            with os.fdopen(descriptor, "wb") as file:
                file.write(pem)
        except OSError as exc:
            raise CommandFailed(f"cannot write the key {path}: {exc.strerror}") from None
        print(f"{PROG} keygen: wrote a new {args.alg} private key to {path}", file=sys.stderr)
    print(
        f"{PROG} keygen: give the server this JWT_PUBLIC_KEY; `{PROG} token --uid ID` signs"
        " with the key",
        file=sys.stderr,
    )
    print(f"export JWT_PUBLIC_KEY={_public_env(private_key)}")
    return 0


def _signing_key(args: argparse.Namespace) -> tuple[Any, str]:
    """The key ``token`` signs with and its algorithm: --key, else one keygen wrote."""
    if args.key is not None:
        path = Path(args.key).expanduser()
    else:
        directory = default_key_dir()
        candidates = [
            _key_file(directory, name) for name in ([args.alg] if args.alg else ALGORITHMS)
        ]
        found = [candidate for candidate in candidates if candidate.exists()]
        if not found:
            wanted = f" --alg {args.alg}" if args.alg else ""
            raise CommandFailed(
                f"no signing key in {directory}: make one with `{PROG} keygen{wanted}` (it prints"
                " the JWT_PUBLIC_KEY for the server), or pass --key PEM_FILE"
            )
        path = found[0]
    private_key = _load_private_key(path)
    algorithm = _algorithm_of(private_key)
    if algorithm is None:
        raise CommandFailed(
            f"{path}: only RSA, Ed25519 and P-256 keys can sign ({', '.join(ALGORITHMS)})"
        )
    if args.alg is not None and args.alg != algorithm:
        raise UsageError(
            f"--alg {args.alg} does not fit the key in {path}, which signs {algorithm}"
        )
    return private_key, algorithm


def barong_claims(
    uid: str, *, role: str, email: str, level: int, ttl: int, now: int | None = None
) -> dict[str, Any]:
    """The claims Barong puts in a session token, valid from now for ``ttl`` seconds."""
    issued = int(time.time()) if now is None else now
    return {
        "iat": issued,
        "exp": issued + ttl,
        "sub": "session",
        "iss": "barong",
        "aud": ["peatio", "barong"],
        "jti": secrets.token_hex(8).upper(),
        "uid": uid,
        "email": email,
        "role": role,
        "level": level,
        "state": "active",
    }


def _token(args: argparse.Namespace) -> int:
    import jwt  # noqa: PLC0415

    private_key, algorithm = _signing_key(args)
    email = args.email or f"{args.uid.lower()}@example.com"
    claims = barong_claims(args.uid, role=args.role, email=email, level=args.level, ttl=args.ttl)
    print(jwt.encode(claims, private_key, algorithm=algorithm))
    return 0


# tail


def _tail_target(args: argparse.Namespace) -> tuple[str, str, int, bool, str]:
    """Scheme-checked parts of --url: host header, host, port, TLS, request target."""
    url = urlsplit(args.url)
    if url.scheme not in ("ws", "wss") or not url.hostname:
        raise UsageError(f"--url {args.url!r} is not a ws:// or wss:// URL")
    try:
        port = url.port or (443 if url.scheme == "wss" else 80)
    except ValueError:
        raise UsageError(f"--url {args.url!r} has a bad port") from None
    path = f"{url.path.rstrip('/')}/{'private' if args.private else 'public'}"
    query = urlencode([("stream", stream) for stream in args.streams])
    host_header = url.netloc.rpartition("@")[2]
    return host_header, url.hostname, port, url.scheme == "wss", f"{path}?{query}"


class _Tail:
    """The connection of ``ranger-py tail``: wsproto over a socket, every message printed."""

    def __init__(self, sock: socket.socket, where: str) -> None:
        self.sock = sock
        self.where = where
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.parts: list[str] = []
        self.refused: list[bytes] = []
        self.status = 0

    def run(self, request: Request) -> None:
        """Print frames until Ctrl-C (returns) or the connection ends (raises CommandFailed)."""
        try:
            self.sock.sendall(self.ws.send(request))
            while True:
                data = self.sock.recv(65536)
                self.ws.receive_data(data or None)
                for event in self.ws.events():
                    self.handle(event)
                if not data:
                    raise CommandFailed(f"the connection to {self.where} was lost")
        except KeyboardInterrupt:
            if self.ws.state is ConnectionState.OPEN:
                with contextlib.suppress(OSError):  # leaving anyway
                    self.sock.sendall(self.ws.send(CloseConnection(code=1000)))
        except BrokenPipeError:
            raise  # our standard output, not the connection: main() handles it
        except RemoteProtocolError as exc:
            problem = f"{self.where} does not answer as a websocket server: {exc}"
            raise CommandFailed(problem) from None
        except TimeoutError:
            problem = f"no answer from {self.where} in {_CONNECT_TIMEOUT:g} s"
            raise CommandFailed(problem) from None
        except OSError as exc:
            problem = f"the connection to {self.where} failed: {exc.strerror or exc}"
            raise CommandFailed(problem) from None

    def handle(self, event: Event) -> None:
        if isinstance(event, AcceptConnection):
            self.sock.settimeout(None)  # the server pings; a quiet stream is fine
            print(f"{PROG} tail: connected to {self.where} (Ctrl-C to stop)", file=sys.stderr)
        elif isinstance(event, TextMessage | BytesMessage):
            data = event.data
            self.parts.append(data if isinstance(data, str) else data.decode("utf-8", "replace"))
            if event.message_finished:
                print("".join(self.parts), flush=True)
                self.parts.clear()
        elif isinstance(event, Ping):
            self.sock.sendall(self.ws.send(event.response()))
        elif isinstance(event, CloseConnection):
            if self.ws.state is ConnectionState.REMOTE_CLOSING:
                self.sock.sendall(self.ws.send(event.response()))
            reason = f" {event.reason}" if event.reason else ""
            raise CommandFailed(f"the server closed the connection: {event.code}{reason}")
        elif isinstance(event, RejectConnection):
            self.status = event.status_code
            if not event.has_body:
                raise CommandFailed(f"{self.where} refused the connection: HTTP {self.status}")
        elif isinstance(event, RejectData):
            self.refused.append(event.data)
            if event.body_finished:
                body = b"".join(self.refused).decode("utf-8", "replace")
                raise CommandFailed(
                    f"{self.where} refused the connection: HTTP {self.status} {body}"
                )


def _tail(args: argparse.Namespace) -> int:
    if args.private and not args.token:
        raise UsageError("--private needs --token (a JWT, e.g. from `ranger-py token`)")
    host_header, host, port, tls, target = _tail_target(args)
    where = f"{'wss' if tls else 'ws'}://{host_header}{target}"
    try:
        sock = socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT)
        if tls:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
    except OSError as exc:
        raise CommandFailed(f"cannot connect to {where}: {exc.strerror or exc}") from None
    headers = [(b"Authorization", f"Bearer {args.token}".encode())] if args.token else []
    with sock:
        _Tail(sock, where).run(Request(host=host_header, target=target, extra_headers=headers))
    return 0


# demo


def _demo_module() -> ModuleType | None:
    try:
        return importlib.import_module("ranger_py.demo")
    except ModuleNotFoundError as exc:
        if exc.name != "ranger_py.demo":
            raise
        return None


def _demo(args: argparse.Namespace) -> int:
    module = _demo_module()
    if module is None:
        raise CommandFailed("the demo is not in this build (no module ranger_py.demo)")
    return int(module.run(args))


# the parser


def build_parser(*, load_demo: bool = False) -> argparse.ArgumentParser:
    """The ``ranger-py`` parser; ``load_demo`` adds ranger_py.demo's own arguments to ``demo``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="ranger-py: the websocket gateway fanning Peatio's RabbitMQ events out to"
        " exchange clients, and the tools to try it.",
        epilog="Exit status: 0 done, 1 the command failed, 2 usage error.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Handler, summary: str, description: str) -> Any:
        sub = commands.add_parser(name, help=summary, description=description)
        sub.set_defaults(handler=handler, parser=sub)
        return sub

    serve = command(
        "serve",
        _serve,
        "run the server",
        "Run the server: gunicorn with ranger-py's settings, exactly as `gunicorn -c"
        " gunicorn.conf.py` in a checkout. Configured by environment variables (see `ranger-py"
        " config`); the options below override theirs. Ctrl-C or SIGTERM closes every client with"
        " 1001 and stops.",
    )
    serve.add_argument("--host", help="listen address (sets RANGER_HOST)")
    serve.add_argument("--port", type=_port, help="listen port (sets RANGER_PORT)")
    serve.add_argument("--workers", type=_positive, help="worker processes (sets WEB_CONCURRENCY)")
    serve.add_argument(
        "--demo",
        action="store_true",
        help="no broker: serve a synthetic feed from memory (sets RANGER_DEMO=on, one worker)",
    )

    command(
        "config",
        _config,
        "print and check the configuration",
        "Print the effective configuration from the environment, secrets masked. Exits 1 naming"
        " every invalid variable (JWT_PUBLIC_KEY is read as startup reads it).",
    )

    publish = command(
        "publish",
        _publish,
        "publish one event as Peatio does",
        "Publish one event to the exchange (RANGER_EXCHANGE, declared as Peatio declares it: a"
        " non-durable topic exchange) on the broker the server uses (RABBITMQ_* or RABBITMQ_URL).",
    )
    publish.add_argument(
        "routing_key",
        metavar="ROUTING_KEY",
        help="public.<market>.<event>, global.tickers, private.<uid>.<event>, ...",
    )
    publish.add_argument(
        "body",
        metavar="JSON",
        nargs="?",
        help="the body, which must be JSON; read from standard input when left out or '-'",
    )

    keygen = command(
        "keygen",
        _keygen,
        "make a signing key and print its JWT_PUBLIC_KEY",
        "Write a private key for `ranger-py token` (mode 0600) and print `export"
        f' JWT_PUBLIC_KEY=...` for the server: eval "$({PROG} keygen)". An existing key is kept'
        " and its value printed again.",
    )
    keygen.add_argument(
        "--alg", choices=ALGORITHMS, default="RS256", help="default: RS256 (Barong's)"
    )
    keygen.add_argument(
        "--out",
        metavar="DIR",
        help=f"directory of the key file jwt-<alg>.pem (default: {_home(default_key_dir())})",
    )
    keygen.add_argument("--force", action="store_true", help="replace an existing key")

    token = command(
        "token",
        _token,
        "mint a JWT with Barong's claims",
        "Print a JWT with the claims Barong issues (iat, exp, sub, iss=barong, aud=peatio,barong,"
        " jti, uid, email, role, level, state), for /private: Authorization: Bearer <token>.",
    )
    token.add_argument("--uid", required=True, help="the user's uid (Barong's IDxxxxxxxxxx)")
    token.add_argument("--role", default="member", help="default: member")
    token.add_argument("--email", help="default: <uid>@example.com")
    token.add_argument("--level", type=int, default=3, help="default: 3")
    token.add_argument(
        "--key",
        metavar="PEM_FILE",
        help=f"private key (default: the one keygen wrote in {_home(default_key_dir())})",
    )
    token.add_argument(
        "--alg", choices=ALGORITHMS, help="which keygen key to use; with --key, must fit it"
    )
    token.add_argument(
        "--ttl",
        type=duration,
        default=3600,
        help="validity: 3600, 90s, 15m, 1h, 7d (default 1h); --ttl=-1h gives an expired token",
    )

    tail = command(
        "tail",
        _tail,
        "print the frames a client receives",
        "Connect to the server as a websocket client subscribed to STREAMs and print every frame"
        " on its own line, until Ctrl-C.",
    )
    tail.add_argument("--url", default=DEFAULT_URL, help=f"the server (default: {DEFAULT_URL})")
    tail.add_argument("--private", action="store_true", help="connect to /private (needs --token)")
    tail.add_argument("--token", help="a JWT sent as Authorization: Bearer <token>")
    tail.add_argument(
        "streams", metavar="STREAM", nargs="+", help="btcusd.trades, global.tickers, order, ..."
    )

    demo = command(
        "demo",
        _demo,
        "publish a synthetic Peatio feed to the broker",
        "Publish synthetic Peatio traffic (tickers, trades, order books, one user's orders and"
        " trades) to the configured broker, as Peatio would, until Ctrl-C or --duration.",
    )
    if load_demo:
        module = _demo_module()
        if module is not None:
            module.add_arguments(demo)
    return parser


def _home(path: Path) -> str:
    """``path`` as documentation writes it: under ~ rather than this user's home."""
    try:
        return f"~/{path.relative_to(Path.home())}"
    except ValueError:
        return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ranger-py`` with ``argv`` (``sys.argv[1:]`` if None); return the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    # The demo module is imported only when it is asked for.
    load_demo = bool(arguments) and arguments[0] == "demo"
    parser = build_parser(load_demo=load_demo)
    if load_demo and _demo_module() is None:
        args = parser.parse_known_args(arguments)[0]  # its handler says what is missing
    else:
        args = parser.parse_args(arguments)
    handler: Handler = args.handler
    try:
        return handler(args)
    except UsageError as exc:
        args.parser.print_usage(sys.stderr)
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return exc.status
    except CommandFailed as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return exc.status
    except ConfigError as exc:
        print(f"{PROG} {args.command}: invalid configuration: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `ranger-py tail ... | head`: the reader left, which ends the command. Later writes (the
        # interpreter's final flush) go nowhere instead of raising again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0

"""Every use consumer.py makes of py-amqp's or kombu's undocumented internals, in one place.

kombu's ``Connection.connection`` is the transport's own connection object, whose interface kombu
says not to depend on; for ``amqp://`` it is a py-amqp ``Connection``, and channels are py-amqp
``Channel`` objects. ``tests/unit/test_adapters.py`` checks each reliance and names the version
when an upgrade breaks it.

One more reliance lives in consumer.py because it is an override, not a call: ``Consumer``
replaces kombu's ``ConsumerMixin.establish_connection`` (kombu 5.7.0: ``consume()`` opens every
connection through it as a context manager yielding the connection). The same test file checks it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = [
    "ACCESS_REFUSED",
    "keep_bodies_raw",
    "listen_for_binding_replies",
    "reply_code",
    "send_binding",
    "set_socket_timeout",
]

# AMQP's reply code for a refused login (connection.close 403 ACCESS_REFUSED).
ACCESS_REFUSED = 403


def set_socket_timeout(conn: Any, seconds: float) -> None:
    """Make blocking reads and writes on ``conn``'s socket (a kombu connection) give up in time.

    Relies on (kombu 5.7.0, amqp 5.4.2): ``conn.connection`` being py-amqp's ``Connection`` for
    ``amqp://``, whose ``sock`` property is the transport's ``socket.socket``; it then times out
    after ``seconds``. Virtual transports (``memory://``) have no socket: nothing to do.
    """
    sock = getattr(conn.connection, "sock", None)
    if sock is not None:
        sock.settimeout(seconds)


def keep_bodies_raw(channel: Any) -> None:
    """Deliver message bodies as the bytes that arrived, whatever their content_encoding.

    Relies on (amqp 5.4.2): py-amqp's ``Channel.auto_decode`` (a constructor argument, True by
    default, which kombu leaves alone) being read on every delivery, so setting it on an open
    channel takes effect. kombu's virtual channels have no such attribute and never decode.
    """
    if hasattr(channel, "auto_decode"):
        channel.auto_decode = False


def reply_code(exc: BaseException) -> object:
    """The AMQP reply code ``exc`` carries, or None.

    Relies on (amqp 5.4.2): py-amqp's errors (``AMQPError`` and subclasses such as
    ``AccessRefused``) carrying it as ``reply_code``.
    """
    return getattr(exc, "reply_code", None)


def listen_for_binding_replies(channel: Any, on_reply: Callable[[], None]) -> bool:
    """Call ``on_reply`` for every queue.bind-ok and queue.unbind-ok that ``channel`` receives.

    The replies to :func:`send_binding` then arrive through the consumer's own reads, while
    deliveries go on. Relies on (amqp 5.4.2): py-amqp's ``AbstractChannel._callbacks``, the
    method signature -> listener table that ``dispatch_method`` consults for every method it
    reads, and ``amqp.spec.Queue.BindOk``/``UnbindOk``. Returns False for a virtual channel
    (``memory://``), whose bindings take effect at once.
    """
    callbacks = getattr(channel, "_callbacks", None)
    if callbacks is None:
        return False
    from amqp import spec  # noqa: PLC0415 (py-amqp is kombu's, imported only where used)

    callbacks[spec.Queue.BindOk] = on_reply
    callbacks[spec.Queue.UnbindOk] = on_reply
    return True


def send_binding(channel: Any, bind: bool, queue: str, exchange: str, key: str) -> bool:
    """Send queue.bind (or queue.unbind) of ``key`` without waiting for the broker's reply;
    True if it took effect at once instead (a virtual channel: no reply will come).

    Relies on (amqp 5.4.2): ``Channel.send_method`` writing one method frame and returning, and
    the argument layouts ``queue_bind``/``queue_unbind`` send ("BsssbF", "BsssF"). On a virtual
    channel the binding is made in place (kombu's ``queue_bind``/``queue_unbind``).
    """
    if not hasattr(channel, "send_method"):
        if bind:
            channel.queue_bind(queue, exchange, key)
        else:
            channel.queue_unbind(queue, exchange, key)
        return True
    from amqp import spec  # noqa: PLC0415

    if bind:
        channel.send_method(spec.Queue.Bind, "BsssbF", (0, queue, exchange, key, False, {}))
    else:
        channel.send_method(spec.Queue.Unbind, "BsssF", (0, queue, exchange, key, {}))
    return False

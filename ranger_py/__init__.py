"""ranger-py: a websocket gateway that fans RabbitMQ events out to exchange clients.

Importing the package does nothing else: gevent must patch the standard library before any
module that opens sockets is imported, and gunicorn's worker does that patching.
"""

__version__ = "0.1.0"

"""Integration tests: the real server (a gunicorn subprocess), RabbitMQ and websocket clients."""

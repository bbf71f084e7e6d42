"""gunicorn settings for ranger-py: `gunicorn -c gunicorn.conf.py` (also the Procfile's command).

The settings and hooks live in the package, ranger_py/gunicorn_conf.py, so that an installed
ranger-py (`ranger-py serve`) runs the very same server from any directory; this file only
re-exports them for a checkout.
"""

from ranger_py.gunicorn_conf import *  # noqa: F403

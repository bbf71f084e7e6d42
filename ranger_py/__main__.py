"""``python -m ranger_py``: the ``ranger-py`` command, for a checkout where it is not installed."""

import sys

from ranger_py.cli import main

sys.exit(main())

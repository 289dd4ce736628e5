"""``python -m indexes``: see :mod:`indexes.cli`."""

import sys

from .cli import main

sys.exit(main())

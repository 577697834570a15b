"""``python -m cggr`` runs the ``cggr`` command (see ``cggr.cli``)."""

import sys

from .cli import main

sys.exit(main())

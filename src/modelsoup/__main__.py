"""``python -m modelsoup``: the ``soup`` command."""

import sys

from .cli import main

sys.exit(main())

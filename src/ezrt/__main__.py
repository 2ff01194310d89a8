"""``python -m ezrt``: the same as the ``ezrt`` command."""

import sys

from .cli import main

sys.exit(main())

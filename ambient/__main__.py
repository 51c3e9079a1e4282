"""``python -m ambient``: the same as the ``ambient`` command."""

import sys

from ambient.cli import main

sys.exit(main())

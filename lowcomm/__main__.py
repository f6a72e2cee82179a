"""``python -m lowcomm ...`` is the ``lowcomm`` command."""

import sys

from .cli import main

sys.exit(main())

"""``python -m globalattn``: the same as the ``globalattn`` command."""

import sys

from globalattn.cli import main

sys.exit(main())

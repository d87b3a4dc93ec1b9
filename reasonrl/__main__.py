"""``python -m reasonrl ...``: the ``reasonrl`` command line (reasonrl/cli.py)."""

import sys

from reasonrl.cli import main

sys.exit(main())

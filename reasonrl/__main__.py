"""``python -m reasonrl ...``: the ``reasonrl`` command line (reasonrl/cli.py)."""

import sys

from reasonrl.cli import main

if __name__ == "__main__":
    sys.exit(main())

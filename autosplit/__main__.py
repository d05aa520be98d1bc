"""``python -m autosplit``: the same command line as ``autosplit``."""

import sys

from autosplit.cli import main

sys.exit(main())

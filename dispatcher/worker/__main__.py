"""``python -m dispatcher.worker``: the same as ``python worker.py``."""

import sys

from dispatcher.worker.pool import main

sys.exit(main())

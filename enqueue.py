"""Entry point: ``python enqueue.py send|bulk|status|retry ...`` (see dispatcher.cli)."""

import sys

from dispatcher.cli import main

if __name__ == "__main__":
    sys.exit(main())

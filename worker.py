"""Entry point: ``python worker.py [--concurrency N] [--burst] [--queues ...]`` (see dispatcher.worker)."""

import sys

from dispatcher.worker import main

if __name__ == "__main__":
    sys.exit(main())

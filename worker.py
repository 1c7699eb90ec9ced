"""Entry point: ``python worker.py [--concurrency N] [--burst] [--queues ...]`` (dispatcher.worker.pool)."""

import sys

from dispatcher.worker.pool import main

if __name__ == "__main__":
    sys.exit(main())

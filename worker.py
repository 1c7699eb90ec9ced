"""Entry point: ``python worker.py [--concurrency N] [--burst] [--queues ...]`` (dispatcher.worker.pool).

Start-up: the imports make some 60,000 objects the collector tracks, nearly all of them living as long as
the process. The cyclic collector is off while they are made (it would walk them again and again and free
almost nothing) and they are frozen once made (``gc.freeze``: no later collection walks them, not even
the ones at exit): a quarter of a worker process's start-and-stop CPU (~190 -> ~145 ms), paid by every
bench drain and every restart, for the few hundred cyclic garbage objects the imports leave (~0.25 MB of
the ~38 MB peak). Frozen before the pool forks its workers, as the ``gc`` docs advise, the children share
those pages.
"""

import gc
import sys

gc.disable()
from dispatcher.worker.pool import main  # noqa: E402

gc.freeze()
gc.enable()

if __name__ == "__main__":
    sys.exit(main())

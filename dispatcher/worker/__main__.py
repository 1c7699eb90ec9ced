"""``python -m dispatcher.worker``: the same as ``python worker.py`` (whose docstring says why the objects
of the imports are frozen; here the package was imported before this module runs, with the collector on).
"""

import gc
import sys

from dispatcher.worker.pool import main

gc.freeze()
sys.exit(main())

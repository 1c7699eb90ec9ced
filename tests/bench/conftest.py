"""Tests of the bench harness's own logic (``bench/`` is a top-level directory of the repository, not a
package the project installs): make it importable."""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

"""``worker.py`` freezes what its imports made (``gc.freeze``) and leaves the collector on for the work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_entry_point_freezes_the_objects_of_its_imports_and_collects_again_after() -> None:
    probe = "import gc, worker; print(gc.get_freeze_count(), gc.isenabled())"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=True)  # fmt: skip
    frozen, enabled = done.stdout.split()
    assert int(frozen) > 10_000  # the imports' objects, never walked again
    assert enabled == "True"

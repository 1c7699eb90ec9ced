"""The runtime package works without the development tools: no aiosmtpd outside ``dispatcher.dev``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ["dispatcher", "dispatcher.worker", "dispatcher.worker.pool", "dispatcher.delivery.jobs",
           "dispatcher.dashboard", "dispatcher.dashboard.api", "dispatcher.cli"]  # fmt: skip


def run_python(script: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", script]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_runtime_modules_import_without_aiosmtpd() -> None:
    # sys.modules[name] = None makes every later ``import name`` raise ImportError, as if not installed.
    script = "import importlib, sys\nsys.modules['aiosmtpd'] = None\n" + "".join(
        f"importlib.import_module({name!r})\n" for name in RUNTIME
    )
    done = run_python(script)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_dev_tools_do_need_it() -> None:
    """The check above can fail: the dev sink is the one that imports aiosmtpd."""
    script = "import sys\nsys.modules['aiosmtpd'] = None\nimport dispatcher.dev.devsink\n"
    done = run_python(script)
    assert done.returncode != 0 and "aiosmtpd" in done.stderr


FRAMEWORKS = ("django", "flask", "jinja2")


def test_importing_dispatcher_loads_no_framework() -> None:
    """Django, Flask and Jinja2 are loaded by the integration that needs them, never by ``dispatcher``."""
    script = (
        "import sys, dispatcher, dispatcher.testing, dispatcher.queue.producer, dispatcher.mail.reader\n"
        f"loaded = [name for name in {FRAMEWORKS!r} if name in sys.modules]\n"
        "print(loaded)\nsys.exit(1 if loaded else 0)\n"
    )
    done = run_python(script)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


def test_the_integrations_do_load_them() -> None:
    """The check above can fail: each integration module imports its framework."""
    script = (
        "import sys, dispatcher.django, dispatcher.flask, dispatcher.mail.templates\n"
        f"print(sorted(name for name in {FRAMEWORKS!r} if name in sys.modules))\n"
    )
    done = run_python(script)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(sorted(FRAMEWORKS))

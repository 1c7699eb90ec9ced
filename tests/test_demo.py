"""`make demo`'s program, run as a new user would (with --exit-when-settled instead of Ctrl-C)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from email import policy
from email.parser import BytesParser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def demo_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_URL", "SMTP_URL", "DISPATCH_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_the_demo_batch_settles_and_every_path_shows(tmp_path: Path) -> None:
    data = tmp_path / "demo-data"
    done = subprocess.run(
        [sys.executable, "-m", "dispatcher.dev.demo", "--data-dir", str(data), "--exit-when-settled",
         "--timeout", "60"],
        cwd=ROOT, env=demo_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "settled    yes" in out
    assert "delivered 23" in out and "failed 1" in out
    assert "dashboard  http://127.0.0.1:" in out and "stopped" in out
    parser = BytesParser(policy=policy.default)
    mails = [parser.parsebytes(p.read_bytes()) for p in sorted((data / "mail").glob("*.eml"))]
    subjects = {str(m["Subject"]) for m in mails}
    assert "Deferred once, then delivered" in subjects  # the 450-once recipient, retried
    assert "Refused with 550" not in subjects
    assert "Grüße aus Köln" in subjects
    assert any(part.get_filename() == "report.csv" for m in mails for part in m.walk())
    assert (data / "logs" / "worker.log").read_text().count('"event": "mail_delivered"') == 23


def test_ctrl_c_stops_everything_the_demo_started(tmp_path: Path) -> None:
    data = tmp_path / "demo-data"
    demo = subprocess.Popen(
        [sys.executable, "-m", "dispatcher.dev.demo", "--data-dir", str(data)],
        cwd=ROOT, env=demo_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert demo.stdout is not None
    lines = []
    for line in demo.stdout:
        lines.append(line)
        if line.startswith("Ctrl-C stops everything"):
            break
    demo.send_signal(signal.SIGINT)
    rest, _ = demo.communicate(timeout=60)
    assert demo.returncode == 0, "".join(lines) + rest
    assert "stopped" in rest
    logs = data / "logs"
    worker_log = (logs / "worker.log").read_text()
    assert '"event": "pool_stopped"' in worker_log
    assert '"event": "dashboard_stopped"' in (logs / "dashboard.log").read_text()
    # Workers stop before Redis does: none of them meets a vanished Redis on its way out.
    for name in ("worker.log", "dashboard.log"):
        text = (logs / name).read_text()
        assert "worker_process_crashed" not in text and "Traceback" not in text, text[-4000:]
    assert '"exit_codes": [0, 0]' in worker_log, worker_log[-4000:]
    assert "Traceback" not in rest

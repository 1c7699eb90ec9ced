"""Nodemailer's ``smtp-server`` (npm) as an interop MTA, driven by ``smtp_server.js`` beside this file.

``install`` runs ``npm install --prefix <cache>/smtp-server`` with pinned versions; ``run`` starts
``node smtp_server.js`` on 127.0.0.1 with a JSON config in the private workdir. The script offers
STARTTLS with the test certificate, AUTH PLAIN/LOGIN (only after STARTTLS: the library answers 538
before it), refuses ``refused@example.test`` with 550 at RCPT, and relays every accepted message (raw
bytes, envelope kept) to the sink with nodemailer's SMTP connection *before* it answers the final dot:
a 250 from it means the sink has the message. The library offers PIPELINING, 8BITMIME, SMTPUTF8,
ENHANCEDSTATUSCODES, DSN, SIZE; not CHUNKING. Nothing but node processes on loopback is involved.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from interop.servers._process import greets, tail
from interop.servers.base import DOMAIN, REFUSED_RECIPIENT, RunningServer, ServerSpec

NAME = "smtp-server"
SMTP_SERVER_VERSION = "3.21.6"
NODEMAILER_VERSION = "10.6.0"  # the version smtp-server 3.21.6 itself depends on: one copy in node_modules
SIZE_LIMIT = 50 * 1024 * 1024
SCRIPT = Path(__file__).with_name("smtp_server.js")
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
OFFERS = frozenset(
    {"PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "DSN", "STARTTLS", "AUTH", "SIZE"}
)


def _prefix(cache: Path) -> Path:
    return cache / "smtp-server"


def _installed_version(cache: Path, package: str) -> str | None:
    manifest = _prefix(cache) / "node_modules" / package / "package.json"
    try:
        version = json.loads(manifest.read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None
    return str(version)


def _installed(cache: Path) -> bool:
    return (
        _installed_version(cache, "smtp-server") == SMTP_SERVER_VERSION
        and _installed_version(cache, "nodemailer") == NODEMAILER_VERSION
    )


def install(cache: Path) -> None:
    """``npm install`` the pinned smtp-server and nodemailer under ``cache/smtp-server`` (once; a lock
    keeps two sessions sharing the cache from installing at the same time)."""
    if _installed(cache):
        return
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed (Debian/Ubuntu: apt-get install nodejs npm)")
    prefix = _prefix(cache)
    prefix.mkdir(parents=True, exist_ok=True)
    with (cache / ".smtp-server.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _installed(cache):
            _npm_install(prefix)


def _npm_install(prefix: Path) -> None:
    argv = [
        "npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--loglevel=error",
        f"smtp-server@{SMTP_SERVER_VERSION}", f"nodemailer@{NODEMAILER_VERSION}",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    manifest = prefix / "node_modules" / "smtp-server" / "package.json"
    if not manifest.exists() or json.loads(manifest.read_text()).get("version") != SMTP_SERVER_VERSION:
        raise RuntimeError(f"npm did not install smtp-server {SMTP_SERVER_VERSION} under {prefix}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM its process group, wait with a deadline, then SIGKILL."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT)


@contextlib.contextmanager
def run(spec: ServerSpec) -> Iterator[RunningServer]:
    version = (
        f"smtp-server {_installed_version(spec.cache, 'smtp-server')}"
        f" + nodemailer {_installed_version(spec.cache, 'nodemailer')}"
        f" on node {subprocess.run(['node', '--version'], capture_output=True, text=True).stdout.strip()}"
    )
    config = {
        "port": spec.port,
        "relay_port": spec.relay_port,
        "domain": DOMAIN,
        "refused": REFUSED_RECIPIENT,
        "cert_pem": str(spec.tls.cert_pem),
        "key_pem": str(spec.tls.key_pem),
        "username": spec.username,
        "password": spec.password,
        "size": SIZE_LIMIT,
        "version": version,
    }
    config_path = spec.workdir / "smtp-server.json"
    config_path.write_text(json.dumps(config, indent=2))
    log_path = spec.workdir / "smtp-server.log"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "NODE_PATH": str(_prefix(spec.cache) / "node_modules"),
        "HOME": str(spec.workdir),
    }
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            ["node", str(SCRIPT), str(config_path)],
            cwd=spec.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not greets(spec.port):
            if process.poll() is not None:
                raise RuntimeError(
                    f"node exited with {process.returncode} before greeting:\n{tail(log_path)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"smtp-server did not greet within {START_TIMEOUT}s:\n{tail(log_path)}")
            time.sleep(0.05)  # polling the port with a deadline
        yield RunningServer(
            name=NAME,
            version=version,
            port=spec.port,
            offers=OFFERS,
            auth_needs_tls=True,
            log_path=log_path,
            notes=(
                "relays each message to the sink before answering its final dot (no queue of its own)",
                "no CHUNKING in the library",
            ),
        )
    finally:
        _stop(process)

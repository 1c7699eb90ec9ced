"""Haraka 3.x from npm, run in the foreground as one process (no cluster) from a private instance directory.

``install`` runs ``npm install --prefix <cache>/haraka Haraka@3.3.4`` (pinned; node >= 20). ``run`` makes an
instance with ``haraka -i <workdir>/haraka`` and writes its config from ``haraka_config/`` beside this file
(``config/*`` are templates filled with the spec; ``plugins/*`` are three tiny local plugins: no reverse
DNS, AUTH only after STARTTLS, refuse the refused recipient). ``node haraka -c <instance>`` then listens on
``127.0.0.1:port`` only and, before it answers the final dot, forwards each message with
``queue/smtp_forward`` to ``127.0.0.1:relay_port``. Nothing outside the cache and the workdir is read or
written, and no name or address lookup leaves the machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from interop.servers import _process
from interop.servers.base import DOMAIN, REFUSED_RECIPIENT, NotApplicable, RunningServer, ServerSpec

NAME = "haraka"
HARAKA_VERSION = "3.3.4"
"""Pinned: the 503 after end of DATA that the suite checks is Haraka 3.3's; a later release may differ."""
PACKAGE = f"Haraka@{HARAKA_VERSION}"
NODE_MAJOR = 20
"""Haraka 3.2+ declares ``engines.node >= 20`` (Debian bookworm's own nodejs is 18)."""
HOSTNAME = "haraka.interop.invalid"
START_TIMEOUT = 60.0
TEMPLATES = Path(__file__).with_name("haraka_config")

PLUGINS = (
    "interop_no_rdns",  # answers lookup_rdns itself: no PTR query leaves the machine
    "tls",
    "auth_flat_file_tls",  # auth/flat_file (auth_flat_file.ini), offered only after STARTTLS
    "refuse_test_rcpt",  # before in_host_list: the refusal must win over the domain's acceptance
    "rcpt_to.in_host_list",
    "queue/smtp_forward",
)


def _prefix(cache: Path) -> Path:
    return cache / "haraka"


def _haraka_js(cache: Path) -> Path:
    return _prefix(cache) / "node_modules" / "Haraka" / "bin" / "haraka"


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        raise RuntimeError(f"the Haraka launcher needs node (>= {NODE_MAJOR}) on PATH")
    return node


def _node_version() -> str:
    return subprocess.run([_node(), "--version"], capture_output=True, text=True, check=False).stdout.strip()


def _check_node() -> None:
    found = _node_version()
    try:
        major = int(found.lstrip("v").split(".")[0])
    except ValueError:
        raise RuntimeError(f"cannot tell node's version from {found!r}") from None
    if major < NODE_MAJOR:
        raise NotApplicable(f"Haraka 3 needs node >= {NODE_MAJOR}; this machine's node is {found}")


def install(cache: Path) -> None:
    """``npm install`` Haraka 3 under ``cache/haraka`` (idempotent: skipped once it is there)."""
    _check_node()
    prefix = _prefix(cache)
    prefix.mkdir(parents=True, exist_ok=True)
    with (prefix / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = prefix / "installed"
        if _haraka_js(cache).exists() and stamp.exists() and stamp.read_text().strip() == HARAKA_VERSION:
            return
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("the Haraka launcher needs npm on PATH")
        result = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--prefix", str(prefix), PACKAGE],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0 or not _haraka_js(cache).exists():
            raise RuntimeError(f"npm install {PACKAGE} failed:\n{result.stdout}\n{result.stderr}")
        (prefix / "installed").write_text(version(cache) + "\n")


def version(cache: Path) -> str:
    package = _prefix(cache) / "node_modules" / "Haraka" / "package.json"
    return str(json.loads(package.read_text())["version"])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TZ")}
    env["NODE_ENV"] = "production"
    return env


def _make_instance(spec: ServerSpec) -> Path:
    instance = spec.workdir / "haraka"
    result = subprocess.run(
        [_node(), str(_haraka_js(spec.cache)), "-i", str(instance)],
        env=_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 or not (instance / "config").is_dir():
        raise _process.LaunchError(
            f"haraka -i failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    config = instance / "config"
    for template in sorted((TEMPLATES / "config").iterdir()):
        text = template.read_text().format(
            port=spec.port,
            relay_port=spec.relay_port,
            domain=DOMAIN,
            refused=REFUSED_RECIPIENT,
            username=spec.username,
            password=spec.password,
            hostname=HOSTNAME,
        )
        (config / template.name).write_text(text)
    (config / "plugins").write_text("\n".join(PLUGINS) + "\n")
    shutil.copyfile(spec.tls.cert_pem, config / "tls_cert.pem")
    shutil.copyfile(spec.tls.key_pem, config / "tls_key.pem")
    (config / "tls_key.pem").chmod(0o600)
    for plugin in sorted((TEMPLATES / "plugins").iterdir()):
        shutil.copyfile(plugin, instance / "plugins" / plugin.name)
    return instance


@contextlib.contextmanager
def run(spec: ServerSpec) -> Iterator[RunningServer]:
    instance = _make_instance(spec)
    log = spec.workdir / "haraka.log"
    argv = [_node(), str(_haraka_js(spec.cache)), "-c", str(instance)]
    with _process.running(
        argv,
        env=_env(),
        cwd=instance,
        output=log,
        port=spec.port,
        timeout=START_TIMEOUT,
    ):
        yield RunningServer(
            name=NAME,
            version=f"{version(spec.cache)} (node {_node_version()})",
            port=spec.port,
            offers=frozenset({"PIPELINING", "8BITMIME", "SMTPUTF8", "SIZE", "STARTTLS", "AUTH"}),
            auth_needs_tls=True,
            log_path=log,
            notes=(
                "no CHUNKING (Haraka has no BDAT)",
                "commands pipelined after the final dot are refused: 503 each, connection kept",
                "AUTH only after STARTTLS (flat_file wrapped: stock offers it in plaintext to loopback)",
            ),
        )

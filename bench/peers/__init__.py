"""Peers of issue 15, installed by the bench itself: BullMQ + Nodemailer (npm) and Celery (pip extra).

- **BullMQ + Nodemailer**: ``bench/peers/package.json`` + ``package-lock.json`` pin the versions; the
  first run copies them to ``bench/.peers/`` (git-ignored) and runs ``npm ci --prefix bench/.peers
  --ignore-scripts --omit=optional`` (registry packages only: no install scripts, no optional native
  add-ons — msgpackr falls back to its pure-JS codec). Later runs reuse it while the two files are
  unchanged (a stamp holds their hash). Without ``node`` on PATH the scenario is skipped with a message;
  without ``npm`` it is skipped only if nothing is installed yet.
- **Celery**: ``celery[redis]`` pinned in the ``bench`` extra of pyproject.toml (``make bench`` installs
  it); without it the scenario is skipped with a message.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

PEERS_DIR = Path(__file__).resolve().parent
CACHE_DIR = PEERS_DIR.parent / ".peers"
NODE_MODULES = CACHE_DIR / "node_modules"
NODE_SCRIPT = PEERS_DIR / "bullmq_peer.js"
_MANIFESTS = ("package.json", "package-lock.json")
_STAMP = CACHE_DIR / ".installed"
NPM_TIMEOUT_S = 300


@dataclass(frozen=True)
class PeerStatus:
    ready: bool
    message: str  # what was done, or why the peer is skipped
    versions: dict[str, str]


def pinned_node_versions() -> dict[str, str]:
    deps: dict[str, str] = json.loads((PEERS_DIR / "package.json").read_text())["dependencies"]
    return dict(deps)


def _manifest_hash() -> str:
    digest = hashlib.sha256()
    for name in _MANIFESTS:
        digest.update((PEERS_DIR / name).read_bytes())
    return digest.hexdigest()


def _installed_versions() -> dict[str, str]:
    out = {}
    for name in pinned_node_versions():
        try:
            out[name] = json.loads((NODE_MODULES / name / "package.json").read_text())["version"]
        except (OSError, ValueError, KeyError):
            out[name] = "?"
    out["node"] = node_version()
    return out


def node_version() -> str:
    node = shutil.which("node")
    if node is None:
        return "absent"
    try:
        return subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def ensure_node_peers() -> PeerStatus:
    """Install BullMQ + Nodemailer into bench/.peers once; skip (not fail) where Node is absent."""
    pins = pinned_node_versions()
    if shutil.which("node") is None:
        return PeerStatus(False, "SKIPPED BullMQ + Nodemailer: `node` is not on PATH "
                          "(Debian/Ubuntu: apt-get install nodejs npm)", pins)
    installed = _STAMP.exists() and _STAMP.read_text().strip() == _manifest_hash()
    if installed and all((NODE_MODULES / name).is_dir() for name in pins):
        versions = _installed_versions()
        return PeerStatus(True, f"{_pretty(versions)} from {NODE_MODULES}", versions)
    npm = shutil.which("npm")
    if npm is None:
        return PeerStatus(False, "SKIPPED BullMQ + Nodemailer: `node` is here but `npm` is not, and "
                          f"{NODE_MODULES} is not installed (apt-get install npm)", pins)
    CACHE_DIR.mkdir(exist_ok=True)
    _STAMP.unlink(missing_ok=True)
    for name in _MANIFESTS:
        shutil.copyfile(PEERS_DIR / name, CACHE_DIR / name)
    cmd = [npm, "ci", "--prefix", str(CACHE_DIR), "--ignore-scripts", "--omit=optional", "--no-audit",
           "--no-fund", "--loglevel=error"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=NPM_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return PeerStatus(False, f"PROBLEM: `{' '.join(cmd)}` took more than {NPM_TIMEOUT_S} s", pins)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return PeerStatus(False, f"PROBLEM: `{' '.join(cmd)}` failed ({done.returncode}): "
                          + " | ".join(tail), pins)
    _STAMP.write_text(_manifest_hash() + "\n")
    versions = _installed_versions()
    return PeerStatus(True, f"installed {_pretty(versions)} into {NODE_MODULES} (npm ci, once)", versions)


def _pretty(versions: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in versions.items())


def celery_status() -> PeerStatus:
    if importlib.util.find_spec("celery") is None:
        return PeerStatus(False, "SKIPPED Celery: not installed (`make bench` installs the bench extra: "
                          "pip install -e '.[bench]')", {})
    from importlib.metadata import version

    versions = {"celery": version("celery"), "kombu": version("kombu")}
    return PeerStatus(True, f"{_pretty(versions)} from the venv", versions)

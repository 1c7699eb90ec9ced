"""Shared plumbing of the launchers that run a Debian package's MTA without installing it.

The package is fetched with ``apt-get download`` and unpacked with ``dpkg -x`` into a private tree under
the interop cache: nothing is installed, no maintainer script runs, and the machine's own MTA (if any),
its users, ``/etc`` and ``/var`` stay as they are. The server then runs inside a private mount namespace
(``unshare --mount``) whose bind mounts make the package's compiled-in paths (its spool, its system
users, a shared library it needs) resolve to files of the test's own work directory; those mounts are
invisible outside that namespace and vanish with its last process.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import shlex
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from interop.servers import _process
from interop.servers.base import NotApplicable

_APT_OPTIONS = ("-o", "APT::Sandbox::User=root", "-o", "Dpkg::Use-Pty=0")
_STAMP = ".installed"


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _private_apt_options(apt: Path, sources: Sequence[str]) -> tuple[str, ...]:
    """apt options for a private package source: its own sources.list, lists and cache under ``apt``, so
    the machine's apt configuration and package lists stay exactly as they were."""
    (apt / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (apt / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    (apt / "sources.list").write_text("".join(f"{line}\n" for line in sources))
    return (
        "-o", f"Dir::Etc::SourceList={apt / 'sources.list'}",
        "-o", f"Dir::Etc::SourceParts={apt / 'sources.list.d'}",
        "-o", f"Dir::State::Lists={apt / 'lists'}",
        "-o", f"Dir::Cache={apt / 'cache'}",
    )  # fmt: skip


def _apt_download(debs: Path, packages: Sequence[str], private: tuple[str, ...]) -> None:
    command = ["apt-get", *_APT_OPTIONS, *private, "download", *packages]
    update = ["apt-get", *_APT_OPTIONS, *private, "update", "-qq"]
    if private:
        # A private source has no lists until its first update (and apt-get download never updates).
        subprocess.run(update, capture_output=True, text=True, check=False)
    first = subprocess.run(command, cwd=debs, capture_output=True, text=True, check=False)
    if first.returncode == 0:
        return
    # A fresh machine has no package lists yet (or stale ones whose files are gone): update once, retry.
    updated = subprocess.run(update, capture_output=True, text=True, check=False)
    second = subprocess.run(command, cwd=debs, capture_output=True, text=True, check=False)
    if second.returncode != 0:
        errors = "\n".join(out.stderr for out in (first, updated, second))
        raise RuntimeError(f"apt-get download {' '.join(packages)} failed:\n{errors}")


def require_tools() -> None:
    """NotApplicable where Debian's package tools are missing (not a Debian/Ubuntu machine); an error where
    the run needs root (mount namespaces, bind mounts, servers that drop to their own users)."""
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise NotApplicable(f"needs Debian's package tools ({', '.join(missing)} missing)")
    if shutil.which("unshare") is None:
        raise RuntimeError("needs unshare (util-linux) for the server's private mount namespace")
    if os.geteuid() != 0:
        raise RuntimeError("runs the server as root in a private mount namespace: run the suite as root")


def unpack_packages(home: Path, packages: Sequence[str], *, sources: Sequence[str] = ()) -> Path:
    """``apt-get download`` ``packages`` into ``home/debs`` and ``dpkg -x`` each into ``home/root``.

    ``sources``: sources.list lines of a private package source (apt state under ``home/apt``) to take
    the packages from instead of the machine's configured ones. Idempotent: a finished unpack leaves a
    stamp naming the packages and sources and is not redone. Returns the root.
    """
    require_tools()
    root = home / "root"
    stamp = home / _STAMP
    wanted = "".join(f"{line}\n" for line in (*sorted(packages), *sources))
    with _locked(home):
        if stamp.is_file() and stamp.read_text() == wanted and root.is_dir():
            return root
        stamp.unlink(missing_ok=True)
        debs = home / "debs"
        shutil.rmtree(debs, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        debs.mkdir(parents=True)
        private = _private_apt_options(home / "apt", sources) if sources else ()
        _apt_download(debs, packages, private)
        shutil.rmtree(home / "apt", ignore_errors=True)  # a private source's lists: only needed to download
        root.mkdir()
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, capture_output=True)
        stamp.write_text(wanted)
    return root


def package_version(home: Path, package: str) -> str:
    """The Debian version of ``package`` as downloaded into ``home/debs`` (e.g. ``4.96-15+deb12u11``)."""
    for deb in sorted((home / "debs").glob(f"{package}_*.deb")):
        out = subprocess.run(
            ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    raise FileNotFoundError(f"no {package} package under {home / 'debs'}")


def library_dirs(root: Path) -> list[Path]:
    """The multiarch library directories of an unpacked tree (``usr/lib/x86_64-linux-gnu`` …)."""
    return sorted(p for p in (root / "usr" / "lib").glob("*-linux-gnu*") if p.is_dir())


def check_libraries(binary: Path, root: Path) -> None:
    """Fail at install time, with the names, when ``binary`` needs a shared library neither the system
    nor the unpacked tree has."""
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(str(p) for p in library_dirs(root)))
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=env, check=False)
    missing = [line.split()[0] for line in out.stdout.splitlines() if "not found" in line]
    if missing:
        raise RuntimeError(f"{binary} needs libraries that are not there: {', '.join(missing)}")


def free_id(taken_uids: set[int], taken_gids: set[int], start: int = 64000, stop: int = 65000) -> int:
    for candidate in range(start, stop):
        if candidate not in taken_uids and candidate not in taken_gids:
            return candidate
    raise RuntimeError(f"no free uid/gid in {start}..{stop}")


def write_user_files(directory: Path, users: Sequence[str], groups: Sequence[str]) -> dict[str, int]:
    """Copies of ``/etc/passwd`` and ``/etc/group`` with the given system users/groups added where the
    machine lacks them (each user gets its own group of the same name and a free id). Bind-mounted over
    the real ones inside the server's mount namespace only. Returns the id of every user and group named.
    """
    passwd_lines = Path("/etc/passwd").read_text().splitlines()
    group_lines = Path("/etc/group").read_text().splitlines()
    uids = {p.pw_uid for p in pwd.getpwall()}
    gids = {g.gr_gid for g in grp.getgrall()}
    ids: dict[str, int] = {}
    for name in groups:
        try:
            ids[name] = grp.getgrnam(name).gr_gid
        except KeyError:
            gid = free_id(uids, gids)
            gids.add(gid)
            group_lines.append(f"{name}:x:{gid}:")
            ids[name] = gid
    for name in users:
        try:
            ids[name] = pwd.getpwnam(name).pw_uid
        except KeyError:
            uid = free_id(uids, gids)
            uids.add(uid)
            gid = ids.get(name, uid)
            passwd_lines.append(f"{name}:x:{uid}:{gid}:interop {name}:/nonexistent:/usr/sbin/nologin")
            ids[name] = uid
    (directory / "passwd").write_text("\n".join(passwd_lines) + "\n")
    (directory / "group").write_text("\n".join(group_lines) + "\n")
    return ids


@dataclass(frozen=True)
class Bind:
    """``source`` (a file or directory of ours) appears at ``target``, which must exist."""

    source: Path
    target: str


@dataclass(frozen=True)
class Tmpfs:
    """A fresh, empty tmpfs on ``target`` (hiding what was there), with the directories ``make`` in it."""

    target: str
    make: tuple[str, ...] = ()


@dataclass(frozen=True)
class Overlay:
    """The directory ``extra`` laid read-only over ``target``: both trees' files show, ``extra``'s win."""

    extra: Path
    target: str


Mount = Bind | Tmpfs | Overlay


def _mount_lines(mounts: Sequence[Mount]) -> list[str]:
    lines = []
    for item in mounts:
        if isinstance(item, Bind):
            lines.append(f"mount --bind {shlex.quote(str(item.source))} {shlex.quote(item.target)}")
        elif isinstance(item, Tmpfs):
            lines.append(f"mount -t tmpfs -o mode=0755,size=1m interop {shlex.quote(item.target)}")
            lines.extend(f"mkdir -p {shlex.quote(item.target + '/' + sub)}" for sub in item.make)
        else:
            for path in (str(item.extra), item.target):
                if ":" in path or "," in path:
                    raise ValueError(f"cannot overlay a path with ':' or ',': {path}")
            option = shlex.quote(f"lowerdir={item.extra}:{item.target}")
            lines.append(f"mount -t overlay -o {option} interop {shlex.quote(item.target)}")
    return lines


def namespace_command(mounts: Sequence[Mount], command: Sequence[str]) -> list[str]:
    """``command`` run in a new private mount namespace (``unshare --mount``, propagation private) after
    ``mounts``, in order. Those mounts exist only in that namespace: the machine sees none of them, and
    they go away with the namespace's last process. ``unshare`` and ``sh`` exec, so the pid of the
    returned command is the server's own."""
    require_tools()
    script = "\n".join(["set -eu", *_mount_lines(mounts), 'exec "$@"'])
    return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script, "sh", *command]


def user_mounts(workdir: Path) -> list[Mount]:
    """Binds of the ``passwd``/``group`` copies that ``write_user_files`` left in ``workdir``."""
    return [Bind(workdir / "passwd", "/etc/passwd"), Bind(workdir / "group", "/etc/group")]


def library_overlay(root: Path, library_glob: str) -> list[Mount]:
    """The unpacked tree's library directory holding ``library_glob``, overlaid on the system's one of
    the same name, so that even re-executed setuid binaries (which ignore LD_LIBRARY_PATH) find it."""
    dirs = [d for d in library_dirs(root) if any(d.glob(library_glob))]
    return [Overlay(dirs[0], f"/usr/lib/{dirs[0].name}")] if dirs else []


def _namespace_id(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


class PrivateNamespace:
    """The mount namespace ``unshare`` made for the server, held open (an fd on it) so that its identity
    cannot be reused by another namespace while we still look for its processes."""

    def __init__(self, pid: int) -> None:
        self.fd: int | None = None
        self.id: tuple[int, int] | None = None
        ours = _namespace_id(f"/proc/{os.getpid()}/ns/mnt")
        try:
            fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY)
        except OSError:
            return  # already gone: nothing left to find
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) == ours:  # not (yet) in a namespace of its own: never sweep ours
            os.close(fd)
            return
        self.fd, self.id = fd, (info.st_dev, info.st_ino)

    def processes(self) -> list[int]:
        if self.id is None:
            return []
        return [
            int(entry.name)
            for entry in Path("/proc").iterdir()
            if entry.name.isdigit() and _namespace_id(f"/proc/{entry.name}/ns/mnt") == self.id
        ]

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then at the deadline SIGKILL, every process left in the namespace; then let it go."""
        try:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in self.processes():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                try:
                    _process.wait_until(lambda: not self.processes(), timeout, "the namespace to empty")
                    return
                except TimeoutError:
                    if sig == signal.SIGKILL:
                        raise
        finally:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None


@contextlib.contextmanager
def running_in_namespace(
    argv: list[str], *, cwd: Path, output: Path, port: int, timeout: float, logs: Sequence[Path] = ()
) -> Iterator[subprocess.Popen[bytes]]:
    """``_process.running`` for a command of ``namespace_command``: on exit, after the process group,
    every process left in the server's private mount namespace (one that left the group) is stopped too.
    """
    namespace: PrivateNamespace | None = None
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: namespace.stop() if namespace is not None else None)
        process = stack.enter_context(
            _process.running(
                argv, env=os.environ, cwd=cwd, output=output, port=port, timeout=timeout, logs=logs
            )
        )
        namespace = PrivateNamespace(process.pid)
        yield process


def _machine_source_entries() -> list[tuple[str, str, str]]:
    """(URI, suite, signed-by) of every enabled ``deb`` entry of the machine's apt configuration."""
    entries: list[tuple[str, str, str]] = []
    etc = Path("/etc/apt")
    for path in sorted(etc.glob("sources.list.d/*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
                continue
            for uri in fields.get("uris", "").split():
                for suite in fields.get("suites", "").split():
                    entries.append((uri, suite, fields.get("signed-by", "")))
    for path in [etc / "sources.list", *sorted(etc.glob("sources.list.d/*.list"))]:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) < 3 or words[0] != "deb":
                continue
            options = ""
            if words[1].startswith("["):
                end = next(i for i, w in enumerate(words) if w.endswith("]"))
                options, words = " ".join(words[1 : end + 1]), [words[0], *words[end + 1 :]]
            signed = ""
            if "signed-by=" in options:
                signed = options.split("signed-by=", 1)[1].split()[0].rstrip("]")
            entries.append((words[1], words[2], signed))
    return entries


def other_release_sources(release: str) -> list[str]:
    """sources.list lines for Debian ``release`` (e.g. ``bullseye``): the machine's own Debian archive and
    security archive (as its apt is configured, same mirrors and keyring), main component only."""
    codename = ""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            codename = line.split("=", 1)[1].strip().strip('"')
    lines = []
    for uri, suite, signed in _machine_source_entries():
        for ours, theirs in ((codename, release), (f"{codename}-security", f"{release}-security")):
            if codename and suite == ours:
                option = f"[signed-by={signed}] " if signed else ""
                lines.append(f"deb {option}{uri} {theirs} main")
    if not lines:
        raise RuntimeError(f"the machine's apt sources have no Debian {codename or '?'} entry to mirror")
    return lines

"""Exim 4.96 from Debian bookworm's packages, run without installing them.

``install`` downloads exim4-daemon-light, exim4-base, exim4-config and libidn12 (``apt-get download``) and
unpacks them (``dpkg -x``) under ``<cache>/exim/root``. ``run`` starts ``exim4 -C <own config> -bdf -q1s``
as root inside a private mount namespace (``unshare --mount``) in which

* ``/etc/passwd`` and ``/etc/group`` are copies with the package's compiled-in system user
  ``Debian-exim`` added (Exim refuses to start without it; the machine's own files are untouched),
* the work directory's ``exim/`` folder appears at the compiled-in spool path ``/var/spool/exim4`` (a
  tmpfs hides the rest of ``/var/spool`` in that namespace only), with the config, spool, logs and a
  copy of the TLS key that the unprivileged receiving processes can read,
* libidn's directory of the unpacked tree is overlaid on the system's library directory, so Exim's
  setuid re-executions find ``libidn.so.12`` without LD_LIBRARY_PATH (which the loader ignores there).

As root is the caller, ``-C`` keeps privilege (no TRUSTED_CONFIG_LIST needed); Exim itself drops to
``Debian-exim`` to receive and deliver (``deliver_drop_privilege``). Nothing outside the work directory
and the cache is written, and no port but ``127.0.0.1:spec.port`` is opened.

Left as Exim does it (the checks rely on real behaviour): after a pipelined ``BDAT n LAST`` refused
because no RCPT was accepted ("503-All RCPT commands were rejected …" / "503 Valid RCPT command must
precede BDAT"), Exim keeps the envelope, so the next pipelined ``MAIL`` gets "503 sender already given"
(and a following RCPT + BDAT would go out under the first sender). The Debian build also advertises
PIPECONNECT (its default ``pipelining_connect_advertise_hosts = *``) and HELP.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from interop.servers import _debian, _process
from interop.servers.base import REFUSED_RECIPIENT, RunningServer, ServerSpec, fill_template

NAME = "exim"
PACKAGES = ("exim4-daemon-light", "exim4-base", "exim4-config", "libidn12")
EXIM_USER = "Debian-exim"
"""The user name compiled into Debian's binary (EXIM_USER=ref:Debian-exim)."""
HOME = "/var/spool/exim4"
"""Where the work directory's ``exim/`` folder appears inside the namespace (the compiled-in spool)."""
TEMPLATE = Path(__file__).with_name("exim.conf.in")
OFFERS = frozenset({"PIPELINING", "CHUNKING", "8BITMIME", "SMTPUTF8", "SIZE", "STARTTLS", "AUTH"})
START_TIMEOUT = 30.0


def _home(cache: Path) -> Path:
    return cache / "exim"


def _binary(root: Path) -> Path:
    return root / "usr" / "sbin" / "exim4"


def install(cache: Path) -> None:
    root = _debian.unpack_packages(_home(cache), PACKAGES)
    _debian.check_libraries(_binary(root), root)


def _expansion_literal(value: str) -> str:
    """``value`` for use between Exim's ``\\N … \\N`` (no expansion inside) on one config line."""
    if "\\N" in value or "\n" in value or "\r" in value or value != value.strip():
        raise ValueError(f"cannot put {value!r} in an Exim expansion literal")
    return value


def render_config(spec: ServerSpec, exim_path: Path) -> str:
    local, domain = REFUSED_RECIPIENT.split("@")
    values = {
        "HOME": HOME,
        "EXIM_PATH": str(exim_path),
        "PORT": str(spec.port),
        "RELAY_PORT": str(spec.relay_port),
        "DOMAIN": domain,
        "REFUSED_LOCAL": local,
        "USERNAME": _expansion_literal(spec.username),
        "PASSWORD": _expansion_literal(spec.password),
    }
    return fill_template(TEMPLATE, values)


def _prepare(spec: ServerSpec, root: Path) -> tuple[Path, Path]:
    """Lays out ``spec.workdir``; returns (the folder that appears at HOME, the main log)."""
    workdir = spec.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    ids = _debian.write_user_files(workdir, users=[EXIM_USER], groups=[EXIM_USER])
    uid, gid = ids[EXIM_USER], ids[EXIM_USER]
    private = workdir / "exim"
    private.mkdir(mode=0o755)
    (private / "exim.conf").write_text(render_config(spec, _binary(root)))
    (private / "exim.conf").chmod(0o644)
    for name in ("spool", "log", "tls"):
        (private / name).mkdir(mode=0o750)
        os.chown(private / name, uid, gid)
    shutil.copyfile(spec.tls.cert_pem, private / "tls" / "cert.pem")
    shutil.copyfile(spec.tls.key_pem, private / "tls" / "key.pem")
    for name in ("cert.pem", "key.pem"):
        os.chown(private / "tls" / name, uid, gid)
        (private / "tls" / name).chmod(0o600)
    return private, private / "log" / "mainlog"


def _command(spec: ServerSpec, root: Path, exim_args: list[str]) -> list[str]:
    mounts: list[_debian.Mount] = [
        *_debian.user_mounts(spec.workdir),
        _debian.Tmpfs(str(Path(HOME).parent), make=(Path(HOME).name,)),
        _debian.Bind(spec.workdir / "exim", HOME),
        *_debian.library_overlay(root, "libidn.so.*"),
    ]
    return _debian.namespace_command(mounts, [str(_binary(root)), "-C", f"{HOME}/exim.conf", *exim_args])


def _version(spec: ServerSpec, root: Path) -> str:
    """``exim -bV`` with the config (which checks it, too): e.g. ``4.96 (Debian 4.96-15+deb12u11)``."""
    out = subprocess.run(
        _command(spec, root, ["-bV"]), capture_output=True, text=True, timeout=START_TIMEOUT, check=False
    )
    if out.returncode != 0:
        raise _process.LaunchError(f"exim -bV failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    match = re.search(r"Exim version (\S+)", out.stdout)
    upstream = match.group(1) if match else "?"
    return f"{upstream} (Debian {_debian.package_version(_home(spec.cache), 'exim4-daemon-light')})"


@contextmanager
def run(spec: ServerSpec) -> Iterator[RunningServer]:
    root = _home(spec.cache) / "root"
    if not _binary(root).is_file():
        raise FileNotFoundError(f"{_binary(root)} is missing: run install({spec.cache}) first")
    _, mainlog = _prepare(spec, root)
    version = _version(spec, root)
    stderr_path = spec.workdir / "exim.stderr"
    with _debian.running_in_namespace(
        _command(spec, root, ["-bdf", "-q1s", "-oX", str(spec.port)]),
        cwd=spec.workdir,
        output=stderr_path,
        port=spec.port,
        timeout=START_TIMEOUT,
        logs=[mainlog, mainlog.with_name("paniclog")],
    ):
        yield RunningServer(
            name=NAME,
            version=version,
            port=spec.port,
            offers=OFFERS,
            auth_needs_tls=True,
            log_path=mainlog,
            notes=("AUTH PLAIN/LOGIN offered only after STARTTLS (server_advertise_condition)",),
        )

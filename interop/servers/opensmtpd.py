"""OpenSMTPD 6.8 (6.8.0p2) from Debian's packages, run without installing them.

Two builds of the same upstream release:

* ``bullseye`` (the default): Debian 11's ``opensmtpd`` 6.8.0p2-3 with its ``libssl1.1``, taken from the
  machine's own Debian archive through a private apt source list and state under the cache (the machine's
  apt configuration and lists are not touched). TLS works: STARTTLS, then AUTH PLAIN/LOGIN.
* ``system``: the machine's own package (bookworm: 6.8.0p2-4+b4, linked with OpenSSL 3). It fails every TLS
  handshake (upstream #1171, fixed in 7.x: the privsep key proxy breaks under OpenSSL 3, the server logs
  "missing private key … EVP lib" and the client gets a TLS internal_error alert) and offers AUTH only
  under TLS, so it runs plaintext: no STARTTLS, no AUTH, and the notes say so.

``install`` unpacks the bullseye build (``apt-get download`` + ``dpkg -x``) under
``<cache>/opensmtpd/bullseye/root``, falling back to the system build (``<cache>/opensmtpd/system``) when
bullseye's packages cannot be had; ``INTEROP_OPENSMTPD_BUILD=system`` (or ``bullseye``) forces one.
``run`` starts ``smtpd -d -f <own config>`` as root inside a private mount namespace (``unshare --mount``)
in which

* ``/etc/passwd`` and ``/etc/group`` are copies with the package's compiled-in privilege-separation users
  ``opensmtpd`` and ``opensmtpq`` added (the machine's own files are untouched),
* the work directory's ``queue/`` folder appears at the compiled-in queue ``/var/spool/smtpd`` (a tmpfs
  hides the rest of ``/var/spool`` in that namespace only),
* a fresh tmpfs on ``/run`` takes the control socket ``/var/run/smtpd.sock`` (so a machine's own smtpd,
  or a parallel test's, is never disturbed),
* the compiled-in chroot ``/var/lib/opensmtpd/empty`` comes from a read-only overlay on ``/var/lib``, and
  the build's own libraries (libssl1.1) from one on the system's library directory.

Known limits of 6.8 either way: no PIPELINING (pipelined commands get "500 5.5.1 Invalid command:
Pipelining not supported" and the session is closed), no CHUNKING (BDAT: "500 5.5.1 Invalid command:
Command unrecognized"), no SMTPUTF8 (``MAIL … SMTPUTF8``: "503 5.5.4 … Unsupported option SMTPUTF8", a
non-ASCII local part: "501 5.1.3 Recipient address syntax error").
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from interop.servers import _debian, _process
from interop.servers.base import REFUSED_RECIPIENT, RunningServer, ServerSpec, fill_template

NAME = "opensmtpd"


@dataclass(frozen=True)
class Build:
    name: str
    packages: tuple[str, ...]
    release: str | None
    """Another Debian release to take the packages from (a private apt source), None: the machine's."""
    tls: bool


BULLSEYE = Build("bullseye", ("opensmtpd", "libssl1.1"), "bullseye", tls=True)
SYSTEM = Build("system", ("opensmtpd",), None, tls=False)
BUILDS = {b.name: b for b in (BULLSEYE, SYSTEM)}
BUILD_ENV = "INTEROP_OPENSMTPD_BUILD"

USERS = ("opensmtpd", "opensmtpq")
"""The privilege-separation users compiled into Debian's build (SMTPD_USER / SMTPD_QUEUE_USER)."""
QUEUE = "/var/spool/smtpd"
CHROOT = "/var/lib/opensmtpd/empty"
TEMPLATE = Path(__file__).with_name("opensmtpd.conf.in")
OFFERS = frozenset({"8BITMIME", "SIZE", "DSN", "ENHANCEDSTATUSCODES"})
TLS_OFFERS = OFFERS | {"STARTTLS", "AUTH"}
START_TIMEOUT = 30.0
SYSTEM_TLS_NOTE = (
    "this OpenSMTPD 6.8 build (OpenSSL 3) fails every TLS handshake (upstream bug #1171, fixed in 7.x)"
    " and offers AUTH only under TLS: run plaintext, so no STARTTLS and no AUTH"
)
BULLSEYE_NOTE = (
    "Debian 11's build (6.8.0p2-3, OpenSSL 1.1.1): bookworm's build of 6.8 cannot complete a handshake"
    " under OpenSSL 3"
)
LIMITS_NOTE = "6.8 has no PIPELINING, CHUNKING or SMTPUTF8"


def _home(cache: Path, build: Build) -> Path:
    return cache / "opensmtpd" / build.name


def _binary(root: Path) -> Path:
    return root / "usr" / "sbin" / "smtpd"


def _forced() -> Build | None:
    name = os.environ.get(BUILD_ENV, "")
    if not name:
        return None
    if name not in BUILDS:
        raise ValueError(f"{BUILD_ENV}={name!r}: expected one of {', '.join(BUILDS)}")
    return BUILDS[name]


def _install(cache: Path, build: Build) -> None:
    sources = _debian.other_release_sources(build.release) if build.release else ()
    root = _debian.unpack_packages(_home(cache, build), build.packages, sources=sources)
    _debian.check_libraries(_binary(root), root)


def _installed(cache: Path, build: Build) -> bool:
    home = _home(cache, build)
    return (home / ".installed").is_file() and _binary(home / "root").is_file()


def install(cache: Path) -> None:
    forced = _forced()
    if forced is not None:
        _install(cache, forced)
        return
    failed = cache / "opensmtpd" / "bullseye.failed"
    try:
        _install(cache, BULLSEYE)
        failed.unlink(missing_ok=True)
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        failed.parent.mkdir(parents=True, exist_ok=True)
        failed.write_text(f"{exc}\n")
        _install(cache, SYSTEM)


def _chosen(cache: Path) -> Build:
    forced = _forced()
    if forced is not None:
        return forced
    return BULLSEYE if _installed(cache, BULLSEYE) else SYSTEM


def _quoted(value: str) -> str:
    if any(c in value for c in '"\\\n\r'):
        raise ValueError(f"cannot quote {value!r} in smtpd.conf")
    return f'"{value}"'


def _env(root: Path) -> dict[str, str]:
    """For the package's binaries run outside the namespace: its own libraries first."""
    return dict(os.environ, LD_LIBRARY_PATH=":".join(str(d) for d in _debian.library_dirs(root)))


def _encrypted(root: Path, password: str) -> str:
    """The crypt(3) hash smtpd compares against, made by the package's own helper."""
    helper = root / "usr" / "libexec" / "opensmtpd" / "encrypt"
    out = subprocess.run(
        [str(helper)], input=password + "\n", capture_output=True, text=True, check=True, env=_env(root)
    )
    return out.stdout.strip()


def render_config(spec: ServerSpec, *, tls: bool, private: Path, root: Path) -> str:
    tables = ""
    options = ""
    if tls:
        creds = private / "creds"
        creds.write_text(f"{spec.username} {_encrypted(root, spec.password)}\n")
        creds.chmod(0o600)
        tables = "\n".join(
            [
                f"pki interop cert {_quoted(str(private / 'tls' / 'cert.pem'))}",
                f"pki interop key {_quoted(str(private / 'tls' / 'key.pem'))}",
                f"table creds file:{creds}",
            ]
        )
        options = "tls pki interop auth-optional <creds>"
    values = {
        "REFUSED": REFUSED_RECIPIENT,
        "PORT": str(spec.port),
        "RELAY_PORT": str(spec.relay_port),
        "TLS_TABLES": tables,
        "LISTEN_OPTIONS": options,
    }
    return fill_template(TEMPLATE, values)


def _prepare(spec: ServerSpec, root: Path, *, tls: bool) -> Path:
    """Lays out ``spec.workdir`` (config, queue, chroot, TLS copies); returns the config's path."""
    workdir = spec.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    _debian.write_user_files(workdir, users=USERS, groups=USERS)
    private = workdir / "opensmtpd"
    private.mkdir(mode=0o755)
    queue = workdir / "queue"
    queue.mkdir()
    queue.chmod(0o711)  # what smtpd insists on for its queue root (it makes the rest itself)
    chroot = workdir / "varlib" / Path(CHROOT).relative_to("/var/lib")
    chroot.mkdir(parents=True)
    for path in (chroot, *chroot.parents):
        if path == workdir:
            break
        path.chmod(0o755)
    if tls:
        (private / "tls").mkdir(mode=0o700)
        shutil.copyfile(spec.tls.cert_pem, private / "tls" / "cert.pem")
        shutil.copyfile(spec.tls.key_pem, private / "tls" / "key.pem")
        os.chmod(private / "tls" / "key.pem", 0o600)
    config = private / "smtpd.conf"
    config.write_text(render_config(spec, tls=tls, private=private, root=root))
    config.chmod(0o644)
    return config


def _command(spec: ServerSpec, root: Path, args: list[str]) -> list[str]:
    mounts: list[_debian.Mount] = [
        *_debian.user_mounts(spec.workdir),
        _debian.Tmpfs(str(Path(QUEUE).parent), make=(Path(QUEUE).name,)),
        _debian.Bind(spec.workdir / "queue", QUEUE),
        _debian.Tmpfs("/run"),
        _debian.Overlay(spec.workdir / "varlib", "/var/lib"),
        *_debian.library_overlay(root, "libssl.so.*"),
    ]
    return _debian.namespace_command(mounts, [str(_binary(root)), *args])


def _version(root: Path, home: Path) -> str:
    """e.g. ``6.8.0p2 (Debian 6.8.0p2-3)``."""
    out = subprocess.run(
        [str(_binary(root)), "-h"], capture_output=True, text=True, check=False, env=_env(root)
    )
    match = re.search(r"OpenSMTPD (\S+)", out.stdout + out.stderr)
    upstream = match.group(1) if match else "?"
    return f"{upstream} (Debian {_debian.package_version(home, 'opensmtpd')})"


@contextmanager
def _serve(spec: ServerSpec, build: Build, *, tls: bool) -> Iterator[RunningServer]:
    home = _home(spec.cache, build)
    root = home / "root"
    if not _installed(spec.cache, build):
        raise FileNotFoundError(f"OpenSMTPD's {build.name} build is not under {home}: run install() first")
    config = _prepare(spec, root, tls=tls)
    check = subprocess.run(
        _command(spec, root, ["-n", "-f", str(config)]),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )
    if check.returncode != 0:
        raise _process.LaunchError(f"smtpd -n rejected {config}:\n{check.stdout}{check.stderr}")
    log_path = spec.workdir / "smtpd.log"
    notes = [LIMITS_NOTE]
    if build.release:
        notes.append(BULLSEYE_NOTE)
    if not build.tls:
        notes.append(SYSTEM_TLS_NOTE)
    failed = spec.cache / "opensmtpd" / "bullseye.failed"
    if build is SYSTEM and failed.is_file():
        why = (failed.read_text().strip().splitlines() or ["?"])[0]
        notes.append(f"Debian 11's build could not be had: {why}")
    with _debian.running_in_namespace(
        _command(spec, root, ["-d", "-v", "-f", str(config)]),
        cwd=spec.workdir,
        output=log_path,
        port=spec.port,
        timeout=START_TIMEOUT,
    ):
        yield RunningServer(
            name=NAME,
            version=_version(root, home),
            port=spec.port,
            offers=TLS_OFFERS if tls else OFFERS,
            auth_needs_tls=True,
            log_path=log_path,
            notes=tuple(notes),
        )


@contextmanager
def run(spec: ServerSpec) -> Iterator[RunningServer]:
    build = _chosen(spec.cache)
    with _serve(spec, build, tls=build.tls) as server:
        yield server

"""Postfix 3.x from the distribution's own package, run as a private instance that leaves the machine alone.

``install`` fetches the ``postfix`` package (and Cyrus SASL's PLAIN/LOGIN/sasldb modules plus ``saslpasswd2``)
with ``apt-get download`` and unpacks them with ``dpkg -x`` under ``<cache>/postfix/root``; nothing is
installed, so an MTA the machine already runs (Postfix, Exim …) is untouched. Libraries the package needs
that the machine lacks are fetched and unpacked the same way.

``run`` writes its own ``main.cf``/``master.cf`` under ``spec.workdir`` with every directory (config, queue,
data, daemons, commands, shared libraries) pointing into the workdir or the unpacked tree, and starts the
unpacked ``master`` with ``-c <workdir>/conf``. master.cf has one listener, smtpd on ``127.0.0.1:port``, and
the internal services relaying needs (no pickup, no local delivery). Everything is relayed to
``[127.0.0.1]:relay_port``. Postfix's master must be started as root (it drops privileges to
``mail_owner``); the accounts are existing ones, no user or group is created (see ``MAIL_OWNER``).
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from interop.servers import _process
from interop.servers.base import DOMAIN, REFUSED_RECIPIENT, NotApplicable, RunningServer, ServerSpec

NAME = "postfix"

PACKAGES = ("postfix", "libsasl2-modules", "libsasl2-modules-db", "sasl2-bin")
"""What ``apt-get download`` fetches; lib* dependencies the machine lacks are added at install time."""

MAIL_OWNER = "nobody"
"""Owns the private queue and runs the daemons. Postfix insists that ``default_privs`` is another user and
that ``setgid_group`` is not the owner's group, so: ``default_privs = daemon`` (only used by local/pipe/
virtual delivery, none of which this master.cf runs) and ``setgid_group = mail`` (group of the private
queue's maildrop/public directories; the unpacked postdrop/postqueue are not setgid)."""
DEFAULT_PRIVS = "daemon"
SETGID_GROUP = "mail"

SASL_REALM = "interop.test"
HOSTNAME = "postfix.interop.invalid"
"""Not the machine's name: the relay sink greets with that, and Postfix refuses to relay to "itself"."""

START_TIMEOUT = 60.0


def _root(cache: Path) -> Path:
    return cache / "postfix" / "root"


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, check=False, capture_output=True, text=True)


def _download(packages: list[str], debs: Path) -> None:
    """``apt-get download`` into ``debs``; runs ``apt-get update`` once if the package lists are stale."""
    # As root apt hands downloads to its _apt user, which cannot write into our cache: keep them root's.
    apt = ["apt-get", "-o", "APT::Sandbox::User=root"]
    result = _run([*apt, "download", *packages], cwd=debs)
    if result.returncode != 0:
        update = _run([*apt, "update", "-qq"])
        if update.returncode != 0:
            raise RuntimeError(f"apt-get update failed:\n{update.stderr}")
        result = _run([*apt, "download", *packages], cwd=debs)
    if result.returncode != 0:
        raise RuntimeError(f"apt-get download {' '.join(packages)} failed:\n{result.stderr}")


def _installed(package: str) -> bool:
    result = _run(["dpkg-query", "-W", "-f=${Status}", package])
    return result.returncode == 0 and result.stdout.endswith("installed") and "ok" in result.stdout


def _missing_libraries(debs: Path) -> list[str]:
    """The lib* packages the downloaded packages depend on that this machine has not installed."""
    wanted: set[str] = set()
    for deb in debs.glob("*.deb"):
        depends = _run(["dpkg-deb", "-f", str(deb), "Depends"]).stdout
        for clause in depends.split(","):
            name = clause.split("|")[0].strip().split(" ")[0].split(":")[0]
            if name.startswith("lib"):
                wanted.add(name)
    have = {deb.name.split("_")[0] for deb in debs.glob("*.deb")}
    return sorted(name for name in wanted - have if not _installed(name))


def library_path(root: Path) -> str:
    dirs = [root / "usr" / "lib" / "postfix"]
    for base in (root / "usr" / "lib", root / "lib"):
        dirs += sorted(p for p in base.glob("*-linux-gnu*") if p.is_dir())
    return ":".join(str(d) for d in dirs if d.is_dir())


def sasl_plugin_path(root: Path) -> Path:
    found = sorted((root / "usr" / "lib").glob("*-linux-gnu*/sasl2"))
    if not found:
        raise RuntimeError(f"no Cyrus SASL plugin directory under {root}/usr/lib")
    return found[0]


def _tool_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "TZ", "LANG")}
    env["LD_LIBRARY_PATH"] = library_path(root)
    env["SASL_PATH"] = str(sasl_plugin_path(root))
    return env


def _is_elf(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) == b"\x7fELF"


def _check_libraries(root: Path) -> None:
    env = _tool_env(root)
    binaries = [root / "usr/sbin/postconf", root / "usr/sbin/saslpasswd2"]
    binaries += sorted((root / "usr/lib/postfix/sbin").iterdir())
    binaries += [sasl_plugin_path(root) / f"lib{name}.so" for name in ("plain", "login", "sasldb")]
    missing: set[str] = set()
    for binary in binaries:
        if not binary.is_file() or not _is_elf(binary):
            continue
        out = subprocess.run(["ldd", str(binary)], env=env, capture_output=True, text=True, check=False)
        missing |= {line.split()[0] for line in out.stdout.splitlines() if "not found" in line}
    if missing:
        raise RuntimeError(f"unpacked Postfix still lacks libraries: {', '.join(sorted(missing))}")


def install(cache: Path) -> None:
    """Download and unpack Postfix + Cyrus SASL bits under ``cache/postfix`` (idempotent, never installs)."""
    base = cache / "postfix"
    base.mkdir(parents=True, exist_ok=True)
    stamp = base / "installed"
    with (base / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and (_root(cache) / "usr/lib/postfix/sbin/master").exists():
            return
        for tool in ("apt-get", "dpkg-deb", "dpkg-query"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"the Postfix launcher needs {tool} (a Debian/Ubuntu machine)")
        debs = base / "debs"
        shutil.rmtree(debs, ignore_errors=True)
        debs.mkdir()
        _download(list(PACKAGES), debs)
        for _ in range(5):  # the libraries' own missing libraries too, a few levels deep
            extra = _missing_libraries(debs)
            if not extra:
                break
            _download(extra, debs)
        unpacking = Path(tempfile.mkdtemp(prefix="root.", dir=base))
        for deb in sorted(debs.glob("*.deb")):
            result = _run(["dpkg-deb", "-x", str(deb), str(unpacking)])
            if result.returncode != 0:
                raise RuntimeError(f"dpkg-deb -x {deb.name} failed:\n{result.stderr}")
        unpacking.chmod(0o755)
        shutil.rmtree(_root(cache), ignore_errors=True)
        unpacking.rename(_root(cache))
        _check_libraries(_root(cache))
        stamp.write_text("\n".join(sorted(d.name for d in debs.glob("*.deb"))) + "\n")


def _main_cf(spec: ServerSpec, conf: Path, queue: Path, data: Path, log: Path) -> str:
    root = _root(spec.cache)
    settings = {
        "compatibility_level": "3.6",
        "config_directory": conf,
        "meta_directory": conf,
        "queue_directory": queue,
        "data_directory": data,
        "daemon_directory": root / "usr/lib/postfix/sbin",
        "command_directory": root / "usr/sbin",
        "shlib_directory": root / "usr/lib/postfix",
        "sendmail_path": root / "usr/sbin/sendmail",
        "newaliases_path": root / "usr/bin/newaliases",
        "mailq_path": root / "usr/bin/mailq",
        "mail_owner": MAIL_OWNER,
        "default_privs": DEFAULT_PRIVS,
        "setgid_group": SETGID_GROUP,
        # master cleans the environment of every daemon it starts: keep the unpacked libraries reachable.
        "import_environment": "MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C POSTLOG_SERVICE POSTLOG_HOSTNAME"
        " LD_LIBRARY_PATH SASL_PATH",
        "maillog_file": log,
        "maillog_file_prefixes": spec.workdir,
        "myhostname": HOSTNAME,
        "mydomain": "interop.invalid",
        "myorigin": "$myhostname",
        "mydestination": "",
        "local_recipient_maps": "",
        "alias_maps": "",
        "alias_database": "",
        "local_transport": "error:local delivery is disabled",
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "relay_domains": DOMAIN,
        "relayhost": f"[127.0.0.1]:{spec.relay_port}",
        "smtp_dns_support_level": "disabled",
        "smtp_host_lookup": "native",
        "smtp_tls_security_level": "none",
        "append_dot_mydomain": "no",
        "biff": "no",
        # Mail from 127.0.0.1 counts as remote: no header rewriting, no Message-ID/Date added.
        "local_header_rewrite_clients": "",
        "smtputf8_enable": "yes",
        "smtpd_banner": "$myhostname ESMTP Postfix",
        "smtpd_relay_restrictions": "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination",
        "smtpd_recipient_restrictions": f"check_recipient_access texthash:{conf / 'recipient_access'}",
        "smtpd_error_sleep_time": "0",
        "smtpd_soft_error_limit": "1000",
        "smtpd_hard_error_limit": "1000",
        "smtpd_junk_command_limit": "10000",
        "smtpd_tls_security_level": "may",
        "smtpd_tls_cert_file": spec.tls.cert_pem,
        "smtpd_tls_key_file": spec.tls.key_pem,
        "smtpd_tls_loglevel": "1",
        "smtpd_sasl_auth_enable": "yes",
        "smtpd_sasl_type": "cyrus",
        "smtpd_sasl_path": "smtpd",
        "cyrus_sasl_config_path": conf / "sasl",
        "smtpd_sasl_local_domain": SASL_REALM,
        "smtpd_sasl_security_options": "noanonymous",
        "smtpd_tls_auth_only": "no",
        # One try, no waiting in the deferred queue: a relay failure bounces at once.
        "maximal_queue_lifetime": "0",
        "bounce_queue_lifetime": "0",
        "in_flow_delay": "0",
    }
    return "".join(f"{key} = {value}\n" for key, value in settings.items())


def _master_cf(spec: ServerSpec) -> str:
    # service type private unpriv chroot wakeup maxproc command
    services = [
        f"127.0.0.1:{spec.port} inet n - n - - smtpd",
        "cleanup unix n - n - 0 cleanup",
        "qmgr unix n - n 300 1 qmgr",
        "tlsmgr unix - - n 1000? 1 tlsmgr",
        "rewrite unix - - n - - trivial-rewrite",
        "bounce unix - - n - 0 bounce",
        "defer unix - - n - 0 bounce",
        "trace unix - - n - 0 bounce",
        "verify unix - - n - 1 verify",
        "flush unix n - n 1000? 0 flush",
        "proxymap unix - - n - - proxymap",
        "smtp unix - - n - - smtp",
        "relay unix - - n - - smtp",
        "error unix - - n - - error",
        "retry unix - - n - - error",
        "discard unix - - n - - discard",
        "anvil unix - - n - 1 anvil",
        "scache unix - - n - 1 scache",
        "postlog unix-dgram n - n - 1 postlogd",
    ]
    return "\n".join(services) + "\n"


QUEUE_DIRS = {
    # name: (owned by mail_owner, group setgid_group, mode) as in the package's postfix-files
    "active": (True, False, 0o700),
    "bounce": (True, False, 0o700),
    "corrupt": (True, False, 0o700),
    "defer": (True, False, 0o700),
    "deferred": (True, False, 0o700),
    "flush": (True, False, 0o700),
    "hold": (True, False, 0o700),
    "incoming": (True, False, 0o700),
    "private": (True, False, 0o700),
    "maildrop": (True, True, 0o730),
    "public": (True, True, 0o710),
    "pid": (False, False, 0o755),
    "saved": (True, False, 0o700),
    "trace": (True, False, 0o700),
    "sasl": (True, False, 0o700),
}


def _owner_ids() -> tuple[int, int, int]:
    try:
        owner = pwd.getpwnam(MAIL_OWNER)
        pwd.getpwnam(DEFAULT_PRIVS)
        return owner.pw_uid, owner.pw_gid, grp.getgrnam(SETGID_GROUP).gr_gid
    except KeyError as exc:
        raise _process.LaunchError(
            f"this machine lacks the account {exc} that the private Postfix runs with"
            f" (mail_owner={MAIL_OWNER}, default_privs={DEFAULT_PRIVS}, setgid_group={SETGID_GROUP})"
        ) from None


def _reachable_by_owner(path: Path) -> bool:
    """Whether mail_owner may search every directory from / down to ``path``."""
    uid, gid, _ = _owner_ids()
    for directory in (path, *path.parents):
        st = directory.stat()
        if st.st_uid == uid:
            allowed = st.st_mode & 0o100
        elif st.st_gid == gid:
            allowed = st.st_mode & 0o010
        else:
            allowed = st.st_mode & 0o001
        if not allowed:
            return False
    return True


def _make_dirs(queue: Path, data: Path) -> None:
    uid, gid, sgid = _owner_ids()
    queue.mkdir(mode=0o755)
    for name, (owned, setgid, mode) in QUEUE_DIRS.items():
        path = queue / name
        path.mkdir()
        os.chown(path, uid if owned else 0, sgid if setgid else (gid if owned else 0))
        path.chmod(mode)
    data.mkdir(mode=0o700)
    os.chown(data, uid, gid)


def _without_syslog(argv: list[str]) -> list[str]:
    """``argv`` with ``/dev/log`` covered by /dev/null in a private mount namespace of its own.

    saslpasswd2 writes three spurious "error deleting entry from sasldb" lines to the machine's syslog
    (auth.err) on every new sasldb2; nothing of the rig should land in the machine's logs. Without
    ``unshare`` (or where mount namespaces are refused) the command runs as is.
    """
    if shutil.which("unshare") is None:
        return argv
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        return argv
    script = 'if [ -e /dev/log ]; then mount --bind /dev/null /dev/log; fi; exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script, "sh", *argv]


def _write_sasl(spec: ServerSpec, conf: Path, queue: Path) -> None:
    """smtpd.conf for Cyrus (PLAIN, LOGIN against a sasldb2) and the sasldb2 with spec's user in it.

    smtpd opens the sasldb2 after dropping to ``mail_owner``, with the workdir's parents possibly closed to
    that user (pytest's tmp is 0700): the file lives in the queue directory, smtpd's working directory,
    and smtpd.conf names it relative to that.
    """
    root = _root(spec.cache)
    db = queue / "sasl" / "sasldb2"
    argv = [str(root / "usr/sbin/saslpasswd2"), "-p", "-c", "-f", str(db), "-u", SASL_REALM, spec.username]
    result = subprocess.run(
        _without_syslog(argv),
        input=spec.password,
        env=_tool_env(root),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 or not db.exists():
        raise _process.LaunchError(f"saslpasswd2 failed ({result.returncode}): {result.stderr}")
    uid, gid, _ = _owner_ids()
    os.chown(db, uid, gid)
    db.chmod(0o600)
    # Debian's Postfix (patch 07_sasl_config) reads it from $config_directory/sasl, upstream from
    # cyrus_sasl_config_path: both point there.
    (conf / "sasl").mkdir()
    (conf / "sasl" / "smtpd.conf").write_text(
        "pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\nsasldb_path: sasl/sasldb2\n"
    )


def version(cache: Path) -> str:
    root = _root(cache)
    out = subprocess.run(
        [str(root / "usr/sbin/postconf"), "-d", "-h", "mail_version"],
        env=_tool_env(root),
        capture_output=True,
        text=True,
        check=False,
    )
    debs = sorted((cache / "postfix" / "debs").glob("postfix_*.deb"))
    package = f" (package {debs[0].name.split('_')[1]})" if debs else ""
    return (out.stdout.strip() or "3.x") + package


@contextlib.contextmanager
def run(spec: ServerSpec) -> Iterator[RunningServer]:
    if os.geteuid() != 0:
        raise NotApplicable("Postfix's master must be started as root (it drops to mail_owner); run as root")
    root = _root(spec.cache)
    conf, queue, log = spec.workdir / "conf", spec.workdir / "queue", spec.workdir / "maillog"
    conf.mkdir(parents=True)
    # master and tlsmgr open data_directory by absolute path after dropping to mail_owner. When the
    # workdir's parents are closed to that user (pytest's tmp is 0700), data lives in a /tmp dir of its
    # own, linked from the workdir and removed on exit.
    outside: Path | None = None
    data = spec.workdir / "data"
    if not _reachable_by_owner(spec.workdir):
        outside = Path(tempfile.mkdtemp(prefix="interop-postfix-"))
        outside.chmod(0o755)
        data = outside / "data"
        (spec.workdir / "data").symlink_to(data)
    _make_dirs(queue, data)
    (conf / "main.cf").write_text(_main_cf(spec, conf, queue, data, log))
    (conf / "master.cf").write_text(_master_cf(spec))
    (conf / "dynamicmaps.cf").write_text("")
    (conf / "recipient_access").write_text(f"{REFUSED_RECIPIENT} 550 5.1.1 refused by the interop rig\n")
    _write_sasl(spec, conf, queue)
    argv = [str(root / "usr/lib/postfix/sbin/master"), "-c", str(conf)]
    with contextlib.ExitStack() as cleanup:
        if outside is not None:
            cleanup.callback(shutil.rmtree, outside, True)
        yield cleanup.enter_context(_serve(spec, argv, log))


@contextlib.contextmanager
def _serve(spec: ServerSpec, argv: list[str], log: Path) -> Iterator[RunningServer]:
    root = _root(spec.cache)
    with _process.running(
        argv,
        env=_tool_env(root),
        cwd=spec.workdir,
        output=spec.workdir / "master.out",
        port=spec.port,
        timeout=START_TIMEOUT,
        logs=(log,),
    ):
        yield RunningServer(
            name=NAME,
            version=version(spec.cache),
            port=spec.port,
            offers=frozenset(
                {
                    "PIPELINING",
                    "SIZE",
                    "ETRN",
                    "STARTTLS",
                    "AUTH",
                    "ENHANCEDSTATUSCODES",
                    "8BITMIME",
                    "DSN",
                    "SMTPUTF8",
                    "CHUNKING",
                    "VRFY",
                }
            ),
            auth_needs_tls=False,
            log_path=log,
            notes=("AUTH via Cyrus SASL sasldb2 (PLAIN, LOGIN), offered before TLS too (Postfix default)",),
        )

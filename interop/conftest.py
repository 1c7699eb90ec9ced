"""Fixtures of the interop suite: TLS files, the counting sink, and one real SMTP server per launcher.

Every module in ``interop/servers/`` other than ``base`` and ``_*`` is a launcher (``NAME``,
``install(cache)``, ``run(spec)``; see ``interop/servers/base.py``). The ``server`` fixture is
parametrized over them at session scope, so each server is installed once (before the first test, out of
any test's timeout), started once, and serves all its checks; then it is stopped and the next one starts.
A launcher that fails to import, install or start makes each of its checks FAIL with the reason; only
one that says it does not apply here (``NotApplicable`` / ``NOT_APPLICABLE``) makes them n/a.

Files of a run (TLS material, each server's workdir and log, the client's log) stay under
``<cache>/runs/<time>/``; the cache is ``$DISPATCH_INTEROP_CACHE`` or ``<root>/.interop-cache``.
``DISPATCH_INTEROP_SERVERS=postfix,exim`` limits the run to those launchers.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import shutil
import socket
import sys
import time
import traceback
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import IO, Any
from urllib.parse import quote, urlencode

import pytest
import structlog
import trustme

from dispatcher.errors import SmtpError
from dispatcher.smtp import SmtpClient
from interop.report import FAIL, NA, PASS, REPORT
from interop.servers.base import NotApplicable, RunningServer, ServerSpec, TlsFiles
from interop.sink import CountingSink

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "tests", ROOT / "tests" / "queue"):  # RedisServer, WorkerRun: the tests' own helpers
    if str(_path) not in sys.path:
        sys.path.append(str(_path))

SERVERS_DIR = Path(__file__).resolve().parent / "servers"
RESULTS_PATH = Path(__file__).resolve().parent / "results.md"
KEEP_RUNS = 5
"""Runs of earlier sessions kept under ``<cache>/runs`` (older ones go once they are an hour old)."""
TIMEOUT = 30
"""Seconds for every SMTP stage of the client in the checks (a hung server fails fast)."""
EHLO_NAME = "client.example.test"

TLS_BROKEN = re.compile(
    r"\b(START)?TLS\b.*\b(broken|bug|buggy|fails?|failing|unusable|does not work|doesn't work)\b", re.I
)


def cache_dir() -> Path:
    return Path(os.environ.get("DISPATCH_INTEROP_CACHE") or ROOT / ".interop-cache").resolve()


# -- launchers -----------------------------------------------------------------------------------------


@dataclass
class Launcher:
    stem: str
    name: str
    module: ModuleType | None = None
    error: str = ""
    not_applicable: str = ""
    installed: bool = False


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return " ".join(text.split())


def _discover() -> list[Launcher]:
    wanted = {n.strip() for n in os.environ.get("DISPATCH_INTEROP_SERVERS", "").split(",") if n.strip()}
    found: list[Launcher] = []
    for path in sorted(SERVERS_DIR.glob("*.py")):
        stem = path.stem
        if stem == "base" or stem.startswith("_"):
            continue
        launcher = Launcher(stem, stem.replace("_", "-"))
        try:
            module = importlib.import_module(f"interop.servers.{stem}")
        except Exception as exc:  # a broken launcher is a failing server, not a missing one
            launcher.error = f"launcher module interop/servers/{path.name} does not import: {_one_line(exc)}"
        else:
            launcher.module = module
            launcher.name = str(getattr(module, "NAME", launcher.name))
            missing = [a for a in ("NAME", "install", "run") if not hasattr(module, a)]
            if missing:
                launcher.error = f"launcher module {path.name} lacks {', '.join(missing)}"
            launcher.not_applicable = str(getattr(module, "NOT_APPLICABLE", "") or "")
        if wanted and launcher.name not in wanted and stem not in wanted:
            continue
        found.append(launcher)
    return found


LAUNCHERS = _discover()


def _install(launcher: Launcher, cache: Path) -> None:
    """Install once per session; the outcome is kept on the launcher for its checks."""
    if launcher.installed or launcher.error or launcher.not_applicable or launcher.module is None:
        return
    launcher.installed = True
    try:
        launcher.module.install(cache)
    except NotApplicable as exc:
        launcher.not_applicable = str(exc) or "the launcher says it does not apply here"
    except Exception as exc:
        launcher.error = f"install failed: {_one_line(exc)}"


# -- the run directory and the client's log ---------------------------------------------------------


def _new_run_dir(cache: Path) -> Path:
    runs = cache / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    stale = time.time() - 3600  # a run of another session still going is never pruned
    for old in sorted(runs.iterdir())[:-KEEP_RUNS]:
        if old.stat().st_mtime < stale:
            shutil.rmtree(old, ignore_errors=True)
    run = runs / f"{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run.mkdir()
    # Servers that drop privileges (postfix, exim…) must reach their workdir and the TLS files.
    for path in (cache, runs, run):
        path.chmod(0o755)
    return run


_client_log: IO[str] | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _client_log
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    run = _new_run_dir(cache)
    config.stash[_RUN_DIR] = run
    _client_log = (run / "client.log").open("a", encoding="utf-8")
    # The client's and the sink's structlog events go to a file of the run, not into pytest's output.
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.WriteLoggerFactory(file=_client_log),
        cache_logger_on_first_use=False,
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    if _client_log is not None:
        _client_log.close()


_RUN_DIR = pytest.StashKey[Path]()


@pytest.fixture(scope="session")
def run_dir(pytestconfig: pytest.Config) -> Path:
    return pytestconfig.stash[_RUN_DIR]


def pytest_collection_finish(session: pytest.Session) -> None:
    """Install every launcher that a collected test needs, before any test runs (and its timeout)."""
    needed: list[Launcher] = []
    for item in session.items:
        callspec = getattr(item, "callspec", None)
        launcher = callspec.params.get("server") if callspec is not None else None
        if isinstance(launcher, Launcher) and launcher not in needed:
            needed.append(launcher)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    cache = cache_dir()
    for launcher in needed:
        started = time.monotonic()
        _install(launcher, cache)
        status = launcher.error or (f"n/a: {launcher.not_applicable}" if launcher.not_applicable else "ok")
        if reporter is not None:
            reporter.write_line(
                f"interop: install {launcher.name}: {status} ({time.monotonic() - started:.0f}s)"
            )


# -- TLS -------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tls_files(run_dir: Path) -> TlsFiles:
    """A trustme CA and a server certificate for localhost / 127.0.0.1, as PEM files (RSA: every MTA
    build takes it), readable by servers that drop privileges."""
    directory = run_dir / "tls"
    directory.mkdir(mode=0o755)
    ca = trustme.CA(key_type=trustme.KeyType.RSA, organization_name="dispatcher interop CA")
    leaf = ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
    files = TlsFiles(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    ca.cert_pem.write_to_path(str(files.ca_pem))
    files.cert_pem.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(files.key_pem))
    for path in (files.ca_pem, files.cert_pem, files.key_pem):
        path.chmod(0o644)  # a throwaway test key
    return files


@pytest.fixture(scope="session")
def wrong_ca_file(run_dir: Path) -> Path:
    """The certificate of a second, unrelated CA: a client trusting only it must refuse the server."""
    path = run_dir / "tls" / "wrong-ca.pem"
    path.parent.mkdir(mode=0o755, exist_ok=True)
    trustme.CA(key_type=trustme.KeyType.RSA, organization_name="unrelated CA").cert_pem.write_to_path(
        str(path)
    )
    path.chmod(0o644)
    return path


# -- the server under test --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServerUnderTest:
    """One launcher's server, started, with its own sink; ``require()`` first in every check."""

    name: str
    tls: TlsFiles
    wrong_ca: Path
    run_dir: Path
    running: RunningServer | None = None
    sink: CountingSink | None = None
    spec: ServerSpec | None = None
    problem: str = ""
    not_applicable: str = ""
    ehlo: tuple[str, ...] = ()
    tls_probe_error: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def require(self) -> tuple[RunningServer, CountingSink]:
        """The running server and its sink; FAIL (or n/a) the calling check when there is none."""
        if self.not_applicable:
            pytest.skip(f"n/a: {self.not_applicable}")
        if self.problem or self.running is None or self.sink is None:
            pytest.fail(f"{self.name} is not running: {self.problem or 'unknown reason'}", pytrace=False)
        return self.running, self.sink

    @property
    def port(self) -> int:
        assert self.running is not None
        return self.running.port

    def url(
        self,
        *,
        tls: str = "off",
        ca_file: Path | None = None,
        username: str | None = None,
        password: str | None = None,
        **options: str,
    ) -> str:
        """A route URL to this server; ``tls=off`` unless asked, every stage bounded by ``TIMEOUT``."""
        query: dict[str, str] = {"tls": tls, "timeout": str(TIMEOUT), "ehlo_name": EHLO_NAME}
        if ca_file is not None:
            query["ca_file"] = str(ca_file)
        query.update(options)
        user = ""
        if username is not None:
            user = f"{quote(username, safe='')}:{quote(password or '', safe='')}@"
        return f"smtp://{user}127.0.0.1:{self.port}?{urlencode(query)}"

    def tls_url(self, ca_file: Path | None = None, **options: str) -> str:
        return self.url(tls="required", ca_file=ca_file or self.tls.ca_pem, **options)

    def tls_broken(self) -> str:
        """Why TLS checks cannot apply to this server ("" when they do)."""
        assert self.running is not None
        if self.running.tls_broken:
            return self.running.tls_broken
        for note in self.running.notes:
            if TLS_BROKEN.search(note):
                return f"the launcher notes: {note}"
        if "STARTTLS" not in self.running.offers:
            return "the server is not configured to offer STARTTLS"
        return ""


def _shown(path: Path) -> str:
    """A path as the results show it: relative to the project root when it is inside."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _probe_ehlo(server: ServerUnderTest) -> tuple[tuple[str, ...], str]:
    """EHLO keywords as the client sees them: after STARTTLS when TLS applies and works, else in plain."""
    attempts: list[tuple[str, str]] = []
    if not server.tls_broken():
        attempts.append(("after STARTTLS", server.tls_url()))
    attempts.append(("plain, no TLS", server.url()))
    errors: list[str] = []
    for how, url in attempts:
        client = SmtpClient.from_url(url)
        try:
            client.connect()
        except SmtpError as exc:
            errors.append(f"{how}: {_one_line(exc)}")
            continue
        finally:
            keywords = client.extensions.keywords
            client.close()
        seen = tuple(f"{name} {params}".strip() for name, params in keywords)
        return seen, "; ".join([how, *errors])
    return (), "no EHLO: " + "; ".join(errors)


@pytest.fixture(scope="session", params=LAUNCHERS, ids=[launcher.name for launcher in LAUNCHERS] or None)
def server(
    request: pytest.FixtureRequest, run_dir: Path, tls_files: TlsFiles, wrong_ca_file: Path
) -> Iterator[ServerUnderTest]:
    launcher: Launcher = request.param
    under_test = ServerUnderTest(launcher.name, tls_files, wrong_ca_file, run_dir)
    info = REPORT.server(launcher.name)
    _install(launcher, cache_dir())  # already done at collection end; a no-op then
    with contextlib.ExitStack() as stack:
        if launcher.not_applicable:
            under_test.not_applicable = launcher.not_applicable
        elif launcher.error:
            under_test.problem = launcher.error
        else:
            assert launcher.module is not None
            sink = CountingSink()
            sink.start()
            stack.callback(sink.stop)
            workdir = run_dir / "servers" / launcher.name
            workdir.mkdir(parents=True, mode=0o755, exist_ok=True)
            workdir.chmod(0o755)
            spec = ServerSpec(
                workdir=workdir, port=free_port(), relay_port=sink.port, tls=tls_files, cache=cache_dir()
            )
            under_test.sink, under_test.spec = sink, spec
            try:
                under_test.running = stack.enter_context(launcher.module.run(spec))
            except NotApplicable as exc:
                under_test.not_applicable = str(exc) or "the launcher says it does not apply here"
            except Exception as exc:
                under_test.problem = f"could not start: {_one_line(exc)}"
                (workdir / "start-failure.txt").write_text(traceback.format_exc())
        if under_test.running is not None:
            running = under_test.running
            info.version = running.version
            info.offers = tuple(sorted(running.offers))
            info.notes = running.notes
            info.log_path = _shown(running.log_path) if running.log_path else ""
            under_test.ehlo, info.ehlo_how = _probe_ehlo(under_test)
            info.ehlo = under_test.ehlo
        info.problem = under_test.problem or (
            f"n/a: {under_test.not_applicable}" if under_test.not_applicable else ""
        )
        yield under_test


# -- recording verdicts -----------------------------------------------------------------------------


def _check_of(item: pytest.Item) -> tuple[str, str] | None:
    callspec = getattr(item, "callspec", None)
    launcher = callspec.params.get("server") if callspec is not None else None
    if not isinstance(launcher, Launcher):
        return None
    function = getattr(item, "originalname", item.name)
    return launcher.name, function.removeprefix("test_")


def _reason(report: pytest.TestReport, call: pytest.CallInfo[Any]) -> str:
    if call.excinfo is not None:
        text = call.excinfo.exconly()
        for prefix in ("Failed: ", "Skipped: ", "_pytest.outcomes.Failed: ", "AssertionError: "):
            text = text.removeprefix(prefix)
        return text.strip().splitlines()[0] if text.strip() else call.excinfo.typename
    return str(report.longrepr or "")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[Any]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    key = _check_of(item)
    if key is None:
        return report
    server, check = key
    if report.skipped:
        reason = _reason(report, call).removeprefix("n/a: ")
        REPORT.record(server, check, NA, reason)
    elif report.failed:
        phase = "" if report.when == "call" else f"({report.when}) "
        REPORT.record(server, check, FAIL, phase + _reason(report, call))
    elif report.when == "call":
        REPORT.record(server, check, PASS)
    return report


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not REPORT.verdicts:
        return
    text = REPORT.render()
    RESULTS_PATH.write_text(text, encoding="utf-8")
    terminalreporter.write_sep("=", "interop results")
    for line in text.splitlines():
        terminalreporter.write_line(line)
    terminalreporter.write_line(
        f"(written to {_shown(RESULTS_PATH)}; run files in {_shown(config.stash[_RUN_DIR])})"
    )

"""The interop summary: every check's verdict per server, written to ``interop/results.md`` at the end.

Verdicts are ``pass``, ``fail`` or ``n/a``, each with a short reason (the first line of the failure or of
the n/a explanation). Per server the report also keeps its version, what the launcher said it offers,
its notes, and the EHLO keywords the client saw (after STARTTLS where that worked).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime

PASS, FAIL, NA = "pass", "fail", "n/a"
_CELL = {PASS: "pass", FAIL: "**FAIL**", NA: "n/a"}
REASON_LIMIT = 300


@dataclass
class Verdict:
    outcome: str
    reason: str = ""


@dataclass
class ServerInfo:
    name: str
    version: str = "?"
    offers: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    ehlo: tuple[str, ...] = ()
    ehlo_how: str = ""
    problem: str = ""
    log_path: str = ""


@dataclass
class Report:
    servers: dict[str, ServerInfo] = field(default_factory=dict)
    verdicts: dict[tuple[str, str], Verdict] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)
    """Check names in the order the suite defines them (the table's rows)."""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def server(self, name: str) -> ServerInfo:
        with self._lock:
            return self.servers.setdefault(name, ServerInfo(name))

    def record(self, server: str, check: str, outcome: str, reason: str = "") -> None:
        """Keep the worst verdict of a test's phases: a failing teardown turns a pass into a fail."""
        reason = " ".join(reason.split())
        if len(reason) > REASON_LIMIT:
            reason = reason[: REASON_LIMIT - 1] + "…"
        with self._lock:
            self.servers.setdefault(server, ServerInfo(server))
            if check not in self.checks:
                self.checks.append(check)
            old = self.verdicts.get((server, check))
            if old is not None and old.outcome == FAIL:
                return
            if old is not None and outcome == PASS:
                return
            self.verdicts[(server, check)] = Verdict(outcome, reason)

    def render(self, command: str = "make interop") -> str:
        with self._lock:
            servers = sorted(self.servers)
            lines = [
                "# Interop results",
                "",
                f"Run {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} with `{command}`"
                " (see `interop/README.md` for what each check means).",
                "",
                "| check | " + " | ".join(servers) + " |",
                "| --- | " + " | ".join("---" for _ in servers) + " |",
            ]
            for check in self.checks:
                cells = []
                for server in servers:
                    verdict = self.verdicts.get((server, check))
                    cells.append(_CELL[verdict.outcome] if verdict else "—")
                lines.append(f"| {check} | " + " | ".join(cells) + " |")
            totals = []
            for server in servers:
                counts = {PASS: 0, FAIL: 0, NA: 0}
                for (name, _), verdict in self.verdicts.items():
                    if name == server:
                        counts[verdict.outcome] += 1
                totals.append(f"{counts[PASS]}/{counts[FAIL]}/{counts[NA]}")
            lines.append("| *pass/fail/n/a* | " + " | ".join(totals) + " |")
            for server in servers:
                info = self.servers[server]
                lines += ["", f"## {server}", "", f"- version: {info.version}"]
                if info.problem:
                    lines.append(f"- **could not be tested**: {info.problem}")
                if info.offers:
                    lines.append(f"- configured to offer: {' '.join(sorted(info.offers))}")
                if info.ehlo:
                    lines.append(
                        f"- EHLO keywords seen by the client ({info.ehlo_how}): {', '.join(info.ehlo)}"
                    )
                elif info.ehlo_how:
                    lines.append(f"- EHLO: {info.ehlo_how}")
                lines.extend(f"- note: {note}" for note in info.notes)
                if info.log_path:
                    lines.append(f"- server log: `{info.log_path}`")
                grouped: dict[tuple[str, str], list[str]] = {}
                for check in self.checks:
                    verdict = self.verdicts.get((server, check))
                    if verdict is not None and verdict.outcome != PASS:
                        grouped.setdefault((verdict.outcome, verdict.reason), []).append(check)
                for (outcome, reason), checks in grouped.items():
                    which = "every check" if len(checks) == len(self.checks) > 1 else ", ".join(checks)
                    lines.append(f"- {which} — {_CELL[outcome]}: {reason or '(no reason given)'}")
            return "\n".join(lines) + "\n"


REPORT = Report()

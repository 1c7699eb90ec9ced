"""Scenario 5's tables (issue 15's grid: RTT x C x contender), for the terminal and the README.

- :func:`grid_table` — drain msg/s per cell and contender (median over rounds) and the ratios of ours
  to each peer, with the ratio of every round to BullMQ + Nodemailer when there are several.
- :func:`grid_cost_table` — per contender and cell: msg/s, ratio vs BullMQ (per round too), worker
  CPU ms per mail (gross, net of start-up, and by process kind), summed PSS, processes, connections,
  and the Redis commands per mail of the contender's untimed MONITOR pass at that C.
- :func:`commands_table` — those MONITOR passes: commands clients sent and commands Lua scripts ran,
  per delivered mail, and the most frequent ones.
"""

from __future__ import annotations

from collections.abc import Sequence

from bench.commands import CommandResult
from bench.harness import UNSAMPLED, DrainResult
from bench.peers.contenders import BULLMQ, CELERY, PEER_ORDER
from bench.scenarios import BASELINE_KEPT, OURS, OURS_CONNS, OURS_SPREAD
from bench.tables import fmt, median, ratio, table

SHORT_NAMES = {OURS: "dispatcher", OURS_CONNS: "1 proc x C conns", OURS_SPREAD: "P procs x C/P conns",
               BULLMQ: "BullMQ", CELERY: "Celery", BASELINE_KEPT.name: "rq (b)"}
LAYOUTS = (OURS_CONNS, OURS_SPREAD)
Cell = tuple[float, int]


def cells(results: Sequence[DrainResult]) -> list[Cell]:
    return list(dict.fromkeys((r.rtt_ms, r.workers) for r in results))


def runs(results: Sequence[DrainResult], name: str, cell: Cell) -> list[DrainResult]:
    return [r for r in results if r.scenario == name and (r.rtt_ms, r.workers) == cell]


def med(items: Sequence[DrainResult], key: str) -> float | None:
    return median([getattr(r, key) for r in items])


def contenders(results: Sequence[DrainResult]) -> list[str]:
    """Names in PEER_ORDER first, then any other contender in the order it ran."""
    present = list(dict.fromkeys(r.scenario for r in results))
    return [n for n in PEER_ORDER if n in present] + [n for n in present if n not in PEER_ORDER]


def per_round(ours: Sequence[DrainResult], peer: Sequence[DrainResult]) -> str:
    """Ratio of each round's msg/s, ``0.74 / 0.77 / 0.75``; "-" for a round one side lacks."""
    by_round = {r.round: r.msgs_per_s for r in peer}
    return " / ".join(fmt(ratio(r.msgs_per_s, by_round.get(r.round)), ".2f") for r in ours)


def _rate(items: Sequence[DrainResult]) -> str:
    """Median msg/s of a contender's runs in one cell; "(!)" when a run had a problem; "-" if not run."""
    return ("-" if not items else fmt(med(items, "msgs_per_s"))) + (" (!)" if any(not r.ok for r in items)
                                                                     else "")


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def grid_table(results: Sequence[DrainResult], markdown: bool = False) -> str:
    rounds = max((r.round for r in results), default=1)
    names = contenders(results)
    peers = [n for n in (BULLMQ, CELERY, BASELINE_KEPT.name) if n in names]
    headers = ["RTT ms", "C", "N", *(SHORT_NAMES.get(n, n) + " msg/s" for n in names),
               *(f"ours / {SHORT_NAMES[p]}" for p in peers),
               *(f"{SHORT_NAMES[n]} / BullMQ" for n in LAYOUTS if n in names and BULLMQ in names),
               *(["ours / BullMQ per round"] if rounds > 1 and BULLMQ in names else [])]
    rows = []
    for cell in cells(results):
        by_name = {n: runs(results, n, cell) for n in names}
        n_mails = next((r.messages for r in results if (r.rtt_ms, r.workers) == cell), 0)
        ours = med(by_name.get(OURS, []), "msgs_per_s")
        row = [fmt(cell[0], ".0f"), str(cell[1]), str(n_mails), *(_rate(by_name[n]) for n in names),
               *(_x(ratio(ours, med(by_name[p], "msgs_per_s"))) for p in peers)]
        for layout in LAYOUTS:
            if layout in names and BULLMQ in names:
                row.append(_x(ratio(med(by_name[layout], "msgs_per_s"), med(by_name[BULLMQ], "msgs_per_s"))))
        if rounds > 1 and BULLMQ in names:
            row.append(per_round(by_name.get(OURS, []), by_name[BULLMQ]))
        rows.append(row)
    text = table(headers, rows, markdown)
    problems = [f"  {r.scenario} @ {r.rtt_ms:.0f} ms x{r.workers} round {r.round}: {r.error}"
                for r in results if not r.ok]
    return text + ("\n\nproblems ((!) above):\n" + "\n".join(problems) if problems else "")


def kinds_per_mail(items: Sequence[DrainResult], net: bool = True) -> dict[str, float]:
    """Median over runs of each process kind's worker CPU ms per delivered mail; ``net`` subtracts the
    same kind's CPU in the start-up run (empty queue), as the ``net`` column does for the total."""
    names = list(dict.fromkeys(k for r in items for k in r.cpu_kinds_ms))
    names = [k for k in names if k != UNSAMPLED] + ([UNSAMPLED] if UNSAMPLED in names else [])
    out = {}
    for name in names:
        value = median([(r.cpu_kinds_ms.get(name, 0.0) - (r.startup_kinds_ms.get(name, 0.0) if net else 0.0))
                        / r.delivered for r in items if r.delivered])
        if value is not None:
            out[name] = value
    return out


def _kinds_text(kinds: dict[str, float]) -> str:
    """``worker 1.52, supervisor 0.01, exit 0.03`` (a rounding -0.00 shows as 0.00)."""
    return ", ".join(f"{'exit' if k == UNSAMPLED else k} {v if abs(v) >= 0.005 else 0.0:.2f}"
                     for k, v in kinds.items()) or "-"


def _commands_of(commands: Sequence[CommandResult], name: str, workers: int) -> CommandResult | None:
    return next((c for c in commands if c.scenario == name and c.workers == workers), None)


def _commands_text(c: CommandResult | None) -> str:
    if c is None or c.total_per_mail is None:
        return "-"
    return f"{c.total_per_mail:.1f} ({c.client_per_mail:.1f}+{c.lua_per_mail:.1f} lua)" + (
        "" if c.ok else " (!)")


def grid_cost_table(results: Sequence[DrainResult], commands: Sequence[CommandResult] = (),
                    markdown: bool = False) -> str:
    """One row per contender and cell; CPU columns are worker processes only (wait4), ms per mail."""
    rounds = max((r.round for r in results), default=1)
    headers = ["RTT ms", "C", "contender", "msg/s", "vs BullMQ", *(["per round"] if rounds > 1 else []),
               "cpu ms/mail", "net", "net by process kind (ms/mail)", "pss MB", "procs", "conns",
               "redis cmds/mail"]
    rows = []
    for cell in cells(results):
        bull = runs(results, BULLMQ, cell)
        for name in contenders(results):
            mine = runs(results, name, cell)
            if not mine:
                continue
            rows.append([fmt(cell[0], ".0f"), str(cell[1]), SHORT_NAMES.get(name, name), _rate(mine),
                         _x(ratio(med(mine, "msgs_per_s"), med(bull, "msgs_per_s"))),
                         *([per_round(mine, bull)] if rounds > 1 else []),
                         fmt(med(mine, "cpu_ms_per_msg"), ".2f"), fmt(med(mine, "cpu_ms_per_msg_net"), ".2f"),
                         _kinds_text(kinds_per_mail(mine)), fmt(med(mine, "peak_pss_mb")),
                         fmt(median([r.peak_procs for r in mine]), ".0f"),
                         fmt(median([r.connections for r in mine]), ".0f"),
                         _commands_text(_commands_of(commands, name, cell[1]))])
    return table(headers, rows, markdown)


def commands_table(commands: Sequence[CommandResult], markdown: bool = False, top: int = 6) -> str:
    headers = ["contender", "C", "mails", "client/mail", "lua/mail", "total/mail", "most frequent (per mail)"]
    rows = []
    for c in commands:
        frequent = list(c.top.items())[:top]
        common = ", ".join(f"{k} {v / c.delivered:.1f}" for k, v in frequent) if c.delivered else "-"
        rows.append([SHORT_NAMES.get(c.scenario, c.scenario), str(c.workers), f"{c.delivered}/{c.messages}",
                     fmt(c.client_per_mail), fmt(c.lua_per_mail), fmt(c.total_per_mail),
                     common + ("" if c.ok else f" (! {c.error[:120]})")])
    return table(headers, rows, markdown)

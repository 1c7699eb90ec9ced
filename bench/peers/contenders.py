"""Scenario 5's peers of issue 15 as :class:`bench.scenarios.Scenario` s: BullMQ + Nodemailer (one Node
process) and Celery + kept smtplib, next to ours and baseline (b); :func:`peer_scenarios` says which can
run here (installing the Node packages on first use, :mod:`bench.peers`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.scenarios import (
    BASELINE_KEPT,
    CONNECTIONS_FLAG,
    OURS,
    OURS_CONNS,
    OURS_SPREAD,
    BenchEnv,
    Scenario,
    dispatcher_conns_scenario,
    dispatcher_scenario,
    dispatcher_spread_scenario,
    fixed_kinds,
    job_data,
)

BULLMQ = "BullMQ+Nodemailer"
CELERY = "Celery+smtplib-kept"
BULLMQ_QUEUE = "bench-bullmq"


def _peer_jobs(n: int, env: BenchEnv) -> list[tuple[str, int, dict[str, Any]]]:
    return [job_data(env, i) for i in range(n)]


def _run_filler(cmd: list[str], env: dict[str, str], payload: Any, cwd: Path) -> None:
    """Run a peer's producer with the jobs as JSON on stdin; a failure says why (its stderr)."""
    done = subprocess.run(cmd, env=env, cwd=cwd, input=json.dumps(payload), text=True, capture_output=True,
                          timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")


def _node_env(env: BenchEnv) -> dict[str, str]:
    from bench.peers import NODE_MODULES

    return {**os.environ, **env.process_env(), "NODE_PATH": str(NODE_MODULES), "BULLMQ_QUEUE": BULLMQ_QUEUE}


def _bullmq_enqueue(n: int, env: BenchEnv) -> None:
    from bench.peers import NODE_SCRIPT

    datas = [{"host": h, "port": p, "mail": m} for h, p, m in _peer_jobs(n, env)]
    _run_filler([shutil.which("node") or "node", str(NODE_SCRIPT), "enqueue"], _node_env(env), datas,
                env.project_root)


def _bullmq_cmds(env: BenchEnv, workers: int) -> list[list[str]]:
    from bench.peers import NODE_MODULES, NODE_SCRIPT

    node = shutil.which("node") or "node"
    # NODE_PATH and the queue name travel in the command (the harness passes only env.process_env())
    return [["env", f"NODE_PATH={NODE_MODULES}", f"BULLMQ_QUEUE={BULLMQ_QUEUE}", node, str(NODE_SCRIPT),
             "work", "--concurrency", str(workers), "--messages", str(env.messages)]]


def _celery_enqueue(n: int, env: BenchEnv) -> None:
    # in a subprocess: importing Celery here would grow the harness, and a child's ru_maxrss starts at
    # the RSS of the process that forked it (the ``rss MB`` column's floor)
    _run_filler([sys.executable, "-m", "bench.peers.celery_peer", "enqueue"],
                {**os.environ, **env.process_env()}, _peer_jobs(n, env), env.project_root)


def _celery_cmds(env: BenchEnv, workers: int) -> list[list[str]]:
    return [[sys.executable, "-m", "bench.peers.celery_peer", "work", "--concurrency", str(workers),
             "--messages", str(env.messages)]]


BULLMQ_PEER = Scenario(
    name=BULLMQ,
    description="BullMQ Worker (concurrency C) + Nodemailer pool (maxConnections C), one Node process",
    worker_cmds=_bullmq_cmds,
    enqueue=_bullmq_enqueue,
    queues=(),
    throughput=False,
    peer=True,
    kinds=fixed_kinds("node"),
)

CELERY_PEER = Scenario(
    name=CELERY,
    description="Celery, Redis broker, smtplib kept per process; --pool solo (C=1) / prefork (C>1)",
    worker_cmds=_celery_cmds,
    enqueue=_celery_enqueue,
    queues=(),
    throughput=False,
    peer=True,
    kinds=lambda workers: ("celery solo",) if workers == 1 else ("celery parent", "celery child"),
)

#: scenario 5's contenders in the order they run in each cell (and are listed in its tables)
PEER_ORDER = (OURS, OURS_CONNS, OURS_SPREAD, BULLMQ, CELERY, BASELINE_KEPT.name)


def peer_scenarios() -> tuple[list[Scenario], list[str]]:
    """The peers that can run here, and one message per peer (installed, or why it is skipped)."""
    from bench.peers import celery_status, ensure_node_peers

    out: list[Scenario] = []
    notes: list[str] = []
    ours = dispatcher_scenario()
    if ours is not None:
        conns = dispatcher_conns_scenario(ours)
        if isinstance(conns, str):
            notes.append(conns)
        else:
            out.extend((conns, dispatcher_spread_scenario(conns)))
            notes.append(f"{OURS_CONNS}: worker.py has {CONNECTIONS_FLAG}")
    for scenario, status in ((BULLMQ_PEER, ensure_node_peers()), (CELERY_PEER, celery_status())):
        notes.append(status.message)
        if status.ready:
            out.append(scenario)
    return out, notes



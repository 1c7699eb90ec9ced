"""Chaos (issue 13): thousands of mails through ``worker.py --concurrency 4`` against a server that, seeded,
drops connections and answers 421 and 4xx at every stage, while a random pool child is killed with
``kill -9`` every 2 to 4 s (seeded) and Redis (AOF, ``appendfsync always``) is crashed with SIGKILL and
started again once a third of the mail is final. At the end every recipient is delivered exactly once
(counted by Message-ID and recipient at the server) or failed / unknown with a reason: zero lost, zero
duplicates outside "unknown".

``make test`` runs 5,000 mails; ``make chaos`` runs 20,000 (``DISPATCH_CHAOS_MAILS``; the seed is
``DISPATCH_CHAOS_SEED``). The counts are printed either way (``pytest -s``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest
from chaoskit import (
    Killer,
    SeededFaults,
    chaos_mails,
    crashed_jobs,
    enqueued,
    events,
    explain,
    finished,
    refusals,
    tally,
)
from helpers import wait_until
from retrykit import StartWorker, env_for, smtp_url
from servers import RedisServer, ScriptedSmtpServer

from dispatcher.queue.producer import Producer
from dispatcher.queue.store import SendStore

Scripted = Callable[..., ScriptedSmtpServer]
MakeRedis = Callable[..., RedisServer]
MAILS = int(os.environ.get("DISPATCH_CHAOS_MAILS", "5000"))
SEED = int(os.environ.get("DISPATCH_CHAOS_SEED", "20261127"))
CONNECTIONS = os.environ.get("DISPATCH_CHAOS_CONNECTIONS", "2")
"""``--connections`` of each pool child: with 2, each adopts a second job before it starts one
(``worker.adoption``), so kills land between the pop and the lease, and on adopted sends."""
# Seconds to drain: ~250 mails/s unharmed on 2 shared cores, slower under kills, a restart and faults.
DRAIN = 60 + MAILS / 40


@pytest.mark.timeout(int(DRAIN) + 120)
def test_chaos_with_kills_and_a_redis_crash_loses_nothing_and_sends_nothing_twice(
    scripted_server: Scripted, make_redis_server: MakeRedis, start_worker: StartWorker
) -> None:
    redis_server = make_redis_server(appendonly=True, appendfsync="always")
    client = redis_server.client()
    bounces, greylisted = refusals(MAILS)
    server = scripted_server(per_recipient={**bounces, **greylisted})
    faults = SeededFaults(SEED)
    server.faults = faults  # type: ignore[assignment]
    mails = chaos_mails(MAILS)
    ids = enqueued(Producer(client).enqueue_many(mails), mails)
    assert len(ids) == MAILS
    store = SendStore(client)

    started = time.monotonic()
    env = env_for(
        redis_server.url,
        smtp_url(server.port, timeout=5),
        DISPATCH_RETRY_BASE="0.05",
        DISPATCH_RETRY_MAX_DELAY="0.2",
        DISPATCH_RETRY_MAX_ATTEMPTS="8",
        DISPATCH_LEASE_SECONDS="3",
        DISPATCH_RECONCILE_AFTER="5",
        DISPATCH_LOG_LEVEL="WARNING",
    )
    pool = start_worker(env, "--concurrency", "4", "--connections", CONNECTIONS)
    killer = Killer(pool, SEED).start()
    try:
        wait_until(lambda: finished(store, MAILS // 3), DRAIN, interval=0.2, message="a third never final")
        restarted_at = time.monotonic() - started
        redis_server.restart(kill=True)
        drained = _drains(store)
    finally:
        killer.stop()
    elapsed = time.monotonic() - started
    # the last child killed is started again before the pool is stopped (a dead child makes its exit 1)
    wait_until(lambda: len(pool.children()) == 4, 30, interval=0.1, message="the pool lost a slot")
    exit_code = pool.stop()

    result = tally(store, server, ids)
    died = events(pool.log_text(), "worker_process_died")
    print(
        f"\nchaos: {result.counts()} in {elapsed:.1f} s; kill -9 of {len(killer.kills)} pool children "
        f"({len(died)} deaths seen by the supervisor), Redis crashed (SIGKILL, AOF always) and restarted "
        f"at {restarted_at:.1f} s; states {dict(result.states)}; "
        f"attempts {dict(sorted(result.attempts.items()))}; connections {server.connection_count}; "
        f"faults fired {sum(faults.fired.values())} {dict(faults.fired)}"
    )
    assert exit_code == 0
    assert drained, f"not all sends final after {DRAIN:.0f} s: {dict(result.states)}"
    assert not result.problems, f"{len(result.problems)} problems, e.g. {result.problems[:10]}\n" + explain(
        result.problems, store, server
    )
    assert result.lost == result.duplicated == result.recorded_wrong == 0
    assert sum(result.states.values()) == MAILS
    assert crashed_jobs(client) == [], "rq jobs crashed (other than those of killed workers)"
    # every 550 recipient ends permanent (or unknown: a drop or a kill after the dot of an attempt)
    outcomes = {r: o.status for rec in store.load_many(ids) for r, o in rec.outcomes.items()}
    bounce_ends = [outcomes.get(r) for r in bounces]
    assert all(s in ("permanent", "unknown") for s in bounce_ends), f"550 recipients: {bounce_ends}"
    assert sum(faults.fired.values()) > MAILS // 20, "the server did not misbehave enough"
    assert len(killer.kills) >= 3, "too few kills to prove much"


def _drains(store: SendStore) -> bool:
    """Every send final within ``DRAIN`` seconds; False (the tally then says which are not) otherwise."""
    try:
        wait_until(lambda: finished(store, MAILS), DRAIN, interval=0.5)
    except AssertionError:
        return False
    return True

"""Read-only views of Redis for the pages: the overview numbers and failures grouped by reason.

Nothing here writes. rq's own ``registry.count`` runs a cleanup that moves or deletes jobs, so registry
sizes are read with ``get_job_count(cleanup=False)``: a GET must never change anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import redis
from rq import Queue, Worker
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from dispatcher.dashboard.records import Unreadable, find
from dispatcher.mail.fields import PRIORITIES
from dispatcher.queue.operations import FailureFilter, describe_group, group_key
from dispatcher.queue.presence import Presence
from dispatcher.queue.producer import QUEUE_NAMES
from dispatcher.queue.records import SendRecord
from dispatcher.queue.store import STATES, SendStore

CHART_MINUTES = 60


def queue_numbers(
    connection: redis.Redis, counts: dict[str, dict[str, int]] | None = None
) -> list[dict[str, Any]]:
    """Per queue: sends in each state (from the records; ``counts``, ``SendStore.counts_per_priority``,
    when the caller has them), and what rq holds — jobs waiting, scheduled for later, running now, and in
    rq's failed registry (a job may carry up to 20 sends)."""
    rows = []
    counts = SendStore(connection).counts_per_priority() if counts is None else counts
    for priority, name in zip(PRIORITIES, QUEUE_NAMES, strict=True):
        queue = Queue(name, connection=connection, serializer=JSONSerializer)
        rows.append(
            {
                "name": name,
                "states": counts[priority],
                "waiting": queue.count,
                "scheduled": ScheduledJobRegistry(queue=queue).get_job_count(cleanup=False),  # type: ignore[no-untyped-call]
                "started": StartedJobRegistry(queue=queue).get_job_count(cleanup=False),
                "rq_failed": FailedJobRegistry(queue=queue).get_job_count(cleanup=False),
            }
        )
    return rows


def describe_route(name: str, route: dict[str, Any]) -> str:
    """One line per route: ``default: ready TLSv1.3, 120 mails on conn 3f2a-81-2``."""
    text = f"{name}: {route.get('state', '?')}"
    if route.get("tls"):
        text += f" {route['tls']}"
    if route.get("conn_id"):
        text += f", {route.get('messages_on_connection', 0)} mails on conn {route['conn_id']}"
    limits = route.get("limits") or {}
    if limits.get("rate") is not None:
        factor = limits.get("rate_factor", 1.0)
        text += f"; rate {limits['rate']:g}/s" + (f" slowed down to x{factor:g}" if factor < 1 else "")
    if limits.get("daily") is not None:
        text += f"; {limits.get('sent_today', 0)}/{limits['daily']} today"
    if limits.get("max_connections") is not None:
        text += f"; max {limits['max_connections']} connections"
    if limits.get("breaker"):
        text += f"; breaker {limits['breaker']}"
        if limits.get("fallbacks"):
            text += f" (fallback {', '.join(limits['fallbacks'])})"
    return text


def workers(connection: redis.Redis, now: float | None = None) -> list[dict[str, Any]]:
    """rq's live worker registrations (a worker's key expires when it stops heartbeating)."""
    now = now or time.time()
    rows = []
    found = Worker.all(connection=connection, serializer=JSONSerializer)
    statuses = Presence(connection).worker_statuses([w.name for w in found])
    for worker, raw_status in zip(found, statuses, strict=True):
        heartbeat = worker.last_heartbeat.timestamp() if worker.last_heartbeat else None
        routes = raw_status["routes"] if raw_status else {}
        rows.append(
            {
                "name": worker.name,
                "hostname": worker.hostname,
                "pid": worker.pid,
                "state": worker.get_state(),
                "queues": worker.queue_names(),
                "current_job": worker.get_current_job_id(),
                "successful": worker.successful_job_count,
                "failed": worker.failed_job_count,
                "heartbeat_age": round(now - heartbeat, 1) if heartbeat else None,
                "started_at": worker.birth_date.timestamp() if worker.birth_date else None,
                "routes": [describe_route(name, route) for name, route in sorted(routes.items())],
            }
        )
    return sorted(rows, key=lambda row: str(row["name"]))


def overview(connection: redis.Redis, now: float | None = None) -> dict[str, Any]:
    """Everything the overview page shows; also its auto-refresh JSON."""
    now = now or time.time()
    store = SendStore(connection)
    per_minute = store.delivered_per_minute(CHART_MINUTES, now=now)
    counts = store.counts_per_priority()
    return {
        "generated_at": now,
        "queues": queue_numbers(connection, counts),
        "states": {state: sum(bucket[state] for bucket in counts.values()) for state in STATES},
        "delivered_last_hour": sum(count for _, count in per_minute),
        "chart": [{"t": minute, "n": count} for minute, count in per_minute],
        "workers": workers(connection, now),
    }


@dataclass
class Group:
    """One reason (``operations.group_key``) with its sends, newest first."""

    key: str
    info: dict[str, str]
    sends: list[SendRecord] = field(default_factory=list)
    sample: str | None = None

    @property
    def count(self) -> int:
        return len(self.sends)


def failure_groups(store: SendStore, flt: FailureFilter) -> tuple[list[Group], list[Unreadable]]:
    """The same groups and order as ``Operations.groups``, keeping the records (one pass over Redis);
    and the records that could not be decoded (left out of every group)."""
    groups: dict[str, Group] = {}
    records, unreadable = find(store, flt)
    for rec in records:
        key = group_key(rec)
        group = groups.get(key)
        if group is None:
            group = groups[key] = Group(key, describe_group(key))
            group.sample = rec.reason.text if rec.reason is not None else None
        group.sends.append(rec)
    return sorted(groups.values(), key=lambda g: (-g.count, g.key)), unreadable


def failed_recipients(rec: SendRecord) -> list[str]:
    return sorted(r for r, o in rec.outcomes.items() if o.status != "accepted") or sorted(rec.outcomes)

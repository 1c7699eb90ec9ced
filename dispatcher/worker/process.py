"""Worker processes: each a non-forking rq worker keeping its SMTP connections across jobs.

rq's default ``Worker`` forks a work-horse per job, so a connection opened in a job dies with it;
``SimpleWorker`` runs jobs in-process, which is what lets one ``SmtpClient`` per route serve every job.
``MailWorker`` adds: the per-process runtime, a job timeout derived from the routes' stage deadlines,
crash recovery in the maintenance loop, and QUIT at teardown (burst end, warm or cold shutdown).

The invariant kept here: **a worker runs only our job functions, and never dies of a job.** Every job is
vetted (``worker.vetting.job_refusal``) before rq touches ``job.func``; anything else — a function not
ours, pickled or undecodable data, a job hash rq cannot even load — is failed with its reason (rq's failed
registry keeps it, ``job_refused`` is logged) without running anything, and the worker takes the next job.
rq's registry maintenance runs an abandoned job's failure callback, so the same check vets the expired
entries of the started registries first (``clean_registries``).
With ``--connections K`` > 1 a worker runs up to K jobs at once: before rq starts the job it dequeued, the
worker adopts more of that queue's jobs (``worker.adoption``) and the job delivers their sends with its own.
A worker loop that ends without being asked to stop exits non-zero, so the pool restarts it.

Several of them, supervised, are ``dispatcher.worker.pool``'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import time
import zlib
from collections.abc import Sequence
from typing import Any

import redis
import structlog
from rq import Queue, SimpleWorker
from rq.exceptions import NoSuchJobError, StopRequested
from rq.job import Job
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import current_timestamp, now, utcformat
from rq.worker import WorkerStatus

from dispatcher.errors import QueueUnavailable
from dispatcher.queue.presence import Presence
from dispatcher.queue.producer import FAILURE_TTL, JOB_BATCH_SIZE, connect
from dispatcher.queue.reconcile import reconcile
from dispatcher.queue.records import text
from dispatcher.queue.recovery import reap_abandoned
from dispatcher.queue.store import SendStore
from dispatcher.settings import load_settings
from dispatcher.worker.adoption import adopt
from dispatcher.worker.backoff import RestartBackoff
from dispatcher.worker.lineage import OwnedScheduler, note_early_stop
from dispatcher.worker.lineage import stops_noted as _stop_before_start
from dispatcher.worker.runtime import Runtime
from dispatcher.worker.startup import wait_for_redis, where
from dispatcher.worker.vetting import CALLBACKS, func_label, job_refusal, job_sends

logger = structlog.get_logger("dispatcher.worker.process")
WORKER_TTL = 35
#: rq's own worker key lives worker_ttl + 60 s; an idle worker refreshes its status only between dequeues.
STATUS_TTL = WORKER_TTL + 60
SWEEP_INTERVAL = 60.0
"""How often one worker sweeps the final sends past their retention (``SendStore.sweep_final``)."""


class MailWorker(SimpleWorker):
    """A ``SimpleWorker`` owning the process's ``Runtime`` (settings and kept SMTP clients)."""

    def __init__(self, queues: Sequence[Queue], *, runtime: Runtime, **kwargs: Any) -> None:
        kwargs.setdefault("serializer", JSONSerializer)
        kwargs.setdefault("maintenance_interval", runtime.settings.maintenance_interval)
        kwargs.setdefault("worker_ttl", WORKER_TTL)
        super().__init__(queues, **kwargs)
        self.runtime = Runtime.install(runtime)
        self.runtime.worker_name = self.name
        self.runtime.should_stop = lambda: bool(self._stop_requested)
        self._limits: dict[str, dict[str, object]] = {}
        self._swept_at: float | None = None
        self.drained = False
        """Set when a burst's dequeue found every queue empty: the one end of a burst that is not a failure
        (rq also leaves its loop, as quietly, on any error of its own)."""

    @property
    def dequeue_timeout(self) -> int:
        """How long an idle worker blocks on the queues: rq's (``worker_ttl`` - 15 s, 20 s here), but never
        past the maintenance interval — rq runs maintenance only between dequeues, so an idle worker would
        otherwise recover a dead worker's sends every 20 s, not every interval."""
        return max(1, min(int(super().dequeue_timeout), int(self.maintenance_interval)))

    def _install_signal_handlers(self) -> None:
        super()._install_signal_handlers()  # type: ignore[no-untyped-call]
        if _stop_before_start:  # a stop asked for while we were starting: honour it now that rq listens
            self._stop_requested = True  # the work loop checks this before it dequeues
            for signum in STOP_SIGNALS:  # and a second signal is a cold stop, as in rq's request_stop
                signal.signal(signum, self.request_force_stop)

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run ``job`` only if it is one of ours (``job_refusal``); fail it with the reason otherwise. Before
        rq records it as started, the jobs it adopts (``worker.adoption``) and its timeout, which counts
        every send it will deliver: rq's started registry keeps the job for that timeout (+ 60 s)."""
        reason = job_refusal(job)
        if reason is not None:
            self.refuse(job, queue, reason)
            return
        own = len(job_sends(job))
        sends = own + self._adopt_for(job, queue, own)
        job.timeout = int(self.runtime.settings.job_timeout() * sends)
        try:
            super().execute_job(job, queue)
        finally:
            self.runtime.adopted.pop(job.id, None)

    def refuse(self, job: Job, queue: Queue, reason: str) -> None:
        """Fail ``job`` in rq's failed registry with ``reason``, running nothing of it: no function, no
        callback, no webhook, no rq retry. Never raises into the work loop."""
        logger.warning("job_refused", job_id=job.id, queue=queue.name, func=func_label(job), reason=reason)
        try:
            job.webhooks = []  # never call out on behalf of a job we did not write
            for attr in CALLBACKS:
                setattr(job, attr, None)
            job.retries_left = None
            self.prepare_execution(job)
            job.started_at = job.ended_at = now()
            self.handle_job_failure(job, queue, exc_string=f"refused by dispatcher: {reason}")
        except redis.RedisError:
            raise
        except Exception as exc:  # the job's own fields broke rq's bookkeeping: fail it by its id alone
            self.fail_job_id(job.id, queue, f"{reason}; {type(exc).__name__}: {exc}")
        finally:
            self.set_state(WorkerStatus.IDLE)

    def fail_job_id(self, job_id: str, queue: Queue, reason: str) -> None:
        """Fail a job rq cannot load as a ``Job``: status, reason and rq's failed registry, by id."""
        key = Job.key_for(job_id)
        with self.connection.pipeline() as pipe:
            pipe.hset(key, mapping={
                "status": "failed", "ended_at": utcformat(now()),
                "exc_info": zlib.compress(f"refused by dispatcher: {reason}".encode()),
            })  # fmt: skip
            pipe.expire(key, FAILURE_TTL)
            registry = FailedJobRegistry(queue.name, connection=self.connection, serializer=JSONSerializer)
            pipe.zadd(registry.key, {job_id: time.time() + FAILURE_TTL})
            pipe.execute()

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """rq's dequeue, except that a job whose hash rq cannot load is failed by id instead of ending
        the work loop (rq re-raises it with ``job_id`` and ``queue`` attached)."""
        while True:
            try:
                result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
                self.drained = result is None and timeout is None  # rq's burst dequeue does not block
                return result
            except (redis.RedisError, StopRequested):
                raise
            except Exception as exc:
                job_id, queue = getattr(exc, "job_id", None), getattr(exc, "queue", None)
                if not isinstance(job_id, str) or not isinstance(queue, Queue):
                    raise
                reason = f"undecodable job ({type(exc).__name__}: {str(exc)[:200]})"
                logger.warning("job_refused", job_id=job_id, queue=queue.name, func=None, reason=reason)
                self.fail_job_id(job_id, queue, reason)

    def _start_scheduler(
        self, burst: bool = False, logging_level: str | None = "INFO", *args: Any, **kwargs: Any
    ) -> None:
        """rq's own start-up of its scheduler, with a scheduler process that dies with this worker
        (``lineage``): rq builds an ``RQScheduler`` here and forks it when it wins the lock."""
        scheduler: Any = OwnedScheduler(  # rq's scheduler methods are untyped
            self.queues,
            connection=self.connection,
            logging_level=logging_level if logging_level is not None else self.log.level,
            serializer=self.serializer,
        )
        self.scheduler = scheduler
        scheduler.acquire_locks()
        if not scheduler.acquired_locks:
            return
        if burst:
            try:
                scheduler.register_birth()
                scheduler.enqueue_scheduled_jobs()
            finally:
                scheduler.release_locks()
                scheduler.register_death()
        else:
            scheduler.start()

    def clean_registries(self) -> None:
        """rq's registry maintenance, once the expired entries of each started registry are vetted: rq
        fails an abandoned job by calling its failure callback, imported by name, so a job that is not
        ours (or that rq cannot load) is failed here first, by id, with nothing imported."""
        for queue in self.queues:
            registry = StartedJobRegistry(queue.name, connection=self.connection, serializer=JSONSerializer)
            for raw in self.connection.zrangebyscore(registry.key, 0, current_timestamp()):
                entry = text(raw)
                job_id = registry.parse_job_id(entry)
                try:
                    job = Job.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
                    reason = job_refusal(job)
                except NoSuchJobError:
                    continue
                except redis.RedisError:
                    raise
                except Exception as exc:
                    reason = f"undecodable job ({type(exc).__name__}: {str(exc)[:200]})"
                if reason is not None:
                    logger.warning("job_refused", job_id=job_id, queue=queue.name, func=None, reason=reason)
                    self.connection.zrem(registry.key, entry)
                    self.fail_job_id(job_id, queue, reason)
        super().clean_registries()  # type: ignore[no-untyped-call]

    def perform_job(self, job: Job, queue: Queue) -> bool:
        try:
            return bool(super().perform_job(job, queue))
        finally:
            self.publish_status()

    def _adopt_for(self, job: Job, queue: Queue, own: int) -> int:
        """With K > 1 connections, adopt up to K - 1 more jobs of ``queue`` for ``job`` (``worker.adoption``),
        which carries ``own`` sends; how many sends they carry. Redis failing stops the adoption: the job
        runs with what it has."""
        connections = self.runtime.connections
        if connections < 2 or self._stop_requested:
            return 0
        try:
            # busy from here, as rq makes it only in prepare_execution: a warm stop signalled while an
            # idle worker adopts would otherwise raise StopRequested in the middle of the adoption
            self.set_state(WorkerStatus.BUSY)
            adopted = adopt(
                self.connection, queue, job, jobs=connections - 1, sends=connections * JOB_BATCH_SIZE - own,
                lease_seconds=self.runtime.settings.lease_seconds, worker_name=self.name,
            )  # fmt: skip
        except Exception as exc:  # never die of adopting: a job popped and not taken over is the reconciler's
            logger.exception("adoption_failed", job_id=job.id, error=str(exc))
            return 0
        self.runtime.adopted[job.id] = [(a.job_id, a.send_ids) for a in adopted]
        return sum(len(a.send_ids) for a in adopted)

    def publish_status(self, *, limits: bool = False) -> None:
        """Routes and connection states for the dashboard; expires if the worker stops refreshing it.
        ``limits`` (every maintenance round, not after every job) also reads the routes' limit states."""
        routes = self.runtime.describe()
        if limits:
            gate = self.runtime.gate(self.connection)
            self._limits = {name: gate.describe(name) for name in routes}
        for name, route in routes.items():
            route["limits"] = self._limits.get(name, {})
        status = {"routes": routes, "updated_at": time.time()}
        try:
            Presence(self.connection).publish_worker(self.name, status, STATUS_TTL)
        except (redis.RedisError, QueueUnavailable) as exc:
            logger.warning("worker_status_failed", error=str(exc))

    def run_maintenance_tasks(self) -> None:
        try:
            self.publish_status(limits=True)
            Presence(self.connection).publish_routes(self.runtime.settings.routes, ttl=STATUS_TTL)
        except (redis.RedisError, QueueUnavailable) as exc:
            logger.warning("worker_status_failed", error=str(exc))
        try:
            super().run_maintenance_tasks()  # type: ignore[no-untyped-call]
        except (StopRequested, redis.RedisError):
            raise
        except Exception as exc:  # rq's registry cleanup tripping on a job: log it, keep working
            logger.exception("maintenance_failed", error=str(exc))
        try:
            self.runtime.journal().replay(self.connection)  # first: before recovery settles those sends
        except StopRequested:
            raise
        except Exception as exc:  # a journal the worker cannot read must not stop recovery
            logger.exception("journal_replay_failed", error=str(exc))
        try:
            reap_abandoned(self.connection)
            reconcile(self.connection, older_than=self.runtime.settings.reconcile_after)
        except StopRequested:  # rq's warm stop, raised from its signal handler while idle: let it through
            raise
        except Exception as exc:  # recovery must never take the worker down with it
            logger.exception("recovery_failed", error=str(exc))
        try:
            self._sweep()
        except (redis.RedisError, QueueUnavailable) as exc:
            logger.warning("records_sweep_failed", error=str(exc))

    def _sweep(self) -> None:
        """Retention: the final sends past ``RECORD_TTL`` go, at most every ``SWEEP_INTERVAL`` seconds."""
        at = time.monotonic()
        if self._swept_at is not None and at - self._swept_at < SWEEP_INTERVAL:
            return
        self._swept_at = at
        swept = SendStore(self.connection).sweep_final(time.time())
        if swept:
            logger.info("records_swept", sends=swept)

    def teardown(self) -> None:
        self.runtime.close()
        with contextlib.suppress(redis.RedisError, QueueUnavailable):
            Presence(self.connection).forget_worker(self.name)
        try:
            super().teardown()  # type: ignore[no-untyped-call]
        except redis.RedisError as exc:  # Redis away: rq's registration expires by itself
            logger.warning("worker_teardown_incomplete", worker=self.name, error=str(exc))


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def run_one(
    queue_names: Sequence[str], *, burst: bool, redis_url: str | None = None, connections: int = 1
) -> int:
    """Run one worker in this process until it is asked to stop; 0 on a clean stop. ``redis_url`` (checked
    by the caller) overrides ``REDIS_URL``; ``connections`` is how many connections to a route a batch
    may use at once (``--connections``). Redis away at the start is waited for (``startup``).

    rq leaves its work loop on any error of its own (Redis gone in the middle of a job's bookkeeping, for
    one): then the worker is started again here, in the same process, after ``RestartBackoff``'s delay and
    once Redis answers — a lone ``worker.py`` has no supervisor to do it, and a pool's child keeps its
    place. A burst ends only when its dequeue found the queues empty (``MailWorker.drained``): rq leaves its
    loop as quietly on an error, and a burst worker used to exit 0 then with mail still queued."""
    for signum in STOP_SIGNALS:  # until rq installs its own handlers in work()
        signal.signal(signum, note_early_stop)
    settings = load_settings(need_routes=True)
    if redis_url:
        settings = dataclasses.replace(settings, redis_url=redis_url)
    connection = connect(settings.redis_url)
    queues = [Queue(name, connection=connection, serializer=JSONSerializer) for name in queue_names]
    backoff = RestartBackoff()
    while True:
        if not wait_for_redis(connection, stop=lambda: bool(_stop_before_start)):
            logger.info("worker_stopped_before_start", redis=where(connection))
            return 0
        worker = MailWorker(queues, connection=connection, runtime=Runtime(settings, connections=connections))
        logger.info(
            "worker_started",
            worker=worker.name,
            queues=list(queue_names),
            burst=burst,
            connections=connections,
            routes={name: cfg.redacted_url() for name, cfg in settings.routes.items()},
        )
        if _stop_before_start:
            logger.info("worker_stopped_before_start", worker=worker.name)
            return 0
        started = time.monotonic()
        worker.work(
            burst=burst,
            with_scheduler=True,
            logging_level=logging.getLevelName(logging.getLogger("rq").getEffectiveLevel()),
        )
        asked = worker._stop_requested or worker._shutdown_requested_date is not None
        if asked or (burst and worker.drained):
            logger.info("worker_stopped", worker=worker.name)
            return 0
        for signum in STOP_SIGNALS:  # rq's handlers belong to the worker that just ended
            signal.signal(signum, note_early_stop)
        delay = backoff.delay(time.monotonic() - started)
        logger.error("worker_loop_ended", worker=worker.name, restart_in=round(delay, 2))
        if _stopped_within(delay):
            logger.info("worker_stopped", worker=worker.name)
            return 0


def _stopped_within(seconds: float) -> bool:
    """Wait ``seconds`` unless a stop signal comes first; whether one came."""
    deadline = time.monotonic() + seconds
    while not _stop_before_start and time.monotonic() < deadline:
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
    return bool(_stop_before_start)

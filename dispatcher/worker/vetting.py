"""Which rq jobs a worker may run: ours, with arguments of the producer's shape, and nothing else.

Anyone who can write to Redis can push a job, and rq resolves a job's function by importing the name it
finds there (``Job.func``), so every job is checked here before rq touches ``job.func`` — by
``MailWorker.execute_job`` for the job rq dequeued, by ``worker.adoption`` for each job a worker adopts:
its function must be ``deliver`` or ``deliver_batch`` (``ALLOWED_FUNCTIONS``), its arguments one send id or
a list of 1..``JOB_BATCH_SIZE`` send ids, with no keyword arguments, no instance, no callbacks and no
webhooks (rq imports callbacks by name too).
"""

from __future__ import annotations

import re

from rq.exceptions import DeserializationError
from rq.job import Job

from dispatcher.queue.producer import BATCH_FUNCTION, JOB_BATCH_SIZE, JOB_FUNCTION

#: The only functions a worker runs; every other job is failed before rq imports anything by name.
ALLOWED_FUNCTIONS = (JOB_FUNCTION, BATCH_FUNCTION)
#: A send id as ``queue.store.new_send_id`` makes them.
SEND_ID = re.compile(r"mail-[0-9a-f]{32}")
CALLBACKS = ("_success_callback_name", "_failure_callback_name", "_stopped_callback_name")


def _is_send_id(value: object) -> bool:
    return isinstance(value, str) and SEND_ID.fullmatch(value) is not None


def job_refusal(job: Job) -> str | None:
    """Why ``job`` must not run on a worker, or None when it is one of ours with well-formed arguments.

    Reads only what rq decoded from the job's JSON data (rq's JSON serializer: no pickle); never resolves
    or imports the function name, never raises.
    """
    try:
        func_name, instance, args, kwargs = job.func_name, job.instance, job.args, job.kwargs
    except DeserializationError as exc:
        cause = exc.__cause__ or exc
        return f"undecodable job data ({type(cause).__name__}: {str(cause)[:200]})"
    except Exception as exc:  # a hash rq decodes into something it cannot unpack
        return f"undecodable job data ({type(exc).__name__}: {str(exc)[:200]})"
    if func_name not in ALLOWED_FUNCTIONS:
        ours = ", ".join(ALLOWED_FUNCTIONS)
        return f"function {str(func_name)[:200]!r} is not a dispatcher job function ({ours})"
    if instance is not None:
        return "the job names a method of an instance; dispatcher jobs are plain functions"
    if kwargs != {}:
        return "unexpected keyword arguments; dispatcher jobs take none"
    callbacks = [str(name)[:200] for attr in CALLBACKS if (name := getattr(job, attr, None))]
    if callbacks:
        return f"the job carries a callback ({', '.join(callbacks)}), which rq would import by name"
    if getattr(job, "webhooks", None):
        return "the job carries webhooks; dispatcher jobs have none"
    if not isinstance(args, list | tuple) or len(args) != 1:
        return "expected exactly one argument: a send id, or a list of send ids for a batch"
    (arg,) = args
    if func_name == JOB_FUNCTION:
        return None if _is_send_id(arg) else "the argument is not a send id (mail-<32 hex digits>)"
    if not isinstance(arg, list) or not 1 <= len(arg) <= JOB_BATCH_SIZE:
        return f"a batch takes a list of 1 to {JOB_BATCH_SIZE} send ids"
    if not all(_is_send_id(item) for item in arg):
        return "a batch item is not a send id (mail-<32 hex digits>)"
    return None


def job_sends(job: Job) -> list[str]:
    """The send ids of a job ``job_refusal`` let through, in order."""
    (arg,) = job.args
    return list(arg) if job.func_name == BATCH_FUNCTION else [arg]


def func_label(job: Job) -> str | None:
    """The job's function name for a log line, or None when its data does not decode."""
    try:
        return str(job.func_name)[:200]
    except Exception:
        return None

"""The producer stores the mail, not its MIME; the worker builds the same bytes on every attempt."""

from __future__ import annotations

from collections.abc import Callable

import redis
from servers import Fault, ScriptedSmtpServer

from dispatcher.delivery.attempt import Attempt
from dispatcher.queue.keys import send_key
from dispatcher.queue.producer import Producer
from dispatcher.queue.store import SendStore
from dispatcher.settings import load_settings
from dispatcher.worker.runtime import Runtime

MAIL = {"from": "Zoë <app@example.com>", "to": "ann@example.org", "subject": "Grüße", "text": "hello\n",
        "html": "<p>hello</p>", "attachments": [{"filename": "a.txt", "content_type": "text/plain",
                                                 "content": "aGk="}]}  # fmt: skip


def runtime_for(port: int) -> Runtime:
    return Runtime(load_settings({"SMTP_URL": f"smtp://127.0.0.1:{port}?tls=off"}, need_routes=True))


def attempt(connection: redis.Redis, runtime: Runtime, send_id: str) -> dict[str, object]:
    job_id = SendStore(connection).load(send_id).rq_job or send_id  # type: ignore[union-attr]
    return Attempt(runtime, connection, job_id, send_id).run()


def test_every_attempt_sends_the_bytes_the_first_one_sent(
    redis_client: redis.Redis, scripted_server: Callable[..., ScriptedSmtpServer]
) -> None:
    server = scripted_server(faults={"data_end": Fault("reply", b"451 4.3.0 try later\r\n", occurrence=1)})
    send_id = Producer(redis_client).enqueue(MAIL).id
    assert not redis_client.hexists(send_key(send_id), "raw")  # no MIME stored at enqueue
    assert redis_client.hexists(send_key(send_id), "source")  # the mail, in its record
    runtime = runtime_for(server.port)
    assert attempt(redis_client, runtime, send_id)["state"] == "deferred"
    assert attempt(redis_client, runtime, send_id)["state"] == "delivered"
    first, second = server.wait_for_messages(2)
    assert first.data == second.data and b"Message-ID: <" in first.data
    runtime.close()


def test_a_mail_the_worker_cannot_build_fails_with_its_reason(
    redis_client: redis.Redis, scripted_server: Callable[..., ScriptedSmtpServer]
) -> None:
    server = scripted_server()
    send_id = Producer(redis_client).enqueue(MAIL).id
    bad = '{"from": "not an address", "to": "ann@example.org", "text": "x"}'
    redis_client.hset(send_key(send_id), "source", bad)
    runtime = runtime_for(server.port)
    assert attempt(redis_client, runtime, send_id)["state"] == "failed"
    rec = SendStore(redis_client).load(send_id)
    assert rec is not None and "cannot be written as MIME" in rec.status()["reason"]["text"]
    assert server.connection_count == 0
    runtime.close()

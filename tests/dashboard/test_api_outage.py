"""The HTTP API tells the truth when Redis goes away in the middle of a list (issue 13, invariant 7): the
answer is 503 with one result per item — 202 for the mails that were stored, 503 for the ones that were
not — and ``first_not_enqueued``; the same request sent again with its keys stores each mail once."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from dashboard_support import AUTH, make_config
from servers import RedisServer

from dispatcher.dashboard import context, create_app
from dispatcher.mail.message import Mail
from dispatcher.queue.producer import BATCH, Enqueued, Producer
from dispatcher.queue.states import SendState
from dispatcher.queue.store import SendStore

MakeRedis = Callable[..., RedisServer]


def test_a_list_cut_by_an_outage_answers_per_item_and_a_resend_stores_each_mail_once(
    make_redis_server: MakeRedis,
) -> None:
    server = make_redis_server(appendonly=True)
    app = create_app(make_config(server.url))
    shared = app.extensions[context.EXTENSION]

    class RedisDiesAfterTheFirstBatch(Producer):
        def enqueue_valid(self, items: Sequence[Mail]) -> list[Enqueued]:  # type: ignore[override]
            done = super().enqueue_valid(items)
            server.stop()  # a real outage, between two of the producer's batches
            return done  # type: ignore[return-value]

    dying = RedisDiesAfterTheFirstBatch(shared.redis)
    dying.__dict__.update(shared.producer.__dict__)
    app.extensions[context.EXTENSION] = dataclasses.replace(shared, producer=dying)
    mails = [{"from": "app@example.com", "to": f"u{i}@example.org", "subject": f"s{i}", "text": "hi",
              "key": f"api-truth-{i}"} for i in range(BATCH + 100)]  # fmt: skip

    response = app.test_client().post("/api/v1/messages", json=mails, headers=AUTH)
    assert response.status_code == 503, response.get_data(as_text=True)
    body = response.get_json()
    assert body["first_not_enqueued"] == BATCH and body["accepted"] == BATCH
    statuses = [result["status"] for result in body["results"]]
    assert statuses == [202] * BATCH + [503] * 100
    assert all(result["enqueued"] is False for result in body["results"][BATCH:])

    server.restart()
    app.extensions[context.EXTENSION] = shared
    again = app.test_client().post("/api/v1/messages", json=mails, headers=AUTH)
    assert again.status_code == 202, again.get_data(as_text=True)
    client = server.client()
    try:
        assert SendStore(client).count_states()[SendState.QUEUED] == BATCH + 100
    finally:
        client.close()
        shared.redis.close()

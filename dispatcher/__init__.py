"""dispatcher: queue-backed mail dispatch over kept, pipelined SMTP connections.

import redis, dispatcher
r = redis.Redis.from_url("redis://127.0.0.1:6379/0")
send_id = dispatcher.enqueue({"from": "app@example.com", "to": "ann@example.org",
                              "subject": "Hi", "text": "Hello"}, connection=r)
"""

from dispatcher.errors import DispatcherError, QueueUnavailable, ValidationError
from dispatcher.mail.message import Mail
from dispatcher.queue.producer import Enqueued, Producer, enqueue, enqueue_many

__all__ = [
    "DispatcherError",
    "Enqueued",
    "Mail",
    "Producer",
    "QueueUnavailable",
    "ValidationError",
    "enqueue",
    "enqueue_many",
]

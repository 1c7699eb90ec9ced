"""What every request handler shares (config and Redis-backed services), reachable from the app."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import redis
from flask import current_app, request

from dispatcher.dashboard.config import DashboardConfig
from dispatcher.queue.operations import Operations
from dispatcher.queue.producer import Producer
from dispatcher.queue.store import SendStore

EXTENSION = "dispatcher"


@dataclass(frozen=True)
class DashboardState:
    config: DashboardConfig
    redis: redis.Redis
    store: SendStore
    operations: Operations
    producer: Producer


def state() -> DashboardState:
    """The current app's shared state (set by ``create_app``)."""
    return cast(DashboardState, current_app.extensions[EXTENSION])


def wants_json() -> bool:
    """API and ``*.json`` requests get JSON errors; pages get HTML ones."""
    return request.path.startswith("/api/") or request.path.endswith(".json")

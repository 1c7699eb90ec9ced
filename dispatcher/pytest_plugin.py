"""The pytest fixture ``dispatcher_outbox`` (registered as a pytest plugin by the package's entry point):
an open :func:`dispatcher.testing.outbox` for the test, so nothing it enqueues reaches Redis."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dispatcher.testing import Outbox, outbox


@pytest.fixture
def dispatcher_outbox() -> Iterator[Outbox]:
    with outbox() as box:
        yield box

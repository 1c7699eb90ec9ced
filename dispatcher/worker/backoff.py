"""How long to wait before a worker that stopped on its own is started again (``RestartBackoff``).

Used for a pool's child processes (``pool.Supervisor``) and for the rq work loop inside one process
(``process.run_one``): either way a worker that cannot work (Redis away) is restarted at most once every
``CAP`` seconds once its delay has grown — never a storm — and promptly after a single hiccup.
"""

from __future__ import annotations

import random


class RestartBackoff:
    """The delays before restarting one slot's child: ``BASE·2^(n-1)`` for the n-th death in a row,
    capped at ``CAP``, times ``uniform(0.5, 1)`` — the jitter keeps a pool's children from restarting in
    step, and halving at most keeps every delay below the cap at least as long as the one before. A child
    that ran ``HEALTHY`` seconds before it died starts the count again."""

    BASE = 0.5
    CAP = 5.0
    HEALTHY = 30.0

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()
        self.failures = 0

    def delay(self, ran_for: float) -> float:
        if ran_for >= self.HEALTHY:
            self.failures = 0
        self.failures += 1
        ceiling = min(self.CAP, self.BASE * 2.0 ** min(self.failures - 1, 32))
        return ceiling * self.rng.uniform(0.5, 1.0)

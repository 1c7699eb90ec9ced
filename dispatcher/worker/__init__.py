"""The worker process: per-process singletons (``runtime``), the rq worker (``process``)."""

"""What lives in Redis and rq: send states (``states``), records and their keys (``store``), the producer,
crash recovery and the operator's operations."""

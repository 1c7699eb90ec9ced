"""Route options and the shared limits around each send: rate, daily cap, connection slots, breaker and
failover (``gate`` puts them together)."""

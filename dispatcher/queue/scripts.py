"""The send store's Lua scripts: an attempt's begin and its outcome, each one atomic call (EVALSHA).

Only their text lives here; ``queue.store.SendStore`` registers them, builds their keys and arguments
and is their one caller (the keys are the store's). A script runs whole or — like a MULTI whose command
fails at run time — stops at the failing command; neither is a rollback, and both only fail on a wrong
key type or memory, never on what an attempt decides.
"""

from __future__ import annotations

BEGIN_ATTEMPT = """
local stored = redis.call('HMGET', KEYS[1], 'rq_job', 'state')
if (stored[1] or '') ~= ARGV[1] or stored[2] ~= ARGV[2] then return false end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('ZREM', KEYS[5], ARGV[3])
redis.call('ZREM', KEYS[6], ARGV[3])
redis.call('ZADD', KEYS[7], ARGV[4], ARGV[3])
redis.call('ZADD', KEYS[8], ARGV[4], ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[3])
return {redis.call('SMEMBERS', KEYS[2]), redis.call('GET', KEYS[3])}
"""
"""``SendStore.begin_attempt``: KEYS record, ledger, source, in-flight, the old and new state indexes
(overall, priority); ARGV the rq job and state the attempt loaded, send id, updated_at, lease expiry,
then the record's fields. False when the record moved on since it was loaded."""

RECORD_OUTCOME = """
local accepted = tonumber(ARGV[7])
for first = 8, 7 + accepted, 500 do
  redis.call('SADD', KEYS[3], unpack(ARGV, first, math.min(first + 499, 7 + accepted)))
end
if accepted > 0 then redis.call('EXPIRE', KEYS[3], ARGV[5]) end
if ARGV[6] ~= '' and redis.call('INCR', KEYS[9]) == 1 then redis.call('EXPIRE', KEYS[9], ARGV[6]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 8 + accepted))
if ARGV[3] == 'expire' then
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
elseif ARGV[3] == 'persist' then
  redis.call('PERSIST', KEYS[1])
  redis.call('PERSIST', KEYS[2])
end
if KEYS[5] ~= KEYS[7] then
  redis.call('ZREM', KEYS[5], ARGV[1])
  redis.call('ZREM', KEYS[6], ARGV[1])
end
redis.call('ZADD', KEYS[7], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[8], ARGV[2], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
return 1
"""
"""``SendStore.record_outcome`` / ``stage_outcome``: what an attempt's outcome writes, unconditionally
(the attempt's lease keeps every other writer off the send): the accepted recipients into the ledger
(its TTL renewed), the minute's delivery count (its TTL set when this created it), the record and its
TTL (set when final, dropped when it leaves a final state), the move between the state indexes, and
the lease dropped. KEYS record, source, ledger, in-flight, the old state indexes (overall, priority;
the new ones again when the state did not change), the new ones, the minute's delivery counter; ARGV
send id, updated_at, ``expire``/``persist``/empty, record TTL, ledger TTL, counter TTL (empty: not
delivered), how many accepted recipients follow, them, then the record's fields."""

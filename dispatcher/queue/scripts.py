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
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[3])
local ledger = redis.call('SMEMBERS', KEYS[2])
local source = false
if ARGV[5] == '1' then source = redis.call('GET', KEYS[3]) end
return {ledger, source}
"""
"""``SendStore.begin_attempt``: KEYS record, ledger, legacy source, in-flight, the index of the state the
attempt loaded; ARGV the rq job and state the attempt loaded, send id, lease expiry, ``1`` to read the
legacy source (a send enqueued before the mail moved into its record), then the record's fields. False
when the record moved on since it was loaded; else the ledger and the legacy source (nil when not
read)."""

RECORD_OUTCOME = """
local accepted = tonumber(ARGV[11])
local function add_to_ledger()
  for first = 12, 11 + accepted, 500 do
    redis.call('SADD', KEYS[2], unpack(ARGV, first, math.min(first + 499, 11 + accepted)))
  end
  if accepted > 0 then redis.call('EXPIRE', KEYS[2], ARGV[4]) end
end
local leased = true
if ARGV[7] == '1' then leased = redis.call('ZREM', KEYS[3], ARGV[1]) == 1 end
if not leased then
  local now = redis.call('HMGET', KEYS[1], 'generation', 'attempts', 'state')
  if now[1] ~= ARGV[8] or now[2] ~= ARGV[9] then
    add_to_ledger()
    return 0
  end
  if now[3] == ARGV[10] then return 1 end
  if now[3] ~= 'sending' and now[3] ~= 'unknown' then
    add_to_ledger()
    return 0
  end
  if now[3] == 'unknown' then redis.call('ZREM', KEYS[7], ARGV[1]) end
end
add_to_ledger()
redis.call('HSET', KEYS[1], unpack(ARGV, 12 + accepted))
if ARGV[3] == '1' then
  redis.call('PERSIST', KEYS[1])
  if ARGV[5] == '1' then redis.call('PERSIST', KEYS[6]) end
end
if ARGV[6] == '1' then redis.call('ZREM', KEYS[4], ARGV[1]) end
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[1])
if ARGV[7] ~= '1' then redis.call('ZREM', KEYS[3], ARGV[1]) end
return 1
"""
"""``SendStore.record_outcome`` / ``stage_outcome``: what an attempt's outcome writes — the accepted
recipients into the ledger (its TTL renewed), the record, the move into the new state's index, and the
lease dropped. A live attempt's outcome (``ARGV[7]`` = ``1``) first takes its lease away: while the lease
was there no other writer touched the send, and the rest is written unconditionally. When the lease is
gone, the record decides: it still shows this attempt (generation ``ARGV[8]``, attempt ``ARGV[9]``)
``sending``, or settled ``unknown`` by recovery meanwhile (taken out of that index, ``KEYS[7]``) — the
outcome is the truth and is written; it already holds the outcome's state (``ARGV[10]``: a retried write
that ran before) — nothing more; anything else (recovery requeued the send and a later attempt, or an
operator, moved it on) — only the accepted recipients go into the ledger, a true fact that keeps the
later attempts from sending to them, and 0 comes back. KEYS record, ledger, in-flight, the old state's
index, the new state's, the legacy source, the ``unknown`` index of the send's bucket; ARGV send id,
updated_at, ``1`` to drop a TTL an earlier version set on a final record (and ``1`` next but one when its
legacy source has one too), ledger TTL, ``1`` to take the send out of the old index (it was not
``sending`` and the state changed), ``1`` for a live attempt, its generation and attempt number, the
outcome's state, how many accepted recipients follow, them, then the record's fields. Returns 1 when the
record holds this outcome, 0 when the send had moved on."""

SWEEP_FINAL = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #ids == 0 then return {0, 0} end
local doomed, swept = {}, 0
for _, id in ipairs(ids) do
  local stored = redis.call('HMGET', ARGV[3] .. id, 'state', 'updated_at')
  if stored[1] == false then
    doomed[#doomed + 1] = ARGV[4] .. id
  elseif stored[1] == ARGV[5] and tonumber(stored[2]) <= tonumber(ARGV[1]) then
    doomed[#doomed + 1] = ARGV[3] .. id
    doomed[#doomed + 1] = ARGV[4] .. id
    swept = swept + 1
  end
end
if #doomed > 0 then redis.call('UNLINK', unpack(doomed)) end
redis.call('ZREM', KEYS[1], unpack(ids))
return {swept, #ids}
"""
"""``SendStore.sweep_final``: the oldest ``ARGV[2]`` entries of a final state's index (``KEYS[1]``, state
``ARGV[5]``) scored at or before ``ARGV[1]`` leave it; the record behind each (key prefix ``ARGV[3]``)
and its legacy source (``ARGV[4]``) are deleted (UNLINK: freed off Redis's main thread) only when the
record still is in that state and was last updated by then — an entry a stale write left behind, or a
send id made again, loses its entry, never its record. Atomic, so a send an operator retries meanwhile
(record and index entry moved in one MULTI) is either out of this index already or deleted before the
retry reads it. The record keys are built here from the ids, not declared: one call for up to
``ARGV[2]`` sends is the point (a standalone Redis; dispatcher's transactions span keys anyway).
Returns the records deleted and the entries removed."""

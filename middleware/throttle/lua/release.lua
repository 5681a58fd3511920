-- Release an operation at its terminal state and hand its slots on, in one step. Idempotent by
-- operation: a second release (or one for an operation never admitted) changes nothing else.
-- ARGV: 3 op, 4 hand-off timeout ms. Returns JSON [status, handoffs]; status: released | noop.
local op, reserve_ms = ARGV[3], tonumber(ARGV[4])
local key = k_op(op)
local handoffs = {}
local state = redis.call('HGET', key, 'state')
if state == 'done' then return cjson.encode({'noop', handoffs}) end
local scopes = scopes_of(op)
for _, s in ipairs(scopes) do
  redis.call('ZREM', k_holders(s), op)
  redis.call('ZREM', k_waiters(s), op)  -- cancelled while waiting
end
redis.call('ZREM', K_LEASES, op)
redis.call('DEL', k_msgs(op))
redis.call('HSET', key, 'state', 'done', 'released_at', NOW)
redis.call('EXPIRE', key, 86400)  -- remembered for a day, so a straggling step cannot re-acquire
if not state then return cjson.encode({'noop', handoffs}) end
redis.call('HINCRBY', K_STATS, 'releases', 1)
promote(scopes, reserve_ms, handoffs)
return cjson.encode({'released', handoffs})

-- Change a scope's limit. Raising it admits waiters at once; lowering it never interrupts holders (they
-- finish; nobody new is admitted until the scope is under the new limit). ARGV: 3 scope, 4 limit,
-- 5 hand-off timeout ms. Returns JSON handoffs.
local scope, limit, reserve_ms = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local handoffs = {}
redis.call('SADD', K_SCOPES, scope)
redis.call('HSET', K_LIMITS, scope, limit)
promote({scope}, reserve_ms, handoffs)
return cjson.encode(handoffs)

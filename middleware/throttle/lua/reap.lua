-- Act on expired leases. A hand-off whose first step never started (its sender crashed before sending)
-- is sent again; a running operation whose worker stopped renewing, or a grant with nothing to send,
-- loses its slots, which are handed on. ARGV: 3 hand-off timeout ms, 4 max leases to look at. Returns JSON [redrives, handoffs].
local reserve_ms, batch = tonumber(ARGV[3]), tonumber(ARGV[4])
local redrives, handoffs, freed = {}, {}, {}
for _, op in ipairs(redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', NOW, 'LIMIT', 0, batch)) do
  local key = k_op(op)
  local state = redis.call('HGET', key, 'state')
  local scopes = scopes_of(op)
  local has_messages = redis.call('LLEN', k_msgs(op)) > 0
  if state == 'granted' and has_messages and holds_all(op, scopes) then
    set_lease(op, scopes, NOW + max_delay_of(op) + reserve_ms)
    redis.call('HINCRBY', key, 'redrives', 1)
    redis.call('HINCRBY', K_STATS, 'redrives', 1)
    table.insert(redrives, {op, tonumber(redis.call('HGET', key, 'fence')), redis.call('LRANGE', k_msgs(op), 0, -1)})
  elseif state == 'holding' or state == 'granted' then
    for _, s in ipairs(scopes) do
      if redis.call('ZREM', k_holders(s), op) == 1 then table.insert(freed, s) end
    end
    redis.call('ZREM', K_LEASES, op)
    redis.call('HSET', key, 'state', 'lost', 'lost_at', NOW)
    redis.call('HINCRBY', K_STATS, 'reclaims', 1)
  else
    redis.call('ZREM', K_LEASES, op)
  end
end
promote(freed, reserve_ms, handoffs)
return cjson.encode({redrives, handoffs})

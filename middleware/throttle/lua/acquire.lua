-- Admit an operation, or park it in line. ARGV: 3 op, 4 mode ("start": a worker is about to run one of
-- its steps; "submit": the producer is about to send its first steps), 5 lease ms, 6 hand-off timeout
-- ms, 7 scopes JSON [[scope, limit], ...], 8 limit policy ("set": these limits are current; "keep":
-- only fill in unknown ones), 9 messages JSON [[delay ms, encoded message], ...] to park.
-- Returns JSON [status, fence, handoffs]; status: granted | held | parked | done.
-- ARGV 10-12 (optional): a guard key, its value and its expiry in ms, set (NX) before anything else: when the
-- key is already set, nothing changes and the reply is ["guarded", 0, {}, the key's value]. (The producer's
-- claim on the first steps these are: see outbox.send_first_steps.)
-- ARGV 13 (optional): a key set (for a minute) when a "submit" grants: the calls that follow this script in
-- its round trip, the send of the first steps, check it to run only then (see ThrottleStore.acquire's "then").
if ARGV[10] and ARGV[10] ~= '' then
  if not redis.call('SET', ARGV[10], ARGV[11], 'NX', 'PX', ARGV[12]) then
    return cjson.encode({'guarded', 0, {}, redis.call('GET', ARGV[10])})
  end
end
local op, mode = ARGV[3], ARGV[4]
local lease_ms, reserve_ms = tonumber(ARGV[5]), tonumber(ARGV[6])
local wanted, policy, messages = cjson.decode(ARGV[7]), ARGV[8], cjson.decode(ARGV[9])
local key = k_op(op)
local handoffs = {}

local scopes, raised = {}, {}
for _, pair in ipairs(wanted) do
  local scope, limit = pair[1], tonumber(pair[2])
  table.insert(scopes, scope)
  redis.call('SADD', K_SCOPES, scope)
  local current = tonumber(redis.call('HGET', K_LIMITS, scope) or '0')
  if current == 0 or (policy == 'set' and current ~= limit) then
    redis.call('HSET', K_LIMITS, scope, limit)
    if limit > current then table.insert(raised, scope) end
  end
end

local function park_messages()
  local max_delay = max_delay_of(op)
  for _, m in ipairs(messages) do
    redis.call('RPUSH', k_msgs(op), m[1] .. '|' .. m[2])
    if tonumber(m[1]) > max_delay then max_delay = tonumber(m[1]) end
  end
  redis.call('HSET', key, 'max_delay', max_delay)
end

local state = redis.call('HGET', key, 'state')
if state == 'waiting' then
  park_messages()  -- first, so that a raised limit admitting this very operation sends these too
end
promote(raised, reserve_ms, handoffs)  -- waiters first: a raised limit serves the line before a newcomer
if state == 'done' then
  return cjson.encode({'done', 0, handoffs})
end
if state == 'holding' or state == 'granted' then
  local own = scopes_of(op)
  if holds_all(op, own) then
    if mode == 'start' then
      set_lease(op, own, NOW + lease_ms)
      if state == 'granted' then
        redis.call('HSET', key, 'state', 'holding', 'started_at', NOW)
        redis.call('DEL', k_msgs(op))
      end
    end
    return cjson.encode({'held', tonumber(redis.call('HGET', key, 'fence')), handoffs})
  end
end
if state == 'waiting' then
  return cjson.encode({'parked', 0, handoffs})
end

-- A newcomer, or an operation that lost its slot (its lease expired): it queues like anyone else.
local partial = scopes_of(op)
if state == 'holding' or state == 'granted' then
  for _, s in ipairs(partial) do redis.call('ZREM', k_holders(s), op) end
  redis.call('ZREM', K_LEASES, op)
  promote(partial, reserve_ms, handoffs)
end
redis.call('DEL', k_msgs(op))
redis.call('HSET', key, 'scopes', cjson.encode(scopes), 'max_delay', 0, 'arrived_at', NOW)
local free = true
for _, s in ipairs(scopes) do
  if redis.call('ZCARD', k_waiters(s)) > 0 or redis.call('ZCARD', k_holders(s)) >= limit_of(s) then
    free = false
    break
  end
end
if free then
  if mode == 'start' then
    local fence = grant(op, scopes, 'holding', NOW + lease_ms)
    redis.call('HSET', key, 'started_at', NOW)
    return cjson.encode({'granted', fence, handoffs})
  end
  park_messages()  -- kept until the first step starts, so that a send lost in a crash is re-driven
  local fence = grant(op, scopes, 'granted', NOW + max_delay_of(op) + reserve_ms)
  if ARGV[13] and ARGV[13] ~= '' then redis.call('SET', ARGV[13], '1', 'PX', 60000) end
  return cjson.encode({'granted', fence, handoffs})
end
local seq = redis.call('INCR', P .. ':seq')
for _, s in ipairs(scopes) do redis.call('ZADD', k_waiters(s), seq, op) end
redis.call('HSET', key, 'state', 'waiting', 'waiting_since', NOW, 'seq', seq)
park_messages()
redis.call('HINCRBY', K_STATS, 'parks', 1)
return cjson.encode({'parked', 0, handoffs})

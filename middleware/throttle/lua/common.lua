-- Shared by every throttle script. Key names are built here from the prefix (ARGV[1]); like Dramatiq's
-- own scripts, that rules out Redis Cluster.
--
-- Per scope:      <P>:holders:<scope>  ZSET op -> lease expiry (ms), or inf while its next step is queued
--                 <P>:waiters:<scope>  ZSET op -> arrival number (FIFO)
-- Per operation:  <P>:op:<op>          HASH state (waiting|granted|holding|lost|done), scopes, fence, times
--                 <P>:msgs:<op>        LIST "delay|message" to send when it is granted (kept until it starts)
-- Global:         <P>:limits HASH scope -> limit; <P>:leases ZSET op -> expiry (what the reaper scans);
--                 <P>:fence, <P>:seq counters; <P>:scopes SET; <P>:stats HASH counters.
local P = ARGV[1]
local NOW
if ARGV[2] ~= '' then
  NOW = tonumber(ARGV[2])  -- a test clock
else
  local t = redis.call('TIME')  -- the server's clock, never a worker's
  NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local K_LIMITS = P .. ':limits'
local K_LEASES = P .. ':leases'
local K_SCOPES = P .. ':scopes'
local K_STATS = P .. ':stats'
local QUEUED = 'inf'

local function k_holders(scope) return P .. ':holders:' .. scope end
local function k_waiters(scope) return P .. ':waiters:' .. scope end
local function k_op(op) return P .. ':op:' .. op end
local function k_msgs(op) return P .. ':msgs:' .. op end

local function scopes_of(op)
  local raw = redis.call('HGET', k_op(op), 'scopes')
  if not raw then return {} end
  return cjson.decode(raw)
end

local function limit_of(scope)
  return tonumber(redis.call('HGET', K_LIMITS, scope) or '0')
end

local function holds_all(op, scopes)
  for _, s in ipairs(scopes) do
    if not redis.call('ZSCORE', k_holders(s), op) then return false end
  end
  return true
end

-- expiry: a time in ms (a step is running, or a hand-off is in flight), or QUEUED (no expiry).
local function set_lease(op, scopes, expiry)
  for _, s in ipairs(scopes) do redis.call('ZADD', k_holders(s), expiry, op) end
  if expiry == QUEUED then
    redis.call('ZREM', K_LEASES, op)
  else
    redis.call('ZADD', K_LEASES, expiry, op)
  end
end

local function max_delay_of(op)
  return tonumber(redis.call('HGET', k_op(op), 'max_delay') or '0')
end

local function grant(op, scopes, state, expiry)
  local fence = redis.call('INCR', P .. ':fence')
  for _, s in ipairs(scopes) do redis.call('ZREM', k_waiters(s), op) end
  set_lease(op, scopes, expiry)
  redis.call('HSET', k_op(op), 'state', state, 'fence', fence, 'granted_at', NOW)
  redis.call('HINCRBY', K_STATS, 'grants', 1)
  return fence
end

-- Hand free slots of these scopes to their waiters, oldest first. A waiter is granted only when it is
-- first in line in every scope it needs and each has a free slot: all or none, in one step, so no two
-- operations can each hold one scope the other waits for. Appends {op, fence, messages} to `out`.
local function promote(todo, reserve_ms, out)
  local i = 1
  while i <= #todo do
    local scope = todo[i]
    i = i + 1
    while true do
      local head = redis.call('ZRANGE', k_waiters(scope), 0, 0)[1]
      if not head then break end
      local scopes = scopes_of(head)
      if #scopes == 0 then
        redis.call('ZREM', k_waiters(scope), head)  -- its record is gone; nothing to grant
      else
        local ready = true
        for _, s in ipairs(scopes) do
          if redis.call('ZRANGE', k_waiters(s), 0, 0)[1] ~= head
            or redis.call('ZCARD', k_holders(s)) >= limit_of(s) then
            ready = false
            break
          end
        end
        if not ready then break end  -- head of the line waits; so does everyone behind it
        local fence = grant(head, scopes, 'granted', NOW + max_delay_of(head) + reserve_ms)
        redis.call('HINCRBY', K_STATS, 'handoffs', 1)
        table.insert(out, {head, fence, redis.call('LRANGE', k_msgs(head), 0, -1)})
        for _, s in ipairs(scopes) do
          if s ~= scope then table.insert(todo, s) end
        end
      end
    end
  end
end

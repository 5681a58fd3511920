-- Renew leases. ARGV: 3 "run" (steps of these operations are running here: expire in lease ms unless
-- renewed) or "queued" (their next steps are in the broker: no expiry), 4 lease ms, 5 JSON list of ops.
-- Only operations still holding are touched. Returns JSON list of the ops that no longer hold.
local mode, lease_ms, ops = ARGV[3], tonumber(ARGV[4]), cjson.decode(ARGV[5])
local lost = {}
for _, op in ipairs(ops) do
  local state = redis.call('HGET', k_op(op), 'state')
  local scopes = scopes_of(op)
  if state == 'holding' and holds_all(op, scopes) then
    if mode == 'run' then set_lease(op, scopes, NOW + lease_ms) else set_lease(op, scopes, QUEUED) end
  else
    table.insert(lost, op)
  end
end
return cjson.encode(lost)

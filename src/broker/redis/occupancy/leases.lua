-- The nodes' leases (see mod.rs). Both keys share one hash slot.
-- KEYS[1]  zset  lease -> when it runs out (ms, Redis's clock)
-- KEYS[2]  zset  lease -> when its sweep, once claimed, is given up as stalled
-- ARGV[1]  'start', 'renew', 'claim', 'done' or 'release'
-- start: ARGV[2] a new lease, ARGV[3] how long it lives from now (ms). Returns 1.
-- renew: ARGV[2] the lease, ARGV[3] as for start. Returns 1, or 0 if the lease was
--        swept (it is not renewed: the node takes a new one).
-- claim: ARGV[2] the most leases to claim, ARGV[3] how long a claim lasts (ms). Moves the
--        leases that ran out (and claims whose sweep stalled) to KEYS[2]; returns them.
-- done:  ARGV[2] a claimed lease whose rooms were all swept. Returns 1.
-- release: ARGV[2] a live lease that holds no room any more (a node shutting down).
local live, sweeping, mode = KEYS[1], KEYS[2], ARGV[1]
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

if mode == 'renew' then
  if not redis.call('ZSCORE', live, ARGV[2]) then return 0 end
  redis.call('ZADD', live, now + tonumber(ARGV[3]), ARGV[2])
  return 1
end
if mode == 'start' then
  redis.call('ZADD', live, now + tonumber(ARGV[3]), ARGV[2])
  return 1
end
if mode == 'done' then
  redis.call('ZREM', sweeping, ARGV[2])
  return 1
end
if mode == 'release' then
  redis.call('ZREM', live, ARGV[2])
  return 1
end

local max, claim = tonumber(ARGV[2]), now + tonumber(ARGV[3])
local claimed = {}
for _, lease in ipairs(redis.call('ZRANGEBYSCORE', live, '-inf', now, 'LIMIT', 0, max)) do
  redis.call('ZREM', live, lease)
  table.insert(claimed, lease)
end
for _, lease in ipairs(redis.call('ZRANGEBYSCORE', sweeping, '-inf', now, 'LIMIT', 0, max)) do
  table.insert(claimed, lease)
end
for _, lease in ipairs(claimed) do redis.call('ZADD', sweeping, claim, lease) end
return claimed

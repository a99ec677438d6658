-- Occupancy of one room (see mod.rs). KEYS[1], in the room's hash slot, is a hash:
-- node id -> the lease under which that node has members in the room, and '#' -> the
-- room's sequence number (counts every occupied and vacated).
-- ARGV[1]  'occupy' or 'vacate'
-- ARGV[2]  the node's id
-- ARGV[3]  the lease (vacate: only a field still holding this lease is taken out)
-- ARGV[4]  how long a vacant room's sequence number is kept (ms)
-- Returns the room's new sequence number if the room became occupied or vacant across
-- every node, else 0.
local key, mode, node, lease = KEYS[1], ARGV[1], ARGV[2], ARGV[3]

local function nodes()
  return redis.call('HLEN', key) - redis.call('HEXISTS', key, '#')
end

if mode == 'occupy' then
  local had = redis.call('HGET', key, node)
  redis.call('HSET', key, node, lease)
  if had or nodes() ~= 1 then return 0 end
  redis.call('PERSIST', key)
  return redis.call('HINCRBY', key, '#', 1)
end

if redis.call('HGET', key, node) ~= lease then return 0 end
redis.call('HDEL', key, node)
if nodes() ~= 0 then return 0 end
local seq = redis.call('HINCRBY', key, '#', 1)
redis.call('PEXPIRE', key, tonumber(ARGV[4]))
return seq

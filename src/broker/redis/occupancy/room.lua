-- Occupancy of one room (see mod.rs). Both keys are in the room's hash slot.
-- KEYS[1]  hash  node id -> 'LEASE|SEQ': the lease under which that node has members in
--                the room, and the sequence number its registration made (0: none); and
--                '#' -> the room's sequence number
-- KEYS[2]  hash  node id -> 'LEASE|SEQ' of that node's last taking out (for answering a
--                call sent again the same); and '!' .. node id -> the lease a sweep took
--                out (a check under it registers nothing)
-- ARGV[1]  'occupy', 'vacate', 'sweep' (a vacate of a lease that ran out, by whichever
--          node sweeps it), or 'check' (an occupy that answers 0 when the node is
--          registered under the lease already: a node checking its registrations)
-- ARGV[2]  the node's id
-- ARGV[3]  the lease (vacate and sweep: only a field still holding this lease is taken
--          out)
-- ARGV[4]  how long a vacant room's sequence number is kept (ms); a room Redis forgot
--          starts again from Redis's clock
-- ARGV[5]  how long a taking out is remembered (ms)
-- Returns the room's new sequence number if the room became occupied or vacant across
-- every node, else 0. A call sent again after it ran (its reply was lost) answers what it
-- answered the first time.
local key, done = KEYS[1], KEYS[2]
local mode, node, lease = ARGV[1], ARGV[2], ARGV[3]

local function nodes()
  return redis.call('HLEN', key) - redis.call('HEXISTS', key, '#')
end

-- The lease and sequence number of a 'LEASE|SEQ' value.
local function parse(value)
  if not value then return nil, nil end
  local held, seq = string.match(value, '^(.*)|(%d+)$')
  return held, tonumber(seq)
end

-- Sequence numbers are written with string.format: Lua's own conversion of a number this
-- large to a string would round it.
local function entry(seq)
  return lease .. '|' .. string.format('%d', seq)
end

-- The room's next sequence number: one more than the last, and at least Redis's clock
-- (ms x 1000), so that the numbers keep growing when Redis forgot the room or lost its
-- latest writes (a failover to a replica that was behind).
local function next_seq()
  local time = redis.call('TIME')
  local clock = tonumber(time[1]) * 1000000 + math.floor(tonumber(time[2]) / 1000) * 1000
  local seq = math.max(tonumber(redis.call('HGET', key, '#') or '0') + 1, clock)
  redis.call('HSET', key, '#', string.format('%d', seq))
  return seq
end

if mode == 'occupy' or mode == 'check' then
  local held, seq = parse(redis.call('HGET', key, node))
  if held == lease then
    if mode == 'check' then return 0 end
    return seq
  end
  -- A check under a lease that was swept registers nothing: the node registers its rooms
  -- again under a new lease once it finds out.
  if mode == 'check' and redis.call('HGET', done, '!' .. node) == lease then return 0 end
  -- A registration forgets this node's taking out under the same lease, which was
  -- answered already (the node settles a taking out whose reply it lost before it
  -- registers again): a later vacate that finds no registration must not answer it again.
  if parse(redis.call('HGET', done, node)) == lease then
    redis.call('HDEL', done, node)
  end
  redis.call('HSET', key, node, lease .. '|0')
  if held or nodes() ~= 1 then return 0 end
  redis.call('PERSIST', key)
  seq = next_seq()
  redis.call('HSET', key, node, entry(seq))
  return seq
end

-- This node took its members out: the room's new number if that vacated it, else 0.
local function taken_out(vacated)
  local seq = 0
  if vacated then
    seq = next_seq()
    redis.call('PEXPIRE', key, tonumber(ARGV[4]))
  end
  redis.call('HSET', done, node, entry(seq))
  if mode == 'sweep' then redis.call('HSET', done, '!' .. node, lease) end
  redis.call('PEXPIRE', done, tonumber(ARGV[5]))
  return seq
end

local held = parse(redis.call('HGET', key, node))
if held ~= lease then
  if mode == 'sweep' then
    redis.call('HSET', done, '!' .. node, lease)
    redis.call('PEXPIRE', done, tonumber(ARGV[5]))
  end
  local gone, seq = parse(redis.call('HGET', done, node))
  if gone == lease then return seq end
  -- Not registered (Redis may have lost the room's keys): nothing to say. Telling the
  -- room vacated here could be untrue: other nodes' registrations may have been lost with
  -- it while they still have members.
  return 0
end
redis.call('HDEL', key, node)
return taken_out(nodes() == 0)
